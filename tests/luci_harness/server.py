"""TEST FIXTURE: serve luci-app-mpvpn's views to a browser, with ubus over HTTP.

A tiny stand-in for uhttpd + rpcd + ubusd on 127.0.0.1 (random port):

  GET  /?view=mpvpn/status&sid=<session>   tests/luci_harness/index.html
  GET  /harness/env?view=...&sid=...       what LuCI's dispatcher puts into L.env
                                           for that page: sessionid and nodespec
                                           (menu.d ACL depends of the view's node)
  GET  /harness/translations               window.TR: the catalog of the server's ``lang``
                                           (admin/translations/<lang> of LuCI), {} in English
  GET  /harness/<file>                     tests/luci_harness/<file> (the LuCI stub)
  GET  /luci-static/resources/...          luci-app-mpvpn/htdocs/luci-static/resources/...
  POST /ubus/                              ubus JSON-RPC ``call``, as uhttpd-mod-ubus
                                           answers it (ubusd.uhttpd_ubus_call): rpcd's
                                           session ACLs from the app's acl.d file, the
                                           session id added as ubus_rpc_session, the
                                           object published with the agent's own ubus
                                           code (ubusd.publish: its signatures and
                                           argument rules)

Sessions: ``server.sid("root")`` (read and write everything, LuCI's root login)
and ``server.sid("viewer")`` (a read-only login: ``list read '*'``, no write).

A backend has ``handlers() -> {method: fn(args) -> dict}`` (the agent's
methods, published as ``orayboxvpn``) or ``None`` (the agent is not running:
ubus has no such object).  Backends here: :class:`StaticBackend` (one fixed
document), :class:`DownBackend` (agent not running) and
:class:`SocketAgentBackend` (a live agent's local control socket,
``<run-dir>/orayboxvpn.sock``, see ``mpvpn.io.rpc``); ``simagent.SimAgentBackend``
runs the real in-memory engine.
"""

from __future__ import annotations

import json
import mimetypes
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from luci_harness import ubusd
from luci_harness.ubusd import ERR_ACCESS, ERR_OBJECT, ERR_PARAMS  # noqa: F401 - re-exported for tests

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
APP = REPO / "luci-app-mpvpn"
RESOURCES = APP / "htdocs" / "luci-static" / "resources"
ACL_FILE = APP / "root" / "usr" / "share" / "rpcd" / "acl.d" / "luci-app-mpvpn.json"
MENU_FILE = APP / "root" / "usr" / "share" / "luci" / "menu.d" / "luci-app-mpvpn.json"


class AgentError(Exception):
    """A handler failure the agent reports as an error (the transport answers {"error": ...})."""


def acl_grants(path: Path = ACL_FILE) -> dict[str, set[str]]:
    """ubus object -> methods granted (read or write) by an rpcd ACL file."""
    grants: dict[str, set[str]] = {}
    for entry in json.loads(path.read_text()).values():
        for mode in ("read", "write"):
            for obj, methods in entry.get(mode, {}).get("ubus", {}).items():
                grants.setdefault(obj, set()).update(methods)
    return grants


def check_acl_depends(require_groups: list[str], groups: dict[str, list[str]]) -> bool | None:
    """LuCI 24.10 dispatcher.uc check_acl_depends(): None (not allowed),
    False (read-only) or True (writable)."""
    writable = False
    for group in require_groups:
        perms = groups.get(group, [])
        if "read" not in perms and "write" not in perms:
            return None
        if "write" in perms:
            writable = True
    return writable


def nodespec(view: str, groups: dict[str, list[str]], menu: Path = MENU_FILE) -> dict:
    """L.env.nodespec of the menu node showing ``view``: satisfied when every
    node on its path passes its ACL depends, readonly when one of them grants
    read only (the dispatcher marks such nodes readonly, children inherit it)."""
    nodes = json.loads(menu.read_text())
    path = next((p for p, n in nodes.items() if n.get("action", {}).get("path") == view), None)
    if path is None:
        return {"satisfied": False}
    satisfied, readonly = True, False
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        node = nodes.get("/".join(parts[:i]))
        acl = (node or {}).get("depends", {}).get("acl")
        if not acl:
            continue
        rv = check_acl_depends(acl, groups)
        if rv is None:
            satisfied = False
        elif rv is False:
            readonly = True
    return {"path": path, "satisfied": satisfied, "readonly": readonly}


