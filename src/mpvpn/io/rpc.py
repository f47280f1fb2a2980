"""Local control transport for hosts without ubus: the agent's methods
(``status``, ``reconnect``, ...) on a unix stream socket under ``--run-dir``.

One request per connection, one JSON line each way::

    -> {"method": "status", "args": {}}
    <- {"ok": true, "result": {...}}      or   {"ok": false, "error": "..."}

The same handler functions are published on ubus on a router (see
``mpvpn.io.ubus``), so there is one implementation of every method and two
transports.  Requests are bounded (64 KiB), connections that stall are
dropped, and a failing handler returns an error instead of killing the agent.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import time

SOCKET_NAME = "orayboxvpn.sock"
MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 5.0

log = logging.getLogger("mpvpn.io.rpc")


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


class RpcServer:
    """Non-blocking server driven by the agent's selector."""

    def __init__(self, path: str, handlers: dict, sel: selectors.BaseSelector):
        self.path = path
        self.handlers = handlers
        self._sel = sel
        try:
            os.unlink(path)  # a stale socket of a crashed agent
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._sock.setblocking(False)
        self._clients: dict[socket.socket, tuple[bytearray, float]] = {}
        sel.register(self._sock, selectors.EVENT_READ, self._accept)

    def _accept(self, _mask) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self._clients[conn] = (bytearray(), time.monotonic())
        self._sel.register(conn, selectors.EVENT_READ, lambda m, c=conn: self._read(c))

    def _drop(self, conn: socket.socket) -> None:
        self._clients.pop(conn, None)
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _read(self, conn: socket.socket) -> None:
        buf, _t = self._clients.get(conn, (None, 0))
        if buf is None:
            return
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:
            self._drop(conn)
            return
        buf += chunk
        if len(buf) > MAX_REQUEST:
            self._reply(conn, {"ok": False, "error": "request too large"})
            return
        if b"\n" in buf:
            line = bytes(buf.split(b"\n", 1)[0])
            self._reply(conn, self.dispatch(line))

    def dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            return {"ok": False, "error": "request needs a string 'method'"}
        args = req.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": "'args' must be an object"}
        fn = self.handlers.get(req["method"])
        if fn is None:
            return {"ok": False, "error": f"unknown method {req['method']!r}; "
                                          f"known: {', '.join(sorted(self.handlers))}"}
        try:
            return {"ok": True, "result": fn(args)}
        except Exception as e:  # a handler bug must not take the agent down
            log.exception("rpc method %s failed", req["method"])
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def _reply(self, conn: socket.socket, obj: dict) -> None:
        data = (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(data)
        except OSError:
            pass
        self._drop(conn)

    def expire(self, now: float | None = None) -> None:
        """Drop clients that sent no complete request in time."""
        now = time.monotonic() if now is None else now
        for conn, (_buf, t0) in list(self._clients.items()):
            if now - t0 > CLIENT_TIMEOUT:
                self._drop(conn)

    def close(self) -> None:
        for conn in list(self._clients):
            self._drop(conn)
        try:
            self._sel.unregister(self._sock)
        except (KeyError, ValueError):
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class RpcError(Exception):
    pass


def call(path: str, method: str, args: dict | None = None, timeout: float = 3.0):
    """Call a method of the running agent; returns its result or raises RpcError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise RpcError(f"agent is not running (no socket at {path})") from None
        except OSError as e:
            raise RpcError(f"cannot reach agent at {path}: {e.strerror}") from None
        s.sendall((json.dumps({"method": method, "args": args or {}}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        raise RpcError(f"agent did not answer within {timeout:g} s") from None
    except OSError as e:  # e.g. reset: the agent closed the socket mid-call (it is restarting)
        raise RpcError(f"agent closed the connection: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise RpcError("agent sent a malformed reply") from None
    if not reply.get("ok"):
        raise RpcError(reply.get("error") or "unknown error")
    return reply.get("result")
