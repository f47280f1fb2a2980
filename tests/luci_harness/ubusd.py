"""TEST FIXTURE: ubus as the LuCI pages reach the agent on a router, strict like the real programs.

Stand-ins, each mirroring a real source:

:class:`PythonUbus`
    the module API of python-ubus 0.1.2 (OpenWrt's ``python3-ubus``, CZ-NIC
    python-ubus, ``ubus_python.c``) plus the bus it talks to
    (``connect``, ``add`` with ``{"method", "signature"}`` per method,
    ``loop``, ``send``); ``test_luci`` checks it against the real python-ubus
    on a real ubusd when OpenWrt's userland is built under /opt/owrt.  A call is checked the way ``ubus_python_method_handler``
    does: a method the object lacks is ``UBUS_STATUS_METHOD_NOT_FOUND`` (3,
    libubus ``ubus_process_invoke``); arguments that do not match the declared
    signature are ``UBUS_STATUS_INVALID_ARGUMENT`` (2, ``test_policies``: every
    declared field must be present with its blobmsg type, no undeclared field
    may be present); a handler that raises is ``UBUS_STATUS_UNKNOWN_ERROR`` (9).
    The handler runs on the thread that is inside ``loop()``, as in python-ubus.

:func:`publish` / :class:`AgentObject`
    the agent's ``orayboxvpn`` object, published with the agent's own ubus
    code: through python-ubus (``mpvpn.io.ubus.UbusTransport`` on
    :class:`PythonUbus`) or, for the transport that speaks ubusd's protocol
    itself, the steps of its ``UbusTransport._invoke`` with its own
    ``check_args`` and ``METHODS``.

:class:`RpcdSessions`
    rpcd's sessions and ACLs (rpcd ``session.c``): a login's ``read`` / ``write``
    group lists (``/etc/config/rpcd``) decide which parts of each
    ``/usr/share/rpcd/acl.d/*.json`` group a session gets
    (``rpc_login_test_permission``: fnmatch patterns, ``!`` negations first,
    write implies read; ``rpc_login_setup_acl_file`` / ``_acl_scope``: array
    notation grants the permission name as function, table notation the listed
    functions; every granted group also lands in the ``access-group`` scope).
    The default session ``000...`` gets only the ``unauthenticated`` group.
    ``access()`` is ``rpc_session_acl_allowed`` (fnmatch on object and function).

:func:`uhttpd_ubus_call`
    uhttpd-mod-ubus's legacy JSON-RPC ``call`` (uhttpd ``ubus.c``,
    ``uh_ubus_handle_request_object`` / ``uh_ubus_send_request`` /
    ``uh_ubus_request_cb``): object lookup first (-32000), then rpcd's
    ``session access`` (-32002), a ``ubus_rpc_session`` sent by the client is
    refused (-32602), the session id is added as ``ubus_rpc_session`` to every
    call, and the answer is ``result: [status]`` or ``[status, {data}]`` (data
    only when the reply is not empty).
"""

from __future__ import annotations

import fnmatch
import json
import queue
import threading
from pathlib import Path

DEFAULT_SID = "0" * 32

# libubus status codes (ubusmsg.h)
UBUS_STATUS_OK = 0
UBUS_STATUS_INVALID_ARGUMENT = 2
UBUS_STATUS_METHOD_NOT_FOUND = 3
UBUS_STATUS_NOT_FOUND = 4
UBUS_STATUS_TIMEOUT = 7
UBUS_STATUS_UNKNOWN_ERROR = 9

# uhttpd ubus.c json_errors[]
ERR_PARSE = (-32700, "Parse error")
ERR_REQUEST = (-32600, "Invalid request")
ERR_METHOD = (-32601, "Method not found")
ERR_PARAMS = (-32602, "Invalid parameters")
ERR_OBJECT = (-32000, "Object not found")
ERR_ACCESS = (-32002, "Access denied")
ERR_TIMEOUT = (-32003, "ubus request timed out")


def blobmsg_type(value) -> int:
    """The blobmsg type libubox's blobmsg_add_json_element gives a JSON value."""
    if value is None:
        return PythonUbus.BLOBMSG_TYPE_UNSPEC
    if isinstance(value, bool):
        return PythonUbus.BLOBMSG_TYPE_BOOL
    if isinstance(value, int):
        return PythonUbus.BLOBMSG_TYPE_INT32 if -2**31 <= value < 2**31 else PythonUbus.BLOBMSG_TYPE_INT64
    if isinstance(value, float):
        return PythonUbus.BLOBMSG_TYPE_DOUBLE
    if isinstance(value, str):
        return PythonUbus.BLOBMSG_TYPE_STRING
    if isinstance(value, list):
        return PythonUbus.BLOBMSG_TYPE_ARRAY
    return PythonUbus.BLOBMSG_TYPE_TABLE


