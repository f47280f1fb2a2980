"""TEST FIXTURE: a stand-in for OpenWrt's ubusd, for hosts without it.

It speaks ubusd's protocol on a unix socket and mirrors, from ubus
``ubusd_proto.c`` (openwrt-24.10 pin 60e0404):

* ``ubusd_proto_new_client``: a HELLO carrying the client's id on connect;
* ``ubusd_handle_add_object``: DATA {OBJID, OBJTYPE} then STATUS 0; a second
  object with the same path is refused (``ubusd_create_object``, status 2);
* ``ubusd_handle_invoke`` / ``ubusd_forward_invoke``: an INVOKE is forwarded
  to the owner with the caller's id as peer; unknown object -> STATUS 4;
* ``ubusd_handle_response``: DATA/STATUS from the owner are routed back to
  the caller only if they carry the OBJID of an object that client owns;
* ``ubusd_proto_receive_message``: every other request gets a STATUS;
* ``ubusd_event.c`` ``ubusd_event_recv``: INVOKE ``send`` on object 1 with
  {id, data} is an event (recorded in :attr:`events`), STATUS 0;
* process exit (``restart``): every client connection is closed and the
  socket is gone until the new process listens; objects do not survive.

:meth:`call` plays the ``ubus call`` CLI (``cli.c``, ``ubus_cli_call``):
it returns (status, data) as the CLI would print them.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading

from mpvpn.io import ubusmsg as um


class StandinUbusd:
    def __init__(self, path: str):
        self.path = path
        self.events: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._next_id = 0x100
        self._stop = threading.Event()
        self._thread = None
        self._listen()

    def _listen(self):
        self._sel = selectors.DefaultSelector()
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.path)
        self._srv.listen(16)
        self._sel.register(self._srv, selectors.EVENT_READ, None)
        self._clients: dict[int, tuple[socket.socket, um.Reader]] = {}
        self._objects: dict[int, tuple[str, int]] = {}  # objid -> (path, owner client id)
        self._waiting: dict[int, dict] = {}             # caller id -> box
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def objects(self) -> dict[str, int]:
        with self._lock:
            return {p: i for i, (p, _o) in self._objects.items()}

    # -- process lifetime ----------------------------------------------------

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        for s, _r in list(self._clients.values()):
            s.close()
        self._srv.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def restart(self):
        """ubusd exits (clients see EOF) and a new one starts on the same path."""
        self.stop()
        self._listen()

    # -- protocol --------------------------------------------------------------

    def _send(self, cid: int, data: bytes):
        s = self._clients.get(cid)
        if s is not None:
            with self._send_lock:  # the server thread and call() both write
                try:
                    s[0].sendall(data)
                except OSError:
                    pass

    def _run(self):
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                if key.data is None:
                    conn, _ = self._srv.accept()
                    cid = self._id()
                    self._clients[cid] = (conn, um.Reader())
                    self._sel.register(conn, selectors.EVENT_READ, cid)
                    self._send(cid, um.pack(um.HELLO, 0, cid))
                    continue
                cid = key.data
                conn, reader = self._clients[cid]
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._drop(cid)
                    continue
                for m in reader.feed(data):
                    self._handle(cid, m)

    def _drop(self, cid):
        conn, _ = self._clients.pop(cid)
        self._sel.unregister(conn)
        conn.close()
        with self._lock:
            for objid in [i for i, (_p, o) in self._objects.items() if o == cid]:
                del self._objects[objid]

    def _status(self, cid, m, status):
        self._send(cid, um.pack(um.STATUS, m.seq, m.peer, um.u32(um.ATTR_STATUS, status)))

    def _handle(self, cid, m: um.Message):
        if m.type == um.ADD_OBJECT:
            path = m.string(um.ATTR_OBJPATH)
            with self._lock:
                taken = path in {p for p, _o in self._objects.values()}
            if not path or taken or um.ATTR_SIGNATURE not in m.attrs:
                return self._status(cid, m, um.STATUS_INVALID_ARGUMENT)
            um.decode_fields(m.attrs[um.ATTR_SIGNATURE])  # must parse as blobmsg tables
            objid = self._id()
            with self._lock:
                self._objects[objid] = (path, cid)
            self._send(cid, um.pack(um.DATA, m.seq, m.peer, um.u32(um.ATTR_OBJID, objid),
                                    um.u32(um.ATTR_OBJTYPE, self._id())))
            return self._status(cid, m, um.STATUS_OK)
        if m.type == um.INVOKE:
            objid, method = m.u32(um.ATTR_OBJID), m.string(um.ATTR_METHOD)
            if objid is None or method is None:
                return self._status(cid, m, um.STATUS_INVALID_ARGUMENT)
            if objid == um.SYSTEM_OBJECT_EVENT:
                if method != "send":
                    return self._status(cid, m, um.STATUS_METHOD_NOT_FOUND)
                d = um.decode_table(m.attrs.get(um.ATTR_DATA, b""))
                if not isinstance(d.get("id"), str) or not isinstance(d.get("data"), dict):
                    return self._status(cid, m, um.STATUS_INVALID_ARGUMENT)
                self.events.append((d["id"], d["data"]))
                return self._status(cid, m, um.STATUS_OK)
            with self._lock:
                target = self._objects.get(objid)
            if target is None:
                return self._status(cid, m, um.STATUS_NOT_FOUND)
            attrs = [um.u32(um.ATTR_OBJID, objid), um.string(um.ATTR_METHOD, method)]
            if um.ATTR_DATA in m.attrs:
                attrs.append(um.blob_attr(um.ATTR_DATA, m.attrs[um.ATTR_DATA]))
            return self._send(target[1], um.pack(um.INVOKE, m.seq, cid, *attrs))
        if m.type in (um.DATA, um.STATUS):
            objid = m.u32(um.ATTR_OBJID)
            with self._lock:
                owner = self._objects.get(objid)
            if owner is None or owner[1] != cid:
                return
            if m.type == um.STATUS and um.ATTR_STATUS not in m.attrs:
                return
            if m.type == um.DATA and um.ATTR_DATA not in m.attrs:
                return
            box = self._waiting.get(m.peer)
            if box is not None:
                if m.type == um.DATA:
                    box["data"] = um.decode_table(m.attrs[um.ATTR_DATA])
                else:
                    box["status"] = m.u32(um.ATTR_STATUS)
                    box["done"].set()
            return
        return self._status(cid, m, um.STATUS_INVALID_COMMAND)

    # -- the `ubus call` CLI -----------------------------------------------------

    def call(self, path: str, method: str, args: dict | None = None, timeout: float = 10.0,
             raw_data: bytes | None = None):
        """(status, data) of ``ubus call path method [args]``; status 4 if no such object."""
        objid = self.objects().get(path)
        if objid is None:
            return um.STATUS_NOT_FOUND, None
        caller = self._id()
        box = {"done": threading.Event(), "data": None}
        self._waiting[caller] = box
        data = raw_data if raw_data is not None else um.encode_table(args or {})
        with self._lock:
            target = self._objects.get(objid)
        self._send(target[1], um.pack(um.INVOKE, 1, caller, um.u32(um.ATTR_OBJID, objid),
                                      um.string(um.ATTR_METHOD, method), um.blob_attr(um.ATTR_DATA, data)))
        if not box["done"].wait(timeout):
            return um.STATUS_TIMEOUT, None
        del self._waiting[caller]
        return box["status"], box["data"]

