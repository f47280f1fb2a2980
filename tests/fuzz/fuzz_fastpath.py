"""Fuzz target: the data path's C loops (``mpvpn.core._fastpath``) on hostile bytes.

Input: the first byte picks the loop, the rest is its input:

* 0 -- ``split``: one frame as read from a vnet-hdr tun;
* 1 -- ``coalesce``: packets (each a 1-byte length, then that many bytes) as
  handed to the tun after decryption (their content comes from the peer's
  LAN: untrusted);
* 2 -- ``open_run``: datagrams (1-byte length each) as received on a
  subflow, against a fixed receiver state (sealed with known keys, so some
  of the seed inputs authenticate);
* 3 -- ``classify``: one inner packet from the LAN (the scheduler's flow
  key and urgency), against ``mpvpn.core.flows.classify_py``;
* 4 -- ``receive_new``: datagrams as for 2, into a reorder buffer holding a
  number ahead of a gap (capacity 4: flushes stop the loop) with NACK gap
  bookkeeping on or off.

Asserts, for every input: no crash and no exception but the documented
``ValueError`` of ``split``; ``split`` and ``coalesce`` give exactly what the
Python reference in ``mpvpn.io.offload`` gives (or both refuse); ``open_run``
stops inside the list and delivers only what authenticates, in order;
``receive_new`` too, and keeps the buffer within its capacity and above
what it released.

Without the compiled loops (``make fastpath``) the target checks the Python
reference alone.  Run under atheris: ``python tests/fuzz/fuzz_fastpath.py``
or ``python -m tests.fuzz.run --target fastpath``.
"""

from __future__ import annotations

import contextlib
import struct

try:
    import atheris
except ImportError:  # the plain (non-atheris) tests import this module too
    atheris = None

_INSTRUMENT = atheris is not None and __name__ == "__main__"

with atheris.instrument_imports(include=["mpvpn"]) if _INSTRUMENT else contextlib.nullcontext():
    from cryptography.exceptions import InvalidTag

    from mpvpn.core import fastpath, flows
    from mpvpn.io import offload
    from mpvpn.core.seal import Sealer

NAME = "fastpath"
C = fastpath.LOOPS
_KEY = bytes(range(32))
_RECV = Sealer(_KEY, _KEY, 1)
_SID = 0x5E55


