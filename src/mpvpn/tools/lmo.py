"""LuCI's compiled translation catalogs (.lmo), as ``po2lmo`` writes them from a .po file.

:func:`po2lmo_records` / :func:`write_lmo` are openwrt/luci
``modules/luci-base/src/po2lmo.c`` (its string extraction keeps every escape but
``\\"`` and ``\\\\``; a translation that hashes like its msgid is left out;
``write_lmo`` gives the same bytes as po2lmo, checked by tests/test_luci_i18n.py
against the real program), :func:`read_lmo` is ``lmo_open()`` of
``modules/luci-base/src/lib/lmo.c`` and :func:`sfh` its ``sfh_hash()`` (Paul
Hsieh's SuperFastHash seeded with the length), the key LuCI looks a message up by.
:mod:`mpvpn.tools.ipk` uses it to build ``luci-i18n-mpvpn-<lang>`` as luci.mk's
``LuciTranslation`` does, without the SDK's host po2lmo.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Entry", "parse_po", "po2lmo_entries", "po2lmo_records", "read_lmo", "sfh",
           "trimws", "unescape", "write_lmo"]


# --- reading .po files -------------------------------------------------------------------

@dataclass
class Entry:
    msgid: str                 # as written in the file, escapes kept
    msgstr: str                # as written in the file, escapes kept
    msgctxt: str | None = None
    msgid_plural: str | None = None
    msgstr_plural: dict[int, str] = field(default_factory=dict)
    locations: list[str] = field(default_factory=list)
    obsolete: bool = False
    fuzzy: bool = False


def unescape(s: str) -> str:
    """A PO/C string body -> its text (gettext's full escape set)."""
    table = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), "\\" + m.group(1)), s)


def parse_po(text: str) -> list[Entry]:
    """Entries of a .po/.pot file (header included: msgid "")."""
    entries: list[Entry] = []
    cur: dict = {}
    last: str | None = None

    def flush():
        nonlocal cur, last
        if "msgid" in cur:
            entries.append(Entry(msgid=cur["msgid"], msgstr=cur.get("msgstr", ""), msgctxt=cur.get("msgctxt"),
                                 msgid_plural=cur.get("msgid_plural"), msgstr_plural=cur.get("plural", {}),
                                 locations=cur.get("loc", []), obsolete=cur.get("obsolete", False),
                                 fuzzy=cur.get("fuzzy", False)))
        cur, last = {}, None

    for raw in text.splitlines():
        line = raw
        if line.startswith("#~"):
            line = line[2:].lstrip()
            cur["obsolete"] = True
        if not line.strip():
            flush()
            continue
        if line.startswith("#"):
            if "msgid" in cur and last is not None:
                flush()
            if line.startswith("#:"):
                cur.setdefault("loc", []).extend(line[2:].split())
            elif line.startswith("#,") and "fuzzy" in line:
                cur["fuzzy"] = True
            continue
        m = re.match(r'^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+"(.*)"\s*$', line)
        if m:
            kw, idx, val = m.group(1), m.group(2), m.group(3)
            if kw in ("msgctxt", "msgid") and ("msgstr" in cur or cur.get("plural")):
                obsolete = cur.get("obsolete", False) and raw.startswith("#~")
                flush()
                if obsolete:
                    cur["obsolete"] = True
            if idx is not None:
                cur.setdefault("plural", {})[int(idx)] = val
                last = ("plural", int(idx))
            else:
                cur[kw] = val
                last = kw
            continue
        m = re.match(r'^"(.*)"\s*$', line)
        if m and last is not None:
            if isinstance(last, tuple):
                cur["plural"][last[1]] += m.group(1)
            else:
                cur[last] += m.group(1)
            continue
        raise ValueError(f"unparsable po line: {raw!r}")
    flush()
    return entries


# --- what the router makes of it: po2lmo, lmo hashes -------------------------------------

def po2lmo_string(body: str) -> str:
    """po2lmo.c extract_string() for one quoted piece: only \\" and \\\\ lose their backslash."""
    return re.sub(r'\\(["\\])', r"\1", body)