def test_policies(signature: dict[str, int], args: dict) -> bool:
    """python-ubus ubus_python.c test_policies(): every argument must be
    declared (with its type unless the declared type is UNSPEC), and the
    number of matched arguments must equal the number of declared fields."""
    passed = 0
    for name, value in args.items():
        if name not in signature:
            return False
        passed += 1
        declared = signature[name]
        if declared != PythonUbus.BLOBMSG_TYPE_UNSPEC and declared != blobmsg_type(value):
            return False
    return passed == len(signature)


test_policies.__test__ = False  # not a pytest test


class ObjectNotFound(Exception):
    """ubus has no object of that name (ubus_lookup_id fails)."""


class PythonUbus:
    """python-ubus 0.1.2's module API (``import ubus``) and the bus behind it; see the module docstring."""

    BLOBMSG_TYPE_UNSPEC = 0
    BLOBMSG_TYPE_ARRAY = 1
    BLOBMSG_TYPE_TABLE = 2
    BLOBMSG_TYPE_STRING = 3
    BLOBMSG_TYPE_INT64 = 4
    BLOBMSG_TYPE_INT32 = 5
    BLOBMSG_TYPE_INT16 = 6
    BLOBMSG_TYPE_INT8 = 7
    BLOBMSG_TYPE_BOOL = 7  # blobmsg.h: BLOBMSG_TYPE_BOOL = BLOBMSG_TYPE_INT8
    BLOBMSG_TYPE_DOUBLE = 8
    BLOBMSG_TYPE_LAST = 8

    def __init__(self):
        self._objects: dict[str, dict] = {}
        self._native: dict[str, object] = {}
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._connected = False
        self.events: list[tuple[str, dict]] = []
        self.invoked: list[tuple[str, str, dict]] = []  # every call that reached a handler

    # --- the module API the agent uses ----------------------------------------------------

    def connect(self, socket_path: str = "/var/run/ubus/ubus.sock") -> bool:
        if self._connected:
            raise RuntimeError("You are already connected to ubus.")
        self._connected = True
        return True

    def disconnect(self, deregister: bool = True) -> None:
        if not self._connected:
            raise RuntimeError("You are not connected to ubus.")
        self._connected = False
        if deregister:
            self._objects.clear()

    def add(self, object_name, methods) -> None:
        if not self._connected:
            raise RuntimeError("You are not connected to ubus.")
        ok = isinstance(object_name, str) and isinstance(methods, dict)
        for name, value in (methods.items() if ok else ()):  # test_methods_argument()
            sig = value.get("signature") if isinstance(value, dict) else None
            ok = ok and isinstance(name, str) and isinstance(value, dict) and len(value) == 2 \
                and isinstance(sig, dict) and callable(value.get("method")) \
                and all(isinstance(k, str) and isinstance(t, int) and 0 <= t <= self.BLOBMSG_TYPE_LAST
                        for k, t in sig.items())
        if not ok:
            raise TypeError("Incorrect method arguments!")
        if object_name in self._objects:
            raise RuntimeError("ubus error occured: Invalid argument")
        self._objects[object_name] = {k: {"method": v["method"], "signature": dict(v["signature"])}
                                      for k, v in methods.items()}

    def loop(self, timeout: int = -1) -> None:
        """Serve calls for up to ``timeout`` ms (on this thread, as uloop does)."""
        if not self._connected:
            raise RuntimeError("You are not connected to ubus.")
        try:
            item = self._calls.get(timeout=None if timeout < 0 else timeout / 1000)
        except queue.Empty:
            return
        while item is not None:
            self._serve(*item)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                item = None

    def send(self, event: str, data) -> bool:
        if not self._connected:
            raise RuntimeError("You are not connected to ubus.")
        self.events.append((event, json.loads(json.dumps(data))))
        return True

    # --- the bus side: what a caller (ubus CLI, uhttpd) gets ------------------------------

    def add_native(self, name: str, serve) -> None:
        """An object published by a client that speaks ubusd's protocol itself
        (no python-ubus): ``serve(method, msg) -> (status, reply or None)``."""
        if name in self._objects or name in self._native:
            raise RuntimeError("ubus error occured: Invalid argument")
        self._native[name] = serve

    def remove_native(self, name: str) -> None:
        self._native.pop(name, None)

    def has_object(self, name: str) -> bool:
        return name in self._objects or name in self._native

    def signatures(self, name: str) -> dict[str, dict[str, int]]:
        return {m: dict(v["signature"]) for m, v in self._objects[name].items()}

    def invoke(self, obj: str, method: str, msg: dict, timeout: float = 10.0) -> tuple[int, dict | None]:
        """ubus_invoke(): (status, reply or None)."""
        if obj in self._native:
            msg = json.loads(json.dumps(msg))
            status, reply = self._native[obj](method, msg)
            if status == UBUS_STATUS_OK:
                self.invoked.append((obj, method, msg))
            return status, (json.loads(json.dumps(reply)) if reply is not None else None)
        if obj not in self._objects:
            raise ObjectNotFound(obj)
        box = {"done": threading.Event(), "status": UBUS_STATUS_TIMEOUT, "reply": None}
        self._calls.put((obj, method, json.loads(json.dumps(msg)), box))
        box["done"].wait(timeout)
        return box["status"], box["reply"]

    def _serve(self, obj: str, method: str, msg: dict, box: dict) -> None:
        methods = self._objects.get(obj, {})
        if method not in methods:
            box["status"] = UBUS_STATUS_METHOD_NOT_FOUND
        elif not test_policies(methods[method]["signature"], msg):
            box["status"] = UBUS_STATUS_INVALID_ARGUMENT
        else:
            class Request:  # python-ubus's ubus.__ResponseHandler
                def reply(self_, data):
                    if not isinstance(data, dict):  # blobmsg_add_json_from_string wants an object
                        raise TypeError("Failed to create json for ubus.")
                    box["reply"] = json.loads(json.dumps(data))
                    return True

            self.invoked.append((obj, method, msg))
            try:
                methods[method]["method"](Request(), msg)
                box["status"] = UBUS_STATUS_OK
            except Exception:
                box["status"] = UBUS_STATUS_UNKNOWN_ERROR
        box["done"].set()


