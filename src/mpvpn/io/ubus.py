"""The agent's methods on ubus (OpenWrt): object ``orayboxvpn``.

``ubus call orayboxvpn status`` / ``reconnect`` / ``test_links`` run the same
handler functions as the unix-socket transport (:mod:`mpvpn.io.rpc`): one
implementation, two transports.  Link and session state changes are sent as
ubus events ``orayboxvpn.link`` and ``orayboxvpn.session``.

Every argument is optional (:data:`METHODS` lists each method's arguments and
their blobmsg types); ``ubus_rpc_session``, which uhttpd adds to every call
from LuCI, is accepted everywhere and not passed on.  An unknown argument or
one of the wrong type is answered with ``UBUS_STATUS_INVALID_ARGUMENT``
before the handler runs.  python-ubus cannot do this (its ``test_policies``
requires every declared argument, see :mod:`mpvpn.io.ubusmsg`), so the agent
speaks ubusd's protocol itself over the ubusd socket, with the stdlib.

One thread owns the ubusd connection.  A method call is handed to the
agent's own loop (``post``) and answered when the agent has computed it, so
handlers never touch agent state from a second thread.  When ubusd goes away
(a restart: the socket reads EOF), the thread logs it, reconnects with
backoff (0.25 s doubling to 5 s) and publishes the object again; the object
is back within a second of ubusd accepting connections, as libubus's
``ubus_auto_connect`` would do for a C daemon.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time

from mpvpn.io import logsink
from mpvpn.io import ubusmsg as um

log = logging.getLogger("mpvpn.io.ubus")

OBJECT = "orayboxvpn"
SOCKET_PATHS = ("/var/run/ubus/ubus.sock", "/var/run/ubus.sock")
CALL_TIMEOUT = 5.0
RPC_SESSION = "ubus_rpc_session"
BACKOFF = (0.25, 5.0)
_NUMBER = (um.T_INT32, um.T_INT64, um.T_INT16, um.T_DOUBLE)

# method -> argument -> accepted blobmsg types (the first is the one declared
# in the object's signature, what `ubus -v list orayboxvpn` shows).  Every
# argument is optional; the handler supplies the default.
METHODS: dict[str, dict[str, tuple[int, ...]]] = {
    "status": {},
    "reconnect": {},
    "test_links": {"duration": _NUMBER, "peer": (um.T_STRING,)},
}


def find_socket(paths=SOCKET_PATHS) -> str | None:
    """The ubusd socket of this host, or None (no ubus: a plain Linux host)."""
    for path in paths:
        if os.path.exists(path):
            return path
    return None


def check_args(method: str, fields: list[tuple[str, int, object]],
               methods=METHODS) -> tuple[dict | None, str | None]:
    """(arguments for the handler, None) or (None, why the call is refused)."""
    spec = methods[method]
    args = {}
    for name, btype, value in fields:
        if name == RPC_SESSION:
            if btype != um.T_STRING:
                return None, f"{RPC_SESSION} must be a string"
            continue
        if name not in spec:
            known = ", ".join(sorted(spec)) or "none"
            return None, f"unknown argument {name!r} (arguments of {method}: {known})"
        if btype not in spec[name]:
            return None, f"{name} must be a {um.TYPE_NAMES[spec[name][0]]}, not a {um.TYPE_NAMES.get(btype, btype)}"
        args[name] = value
    return args, None


class ConnectionLost(Exception):
    pass


class Connection:
    """One client connection to ubusd (the part of libubus the agent needs:
    ``ubus_connect``, ``ubus_add_object``, replies, ``ubus_send_event``)."""

    def __init__(self, path: str, timeout: float = CALL_TIMEOUT):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._reader = um.Reader()
        self._backlog: list[um.Message] = []
        self._seq = 0
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            hello = self._next(timeout)
            if hello.type != um.HELLO or hello.peer <= um.CLIENT_ID_CHANNEL:
                raise ConnectionLost("ubusd did not say hello")
            self.local_id = hello.peer
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _fill(self, timeout: float) -> list[um.Message]:
        r, _, _ = select.select([self._sock], [], [], max(timeout, 0))
        if not r:
            return []
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return []
        except OSError as e:
            raise ConnectionLost(e.strerror or str(e)) from None
        if not data:
            raise ConnectionLost("ubusd closed the connection")
        return self._reader.feed(data)

    def _next(self, timeout: float) -> um.Message:
        end = time.monotonic() + timeout
        while not self._backlog:
            left = end - time.monotonic()
            if left <= 0:
                raise ConnectionLost("ubusd did not answer")
            self._backlog.extend(self._fill(left))
        return self._backlog.pop(0)

    def receive(self, timeout: float) -> list[um.Message]:
        """Messages from ubusd within ``timeout`` (raises ConnectionLost on EOF)."""
        if not self._backlog:
            self._backlog.extend(self._fill(timeout))
        out, self._backlog = self._backlog, []
        return out

    def _request(self, mtype: int, peer: int, *attrs: bytes) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        self._send(um.pack(mtype, self._seq, peer, *attrs))
        return self._seq

    def add_object(self, name: str, methods: dict[str, dict[str, int]], timeout: float = CALL_TIMEOUT) -> int:
        """Publish ``name``; returns its object id (ubusd answers DATA{OBJID}, then STATUS)."""
        seq = self._request(um.ADD_OBJECT, 0, um.string(um.ATTR_OBJPATH, name), um.signature(methods))
        objid, end, later = None, time.monotonic() + timeout, []
        try:
            while True:
                m = self._next(max(end - time.monotonic(), 0))
                if m.seq != seq or m.type not in (um.DATA, um.STATUS):
                    later.append(m)
                elif m.type == um.DATA:
                    objid = m.u32(um.ATTR_OBJID)
                else:
                    status = m.u32(um.ATTR_STATUS)
                    if status:
                        raise ConnectionLost(f"ubusd refused object {name} (ubus status {status})")
                    if objid is None:
                        raise ConnectionLost(f"ubusd gave no id for object {name}")
                    return objid
        finally:
            self._backlog[:0] = later

    def reply(self, invoke: um.Message, objid: int, status: int, data: dict | None = None) -> None:
        """``ubus_send_reply`` (DATA, if any) and ``ubus_complete_deferred_request`` (STATUS)."""
        if data is not None:
            self._send(um.pack(um.DATA, invoke.seq, invoke.peer, um.u32(um.ATTR_OBJID, objid),
                               um.blob_attr(um.ATTR_DATA, um.encode_table(data))))
        self._send(um.pack(um.STATUS, invoke.seq, invoke.peer, um.u32(um.ATTR_STATUS, status),
                           um.u32(um.ATTR_OBJID, objid)))

    def send_event(self, event: str, data: dict) -> None:
        """``ubus_send_event``: invoke ``send`` on ubusd's event object; the
        STATUS answer arrives later and is ignored like any unknown reply."""
        self._request(um.INVOKE, um.SYSTEM_OBJECT_EVENT, um.u32(um.ATTR_OBJID, um.SYSTEM_OBJECT_EVENT),
                      um.string(um.ATTR_METHOD, "send"),
                      um.blob_attr(um.ATTR_DATA, um.encode_value("id", event) + um.encode_value("data", data)))


class UbusTransport:
    """Publishes ``handlers`` (name -> fn(args) -> dict) as ubus object ``orayboxvpn``
    and keeps it published across ubusd restarts.

    ``post(fn)`` must run ``fn()`` on the agent's thread and return a
    ``concurrent.futures.Future``-like object with ``result(timeout)``.
    ``socket_path`` None means: look for ubusd's socket at every (re)connect.
    """

    def __init__(self, handlers: dict, post, socket_path: str | None = None,
                 methods=METHODS, backoff=BACKOFF):
        unknown = set(handlers) - set(methods)
        if unknown:
            raise ValueError(f"no argument list for ubus method(s) {', '.join(sorted(unknown))}")
        self._path = socket_path
        self._handlers = handlers
        self._methods = methods
        self._post = post
        self._backoff = backoff
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._published = threading.Event()
        self.calls = 0
        self.publishes = 0
        self.error: str | None = None  # why the object is not published now, if it is not
        self._thread = threading.Thread(target=self._run, name="ubus", daemon=True)

    @property
    def published(self) -> bool:
        return self._published.is_set()

    def start(self, timeout: float = 5.0) -> bool:
        """Start the ubus thread; True once the object is published (it keeps
        trying in the background if not yet)."""
        self._thread.start()
        return self._published.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def send_event(self, event: str, data: dict) -> None:
        """Queue a ubus event (sent by the ubus thread within 0.2 s; dropped
        while ubusd is away: events are news, not state)."""
        if self.published:
            self._events.put((event, data))

    # -- the ubus thread ------------------------------------------------------

    def _connect(self) -> tuple[Connection, int]:
        path = self._path or find_socket()
        if path is None:
            raise ConnectionLost("no ubusd socket")
        conn = Connection(path)
        try:
            sig = {m: {a: types[0] for a, types in self._methods[m].items()} for m in self._handlers}
            return conn, conn.add_object(OBJECT, sig)
        except BaseException:
            conn.close()
            raise

    def _run(self) -> None:
        delay, down_since = self._backoff[0], None
        while not self._stop.is_set():
            try:
                conn, objid = self._connect()
            except (OSError, ConnectionLost, um.BlobError) as e:
                why = getattr(e, "strerror", None) or str(e)
                if down_since is None:  # once per outage, whatever the retries say
                    log.warning("cannot publish ubus object %s: %s; retrying", OBJECT, why)
                elif self.error != why:
                    log.debug("cannot publish ubus object %s: %s; retrying", OBJECT, why)
                self.error = why
                if down_since is None:
                    down_since = time.monotonic()
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            self.publishes += 1
            self.error = None
            if self.publishes == 1:
                log.info("ubus object %s published on %s (%s)", OBJECT, conn.path, ", ".join(sorted(self._handlers)))
            else:
                log.log(logsink.NOTICE, "ubus object %s re-published after %.1f s without ubusd", OBJECT,
                            time.monotonic() - (down_since or time.monotonic()))
            delay, down_since = self._backoff[0], None
            self._published.set()
            try:
                self._serve(conn, objid)
            except (OSError, ConnectionLost, um.BlobError) as e:
                why = getattr(e, "strerror", None) or str(e)
                self.error = f"lost connection to ubusd: {why}"
                log.warning("lost connection to ubusd (%s); object %s is gone until it is back", why, OBJECT)
                down_since = time.monotonic()
            finally:
                self._published.clear()
                conn.close()

    def _serve(self, conn: Connection, objid: int) -> None:
        while not self._stop.is_set():
            for m in conn.receive(0.2):
                if m.type == um.INVOKE:
                    self._invoke(conn, objid, m)
                # STATUS/DATA answers to our events, pings of nobody: nothing to do
            while True:
                try:
                    event, data = self._events.get_nowait()
                except queue.Empty:
                    break
                conn.send_event(event, data)

    def _invoke(self, conn: Connection, objid: int, m: um.Message) -> None:
        method = m.string(um.ATTR_METHOD)
        if m.u32(um.ATTR_OBJID) != objid:
            return conn.reply(m, objid, um.STATUS_NOT_FOUND)
        if method not in self._handlers:
            return conn.reply(m, objid, um.STATUS_METHOD_NOT_FOUND)
        raw = m.attrs.get(um.ATTR_DATA)
        if raw is None:  # libubus ubus_process_invoke does the same
            return conn.reply(m, objid, um.STATUS_INVALID_ARGUMENT)
        try:
            args, why = check_args(method, um.decode_fields(raw), self._methods)
        except um.BlobError as e:
            args, why = None, str(e)
        no_reply = bool(m.attrs.get(um.ATTR_NO_REPLY, b"\0")[:1] != b"\0")
        if args is None:
            log.info("ubus %s.%s refused: %s", OBJECT, method, why)
            if not no_reply:
                conn.reply(m, objid, um.STATUS_INVALID_ARGUMENT)
            return
        self.calls += 1
        fn = self._handlers[method]
        try:
            result = self._post(lambda: fn(args)).result(CALL_TIMEOUT)
        except Exception as e:  # the agent stays up; the caller gets a reason
            log.error("ubus %s.%s failed: %s", OBJECT, method, e)
            result = {"error": f"{type(e).__name__}: {e}"}
        if no_reply:
            return
        try:
            conn.reply(m, objid, um.STATUS_OK, result if isinstance(result, dict) else {"result": result})
        except um.BlobError as e:  # e.g. over ubusd's 1 MiB message limit: an error, not a reconnect
            log.error("ubus %s.%s: cannot send the answer: %s", OBJECT, method, e)
            conn.reply(m, objid, um.STATUS_UNKNOWN_ERROR)
