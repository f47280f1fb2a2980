"""The agent's methods on ubus (OpenWrt), with python-ubus.

``ubus call orayboxvpn status`` / ``reconnect`` run the same handler
functions as the unix-socket transport (:mod:`mpvpn.rpc`): one
implementation, two transports.  Link and session state changes are sent as
ubus events ``orayboxvpn.link`` and ``orayboxvpn.session``.

python-ubus keeps one global libubus context and serves calls from inside
``ubus.loop()``, which is not thread-safe to mix with other ubus calls.  So
one thread owns ubus: it runs ``ubus.loop(200)`` in a loop, and between
turns sends the events queued by the agent.  A method call is handed to the
agent's own loop (``post``) and answered when the agent has computed it, so
handlers never touch agent state from a second thread.

python-ubus checks each call's arguments against the declared signature:
calls through rpcd (LuCI) add ``ubus_rpc_session``, so every method
declares it, and accepts calls with no arguments too.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

log = logging.getLogger("mpvpn.ubus")

OBJECT = "orayboxvpn"
SOCKET_PATHS = ("/var/run/ubus/ubus.sock", "/var/run/ubus.sock")
CALL_TIMEOUT = 5.0


def available(module=None) -> tuple[object | None, str | None]:
    """(python-ubus module, socket path) if ubus can be used here, else (None, why)."""
    if module is None:
        try:
            import ubus as module  # python3-ubus on OpenWrt
        except ImportError:
            return None, "python-ubus is not installed"
    for path in SOCKET_PATHS:
        if os.path.exists(path):
            return module, path
    return None, "no ubusd socket"


# Arguments a method takes besides rpcd's ubus_rpc_session (blobmsg types).
ARGUMENTS = {
    "test_links": {"duration": "INT32", "peer": "STRING"},
}


class UbusTransport:
    """Publishes ``handlers`` (name -> fn(args) -> dict) as ubus object ``orayboxvpn``.

    ``post(fn)`` must run ``fn()`` on the agent's thread and return a
    ``concurrent.futures.Future``-like object with ``result(timeout)``.
    """

    def __init__(self, module, socket_path: str, handlers: dict, post):
        self._ubus = module
        self._path = socket_path
        self._handlers = handlers
        self._post = post
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: str | None = None
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name="ubus", daemon=True)

    def start(self, timeout: float = 5.0) -> bool:
        self._thread.start()
        self._ready.wait(timeout)
        return self.error is None and self._ready.is_set()

    def _method(self, name):
        fn = self._handlers[name]

        def handler(request, data):
            self.calls += 1
            args = {k: v for k, v in (data or {}).items() if k != "ubus_rpc_session"}
            try:
                result = self._post(lambda: fn(args)).result(CALL_TIMEOUT)
            except Exception as e:  # the agent stays up; the caller gets a reason
                log.error("ubus %s.%s failed: %s", OBJECT, name, e)
                result = {"error": f"{type(e).__name__}: {e}"}
            request.reply(result)

        return handler

    def _run(self) -> None:
        u = self._ubus
        try:
            u.connect(self._path)
            sig = {"ubus_rpc_session": u.BLOBMSG_TYPE_STRING}
            u.add(OBJECT, {name: {"method": self._method(name),
                                  "signature": dict(sig, **{k: getattr(u, f"BLOBMSG_TYPE_{t}")
                                                            for k, t in ARGUMENTS.get(name, {}).items()})}
                           for name in self._handlers})
        except Exception as e:
            self.error = f"cannot publish ubus object {OBJECT}: {e}"
            log.warning(self.error)
            self._ready.set()
            return
        self._ready.set()
        log.info("ubus object %s published (%s)", OBJECT, ", ".join(sorted(self._handlers)))
        try:
            while not self._stop.is_set():
                u.loop(200)
                while True:
                    try:
                        event, data = self._events.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        u.send(event, data)
                    except Exception as e:
                        log.debug("ubus send %s: %s", event, e)
        finally:
            try:
                u.disconnect()
            except Exception:
                pass

    def send_event(self, event: str, data: dict) -> None:
        """Queue a ubus event (sent by the ubus thread within 0.2 s)."""
        self._events.put((event, data))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
