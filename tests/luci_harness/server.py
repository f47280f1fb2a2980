"""TEST FIXTURE: serve luci-app-mpvpn's views to a browser, with ubus over HTTP.

A tiny stand-in for uhttpd + rpcd on 127.0.0.1 (random port):

  GET  /?view=mpvpn/status          tests/luci_harness/index.html
  GET  /harness/<file>              tests/luci_harness/<file> (the LuCI stub)
  GET  /luci-static/resources/...   luci-app-mpvpn/htdocs/luci-static/resources/...
  POST /ubus/                       ubus JSON-RPC ``call``, like uhttpd-mod-ubus:
                                    checked against the app's rpcd ACL file
                                    (-32002 "Access denied" for anything it does
                                    not grant), then answered by a backend

A backend has ``call(obj, method, args) -> dict`` and raises
:class:`ObjectNotFound` (no such ubus object: the agent is not running,
JSON-RPC error -32000) or :class:`UbusStatus` (a non-zero ubus status).
Backends here: :class:`StaticBackend` (one fixed document),
:class:`DownBackend` (agent not running) and :class:`SocketAgentBackend`
(a live agent's local control socket, ``<run-dir>/orayboxvpn.sock``, see
``mpvpn.rpc``); ``simagent.SimAgentBackend`` runs the real in-memory engine.
"""

from __future__ import annotations

import json
import mimetypes
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
APP = REPO / "luci-app-mpvpn"
RESOURCES = APP / "htdocs" / "luci-static" / "resources"
ACL_FILE = APP / "root" / "usr" / "share" / "rpcd" / "acl.d" / "luci-app-mpvpn.json"

# uhttpd-mod-ubus JSON-RPC errors
ERR_OBJECT = (-32000, "Object not found")
ERR_ACCESS = (-32002, "Access denied")
ERR_METHOD = (-32601, "Method not found")
ERR_PARSE = (-32700, "Parse error")


class ObjectNotFound(Exception):
    """The ubus object does not exist (the agent is not running)."""


class UbusStatus(Exception):
    """A ubus call that returned a non-zero status (UBUS_STATUS_*)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def acl_grants(path: Path = ACL_FILE) -> dict[str, set[str]]:
    """ubus object -> methods granted (read or write) by an rpcd ACL file."""
    grants: dict[str, set[str]] = {}
    for entry in json.loads(path.read_text()).values():
        for mode in ("read", "write"):
            for obj, methods in entry.get(mode, {}).get("ubus", {}).items():
                grants.setdefault(obj, set()).update(methods)
    return grants


class StaticBackend:
    """Answers ``status`` with a fixed document, ``reconnect`` with {} and
    other methods with the fixed answers in ``replies`` (method -> dict)."""

    def __init__(self, doc: dict, obj: str = "orayboxvpn", replies: dict | None = None):
        self.doc = doc
        self.obj = obj
        self.replies = {"reconnect": {}, **(replies or {})}

    def call(self, obj: str, method: str, args: dict) -> dict:
        if obj != self.obj:
            raise ObjectNotFound(obj)
        if method == "status":
            return self.doc
        if method in self.replies:
            return self.replies[method]
        raise UbusStatus(3)  # UBUS_STATUS_METHOD_NOT_FOUND


class DownBackend:
    """No agent: ubus has no such object."""

    def call(self, obj: str, method: str, args: dict) -> dict:
        raise ObjectNotFound(obj)


class SocketAgentBackend:
    """A live agent's local control socket (one JSON line each way, see mpvpn.rpc).

    A missing or refusing socket counts as "object not found", which is what
    ubus reports on a router when the agent is not running."""

    def __init__(self, path: str, obj: str = "orayboxvpn", timeout: float = 5.0):
        self.path = path
        self.obj = obj
        self.timeout = timeout

    def call(self, obj: str, method: str, args: dict) -> dict:
        if obj != self.obj:
            raise ObjectNotFound(obj)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.path)
                s.sendall(json.dumps({"method": method, "args": args or {}}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise ObjectNotFound(obj) from None
        except socket.timeout:
            raise UbusStatus(7) from None  # UBUS_STATUS_TIMEOUT
        try:
            reply = json.loads(buf)
        except ValueError:
            raise UbusStatus(5) from None  # UBUS_STATUS_NO_DATA
        if not reply.get("ok"):
            err = str(reply.get("error", ""))
            raise UbusStatus(3 if "unknown method" in err.lower() else 9)  # METHOD_NOT_FOUND / UNKNOWN_ERROR
        result = reply.get("result")
        return result if isinstance(result, dict) else {}


class HarnessServer:
    """The fixture web server; use as a context manager."""

    def __init__(self, backend, acl: Path = ACL_FILE):
        self.backend = backend
        self.grants = acl_grants(acl)
        self.calls: list[tuple[str, str, dict]] = []  # every ubus call that passed the ACL
        self.denied: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="luci-harness", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self) -> "HarnessServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()  # waits for serve_forever(): only once it runs
            self._thread.join()
        self._httpd.server_close()

    def ubus(self, request: object) -> dict:
        """One JSON-RPC request -> reply object (uhttpd-mod-ubus semantics)."""
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
            return {"jsonrpc": "2.0", "id": None, "error": dict(zip(("code", "message"), ERR_PARSE))}
        rid = request.get("id")

        def error(err):
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": err[0], "message": err[1]}}

        params = request.get("params")
        if request.get("method") != "call" or not isinstance(params, list) or len(params) != 4:
            return error(ERR_METHOD)
        _sid, obj, method, args = params
        if method not in self.grants.get(obj, ()):
            with self._lock:
                self.denied.append((obj, method))
            return error(ERR_ACCESS)
        with self._lock:
            self.calls.append((obj, method, args))
            try:
                result = self.backend.call(obj, method, args if isinstance(args, dict) else {})
            except ObjectNotFound:
                return error(ERR_OBJECT)
            except UbusStatus as e:
                return {"jsonrpc": "2.0", "id": rid, "result": [e.code]}
        return {"jsonrpc": "2.0", "id": rid, "result": [0, result]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _file(self, base: Path, rel: str) -> None:
                path = (base / rel).resolve()
                if base.resolve() not in path.parents or not path.is_file():
                    self._send(404, b"not found\n", "text/plain")
                    return
                ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                if ctype.startswith("text/") or ctype.endswith("javascript"):
                    ctype += "; charset=utf-8"
                self._send(200, path.read_bytes(), ctype)

            def do_GET(self):
                p = urlsplit(self.path).path
                if p in ("/", "/index.html"):
                    self._file(HERE, "index.html")
                elif p.startswith("/harness/"):
                    self._file(HERE, p[len("/harness/"):])
                elif p.startswith("/luci-static/resources/"):
                    self._file(RESOURCES, p[len("/luci-static/resources/"):])
                else:
                    self._send(404, b"not found\n", "text/plain")

            def do_POST(self):
                if urlsplit(self.path).path.rstrip("/") != "/ubus":
                    self._send(404, b"not found\n", "text/plain")
                    return
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    request = json.loads(self.rfile.read(n))
                except ValueError:
                    request = None
                reply = server.ubus(request)
                self._send(200, json.dumps(reply).encode(), "application/json")

        return Handler
