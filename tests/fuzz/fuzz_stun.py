"""Fuzz target: the STUN codec and the STUN/TURN clients (issue 15).

Input: the fuzzer's bytes are one UDP datagram from the STUN/TURN server's
address (the worst case: the source check has passed).

Asserts, for every input:

* ``stun.decode`` raises nothing but ``StunError``; an accepted message
  re-encodes (``stun.encode`` of its attributes) to the input with the
  attribute padding zeroed, unless attributes after MESSAGE-INTEGRITY were
  ignored (then it is shorter); integrity/fingerprint checks never raise;
* ``turn.decode_channel_data`` raises nothing but ``StunError`` and an
  accepted frame re-encodes to the input minus its (<= 3) padding bytes;
* a :class:`stun.BindingClient` with a round in flight and an allocated
  :class:`turn.TurnClient` with a bound channel never raise on it, and the
  datagram is accounted for exactly once: one drop counter moves, or (for
  the TURN client) one event comes out, or the Binding client's round ends.

Run under atheris (``python tests/fuzz/fuzz_stun.py [libFuzzer flags]``);
``tests/test_stun.py`` runs :func:`TestOneInput` on the seeds and on
deterministic random inputs without atheris.
"""

from __future__ import annotations

import contextlib
import copy
import struct

try:
    import atheris
except ImportError:
    atheris = None

_INSTRUMENT = atheris is not None and __name__ == "__main__"

with atheris.instrument_imports(include=["mpvpn"]) if _INSTRUMENT else contextlib.nullcontext():
    from mpvpn.core import stun, turn

NAME = "stun"
SRV = ("192.0.2.10", 3478)
PEER = ("198.51.100.7", 5000)
KEY = stun.long_term_key("alice", "example.org", "secret")


def _fixed_rng(seed: int):
    state = [seed]

    def rng(n: int) -> bytes:
        state[0] += 1
        return (state[0].to_bytes(4, "big") * 4)[:n]
    return rng


def _allocated_turn() -> turn.TurnClient:
    c = turn.TurnClient(SRV, "alice", "secret", rng=_fixed_rng(100))
    c.add_peer(PEER, 0.0)
    c.start(0.0)
    req = stun.decode(c.take_outgoing()[0][0])
    c.on_datagram(stun.encode(stun.ALLOCATE, stun.ERROR, req.txid, [
        (stun.ERROR_CODE, stun.encode_error_code(401)), (stun.REALM, b"example.org"),
        (stun.NONCE, b"n")]), SRV, 0.0)
    req = stun.decode(c.take_outgoing()[0][0])
    c.on_datagram(stun.encode(stun.ALLOCATE, stun.SUCCESS, req.txid, [
        (stun.XOR_RELAYED_ADDRESS, stun.encode_address(("192.0.2.10", 50000), xor=True, txid=req.txid)),
        (stun.LIFETIME, struct.pack("!I", 600))], integrity=KEY), SRV, 0.0)
    for _ in range(2):      # permission, then channel
        req = stun.decode(c.take_outgoing()[0][0])
        c.on_datagram(stun.encode(req.method, stun.SUCCESS, req.txid, [], integrity=KEY), SRV, 0.1)
    assert c.peer_state(PEER) == {"permission": True, "channel": 0x4000}, c.status()
    c.take_events()
    return c


def _binding() -> stun.BindingClient:
    c = stun.BindingClient([SRV], ("10.0.0.1", 4000), rng=_fixed_rng(1))
    c.start(0.0)
    c.take_outgoing()
    return c


_TURN = _allocated_turn()
_BINDING = _binding()


def _zero_padding(data: bytes) -> bytes:
    out = bytearray(data)
    pos = stun.HEADER_LEN
    while pos + 4 <= len(out):
        alen = struct.unpack_from("!H", out, pos + 2)[0]
        end = pos + 4 + alen
        padded = pos + 4 + ((alen + 3) & ~3)
        out[end:padded] = bytes(padded - end)
        pos = padded
    return bytes(out)