def sfh(data: bytes) -> int:
    """lmo.c sfh_hash(data, len, len)."""
    n = len(data)
    if n <= 0:
        return 0
    h = n
    rem, count, off = n & 3, n >> 2, 0

    def get16(o):
        return data[o] | (data[o + 1] << 8)

    def s8(o):
        v = data[o]
        return v - 256 if v > 0x7F else v

    M = 0xFFFFFFFF
    for _ in range(count):
        h = (h + get16(off)) & M
        tmp = ((get16(off + 2) << 11) ^ h) & M
        h = ((h << 16) ^ tmp) & M
        off += 4
        h = (h + (h >> 11)) & M
    if rem == 3:
        h = (h + get16(off)) & M
        h ^= (h << 16) & M
        h ^= (s8(off + 2) << 18) & M
        h = (h + (h >> 11)) & M
    elif rem == 2:
        h = (h + get16(off)) & M
        h ^= (h << 11) & M
        h = (h + (h >> 17)) & M
    elif rem == 1:
        h = (h + s8(off)) & M
        h ^= (h << 10) & M
        h = (h + (h >> 1)) & M
    h ^= (h << 3) & M
    h = (h + (h >> 5)) & M
    h ^= (h << 4) & M
    h = (h + (h >> 17)) & M
    h ^= (h << 25) & M
    h = (h + (h >> 6)) & M
    return h


def trimws(s: str) -> str:
    """cbi.js trimws(): String(s).trim().replace(/[ \\t\\n]+/g, ' ')."""
    return re.sub(r"[ \t\n]+", " ", s.strip())


def po2lmo_records(path: Path) -> list[tuple[int, int, str]]:
    """(key hash, val_id, string) in the order po2lmo.c's print_msg() writes them: the
    Plural-Forms of the header (key 0, val_id 0), then each translation (val_id = plural
    index + 1), leaving out empty ones and those whose text hashes like their key."""
    out: list[tuple[int, int, str]] = []
    for e in parse_po(path.read_text(encoding="utf-8")):
        if e.obsolete:
            continue  # po2lmo's line matcher never sees '#~' lines
        if e.msgid == "":
            for fld in e.msgstr.split("\\n"):
                if fld.lower().startswith("plural-forms: "):
                    out.append((0, 0, fld[14:]))
                    break
            continue
        ctxt = po2lmo_string(e.msgctxt) if e.msgctxt is not None else None
        mid = po2lmo_string(e.msgid)
        vals = e.msgstr_plural if e.msgid_plural is not None else {0: e.msgstr}
        top = max(vals)
        for i, val in sorted(vals.items()):
            val = po2lmo_string(val)
            if not val:
                continue
            if ctxt is not None and e.msgid_plural is not None:
                key = f"{ctxt}\1{mid}\2{i}"
            elif ctxt is not None:
                key = f"{ctxt}\1{mid}"
            elif e.msgid_plural is not None:
                key = f"{mid}\2{i}"
            else:
                key = mid
            kb, vb = key.encode(), val.encode()
            if sfh(kb) != sfh(vb):
                out.append((sfh(kb), top + 1, val))
    return out


def po2lmo_entries(path: Path) -> dict[int, str]:
    """key hash -> translation, as po2lmo.c writes them into the .lmo (0: Plural-Forms)."""
    return {k: v for k, _vid, v in po2lmo_records(path)}


def write_lmo(path: Path) -> bytes:
    """The .lmo file po2lmo.c writes for a .po (b"" where po2lmo writes no file): the
    strings, each NUL-padded to 4 bytes, then the index (key_id, val_id, offset, length,
    big-endian, sorted by key_id), then the index's offset."""
    blob, index = bytearray(), []
    for key, vid, text in po2lmo_records(path):
        data = text.encode()
        index.append((key, vid, len(blob), len(data)))
        blob += data + b"\0" * ((4 - len(data) % 4) % 4)
    if not blob:
        return b""
    offset = len(blob)
    for entry in sorted(index, key=lambda e: e[0]):
        blob += struct.pack(">IIII", *entry)
    return bytes(blob + struct.pack(">I", offset))


def read_lmo(data: bytes) -> dict[int, str]:
    """key hash -> string of an .lmo file (lmo.c lmo_open: the last 32-bit word is the index
    offset; index entries are key_id, val_id, offset, length, big-endian)."""
    idx = struct.unpack(">I", data[-4:])[0]
    out = {}
    for pos in range(idx, len(data) - 4, 16):
        key, _val, off, length = struct.unpack(">IIII", data[pos:pos + 16])
        out[key] = data[off:off + length].decode("utf-8")
    return out
