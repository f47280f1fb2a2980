"""docs/status.md says its fields are always present: check every field of
its examples in the documents real agents give in each state (a client still
connecting, a server with no session, both connected).

The field list is read from the doc's ```json examples: the whole document,
then the server's ``control``.  An example value ``{}`` is "an object,
contents not listed"; an example list's first element lists the fields of
every element."""

import json
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "status.md"


def doc_examples() -> tuple[dict, dict]:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 2, "docs/status.md: the document and the server's control as ```json blocks"
    full, server_control = json.loads(blocks[0]), json.loads(blocks[1])
    return full, server_control


def missing(doc, example, path="") -> list[str]:
    out: list[str] = []
    if doc is None:  # "unknown values are null"
        return out
    if isinstance(example, dict):
        if not isinstance(doc, dict):
            return [f"{path or '.'} is {type(doc).__name__}, not an object"]
        for k, v in example.items():
            p = f"{path}.{k}" if path else k
            if k not in doc:
                out.append(p)
            elif v != {}:
                out += missing(doc[k], v, p)
    elif isinstance(example, list) and example and isinstance(example[0], dict):
        if not isinstance(doc, list):
            return [f"{path} is {type(doc).__name__}, not a list"]
        for i, item in enumerate(doc):
            out += missing(item, example[0], f"{path}[{i}]")
    return out


def schema(role: str) -> dict:
    full, server_control = doc_examples()
    return dict(full, control=server_control) if role == "server" else full


def test_the_doc_lists_the_fields_the_examples_need():
    full, server_control = doc_examples()
    assert {"control", "counters", "links", "sessions", "dataplane", "link_test", "policies"} <= set(full)
    assert {"sent", "delivered", "mss_clamped"} <= set(full["counters"])
    assert set(server_control) == {"state", "listen", "connections", "closed_by_reason", "registry"}
    assert missing({"a": 1}, {"a": None, "b": {"c": 1}}) == ["b"]
    assert missing({"l": [{"x": 1}, {}]}, {"l": [{"x": 0}]}) == ["l[1].x"]


def _agent(tmp_path, role):
    from agentlab import site_config

    from mpvpn.agent import config as cfgmod
    from mpvpn.agent.agent import Agent
    from mpvpn.core.noise import genpsk

    text, net = site_config(role, genpsk(), 1 if role == "client" else 2, "172.30.0.1", "192.168.10.1")
    (tmp_path / "orayboxvpn").write_text(text)
    (tmp_path / "network").write_text(net)
    cfg, problems = cfgmod.load_config(str(tmp_path))
    assert cfg is not None, problems
    return Agent(cfg, uci_dir=str(tmp_path), run_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("role", ["client", "server"])
def test_a_fresh_agent_has_every_documented_field(tmp_path, role):
    st = json.loads(json.dumps(_agent(tmp_path, role).status()))
    assert st["state"] == "connecting" and st["sessions"] == []
    assert missing(st, schema(role)) == []


@pytest.mark.usefixtures("netlab_ready")
def test_running_agents_have_every_documented_field_in_each_state(make_lab):
    from agentlab import TwoSites

    lab = make_lab(carriers=2)
    with TwoSites(lab, carriers=2) as ts:
        ts.b.start()
        st = ts.b.wait(lambda s: True, 10, "server up")
        assert st["sessions"] == [] and missing(st, schema("server")) == [], "server, no session"
        ts.b.stop()
        ts.a.start()  # no server: the client stays connecting
        st = ts.a.wait(lambda s: s["uplinks"] and all(u["state"] == "up" for u in s["uplinks"]), 10,
                       "client uplinks up")
        assert st["state"] == "connecting" and missing(st, schema("client")) == [], "client, connecting"
        ts.b.start()
        st_a, st_b = ts.a.wait_connected(2), ts.b.wait_connected(2)
        assert st_a["links"] and st_a["sessions"]
        from mpvpn.agent.agent import \
            SESSION_COUNTERS  # the names it shows with no session are real ones
        assert set(SESSION_COUNTERS) <= set(st_a["sessions"][0]["counters"])
        assert missing(st_a, schema("client")) == [], "client, connected"
        assert missing(st_b, schema("server")) == [], "server, connected"
