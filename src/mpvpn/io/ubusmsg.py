"""ubus's wire format, sans I/O: blob/blobmsg attributes and ubusd messages.

Why the agent speaks ubus itself instead of through python-ubus: python-ubus
0.1.2 (``ubus_python.c``, ``test_policies``, called by
``ubus_python_method_handler`` before Python sees the call) answers
``UBUS_STATUS_INVALID_ARGUMENT`` unless a call carries *exactly* the fields of
the method's signature: every declared field is required and every other one
is refused.  So one method cannot be called both as ``ubus call orayboxvpn
test_links`` and ``... '{"duration": 3}'``, nor both from the shell and
through rpcd/uhttpd, which always adds ``ubus_rpc_session`` (uhttpd
``ubus.c``, ``uh_ubus_send_request``).  libubus itself checks nothing
(``libubus-obj.c``, ``ubus_process_invoke``), so a client that speaks the
protocol can make every argument optional, the way OpenWrt's C daemons do
with ``blobmsg_parse``.

The format, from libubox ``blob.h``/``blobmsg.h`` and ubus ``ubusmsg.h``:

* a blob attribute is a big-endian u32 ``extended:1 | id:7 | len:24`` (``len``
  counts the 4-byte header, not the padding) followed by its payload, padded
  to 4 bytes;
* a blobmsg attribute is an extended blob attribute whose id is the blobmsg
  type and whose payload starts with ``u16 namelen``, the name and a NUL,
  padded to 4 (``blobmsg_hdrlen``);
* a ubus message is ``struct ubus_msghdr`` (u8 version 0, u8 type, be16 seq,
  be32 peer) followed by one blob attribute (id 0) holding the ``UBUS_ATTR_*``
  attributes (plain, not extended).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

# ubusmsg.h enum ubus_msg_type
HELLO, STATUS, DATA, PING, LOOKUP, INVOKE, ADD_OBJECT, REMOVE_OBJECT = range(8)
SUBSCRIBE, UNSUBSCRIBE, NOTIFY, MONITOR = range(8, 12)

# ubusmsg.h enum ubus_msg_attr
ATTR_STATUS, ATTR_OBJPATH, ATTR_OBJID, ATTR_METHOD, ATTR_OBJTYPE = 1, 2, 3, 4, 5
ATTR_SIGNATURE, ATTR_DATA, ATTR_TARGET, ATTR_ACTIVE, ATTR_NO_REPLY = 6, 7, 8, 9, 10
ATTR_SUBSCRIBERS, ATTR_USER, ATTR_GROUP = 11, 12, 13

# ubusmsg.h enum ubus_msg_status
STATUS_OK = 0
STATUS_INVALID_COMMAND = 1
STATUS_INVALID_ARGUMENT = 2
STATUS_METHOD_NOT_FOUND = 3
STATUS_NOT_FOUND = 4
STATUS_NO_DATA = 5
STATUS_PERMISSION_DENIED = 6
STATUS_TIMEOUT = 7
STATUS_NOT_SUPPORTED = 8
STATUS_UNKNOWN_ERROR = 9

SYSTEM_OBJECT_EVENT = 1  # ubusmsg.h UBUS_SYSTEM_OBJECT_EVENT
MAX_MSGLEN = 1048576     # ubus_common.h UBUS_MAX_MSGLEN
CLIENT_ID_CHANNEL = 1    # ubusmsg.h: client ids above this are real clients

# blobmsg.h enum blobmsg_type (BOOL is INT8 on the wire)
T_UNSPEC, T_ARRAY, T_TABLE, T_STRING, T_INT64, T_INT32, T_INT16, T_INT8, T_DOUBLE = range(9)
T_BOOL = T_INT8
TYPE_NAMES = {T_UNSPEC: "unknown", T_ARRAY: "array", T_TABLE: "object", T_STRING: "string",
              T_INT64: "number", T_INT32: "number", T_INT16: "number", T_INT8: "boolean",
              T_DOUBLE: "double"}

_EXTENDED = 0x80000000
_HDR = struct.Struct(">BBHI")


class BlobError(ValueError):
    """Malformed blob data (a clear error instead of a traceback)."""


def _pad(n: int) -> int:
    return (n + 3) & ~3


def blob_attr(attr_id: int, payload: bytes, extended: bool = False) -> bytes:
    """One blob attribute, padded to 4 bytes (``blob_put``)."""
    n = 4 + len(payload)
    if n > 0xFFFFFF:
        raise BlobError("blob attribute too long")
    head = (_EXTENDED if extended else 0) | (attr_id & 0x7F) << 24 | n
    return struct.pack(">I", head) + payload + b"\0" * (_pad(n) - n)


def blob_attrs(data: bytes) -> list[tuple[int, bool, bytes]]:
    """Split a run of blob attributes into (id, extended, payload); bounds-checked."""
    out, i = [], 0
    while i < len(data):
        if len(data) - i < 4:
            raise BlobError("truncated blob attribute header")
        head, = struct.unpack_from(">I", data, i)
        n = head & 0xFFFFFF
        if n < 4 or i + n > len(data):
            raise BlobError("blob attribute length out of bounds")
        out.append(((head >> 24) & 0x7F, bool(head & _EXTENDED), data[i + 4:i + n]))
        i += _pad(n)
    return out


# -- blobmsg (the JSON-like payload of calls, replies and events) ------------

def _blobmsg(btype: int, name: str, data: bytes) -> bytes:
    raw = name.encode()
    if len(raw) > 0xFFFF:
        raise BlobError("blobmsg name too long")
    hdr = struct.pack(">H", len(raw)) + raw + b"\0"
    hdr += b"\0" * (_pad(len(hdr)) - len(hdr))
    return blob_attr(btype, hdr + data, extended=True)


def encode_value(name: str, value) -> bytes:
    """One named blobmsg attribute from a JSON-like value, typed the way
    libubox ``blobmsg_json.c`` (``blobmsg_add_json_element``) types JSON."""
    if value is None:
        return _blobmsg(T_UNSPEC, name, b"")
    if isinstance(value, bool):
        return _blobmsg(T_INT8, name, bytes([value]))
    if isinstance(value, int):
        if -2**31 <= value < 2**31:
            return _blobmsg(T_INT32, name, struct.pack(">i", value))
        if -2**63 <= value < 2**63:
            return _blobmsg(T_INT64, name, struct.pack(">q", value))
        value = float(value)
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON has no NaN/inf
            return _blobmsg(T_UNSPEC, name, b"")
        return _blobmsg(T_DOUBLE, name, struct.pack(">d", value))
    if isinstance(value, str):
        return _blobmsg(T_STRING, name, value.encode() + b"\0")
    if isinstance(value, dict):
        return _blobmsg(T_TABLE, name, encode_table(value))
    if isinstance(value, (list, tuple)):
        return _blobmsg(T_ARRAY, name, b"".join(encode_value("", v) for v in value))
    return encode_value(name, str(value))


def encode_table(d: dict) -> bytes:
    """The attributes of a blobmsg table (what ``blob_data`` of a table holds)."""
    return b"".join(encode_value(str(k), v) for k, v in d.items())


def decode_fields(data: bytes) -> list[tuple[str, int, object]]:
    """(name, blobmsg type, value) of each attribute of a blobmsg table."""
    out = []
    for btype, ext, payload in blob_attrs(data):
        if not ext:
            raise BlobError("blobmsg attribute without a name header")
        if len(payload) < 3:
            raise BlobError("truncated blobmsg header")
        nlen, = struct.unpack_from(">H", payload, 0)
        hlen = _pad(2 + nlen + 1)
        if hlen > len(payload):
            raise BlobError("blobmsg name out of bounds")
        try:
            name = payload[2:2 + nlen].decode()
        except UnicodeDecodeError:
            raise BlobError("blobmsg name is not UTF-8") from None
        out.append((name, btype, _decode_data(btype, payload[hlen:])))
    return out


def _decode_data(btype: int, data: bytes):
    fixed = {T_INT8: (1, ">b"), T_INT16: (2, ">h"), T_INT32: (4, ">i"), T_INT64: (8, ">q"),
             T_DOUBLE: (8, ">d")}
    if btype in fixed:
        size, fmt = fixed[btype]
        if len(data) < size:
            raise BlobError("truncated blobmsg number")
        v, = struct.unpack_from(fmt, data)
        return bool(v) if btype == T_INT8 else v  # blobmsg_format_json: INT8 is a bool
    if btype == T_STRING:
        end = data.find(b"\0")
        try:
            return (data if end < 0 else data[:end]).decode()
        except UnicodeDecodeError:
            raise BlobError("blobmsg string is not UTF-8") from None
    if btype == T_TABLE:
        return {n: v for n, _t, v in decode_fields(data)}
    if btype == T_ARRAY:
        return [v for _n, _t, v in decode_fields(data)]
    if btype == T_UNSPEC:
        return None
    raise BlobError(f"unknown blobmsg type {btype}")


def decode_table(data: bytes) -> dict:
    return {n: v for n, _t, v in decode_fields(data)}


# -- ubus messages ------------------------------------------------------------

def u32(attr_id: int, v: int) -> bytes:
    return blob_attr(attr_id, struct.pack(">I", v & 0xFFFFFFFF))


def string(attr_id: int, s: str) -> bytes:
    return blob_attr(attr_id, s.encode() + b"\0")


@dataclass
class Message:
    type: int
    seq: int
    peer: int
    attrs: dict = field(default_factory=dict)  # UBUS_ATTR_* -> raw payload

    def u32(self, attr_id: int) -> int | None:
        v = self.attrs.get(attr_id)
        if v is None:
            return None
        if len(v) < 4:
            raise BlobError("truncated u32 attribute")
        return struct.unpack_from(">I", v)[0]

    def string(self, attr_id: int) -> str | None:
        v = self.attrs.get(attr_id)
        if v is None:
            return None
        end = v.find(b"\0")
        try:
            return (v if end < 0 else v[:end]).decode()
        except UnicodeDecodeError:
            raise BlobError("ubus string attribute is not UTF-8") from None


def pack(mtype: int, seq: int, peer: int, *attrs: bytes) -> bytes:
    """``ubus_send_msg``: header, then one blob (id 0) holding ``attrs``."""
    body = b"".join(attrs)
    if 4 + len(body) > MAX_MSGLEN:
        raise BlobError("ubus message too long")
    return _HDR.pack(0, mtype, seq & 0xFFFF, peer & 0xFFFFFFFF) + struct.pack(">I", 4 + len(body)) + body


class Reader:
    """Reassembles ubus messages from a byte stream (``get_next_msg``)."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out = []
        while len(self._buf) >= 12:
            version, mtype, seq, peer = _HDR.unpack_from(self._buf, 0)
            head, = struct.unpack_from(">I", self._buf, 8)
            n = head & 0xFFFFFF
            if version != 0 or n < 4 or _pad(n) > MAX_MSGLEN:  # ubus_validate_hdr
                raise BlobError("invalid ubus message header")
            if len(self._buf) < 8 + n:
                break
            body = bytes(self._buf[12:8 + n])
            del self._buf[:8 + n]
            attrs = {}
            for attr_id, _ext, payload in blob_attrs(body):
                attrs.setdefault(attr_id, payload)
            out.append(Message(mtype, seq, peer, attrs))
        return out


def signature(methods: dict[str, dict[str, int]]) -> bytes:
    """``UBUS_ATTR_SIGNATURE``: per method a table of argument name -> blobmsg
    type (``ubus_push_object_type``); what ``ubus -v list`` shows."""
    return blob_attr(ATTR_SIGNATURE, b"".join(_blobmsg(T_TABLE, m, b"".join(
        _blobmsg(T_INT32, a, struct.pack(">i", t)) for a, t in args.items()))
        for m, args in methods.items()))