# --- rpcd sessions and ACLs --------------------------------------------------------------------

# /etc/config/rpcd login sections: LuCI's root login (read and write '*') and a
# read-only one as an administrator adds it (list read '*', no write)
LOGINS = {
    "root": {"read": ["*"], "write": ["*"]},
    "viewer": {"read": ["*", "!uci-access"], "write": []},
}


def login_test_permission(login: dict | None, perm: str, group: str) -> bool:
    """rpcd session.c rpc_login_test_permission()."""
    if login is None:  # the default session
        return group == "unauthenticated"
    patterns = login.get(perm, [])
    for p in patterns:
        if p.startswith("!") and p[1:].strip() and fnmatch.fnmatchcase(group, p[1:].strip()):
            return False
    for p in patterns:
        if p and not p.startswith("!") and fnmatch.fnmatchcase(group, p):
            return True
    if perm == "read":  # write permission implies read permission
        return login_test_permission(login, "write", group)
    return False


def session_acls(acl_files: list[Path], login: dict | None) -> set[tuple[str, str, str]]:
    """(scope, object, function) grants of a session: rpc_login_setup_acl_file()."""
    grants: set[tuple[str, str, str]] = set()
    for path in acl_files:
        for group, perms in json.loads(Path(path).read_text()).items():
            if not isinstance(perms, dict):
                continue
            for perm, scopes in perms.items():
                if perm not in ("read", "write") or not isinstance(scopes, dict):
                    continue
                if not login_test_permission(login, perm, group):
                    continue
                for scope, objs in scopes.items():  # rpc_login_setup_acl_scope()
                    if isinstance(objs, dict):
                        for obj, funcs in objs.items():
                            if isinstance(funcs, list):
                                grants.update((scope, obj, f) for f in funcs if isinstance(f, str))
                    elif isinstance(objs, list):
                        grants.update((scope, obj, perm) for obj in objs if isinstance(obj, str))
                    grants.add(("access-group", group, perm))
    return grants