def _check_codec(data: bytes) -> None:
    try:
        m = stun.decode(data)
    except stun.StunError:
        return
    again = stun.encode(m.method, m.cls, m.txid, m.attrs)
    if len(again) == len(data):
        assert again == _zero_padding(data), "accepted message does not re-encode"
    else:
        assert len(again) < len(data) and m.has(stun.MESSAGE_INTEGRITY)
    m.check_integrity(KEY)
    m.check_integrity_sha256(KEY)
    m.check_fingerprint()
    for t, v in m.attrs:
        try:
            if t in (stun.XOR_MAPPED_ADDRESS, stun.XOR_PEER_ADDRESS, stun.XOR_RELAYED_ADDRESS):
                stun.decode_address(v, xor=True, txid=m.txid)
            elif t in (stun.MAPPED_ADDRESS, stun.OTHER_ADDRESS, stun.RESPONSE_ORIGIN):
                stun.decode_address(v, xor=False)
            elif t == stun.ERROR_CODE:
                stun.decode_error_code(v)
        except stun.StunError:
            pass


def _check_channel(data: bytes) -> None:
    try:
        ch, payload = turn.decode_channel_data(data)
    except stun.StunError:
        return
    frame = turn.encode_channel_data(ch, payload)
    assert data[:len(frame)] == frame and len(data) - len(frame) <= 3


def _check_clients(data: bytes) -> None:
    b = copy.deepcopy(_BINDING)
    before = sum(b.drops.values())
    b.on_datagram(data, SRV, 0.2)
    moved = sum(b.drops.values()) - before
    # accepted: the round ended, or (OTHER-ADDRESS) a second request went out
    accepted = b.result is not None or bool(b.take_outgoing())
    assert moved + accepted == 1, (b.drops, b.result)

    t = copy.deepcopy(_TURN)
    before = sum(t.drops.values())
    t.on_datagram(data, SRV, 0.3)
    moved = sum(t.drops.values()) - before
    events = t.take_events()
    # no request is pending, so a response is always a counted drop; an
    # indication or ChannelData is a drop or one Data event: nothing is silent
    assert moved + len(events) == 1, (t.drops, events)
    assert all(isinstance(e, turn.Data) and e.peer == PEER for e in events), events
    assert t.state == "allocated"


def TestOneInput(data: bytes) -> None:
    _check_codec(data)
    _check_channel(data)
    _check_clients(data)


def seed_corpus() -> list[bytes]:
    txid = bytes(range(12))
    out = [
        stun.encode(stun.BINDING, stun.SUCCESS, txid, [
            (stun.XOR_MAPPED_ADDRESS, stun.encode_address(("203.0.113.5", 40000), xor=True, txid=txid)),
            (stun.OTHER_ADDRESS, stun.encode_address(("192.0.2.11", 3479), xor=False)),
            (stun.SOFTWARE, b"coturn")], fingerprint=True),
        stun.encode(stun.BINDING, stun.SUCCESS, txid, [
            (stun.MAPPED_ADDRESS, stun.encode_address(("2001:db8::1", 1), xor=False))], integrity=KEY),
        stun.encode(stun.ALLOCATE, stun.ERROR, txid, [
            (stun.ERROR_CODE, stun.encode_error_code(438, "Stale Nonce")), (stun.NONCE, b"x" * 33),
            (stun.REALM, b"example.org")], fingerprint=True),
        stun.encode(stun.DATA, stun.INDICATION, txid, [
            (stun.XOR_PEER_ADDRESS, stun.encode_address(PEER, xor=True, txid=txid)),
            (stun.DATA_ATTR, b"payload")]),
        turn.encode_channel_data(0x4000, b"sealed"),
        turn.encode_channel_data(0x4000, b"abcde", pad=True),
        b"\x40\x01\x00\x00",
        b"",
    ]
    # answers to the Binding client's pending transaction (same rng, same id)
    tid = _fixed_rng(1)(12)
    for other in (None, ("192.0.2.11", 3479)):
        attrs = [(stun.XOR_MAPPED_ADDRESS, stun.encode_address(("203.0.113.5", 4000), xor=True,
                                                               txid=tid))]
        if other:
            attrs.append((stun.OTHER_ADDRESS, stun.encode_address(other, xor=False)))
        out.append(stun.encode(stun.BINDING, stun.SUCCESS, tid, attrs, fingerprint=True))
    return out


def main(argv=None) -> None:
    from target import fuzz_main  # tests/fuzz is sys.path[0] when run as a script

    fuzz_main(TestOneInput, argv)


if __name__ == "__main__":
    main()