def _chunks(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = data[i]
        out.append(bytes(data[i + 1:i + 1 + n]))
        i += 1 + n
    return out


def _split(frame: bytes) -> None:
    try:
        want = offload.split_py(frame)
    except (offload.OffloadError, IndexError, ValueError, struct.error):
        want = None
    if C is None:
        return
    try:
        got = C.split(frame)
    except ValueError:
        got = None
    assert got == want, (got, want)


def _coalesce(packets: list[bytes]) -> None:
    want = [b"".join(bytes(b) for b in bufs) for bufs in offload.coalesce(packets)]
    assert sum(offload.frame_packets(f) for f in want) == len(packets)
    if C is not None:
        assert C.coalesce(packets) == want


def _open_run(datagrams: list[bytes]) -> None:
    if C is None:
        return
    start = datagrams[0][0] % (len(datagrams) + 1) if datagrams and datagrams[0] else 0
    last = 3
    i, got, new_last, dup, late, nbytes, bad = C.open_run(
        datagrams, start, 1, _SID, last, 0, 0, 1, _RECV.data_decryptors()[1], -1, None, InvalidTag)
    assert start <= i <= len(datagrams)
    assert new_last == last + len(got)
    assert dup + late + len(got) + bad <= i - start
    if got:  # only what authenticates: each plaintext is what the Python opener gives some datagram
        opened = {_RECV.open(d) for d in datagrams[start:i] if len(d) >= 36}
        assert all(p in opened for p in got)


def _receive_new(datagrams: list[bytes]) -> None:
    if C is None:
        return
    from collections import deque

    start = datagrams[0][0] % (len(datagrams) + 1) if datagrams and datagrams[0] else 0
    nack = bool(start & 1)
    buf, arrivals = {7: b"held"}, deque([(0.5, 7)])
    missing = {4: 0.5, 5: 0.5, 6: 0.5} if nack else None
    last, capacity = 3, 4
    (i, got, new_last, tlast, dup, late, nbytes, bad, accepted, high, top, noted,
     untracked) = C.receive_new(datagrams, start, 1, _SID, 1, _RECV.data_decryptors()[1], -1, None,
                                InvalidTag, buf, arrivals, 8, last, 2, 3, 0.5, capacity, 1.0,
                                missing, 7, 1024, 64)
    assert start <= i <= len(datagrams)
    assert dup + late + accepted + bad <= i - start
    assert new_last == last + len(got) and tlast >= 0.5
    assert len(buf) <= capacity and all(k > new_last for k in buf)
    if got:  # only what authenticates (or was held), in order
        opened = {_RECV.open(d) for d in datagrams[start:i] if len(d) >= 36} | {b"held"}
        assert all(p in opened for p in got)
    if not nack:
        assert (high, top, noted, untracked) == (7, 0, 0, 0)


def _classify(packet: bytes) -> None:
    want = flows.classify_py(packet, 128)
    if C is not None:
        assert C.classify(packet, 128) == want, packet


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    kind, rest = data[0] % 5, data[1:]
    if kind == 0:
        _split(rest)
    elif kind == 1:
        _coalesce(_chunks(rest))
    elif kind == 2:
        _open_run(_chunks(rest))
    elif kind == 3:
        _classify(rest)
    else:
        _receive_new(_chunks(rest))


# --- seed corpus ------------------------------------------------------------------------

def _sealed(sealer: Sealer, seq: int, payload: bytes, member: int = 1) -> bytes:
    d = sealer.seal_data(_SID, seq, payload)
    return d[:2] + bytes([member]) + d[3:]


def seed_corpus() -> list[bytes]:
    from mpvpn.io.offload import GSO_TCPV4, F_NEEDS_CSUM, build_hdr

    ip = bytes([0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 192, 168, 10, 2, 192, 168, 20, 2])
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 1, 5 << 4, 0x18, 500, 0, 0)
    big = bytearray(ip + tcp + bytes(3000))
    big[2:4] = len(big).to_bytes(2, "big")
    frames = [build_hdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + bytes(big), bytes(10) + ip + tcp]
    out = [b"\0" + f for f in frames]
    segs = []
    for k in range(4):
        s = bytearray(ip + struct.pack("!HHIIBBHHH", 40000, 5201, 1000 + 100 * k, 1, 5 << 4, 0x10, 500, 0, 0)
                      + bytes(100))
        s[2:4] = len(s).to_bytes(2, "big")
        s[4:6] = (1 + k).to_bytes(2, "big")
        segs.append(bytes(s))
    out.append(b"\1" + b"".join(bytes([len(s)]) + s for s in segs))
    sealer = Sealer(_KEY, _KEY, 1)
    dgrams = [_sealed(sealer, 4, b"a" * 40), _sealed(sealer, 5, b"b" * 40), _sealed(sealer, 6, b"c" * 30)]
    out.append(b"\2" + b"".join(bytes([len(d)]) + d for d in dgrams if 0 < len(d) < 256))
    more = dgrams + [_sealed(Sealer(_KEY, _KEY, 1), s, b"d" * 20) for s in (9, 8, 11, 12, 13, 2)] + dgrams[:1]
    for lead in (b"\x02", b"\x03"):  # NACK bookkeeping off / on (receive_new's start byte)
        out.append(b"\4" + bytes([1]) + lead + b"".join(bytes([len(d)]) + d for d in more if 0 < len(d) < 256))
    out += [b"\3" + s for s in segs[:2]]  # classify: a TCP segment, then garbage-ish
    out.append(b"\3" + bytes([0x60]) + bytes(45))
    return out


def main(argv=None) -> None:
    from target import fuzz_main  # tests/fuzz is sys.path[0] when run as a script

    fuzz_main(TestOneInput, argv)


if __name__ == "__main__":
    main()