class RpcdSessions:
    """rpcd's ``session`` object: one session per login of :data:`LOGINS` (and the default one)."""

    def __init__(self, acl_files: list[Path], logins: dict[str, dict] = LOGINS):
        self.acls: dict[str, set[tuple[str, str, str]]] = {DEFAULT_SID: session_acls(acl_files, None)}
        self.sid_of: dict[str, str] = {}
        for n, (name, login) in enumerate(sorted(logins.items()), 1):
            sid = f"{n:032x}"
            self.sid_of[name] = sid
            self.acls[sid] = session_acls(acl_files, login)

    def access(self, sid: str, scope: str, obj: str, function: str) -> bool:
        """rpc_session_access() / rpc_session_acl_allowed(): fnmatch on object and function."""
        return any(s == scope and fnmatch.fnmatchcase(obj, o) and fnmatch.fnmatchcase(function, f)
                   for s, o, f in self.acls.get(sid, ()))

    def groups(self, sid: str) -> dict[str, list[str]]:
        """The session's access groups and permissions (what LuCI reads from ``session list``)."""
        rv: dict[str, list[str]] = {}
        for s, o, f in sorted(self.acls.get(sid, ())):
            if s == "access-group":
                rv.setdefault(o, []).append(f)
        return rv


def uhttpd_ubus_call(bus: PythonUbus, sessions: RpcdSessions, request: object,
                     log: list | None = None) -> dict:
    """One legacy JSON-RPC request to uhttpd-mod-ubus (``/ubus``) -> reply object."""
    rid = request.get("id") if isinstance(request, dict) else None

    def error(err):
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": err[0], "message": err[1]}}

    if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or not isinstance(request.get("method"), str):
        return error(ERR_PARSE)
    if request["method"] != "call":
        return error(ERR_METHOD)
    params = request.get("params")
    if not isinstance(params, list) or len(params) < 4 or not all(isinstance(p, str) for p in params[:3]) \
            or not isinstance(params[3], dict):
        return error(ERR_PARSE)
    sid, obj, method, args = params[:4]
    if not bus.has_object(obj):
        if log is not None:
            log.append(("no-object", sid, obj, method, args))
        return error(ERR_OBJECT)
    if not sessions.access(sid, "ubus", obj, method):
        if log is not None:
            log.append(("denied", sid, obj, method, args))
        return error(ERR_ACCESS)
    if "ubus_rpc_session" in args:
        return error(ERR_PARAMS)
    msg = dict(args, ubus_rpc_session=sid)
    if log is not None:
        log.append(("call", sid, obj, method, msg))
    try:
        status, reply = bus.invoke(obj, method, msg)
    except ObjectNotFound:
        return error(ERR_OBJECT)
    result = [status] + ([reply] if reply else [])
    return {"jsonrpc": "2.0", "id": rid, "result": result}


class AgentObject:
    """``orayboxvpn`` as the agent publishes it when it speaks ubusd's protocol
    itself (``mpvpn.io.ubus`` with ``METHODS`` and ``check_args``): the steps of
    ``UbusTransport._invoke``, with the agent's own argument rules.  A method
    the agent lacks is METHOD_NOT_FOUND; arguments ``check_args`` refuses
    (unknown, wrong type; ``ubus_rpc_session`` is accepted and dropped) are
    INVALID_ARGUMENT; a handler that raises answers ``{"error": ...}``."""

    def __init__(self, bus: PythonUbus, handlers: dict, ubusmod):
        self.bus, self.handlers, self.ubusmod = bus, handlers, ubusmod
        unknown = set(handlers) - set(ubusmod.METHODS)
        if unknown:  # the transport's own check
            raise ValueError(f"no argument list for ubus method(s) {', '.join(sorted(unknown))}")
        bus.add_native(ubusmod.OBJECT, self.serve)

    def serve(self, method: str, msg: dict) -> tuple[int, dict | None]:
        if method not in self.handlers:
            return UBUS_STATUS_METHOD_NOT_FOUND, None
        fields = [(k, blobmsg_type(v), v) for k, v in msg.items()]  # what decode_fields gives for uhttpd's blob
        args, _why = self.ubusmod.check_args(method, fields, self.ubusmod.METHODS)
        if args is None:
            return UBUS_STATUS_INVALID_ARGUMENT, None
        try:
            result = self.handlers[method](args)
        except Exception as e:  # noqa: BLE001 - the transport answers like this
            result = {"error": f"{type(e).__name__}: {e}"}
        return UBUS_STATUS_OK, (result if isinstance(result, dict) else {"result": result})

    def stop(self) -> None:
        self.bus.remove_native(self.ubusmod.OBJECT)


def publish(bus: PythonUbus, handlers: dict) -> object:
    """Publish ``handlers`` as ubus object ``orayboxvpn`` the way the agent does on a router:
    with the agent's own ubus code (``mpvpn.io.ubus``: its ``METHODS`` signatures and
    ``check_args``; the agent speaks ubusd's protocol itself), calls run inline (the
    agent's ``post``)."""
    from mpvpn.io import ubus as ubusmod

    return AgentObject(bus, handlers, ubusmod)
