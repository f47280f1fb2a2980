"""Fuzz target: the SMPU header decoder, ``mpvpn.core.wire.decode``.

Input: the fuzzer's bytes are one UDP datagram, as is.

Asserts, for every input:

* ``decode`` never raises and returns a :class:`~mpvpn.core.wire.Header` or a
  :class:`~mpvpn.core.wire.DecodeError`;
* the verdict (accept, or the exact error code) equals a reference decoder
  written here from ``docs/protocol.md`` (its own field layout and order of
  checks; the opcode list and the control payload sizes are taken from
  ``wire.CONTROL_SIZES``, so a new opcode needs no change here);
* an accepted header re-encodes (``wire.encode_header`` + the rest of the
  datagram) to exactly the input bytes, and its ``repr`` works;
* ``wire.nack_decode`` (where it exists) on the last 16 bytes never raises
  and names at most 64 ascending sequence numbers in ``base .. base + 63``
  (none for base 0), which ``nack_encode`` encodes back to the same list.

Run it under atheris (``python tests/fuzz/fuzz_wire.py [libFuzzer flags]``,
or ``python -m tests.fuzz.run --target wire``); ``tests/test_fuzz.py``
calls :func:`TestOneInput` directly without atheris.
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
    from mpvpn.core import wire

NAME = "wire"
_HAS_NACK = hasattr(wire, "nack_decode") and hasattr(wire, "nack_encode")

# --- reference decoder (independent of mpvpn.core.wire's code) ----------------------------

_REF = struct.Struct("!BBBBIHBBQ")  # version op member flags | session | length epoch reserved | seq
_CTRL_SIZES = {int(k): v for k, v in wire.CONTROL_SIZES.items()}
_OPS = set(_CTRL_SIZES) | {0x10}


def reference_decode(data: bytes):
    """The documented rules, in the documented order: an error name or a tuple."""
    if len(data) < 20:
        return "TRUNCATED"
    version, op, member, flags, session, length, epoch, reserved, seq = _REF.unpack_from(data)
    if version != 1:
        return "VERSION"
    if op not in _OPS:
        return "OPCODE"
    if flags & ~0x01 or reserved:
        return "FLAGS"
    expected = 20 + length + (16 if flags & 0x01 else 0)
    if len(data) < expected:
        return "TRUNCATED"
    if len(data) > expected:
        return "LENGTH"
    if member == 0:
        return "MEMBER"
    if session == 0:
        return "SESSION"
    if op != 0x10 and length != _CTRL_SIZES[op] and not (
            op in getattr(wire, "VARIABLE_SIZE", ()) and length > _CTRL_SIZES[op]):
        return "PAYLOAD"
    return (op, member, flags, session, length, epoch, seq)


def _check_decode(data: bytes) -> None:
    got = wire.decode(data)
    want = reference_decode(data)
    if isinstance(got, wire.DecodeError):
        assert want == got.name, f"decode said {got.name}, reference {want}"
        return
    assert isinstance(got, wire.Header), f"decode returned {type(got).__name__}"
    assert want == (got.opcode, got.member, got.flags, got.session, got.length, got.epoch,
                    got.seq), f"decode accepted {got!r}, reference {want}"
    assert got.version == wire.VERSION
    again = wire.encode_header(got.opcode, got.member, got.session, got.seq, got.length,
                               got.flags, got.epoch) + bytes(wire.payload_of(data, got))
    assert again == data, "accepted header does not re-encode to the same bytes"
    repr(got)


def _check_nack(payload: bytes) -> None:
    seqs = wire.nack_decode(payload)
    base = int.from_bytes(payload[:8], "big")
    if base == 0:
        assert seqs == [], seqs
        return
    assert len(seqs) <= 64 and seqs == sorted(set(seqs)), seqs
    assert all(base <= s <= base + 63 and s <= wire.MAX_SEQ for s in seqs), (base, seqs)
    if seqs:
        assert wire.nack_decode(wire.nack_encode(seqs)) == seqs


def TestOneInput(data: bytes) -> None:
    _check_decode(data)
    if _HAS_NACK and len(data) >= 16:
        _check_nack(data[-16:])


# --- seed corpus ------------------------------------------------------------------------

def seed_corpus() -> list[bytes]:
    """Valid datagrams of every opcode (plain and sealed) and a few bad ones."""
    out = []
    for op, size in sorted(wire.CONTROL_SIZES.items()):
        out.append(wire.encode(op, 1, 0x5E55, 7, bytes(size)))
        out.append(wire.encode(op, 3, 0x5E55, 8, bytes(size + wire.TAG_LEN), flags=wire.F_SEALED,
                               epoch=1))
    for n in (1, 100, 1400):
        out.append(wire.encode(wire.DATA, 2, 0xFFFFFFFF, 2**64 - 1, bytes(range(256)) * (n // 256)
                               + bytes(n % 256)))
        out.append(wire.encode(wire.DATA, 255, 1, 1, bytes(n + wire.TAG_LEN), flags=wire.F_SEALED,
                               epoch=255))
    good = out[0]
    out += [b"", good[:19], good[:-1], good + b"\x00", b"\x02" + good[1:]]
    return out


def main(argv=None) -> None:
    from target import fuzz_main  # tests/fuzz is sys.path[0] when run as a script

    fuzz_main(TestOneInput, argv)


if __name__ == "__main__":
    main()
