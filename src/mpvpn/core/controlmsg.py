"""Control connection, wire level: framing, the data model and the message
schema (sans-I/O).

* framing: ``u16`` big-endian length + body (:class:`FrameDecoder`,
  :func:`encode_frame`), with the per-phase size limits;
* what a side announces (:class:`Vnc`, :class:`PeerInfo`);
* post-handshake messages: one JSON object per Noise transport message,
  strictly validated and bounded (:func:`decode_message`); every check
  raises :class:`Bad` (code for ERROR, counter name), never a traceback.

What the announced values mean together (subnets, overlaps) is checked in
:mod:`mpvpn.core.peercheck`.  Schema: ``docs/control.md``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
from dataclasses import dataclass

from mpvpn.core import noise, pairing, seal
from mpvpn.core.candidates import KINDS as CANDIDATE_KINDS
from mpvpn.core.candidates import MAX_CANDIDATES, Candidate
from mpvpn.core.pairing import Uplink

# --- constants -----------------------------------------------------------------

PROLOGUE = b"orayboxvpn control v1"
REKEY_PROLOGUE = b"orayboxvpn control v1 rekey"
# Control protocol versions this build speaks.  Version 2 added the
# freshness stamp and MAC after the first handshake message and the BUSY
# reply; a version-1 peer cannot talk to it (see docs/control.md).
VERSIONS = (2,)

MAX_FRAME = 65535  # u16 length prefix
LEN_PREFIX = 2
# Before the handshake completes a frame is one Noise handshake message:
# 32 (e) + JSON payload + 16 (tag).  Payloads are tiny; 512 leaves room.
PREAUTH_MAX_FRAME = 512
MIN_HANDSHAKE_MSG = noise.KEY_LEN + noise.TAG_LEN  # 48: e + tag of an empty payload
MAX_MESSAGE = 16384  # plaintext JSON of one post-handshake message
POSTAUTH_MAX_FRAME = MAX_MESSAGE + noise.TAG_LEN

MAX_UPLINKS = 16
MAX_LANS = 32
MAX_VIA = 255  # other sites a hub announces to one site (base.hub_forward)
MAX_VERSIONS = 16
MAX_TEXT = 256
MAX_PLAN = 255

WORD_RE = re.compile(r"[a-z0-9_-]{1,32}")  # carrier type, mode, error code, BYE reason
NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # site name
UPLINK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # uplink (smpu section) name
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

#: ERROR codes we send.  Peers may send other words; they are shown as given.
ERROR_CODES = ("version", "auth", "invalid", "overlap", "vnic", "route", "busy",
               "internal", "timeout", "name", "lan")


# --- data model -------------------------------------------------------------------


@dataclass(frozen=True)
class Vnc:
    """A side's virtual NIC: address, netmask (dotted quad for IPv4 or a
    prefix length), optional MAC (a tun device has none)."""

    ip: str
    netmask: str
    mac: str | None = None

    @property
    def interface(self):
        return ipaddress.ip_interface(f"{self.ip}/{self.netmask}")

    def to_json(self) -> dict:
        d = {"ip": self.ip, "netmask": self.netmask}
        if self.mac is not None:
            d["mac"] = self.mac
        return d


@dataclass(frozen=True)
class PeerInfo:
    """What one side announces (HELLO / WELCOME / UPDATE)."""

    name: str
    uplinks: tuple  # tuple[Uplink, ...]
    vnc: Vnc
    lans: tuple = ()  # normalized CIDR strings
    mode: str = "duplicate"
    pair_unmatched: bool = False
    control_port: int | None = None  # server only: where its control listener is
    # data-plane AEADs this side can use, best first (HELLO), and the one the
    # server chose for the session (WELCOME); peers without them mean ChaCha20
    ciphers: tuple = (seal.CHACHA,)
    cipher: str | None = None
    # hub only (base.hub_forward): the other sites it forwards to (ViaSite,
    # from its UPDATE's ``via``); what a site may use of them: peercheck.usable_via
    via: tuple = ()
    # the X25519 public key this site uses for direct site-to-site sessions
    # (HELLO ``options.direct_key``; None: it takes no direct paths)
    direct_key: bytes | None = None

    @property
    def networks(self):
        return [ipaddress.ip_network(x) for x in self.lans]


@dataclass(frozen=True)
class ViaSite:
    """Another site a hub forwards to (``via`` in the hub's UPDATE): its name,
    vNIC address and LANs."""

    name: str
    vnc: str  # plain address
    lans: tuple = ()  # normalized CIDR strings

    @property
    def routes(self) -> list:
        """What a site routes to the hub for it: its LANs and its vNIC address."""
        host = 32 if ":" not in self.vnc else 128
        return [*self.lans, f"{self.vnc}/{host}"]

    def to_json(self) -> dict:
        return {"name": self.name, "vnc": self.vnc, "lans": list(self.lans)}



# --- framing ----------------------------------------------------------------------


def encode_frame(body: bytes) -> bytes:
    """``u16`` big-endian length + body."""
    n = len(body)
    if not 0 < n <= MAX_FRAME:
        raise ValueError(f"frame body of {n} bytes (must be 1..{MAX_FRAME})")
    return n.to_bytes(2, "big") + bytes(body)


class FrameDecoder:
    """Cuts a TCP byte stream into frames.

    ``feed(data)`` appends; ``next_frame()`` returns the next complete frame
    body or None (need more bytes, or failed).  On bad input ``error`` is
    set to ``"oversized"`` (length prefix above ``max_frame``) or
    ``"malformed"`` (zero length) and the decoder stays failed.  After every
    complete frame has been taken, at most ``LEN_PREFIX + max_frame - 1``
    bytes stay buffered; ``max_frame`` may be changed between frames (the
    control connection raises it once the peer has authenticated).
    """

    __slots__ = ("max_frame", "error", "_buf", "frames", "bytes_in")

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self.error: str | None = None
        self._buf = bytearray()
        self.frames = 0
        self.bytes_in = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data) -> None:
        if self.error is None:
            self._buf += data
            self.bytes_in += len(data)

    def next_frame(self) -> bytes | None:
        if self.error is not None:
            return None
        buf = self._buf
        if len(buf) < LEN_PREFIX:
            return None
        n = (buf[0] << 8) | buf[1]
        if n == 0:
            self._fail("malformed")
            return None
        if n > self.max_frame:
            self._fail("oversized")
            return None
        if len(buf) < LEN_PREFIX + n:
            return None
        body = bytes(buf[LEN_PREFIX:LEN_PREFIX + n])
        del buf[:LEN_PREFIX + n]
        self.frames += 1
        return body

    def _fail(self, why: str) -> None:
        self.error = why
        self._buf = bytearray()


# --- message parsing and validation --------------------------------------------------


class Bad(Exception):
    """Bad peer input (raised by every parser and check here and in
    :mod:`mpvpn.core.peercheck`; the machines turn it into an ERROR and a close).  ``code`` goes into ERROR, ``count`` names
    the counter (defaults to ``code``)."""

    def __init__(self, code: str, text: str, count: str | None = None):
        super().__init__(text)
        self.code = code
        self.text = text
        self.count = count or code


def safe_text(s, limit: int = MAX_TEXT) -> str:
    """Printable ASCII only (peer text goes to logs and LuCI)."""
    if not isinstance(s, str):
        s = repr(s)
    out = "".join(c if " " <= c <= "~" else "?" for c in s[:limit])
    return out


def _obj(v, what: str, req: frozenset | set, opt: frozenset | set = frozenset()) -> dict:
    if type(v) is not dict:
        raise Bad("invalid", f"{what}: expected an object")
    for k in v:
        if k not in req and k not in opt:
            raise Bad("invalid", f"{what}: unknown field {safe_text(k, 32)!r}")
    for k in req:
        if k not in v:
            raise Bad("invalid", f"{what}: missing field {k!r}")
    return v


def _int(v, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise Bad("invalid", f"{what}: expected an integer {lo}..{hi}")
    return v


def _num(v, what: str, lo: float, hi: float) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
        raise Bad("invalid", f"{what}: expected a number {lo}..{hi}")
    return float(v)


def _bool(v, what: str) -> bool:
    if type(v) is not bool:
        raise Bad("invalid", f"{what}: expected true or false")
    return v


def _str(v, what: str, limit: int) -> str:
    if type(v) is not str or len(v) > limit:
        raise Bad("invalid", f"{what}: expected a string of at most {limit} characters")
    return v


def _match(v, what: str, rx: re.Pattern, desc: str) -> str:
    if type(v) is not str or not rx.fullmatch(v):
        raise Bad("invalid", f"{what}: expected {desc}")
    return v


def _list(v, what: str, limit: int) -> list:
    if type(v) is not list or len(v) > limit:
        raise Bad("invalid", f"{what}: expected a list of at most {limit} items")
    return v


def _ip(v, what: str):
    s = _str(v, what, 45)
    if "%" in s or "/" in s:
        raise Bad("invalid", f"{what}: expected a plain IP address")
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        raise Bad("invalid", f"{what}: {safe_text(s, 45)!r} is not an IP address") from None


def _unicast(v, what: str):
    addr = _ip(v, what)
    if addr.is_unspecified or addr.is_multicast:
        raise Bad("invalid", f"{what}: {addr} is not a unicast address")
    return addr


def _parse_candidates(v, what: str) -> tuple:
    """``candidates`` of an uplink (docs/control.md, mpvpn.core.candidates)."""
    items = _list(v, what, MAX_CANDIDATES)
    out = []
    for i, x in enumerate(items):
        w = f"{what}[{i}]"
        d = _obj(x, w, {"kind", "addr", "port"})
        kind = _str(d["kind"], f"{w}.kind", 8)
        if kind not in CANDIDATE_KINDS:
            raise Bad("invalid", f"{w}.kind: expected one of {', '.join(CANDIDATE_KINDS)}")
        addr = _unicast(d["addr"], f"{w}.addr")
        out.append(Candidate(kind, str(addr), _int(d["port"], f"{w}.port", 1, 65535)))
    eps = [c.endpoint for c in out]
    if len(set(eps)) != len(eps):
        raise Bad("invalid", f"{what}: two candidates share one address and port")
    return tuple(out)


def _parse_uplink(v, what: str) -> Uplink:
    d = _obj(v, what, {"name", "type", "addr", "port"}, {"candidates"})
    name = _match(d["name"], f"{what}.name", UPLINK_RE, "an uplink name [A-Za-z0-9_.-]{1,32}")
    typ = _match(d["type"], f"{what}.type", WORD_RE, "a carrier type [a-z0-9_-]{1,32}")
    addr = _ip(d["addr"], f"{what}.addr")
    if addr.is_unspecified or addr.is_multicast:
        raise Bad("invalid", f"{what}.addr: {addr} is not a unicast address")
    port = _int(d["port"], f"{what}.port", 1, 65535)
    cands = _parse_candidates(d["candidates"], f"{what}.candidates") if "candidates" in d else ()
    return Uplink(name, typ, str(addr), port, cands)


def _parse_uplinks(v, what: str) -> tuple:
    items = _list(v, what, MAX_UPLINKS)
    ups = tuple(_parse_uplink(x, f"{what}[{i}]") for i, x in enumerate(items))
    names = [u.name for u in ups]
    if len(set(names)) != len(names):
        raise Bad("invalid", f"{what}: uplink names are not unique")
    eps = [(u.addr, u.port) for u in ups]
    if len(set(eps)) != len(eps):
        raise Bad("invalid", f"{what}: two uplinks share one address and port")
    return ups


def _parse_vnc(v, what: str) -> Vnc:
    d = _obj(v, what, {"ip", "netmask"}, {"mac"})
    ip = _ip(d["ip"], f"{what}.ip")
    mask = _str(d["netmask"], f"{what}.netmask", 45)
    if "/" in mask or "%" in mask:
        raise Bad("invalid", f"{what}.netmask: expected a netmask or prefix length")
    try:
        iface = ipaddress.ip_interface(f"{ip}/{mask}")
    except ValueError:
        raise Bad("invalid", f"{what}.netmask: {safe_text(mask, 45)!r} is not a valid netmask") from None
    mac = d.get("mac")
    if mac is not None:
        mac = _match(mac.lower() if type(mac) is str else mac, f"{what}.mac", MAC_RE,
                     "a MAC address aa:bb:cc:dd:ee:ff")
    netmask = str(iface.netmask) if iface.version == 4 else str(iface.network.prefixlen)
    return Vnc(str(iface.ip), netmask, mac)


def _parse_lans(v, what: str) -> tuple:
    items = _list(v, what, MAX_LANS)
    out = []
    for i, x in enumerate(items):
        s = _str(x, f"{what}[{i}]", 49)
        if "%" in s or "/" not in s:
            raise Bad("invalid", f"{what}[{i}]: expected a CIDR subnet like 192.168.1.0/24")
        try:
            net = ipaddress.ip_network(s, strict=True)
        except ValueError:
            raise Bad("invalid", f"{what}[{i}]: {safe_text(s, 49)!r} is not a CIDR subnet "
                                  "(host bits must be zero)") from None
        out.append(str(net))
    return tuple(out)


def _parse_via(v, what: str) -> tuple:
    items = _list(v, what, MAX_VIA)
    out = []
    for i, x in enumerate(items):
        d = _obj(x, f"{what}[{i}]", {"name", "vnc", "lans"})
        name = _match(d["name"], f"{what}[{i}].name", NODE_RE, "a site name [A-Za-z0-9_.-]{1,64}")
        vnc = _ip(d["vnc"], f"{what}[{i}].vnc")
        out.append(ViaSite(name, str(vnc), _parse_lans(d["lans"], f"{what}[{i}].lans")))
    if len({s.name for s in out}) != len(out) or len({s.vnc for s in out}) != len(out):
        raise Bad("invalid", f"{what}: site names and vNIC addresses must be unique")
    return tuple(out)


def _base64(v, what: str, limit: int) -> bytes:
    s = _str(v, what, limit)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise Bad("invalid", f"{what}: not base64") from None


def _key32(v, what: str) -> bytes:
    """A 32-byte X25519 public key (or token) in base64."""
    raw = _base64(v, what, 44)
    if len(raw) != noise.KEY_LEN:
        raise Bad("invalid", f"{what}: expected a {noise.KEY_LEN}-byte key")
    return raw


def _parse_ciphers(v, what: str) -> tuple:
    items = _list(v, what, 8)
    words = tuple(_match(c, f"{what}[]", WORD_RE, "a cipher name") for c in items)
    if not words or len(set(words)) != len(words):
        raise Bad("invalid", f"{what} must be a non-empty list without repeats")
    return words  # unknown names are allowed (newer peers) and never chosen


def _parse_options(v, what: str) -> dict:
    d = _obj(v, what, set(), {"pair_unmatched", "ciphers", "cipher", "direct_key"})
    out = {"pair_unmatched": _bool(d.get("pair_unmatched", False), f"{what}.pair_unmatched"),
           "ciphers": (seal.CHACHA,), "cipher": None,
           "direct_key": _key32(d["direct_key"], f"{what}.direct_key") if "direct_key" in d else None}
    if "ciphers" in d:
        out["ciphers"] = _parse_ciphers(d["ciphers"], f"{what}.ciphers")
    if "cipher" in d:
        out["cipher"] = _match(d["cipher"], f"{what}.cipher", WORD_RE, "a cipher name")
    return out


def parse_info(d: dict, what: str) -> PeerInfo:
    name = _match(d["name"], f"{what}.name", NODE_RE, "a site name [A-Za-z0-9_.-]{1,64}")
    uplinks = _parse_uplinks(d["uplinks"], f"{what}.uplinks")
    vnc = _parse_vnc(d["vnc"], f"{what}.vnc")
    lans = _parse_lans(d["lans"], f"{what}.lans")
    mode = _match(d["mode"], f"{what}.mode", WORD_RE, "a mode word [a-z0-9_-]{1,32}")
    opts = _parse_options(d.get("options", {}), f"{what}.options")
    return PeerInfo(name, uplinks, vnc, lans, mode, opts["pair_unmatched"],
                    ciphers=opts["ciphers"], cipher=opts["cipher"], direct_key=opts["direct_key"])


def _parse_plan(v, what: str) -> list:
    items = _list(v, what, MAX_PLAN)
    out = []
    for i, x in enumerate(items):
        d = _obj(x, f"{what}[{i}]", {"member", "client", "server"})
        out.append({"member": _int(d["member"], f"{what}[{i}].member", 1, pairing.MAX_MEMBER),
                    "client": _match(d["client"], f"{what}[{i}].client", UPLINK_RE, "an uplink name"),
                    "server": _match(d["server"], f"{what}[{i}].server", UPLINK_RE, "an uplink name")})
    return out


def _parse_hs(v, what: str) -> bytes:
    raw = _base64(v, what, 700)
    if not MIN_HANDSHAKE_MSG <= len(raw) <= PREAUTH_MAX_FRAME:
        raise Bad("invalid", f"{what}: handshake message of {len(raw)} bytes")
    return raw


_INFO_FIELDS = {"name", "uplinks", "vnc", "lans", "mode"}
_SCHEMA_REQ = {
    "HELLO": _INFO_FIELDS,
    "WELCOME": _INFO_FIELDS | {"session_id", "plan", "keepalive"},
    "KEEPALIVE": {"n"},
    "KEEPALIVE_ACK": {"n"},
    "BYE": {"reason"},
    "ERROR": {"code"},
    "REKEY": {"step", "epoch"},
    # direct site-to-site paths (docs/control.md "Direct paths between sites")
    "PEER_OFFER": {"name", "key", "uplinks", "session_id", "initiator", "token", "ciphers",
                   "mode", "pair_unmatched"},
    "PEER_HS": {"name", "session_id", "step", "hs"},
    "PEER_END": {"name", "session_id", "reason"},
}
_SCHEMA_OPT = {
    "HELLO": {"options"},
    "WELCOME": {"options", "control_port"},
    "BYE": {"text"},
    "ERROR": {"text"},
    "REKEY": {"hs"},
    "PEER_HS": {"epoch"},
    "PEER_END": {"text"},
}
#: the messages of direct site-to-site paths, all of them post-handshake;
#: PEER_OFFER only from the hub, the others both ways
PEER_TYPES = ("PEER_OFFER", "PEER_HS", "PEER_END")


def _no_dups(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("duplicate key")
        d[k] = v
    return d


def _no_constants(name):
    raise ValueError(f"{name} is not allowed")


def loads(data) -> dict:
    if len(data) > MAX_MESSAGE:
        raise Bad("invalid", f"message of {len(data)} bytes exceeds {MAX_MESSAGE}", "oversized")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_dups,
                         parse_constant=_no_constants)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError):
        raise Bad("invalid", "message is not a JSON object", "malformed") from None
    if type(obj) is not dict:
        raise Bad("invalid", "message is not a JSON object", "malformed")
    return obj


def parse_message(data, from_client: bool) -> dict:
    """Parse and validate one post-handshake message; raises Bad."""
    obj = loads(data)
    t = obj.get("type")
    if type(t) is not str or t not in ("HELLO", "WELCOME", "UPDATE", "KEEPALIVE",
                                       "KEEPALIVE_ACK", "BYE", "ERROR", "REKEY") + PEER_TYPES:
        raise Bad("invalid", f"unknown message type {safe_text(t, 32)!r}")
    if (t == "HELLO" and not from_client) or (t in ("WELCOME", "PEER_OFFER") and from_client):
        raise Bad("invalid", f"{t} in the wrong direction")
    if t == "UPDATE":
        if from_client:
            d = _obj(obj, t, {"type", "seq"}, {"uplinks", "lans"})
            if "uplinks" not in d and "lans" not in d:
                raise Bad("invalid", "UPDATE: nothing to update")
        else:
            d = _obj(obj, t, {"type", "ack", "plan"}, {"uplinks", "lans", "via"})
    else:
        d = _obj(obj, t, _SCHEMA_REQ[t] | {"type"}, _SCHEMA_OPT.get(t, set()))
    m = {"type": t}
    if t in ("HELLO", "WELCOME"):
        m["info"] = parse_info(d, t)
    if t == "WELCOME":
        m["session_id"] = _int(d["session_id"], "WELCOME.session_id", 1, 0xFFFFFFFF)
        m["plan"] = _parse_plan(d["plan"], "WELCOME.plan")
        ka = _obj(d["keepalive"], "WELCOME.keepalive", {"interval", "timeout"})
        m["interval"] = _num(ka["interval"], "keepalive.interval", 0.05, 600)
        m["timeout"] = _num(ka["timeout"], "keepalive.timeout", 0.1, 3600)
        if m["timeout"] <= m["interval"]:
            raise Bad("invalid", "keepalive.timeout must exceed keepalive.interval")
        cp = d.get("control_port")
        m["control_port"] = None if cp is None else _int(cp, "WELCOME.control_port", 1, 65535)
    elif t == "UPDATE":
        if from_client:
            m["seq"] = _int(d["seq"], "UPDATE.seq", 1, 2**53)
        else:
            m["ack"] = _int(d["ack"], "UPDATE.ack", 0, 2**53)
            m["plan"] = _parse_plan(d["plan"], "UPDATE.plan")
        if "uplinks" in d:
            m["uplinks"] = _parse_uplinks(d["uplinks"], "UPDATE.uplinks")
        if "lans" in d:
            m["lans"] = _parse_lans(d["lans"], "UPDATE.lans")
        if "via" in d:
            m["via"] = _parse_via(d["via"], "UPDATE.via")
    elif t in ("KEEPALIVE", "KEEPALIVE_ACK"):
        m["n"] = _int(d["n"], f"{t}.n", 0, 2**53)
    elif t == "BYE":
        m["reason"] = _match(d["reason"], "BYE.reason", WORD_RE, "a reason word")
        m["text"] = safe_text(_str(d.get("text", ""), "BYE.text", MAX_TEXT))
    elif t == "ERROR":
        m["code"] = _match(d["code"], "ERROR.code", WORD_RE, "an error code word")
        m["text"] = safe_text(_str(d.get("text", ""), "ERROR.text", MAX_TEXT))
    elif t == "REKEY":
        m["step"] = _int(d["step"], "REKEY.step", 1, 3)
        m["epoch"] = _int(d["epoch"], "REKEY.epoch", 1, 255)
        if m["step"] in (1, 2):
            if "hs" not in d:
                raise Bad("invalid", "REKEY: missing field 'hs'")
            m["hs"] = _parse_hs(d["hs"], "REKEY.hs")
        elif "hs" in d:
            raise Bad("invalid", "REKEY step 3 carries no handshake message")
    elif t in PEER_TYPES:
        m["name"] = _match(d["name"], f"{t}.name", NODE_RE, "a site name [A-Za-z0-9_.-]{1,64}")
        m["session_id"] = _int(d["session_id"], f"{t}.session_id", 1, 0xFFFFFFFF)
        if t == "PEER_OFFER":
            m["key"] = _key32(d["key"], "PEER_OFFER.key")
            m["uplinks"] = _parse_uplinks(d["uplinks"], "PEER_OFFER.uplinks")
            m["initiator"] = _bool(d["initiator"], "PEER_OFFER.initiator")
            m["token"] = _key32(d["token"], "PEER_OFFER.token")
            m["ciphers"] = _parse_ciphers(d["ciphers"], "PEER_OFFER.ciphers")
            m["mode"] = _match(d["mode"], "PEER_OFFER.mode", WORD_RE, "a mode word")
            m["pair_unmatched"] = _bool(d["pair_unmatched"], "PEER_OFFER.pair_unmatched")
        elif t == "PEER_HS":
            m["step"] = _int(d["step"], "PEER_HS.step", 1, 2)
            m["hs"] = _parse_hs(d["hs"], "PEER_HS.hs")
            m["epoch"] = _int(d.get("epoch", 1), "PEER_HS.epoch", 1, 255)  # 2..: a rekey
        else:
            m["reason"] = _match(d["reason"], "PEER_END.reason", WORD_RE, "a reason word")
            m["text"] = safe_text(_str(d.get("text", ""), "PEER_END.text", MAX_TEXT))
    return m


def decode_message(data, from_client: bool) -> tuple[dict | None, str | None, str]:
    """Parse one decrypted control message.

    Returns ``(message, None, "")`` or ``(None, counter_reason, text)`` with
    ``counter_reason`` one of ``malformed``, ``oversized``, ``invalid``.
    Never raises.
    """
    try:
        return parse_message(data, from_client), None, ""
    except Bad as b:
        return None, b.count, b.text
    except Exception as exc:  # pragma: no cover - defensive
        return None, "internal", type(exc).__name__


def info_json(info: PeerInfo) -> dict:
    opts = {"pair_unmatched": info.pair_unmatched, "ciphers": list(info.ciphers)}
    if info.direct_key is not None:
        opts["direct_key"] = b64(info.direct_key)
    return {"name": info.name, "uplinks": [u.to_json() for u in info.uplinks],
            "vnc": info.vnc.to_json(), "lans": list(info.lans), "mode": info.mode,
            "options": opts}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")



def dumps(obj) -> bytes:
    """A message as compact ASCII JSON (what every side sends)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


# --- the Noise handshake's payloads ------------------------------------------------------------


def parse_versions_offer(payload) -> set:
    """The client's message 1 payload ``{"versions": [...]}``: the set of
    versions it offers.  Raises :class:`Bad`."""
    d = _obj(loads(payload), "handshake", {"versions"})
    offered = _list(d["versions"], "versions", MAX_VERSIONS)
    return {_int(v, "versions[]", 1, 255) for v in offered}


def parse_handshake_reply(payload) -> tuple:
    """The server's message 2 payload: ``("version", v, "")`` or
    ``("error", code, text)`` (text reduced to printable ASCII).  Raises
    :class:`Bad` (``invalid``, counted ``malformed``)."""
    try:
        obj = loads(payload)
        if "error" in obj:
            d = _obj(obj, "handshake reply", {"error"}, {"text"})
            code = _match(d["error"], "error", WORD_RE, "an error code")
            text = safe_text(_str(d.get("text", ""), "text", MAX_TEXT))
            return "error", code, text
        d = _obj(obj, "handshake reply", {"version"})
        return "version", _int(d["version"], "version", 1, 255), ""
    except Bad as b:
        raise Bad("invalid", f"bad handshake reply: {b.text}", "malformed") from None
