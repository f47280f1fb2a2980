"""mpvpn.core.nack on its own: decisions out, no session, no callbacks."""

from mpvpn.core import wire
from mpvpn.core.nack import NackReceiver, NackRound, NackSender
from mpvpn.core.reorder import ReorderBuffer
from mpvpn.core.smpu import SessionConfig


class _Rtt:
    def __init__(self, srtt):
        self.srtt, self.rttvar = srtt, 0.001


class _Sub:
    def __init__(self, member, srtt):
        self.member, self.rtt = member, _Rtt(srtt)


def test_a_gap_is_asked_for_on_the_fastest_subflows_and_the_line_is_held():
    cfg = SessionConfig()
    rx = NackReceiver(cfg)
    reorder = ReorderBuffer(64, 0.1)
    reorder.push(1, "a", 0.0)
    rx.on_data(1, 1, 0.0, reorder.last)
    reorder.push(5, "e", 0.001)
    rx.on_data(1, 5, 0.001, reorder.last)  # 2, 3, 4 missing
    assert list(rx.missing) == [2, 3, 4] and rx.next is not None
    slow, fast, mid = _Sub(1, 0.050), _Sub(2, 0.010), _Sub(3, 0.020)
    r = rx.tick(rx.next, [slow, fast, mid], reorder)
    assert isinstance(r, NackRound)
    assert [wire.nack_decode(p) for p in r.payloads] == [[2, 3, 4]]
    assert [s.member for s in r.targets] == [2, 3][:cfg.nack_copies]  # fastest first
    assert r.defer is not None and r.defer > rx.last
    assert rx.nacks_sent == 1 and rx.nack_seqs == 3 and not rx.missing
    assert set(rx.asked) == {2, 3, 4}  # asked again if the re-send does not come
    # a re-send arrives: no longer asked for once the reorder buffer has it
    reorder.push(2, "b", 0.02)
    rx.on_data(2, 2, 0.02, reorder.last)
    assert rx.tick(rx.last, [fast], reorder).payloads == []  # rate limit: nothing yet


def test_reset_forgets_everything_missing():
    rx = NackReceiver(SessionConfig())
    rx.on_data(1, 10, 0.0, 0)
    assert rx.missing
    rx.reset()
    assert not rx.missing and not rx.asked and rx.next is None


def test_the_sender_resends_only_what_it_has_once_and_within_budget():
    cfg = SessionConfig(retransmit_burst=1, retransmit_budget=0.0)
    tx = NackSender(cfg)
    up = [_Sub(1, 0.01), _Sub(2, 0.02)]
    assert tx.on_nack(wire.nack_encode([7, 8, 9]), 1.0, 100, []) is None  # nothing up
    seqs = tx.on_nack(wire.nack_encode([7, 8, 9]), 1.0, 100, up)
    assert seqs == [7, 8, 9]
    assert not tx.decide(7, None, 1.0) and tx.nack_unavailable == 1
    assert not tx.decide(8, (8, b"x", [], 0.995), 1.0) and tx.nack_duplicates == 1  # just re-sent
    assert tx.decide(9, (9, b"x", []), 1.0)
    tx.spend()
    tx.resent()
    assert not tx.decide(9, (9, b"x", []), 1.0) and tx.nack_budget_drops == 1  # budget spent
    assert (tx.nacks_received, tx.nack_retransmits) == (2, 1)


def test_the_core_modules_of_this_split_stay_sans_io():
    """nack, schedbase and the session's two sides import no sockets, clocks
    or event loops (the I/O edges are the agent's)."""
    import ast
    import importlib
    banned = {"socket", "select", "selectors", "time", "asyncio", "threading", "os", "subprocess"}
    for name in ("mpvpn.core.nack", "mpvpn.core.schedbase", "mpvpn.core.smpu_send", "mpvpn.core.smpu_receive",
                 "mpvpn.core.smpu", "mpvpn.core.wire"):
        mod = importlib.import_module(name)
        tree = ast.parse(open(mod.__file__).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & banned, (name, imported & banned)
