"""The mpvpn command line: subcommands exist and behave."""

import base64

from mpvpn import cli
from mpvpn.core.noise import load_psk


def test_genpsk_prints_a_key_that_loads(capsys):
    assert cli.main(["genpsk"]) == 0
    key = capsys.readouterr().out.strip()
    assert len(base64.b64decode(key)) == 32
    assert load_psk(key) == base64.b64decode(key)
    cli.main(["genpsk"])
    assert capsys.readouterr().out.strip() != key


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_check_subcommand_is_wired(tmp_path, capsys):
    (tmp_path / "orayboxvpn").write_text("config base 'base'\n\toption role 'client'\n")
    assert cli.main(["check", "--uci-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "orayboxvpn.base.psk" in out and "NOT OK" in out


def test_genkey_and_pubkey(capsys, monkeypatch):
    import io

    from mpvpn.core.noise import public_key

    assert cli.main(["genkey"]) == 0
    priv = capsys.readouterr().out.strip()
    assert len(base64.b64decode(priv)) == 32
    monkeypatch.setattr("sys.stdin", io.StringIO(priv + "\n"))
    assert cli.main(["pubkey"]) == 0
    assert base64.b64decode(capsys.readouterr().out.strip()) == public_key(base64.b64decode(priv))
    monkeypatch.setattr("sys.stdin", io.StringIO("not a key"))
    assert cli.main(["pubkey"]) == 1
    assert "expected a private key" in capsys.readouterr().err


def test_link_test_table_formats_results_and_survives_odd_values():
    doc = {"id": 3, "state": "done", "error": None, "peer": "siteb", "results": [
        {"name": "telecom", "direction": "up", "mbps": 48.7, "goodput_mbps": 43.9, "rtt_ms": 23.4,
         "loss": 0.0123},
        {"name": "x" * 80, "direction": "down", "mbps": None, "goodput_mbps": "fast", "rtt_ms": True,
         "loss": None}]}
    out = cli.format_link_test(doc).splitlines()
    assert out[0] == "link test 3 with siteb: done"
    assert out[2].split() == ["telecom", "up", "48.7", "43.9", "23.4", "1.23%"]
    assert out[3].split()[1:] == ["down", "-", "-", "-", "-"] and len(out[3].split()[0]) == 27
    assert "(no load" in cli.format_link_test({"state": "done", "error": "no load from the peer"})


def test_test_links_without_an_agent_says_so(tmp_path, capsys):
    assert cli.main(["test-links", "--run-dir", str(tmp_path)]) == 3
    assert "not running" in capsys.readouterr().err


def test_status_without_an_agent_text_and_json(tmp_path, capsys):
    import json

    assert cli.main(["status", "--run-dir", str(tmp_path)]) == 3
    cap = capsys.readouterr()
    assert cap.out == "" and "not running" in cap.err
    assert cli.main(["status", "--json", "--run-dir", str(tmp_path)]) == 3
    doc = json.loads(capsys.readouterr().out)  # a script still gets a document
    assert doc["state"] == "stopped" and "not running" in doc["error"]


def _help(capsys, *argv) -> str:
    import pytest

    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_defaults_and_says_what_each_option_is(capsys):
    text = _help(capsys, "run")
    assert f"(default: {cli.DEFAULT_UCI_DIR})" in text and f"(default: {cli.DEFAULT_RUN_DIR})" in text
    for cmd in ("run", "status", "test-links"):
        assert "--run-dir RUN_DIR the agent's run directory" in _help(capsys, cmd), cmd
    assert "--packets PACKETS user packets to send (default: 20000)" in _help(capsys, "demo")
    assert "base.psk" in _help(capsys, "genpsk")
    assert "base.private_key" in _help(capsys, "genkey")
    assert "standard input" in _help(capsys, "pubkey")


def test_demo_refuses_bad_values_with_its_own_usage(capsys):
    import pytest

    for argv in (["--loss", "150"], ["--loss", "x"], ["--packets", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["demo", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        usage = err.splitlines()[0]
        # the usage line offers what `mpvpn demo` accepts, nothing else (no --rate/--seed)
        assert usage == "usage: mpvpn demo [-h] [--packets PACKETS] [--loss LOSS]", err
        assert argv[0] in err


class SimAgentRpc:
    """Stands in for ``mpvpn.io.rpc.call`` against a running agent (its ``test_links`` and
    ``status`` handlers, src/mpvpn/agent/agent.py Agent.test_links / _link_test_status):
    the link test is the real one (mpvpn.core.linktest) between two sessions on simulated
    links; each status poll advances the simulated clock by ``step`` seconds."""

    def __init__(self, carriers=3, step=0.25):
        from mpvpn.tools.simnet import SimPair

        self.p = SimPair(carriers, delay=0.01, seed=3, sealed=True)
        assert self.p.handshake()
        for m in range(1, carriers + 1):
            self.p.set(m, rate=20e6 / 8, queue=100_000, loss=0.0)
        self.p.run(1.0)
        self.a = self.p.session("a")
        self.step = step
        self.polls = []

    def call(self, path, method, args=None, timeout=3.0):
        if method == "test_links":
            test_id = self.a.start_link_test(self.p.now, args["duration"])
            return {"started": True, "id": test_id, "phases": self.a.linktest.status()["phases"], "peer": "siteb"}
        assert method == "status"
        self.p.run(self.step)
        doc = dict(self.a.linktest.status(), peer="siteb")
        self.polls.append(doc)
        return {"state": "connected", "link_test": doc}


def test_test_links_prints_each_phase_as_it_runs(monkeypatch, capsys):
    """Each phase's name and direction when it starts, its result row when it ends, in the
    order the agent runs them and before the test is over; then the table."""
    import json

    sim = SimAgentRpc(carriers=2)
    monkeypatch.setattr("mpvpn.io.rpc.call", sim.call)
    monkeypatch.setattr("time.sleep", lambda s: None)
    printed = []
    real_print = print

    def spy(*a, **kw):  # what was printed while the test was still running
        printed.append((sim.polls[-1]["state"] if sim.polls else None, " ".join(map(str, a))))
        real_print(*a, **kw)

    monkeypatch.setattr("builtins.print", spy)
    assert cli.main(["test-links", "--duration", "1", "--run-dir", "/nonexistent"]) == 0
    out = capsys.readouterr().out.splitlines()
    final = sim.polls[-1]
    assert final["state"] == "done" and final["phases"] == 6
    names = [(ph["name"], ph["direction"]) for ph in final["plan"]]
    assert names == [(r["name"], r["direction"]) for r in final["results"]]
    progress = [ln for ln in out if ln.startswith("  [")]
    want = []
    for i, (name, d) in enumerate(names):
        want.append(f"  [{i + 1}/6] {name} {d} ...")
        want.append(cli.format_phase_result(i, 6, final["results"][i]))
    assert progress == want
    assert [s for s, ln in printed if ln.startswith("  [")][:-1] == ["running"] * (len(want) - 1)
    r0 = final["results"][0]
    assert progress[1] == (f"  [1/6] {names[0][0]} up: {r0['mbps']:.1f} Mbit/s, goodput "
                           f"{r0['goodput_mbps']:.1f} Mbit/s, rtt {r0['rtt_ms']:.1f} ms, loss {100 * r0['loss']:.2f} %")
    table = cli.format_link_test(final).splitlines()
    assert out[-len(table):] == table
    # --json: only the document
    sim = SimAgentRpc(carriers=2)
    monkeypatch.setattr("mpvpn.io.rpc.call", sim.call)
    assert cli.main(["test-links", "--duration", "1", "--json", "--run-dir", "/nonexistent"]) == 0
    assert json.loads(capsys.readouterr().out) == sim.polls[-1]


def test_link_test_progress_with_missed_polls_and_an_old_agent():
    """A phase that started and ended between two polls still gets its result row once;
    a document without ``plan`` (an older agent) still shows which phase runs."""
    prog = cli.LinkTestProgress(4)
    res = {"name": "a", "direction": "up", "mbps": 1.0, "goodput_mbps": 0.9, "rtt_ms": 10.0, "loss": 0.0}
    assert prog.update({"state": "running", "phase": 0, "phases": 4, "results": []}) == ["  [1/4] phase 1 ..."]
    assert prog.update({"state": "running", "phase": 0, "phases": 4, "results": []}) == []
    lines = prog.update({"state": "running", "phase": 2, "phases": 4, "results": [res, dict(res, direction="down")]})
    assert lines == [cli.format_phase_result(0, 4, res), cli.format_phase_result(1, 4, dict(res, direction="down")),
                     "  [3/4] phase 3 ..."]
    lines = prog.update({"state": "failed", "phase": None, "phases": 4, "results": [res, res, res]})
    assert lines == [cli.format_phase_result(2, 4, res)]
    assert cli.format_phase_result(0, 1, {"name": "x", "direction": "up", "loss": None}).endswith(
        "- Mbit/s, goodput - Mbit/s, rtt - ms, loss -")


def test_status_text_says_where_an_uplink_is_behind_nat_and_which_links_are_punched(capsys):
    link = {"peer": "b", "member": 1, "type": "mobile", "local": "10.3.1.2:7000",
            "remote": "203.0.113.203:7000", "state": "established", "rtt_ms": 2.0, "loss": 0.0,
            "tx_packets": 5, "rx_packets": 5}
    doc = {"role": "client", "name": "a", "state": "connected", "state_text": "connected",
           "uplinks": [{"name": "mobile", "type": "mobile", "bind_ip": "10.3.1.2", "port": 7000,
                        "state": "up", "error": None, "public": "203.0.113.103:7000",
                        "nat": "endpoint-independent"},
                       {"name": "telecom", "type": "telecom", "bind_ip": "10.1.0.1", "port": 7000,
                        "state": "up", "error": None, "public": None, "nat": "unknown"},
                       {"name": "unicom", "type": "unicom", "bind_ip": "10.2.0.1", "port": 7000,
                        "state": "up", "error": None, "public": None, "nat": None}],
           "links": [dict(link, path="punched"), dict(link, member=2, type="telecom", path="direct")]}
    cli._print_status(doc)
    out = capsys.readouterr().out.splitlines()
    ups = [ln for ln in out if ln.strip().startswith("uplink")]
    assert ups[0].endswith("up, public 203.0.113.103:7000 (endpoint-independent NAT)")
    assert ups[1].endswith("up, NAT unknown") and ups[2].endswith(" up")
    rows = [ln for ln in out if "203.0.113.203:7000" in ln]
    assert rows[0].endswith("  punched") and not rows[1].endswith("direct")


def test_status_text_says_a_link_is_relayed_and_why(capsys):
    link = {"peer": "b", "member": 1, "type": "mobile", "local": "10.3.1.2:7000",
            "remote": "203.0.113.1:50100", "state": "established", "rtt_ms": 3.0, "loss": 0.0,
            "tx_packets": 5, "rx_packets": 5, "path": "relayed", "relay": "203.0.113.1:3478",
            "relay_reason": "both ends behind NAT, this one symmetric: the direct path did not open"}
    up = {"name": "mobile", "type": "mobile", "bind_ip": "10.3.1.2", "port": 7000, "state": "up",
          "relay": {"started": True, "state": "waiting",
                    "last_error": "allocation failed: relay has insufficient capacity (508 x)"}}
    cli._print_status({"role": "client", "name": "a", "state": "connected", "links": [link],
                       "uplinks": [up]})
    out = capsys.readouterr().out
    assert ("via relay 203.0.113.1:3478: both ends behind NAT, this one symmetric: the direct "
            "path did not open") in out
    assert "relay: waiting: allocation failed: relay has insufficient capacity (508 x)" in out
    assert cli.relay_words(dict(link, path="direct")) is None