class StaticBackend:
    """Answers ``status`` with a fixed document, ``reconnect`` with {"ok": true}
    and other methods with the fixed answers in ``replies`` (method -> dict)."""

    def __init__(self, doc: dict, replies: dict | None = None):
        self.doc = doc
        self.replies = {"reconnect": {"ok": True}, "test_links": {"error": "no connected session"},
                        **(replies or {})}
        self.calls: list[tuple[str, dict]] = []  # (method, args) as the agent's handlers got them

    def handlers(self) -> dict:
        def method(name):
            def fn(args):
                self.calls.append((name, dict(args)))
                return self.doc if name == "status" else self.replies[name]
            return fn
        return {m: method(m) for m in ("status", "reconnect", "test_links")}


class DownBackend:
    """No agent: ubus has no such object."""

    def handlers(self):
        return None


class SocketAgentBackend:
    """A live agent's local control socket (one JSON line each way, see mpvpn.io.rpc),
    published on the harness's ubus with the agent's own transport.

    A missing or refusing socket is an agent failure the page sees as an error."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout

    def call(self, method: str, args: dict) -> dict:
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
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise AgentError(str(reply.get("error", "")))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    def handlers(self) -> dict:
        return {m: (lambda args, m=m: self.call(m, args)) for m in ("status", "reconnect", "test_links")}


class HarnessServer:
    """The fixture web server; use as a context manager."""

    def __init__(self, backend, acl: Path = ACL_FILE, lang: str | None = None):
        self.backend = backend
        self.lang = lang  # LuCI language code of po/<lang>/*.po to serve as window.TR; None: English
        self.grants = acl_grants(acl)
        self.sessions = ubusd.RpcdSessions([acl])
        self.bus = ubusd.PythonUbus()
        self.transport = None
        handlers = backend.handlers()
        if handlers is not None:
            self.transport = ubusd.publish(self.bus, handlers)
        self.log: list[tuple] = []  # ("call" | "denied" | "no-object", sid, object, method, args) per request
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="luci-harness", daemon=True)

    def sid(self, login: str) -> str:
        return self.sessions.sid_of[login]

    @property
    def calls(self) -> list[tuple[str, str, dict]]:
        """(object, method, arguments as ubus got them) of every call that passed the ACL."""
        return [(e[2], e[3], e[4]) for e in self.log if e[0] == "call"]

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(object, method) of every JSON-RPC call request, answered or refused."""
        return [(e[2], e[3]) for e in self.log]

    @property
    def denied(self) -> list[tuple[str, str]]:
        return [(e[2], e[3]) for e in self.log if e[0] == "denied"]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def page(self, view: str, login: str = "root", fragment: str = "") -> str:
        return f"{self.url}?view={view}&sid={self.sid(login)}" + (f"#{fragment}" if fragment else "")

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
        if self.transport is not None:
            self.transport.stop()
            self.transport = None

    def ubus(self, request: object) -> dict:
        """One JSON-RPC request -> reply object (uhttpd-mod-ubus + rpcd + python-ubus semantics)."""
        with self._lock:
            return ubusd.uhttpd_ubus_call(self.bus, self.sessions, request, self.log)

    def translations(self) -> str:
        """The script LuCI's header loads before the views: admin/translations/<lang>
        (luci-base dispatcher action_translations), i.e. ``window.TR={...};`` of every
        catalog of the language: here po/<lang>/*.po of the app, as po2lmo would
        compile them (tests/luci_i18n.py).  English: an empty catalog."""
        if self.lang is None:
            return "window.TR={};"
        from luci_i18n import PO_DIR, window_tr
        catalog: dict[str, str] = {}
        pos = sorted((PO_DIR / self.lang).glob("*.po"))
        if not pos:
            raise FileNotFoundError(f"no po/{self.lang}/*.po")
        for po in pos:
            catalog.update(window_tr(po))
        return "window.TR={" + "".join(f"{json.dumps(k)}:{json.dumps(v)}," for k, v in catalog.items()) + "};"

    def env(self, view: str, sid: str) -> dict:
        return {"sessionid": sid, "nodespec": nodespec(view, self.sessions.groups(sid))}

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
                elif p == "/harness/env":
                    q = parse_qs(urlsplit(self.path).query)
                    env = server.env(q.get("view", [""])[0], q.get("sid", [ubusd.DEFAULT_SID])[0])
                    self._send(200, json.dumps(env).encode(), "application/json")
                elif p == "/harness/translations":
                    self._send(200, server.translations().encode(), "application/javascript; charset=utf-8")
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
