"""Monitoring the way router admins do it: the agent's per-link figures for
prometheus-node-exporter-lua (package prometheus-node-exporter-lua-orayboxvpn,
a collector file) and for collectd / luci-app-statistics (package
orayboxvpn-collectd, a script for collectd's exec plugin).

Both are Lua and read the status document with the Lua ubus binding.  They
run here under lua5.1 against

* the status documents of two real agents connected in this process
  (tests/test_agent_inproc.py's Pair: the real status code path), handed to
  the scripts as the Lua ubus binding would: the agent's blobmsg encoding
  (mpvpn.io.ubusmsg, what it sends ubusd) decoded as lua/ubus.c does (null
  fields absent).  The bus is tests/monitoring/ubus.lua, a stand-in for the
  binding; where the real binding (libubus-lua, MPVPN_LUA_UBUS=<dir of
  ubus.so>) and OpenWrt's ubusd are present, also against those, with the
  agent's own ubus transport publishing the object;
* a strict parser of the Prometheus text exposition format (below, and
  prometheus_client's parser as a second opinion) and of collectd's PUTVAL
  lines against collectd's types.db; where collectd is installed, collectd
  itself runs the script through its exec plugin and writes what it
  accepted with its csv plugin.

Every name, label and value is checked against the document it came from.
"""

from __future__ import annotations

import csv
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mpvpn.io import ubusmsg as um

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "monitoring"
PROM_PKG = ROOT / "package" / "prometheus-node-exporter-lua-orayboxvpn"
COLLECTOR_LUA_ROOT = PROM_PKG / "files" / "usr" / "lib" / "lua"
COLLECTD_PKG = ROOT / "package" / "orayboxvpn-collectd"
SCRIPT = COLLECTD_PKG / "files" / "usr" / "libexec" / "collectd" / "orayboxvpn"
ACL = COLLECTD_PKG / "files" / "usr" / "share" / "acl.d" / "orayboxvpn-collectd.json"
TYPES_DB = ROOT / "tests" / "data" / "collectd-types.db"

LUA = shutil.which("lua5.1") or shutil.which("lua")
needs_lua = pytest.mark.skipif(LUA is None, reason="lua5.1 not installed (Debian package lua5.1; .ci/run installs it)")


# -- status documents from real agents ------------------------------------------------

@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """(client document, server document) of two agents connected over three
    subflows with traffic both ways (one carrier losing every 4th datagram,
    so that loss figures are not all 0), and a fresh agent's (no session)."""
    from test_agent_inproc import Pair, ipv4_udp
    from test_statusdoc import _agent

    lossy = {"on": False, "n": 0}

    def drop(src, dst, d):  # carrier 3 (mobile) loses a quarter, both ways
        if lossy["on"] and (src[0].startswith("10.3.") or dst[0].startswith("10.3.")):
            lossy["n"] += 1
            return lossy["n"] % 4 == 0
        return False

    def figures(st):
        return (all(ln["rtt_ms"] is not None and ln["loss"] is not None and ln["loss_in"] is not None
                    for ln in st["links"])
                and any(ln["loss"] for ln in st["links"]) and any(ln["loss_in"] for ln in st["links"]))

    with Pair(tmp_path_factory.mktemp("pair"), drop=drop) as p:
        p.connected()
        lossy["on"] = True
        i = 0

        def traffic():
            nonlocal i
            for _ in range(5):
                p.ha.tun.inject(ipv4_udp("192.168.10.2", "192.168.20.2", b"to B %d" % i))
                p.hb.tun.inject(ipv4_udp("192.168.20.2", "192.168.10.2", b"to A %d" % i))
                i += 1
            a, b = p.a.status(), p.b.status()
            return figures(a) and figures(b) and (a, b)

        a, b = p.until(traffic, "loss figures on both sites")
    fresh = _agent(tmp_path_factory.mktemp("fresh"), "client").status()
    a, b, fresh = (json.loads(json.dumps(d)) for d in (a, b, fresh))
    assert a["state"] == "connected" and len(a["links"]) == 3 and b["sessions"]
    assert all(ln["tx_bytes"] and ln["rx_bytes"] for ln in a["links"]) and a["counters"]["delivered"] >= 5
    return a, b, fresh


def ubus_view(doc: dict) -> dict:
    """The document as a ubus caller receives it: the agent's blobmsg encoding
    of its reply (mpvpn.io.ubusmsg.encode_table, what UbusTransport sends),
    decoded (null = BLOBMSG_TYPE_UNSPEC, which lua/ubus.c turns into nil)."""
    return um.decode_table(um.encode_table(doc))


def lua_string(s: str) -> str:
    out = []
    for byte in s.encode():
        c = chr(byte)
        out.append(c if 32 <= byte < 127 and c not in '\\"' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def lua_literal(v) -> str:
    """A Lua constructor for ``v`` as ubus_lua_parse_blob builds it: tables
    keyed by name without the nil (UNSPEC) fields, arrays in order (a nil
    element leaves a hole), INT8 a boolean, every other number a number."""
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return lua_string(v)
    if isinstance(v, list):
        return "{" + ", ".join(lua_literal(x) for x in v) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"[{lua_string(k)}] = {lua_literal(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(type(v))


def write_bus(path: Path, doc: dict | None, ubusd: bool = True) -> Path:
    """The stand-in bus: object orayboxvpn answering ``status`` with ``doc``
    (None: no such object, the agent is stopped; ubusd False: no ubusd)."""
    objects = "{}" if doc is None else "{orayboxvpn = {status = " + lua_literal(ubus_view(doc)) + "}}"
    path.write_text(f"return {{ubusd = {'true' if ubusd else 'false'}, objects = {objects}}}\n")
    path.chmod(0o644)
    return path


def lua_env(bus: Path | None) -> dict:
    """The environment of a script run: the stand-in binding reading ``bus``,
    or (bus None) whatever ``require "ubus"`` finds (LUA_CPATH)."""
    env = dict(os.environ)
    standin = f"{FIXTURES}/standin/?.lua;" if bus is not None else ""
    env["LUA_PATH"] = f"{standin}{FIXTURES}/?.lua;{COLLECTOR_LUA_ROOT}/?.lua;;"
    if bus is not None:
        env["MPVPN_TEST_UBUS"] = str(bus)
    return env


# -- the Prometheus text exposition format (strict) ------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|Inf|NaN)")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class FormatError(AssertionError):
    pass


def parse_labels(s: str) -> dict:
    """label="value",... with only the escapes \\\\, \\" and \\n; no duplicates."""
    labels, i = {}, 0
    while i < len(s):
        m = LABEL_NAME.match(s, i)
        if not m or s[m.end():m.end() + 2] != '="':
            raise FormatError(f"bad label at {s[i:]!r}")
        name, i = m.group(), m.end() + 2
        val = []
        while True:
            if i >= len(s):
                raise FormatError(f"unterminated label value in {s!r}")
            c = s[i]
            if c == "\\":
                esc = s[i + 1:i + 2]
                if esc not in ('\\', '"', 'n'):
                    raise FormatError(f"bad escape \\{esc} in {s!r}")
                val.append("\n" if esc == "n" else esc)
                i += 2
            elif c == '"':
                i += 1
                break
            elif c == "\n":
                raise FormatError("newline in a label value")
            else:
                val.append(c)
                i += 1
        if name in labels:
            raise FormatError(f"label {name} twice in {s!r}")
        labels[name] = "".join(val)
        if i < len(s):
            if s[i] != ",":
                raise FormatError(f"expected , at {s[i:]!r}")
            i += 1
    return labels


# The real exporter's own families: it writes their TYPE lines before the
# collectors run and their samples after each one (run_all_collectors).
EXPORTER_OWN = {"node_scrape_collector_duration_seconds", "node_scrape_collector_success"}


def parse_prometheus(text: str) -> tuple[dict, dict]:
    """(name -> type, (name, frozenset(labels)) -> value) of a text-format
    scrape.  Strict: every sample's family has exactly one TYPE line, given
    before its samples; a family's lines are one group (but EXPORTER_OWN);
    no series twice; the grammar of the format."""
    types: dict[str, str] = {}
    samples: dict[tuple, float] = {}
    closed: set[str] = set()  # families whose group has ended
    current = None

    def enter(name):
        nonlocal current
        if name != current:
            if name in closed and name not in EXPORTER_OWN:
                raise FormatError(f"lines of {name} are not one group")
            if current is not None:
                closed.add(current)
            current = name

    for line in text.split("\n"):
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 2 and parts[1] == "TYPE":
                m = re.fullmatch(rf"# TYPE ({NAME}) (\w+)", line)
                if not m or m.group(2) not in TYPES:
                    raise FormatError(f"bad TYPE line {line!r}")
                if m.group(1) in types:
                    raise FormatError(f"second TYPE line for {m.group(1)}")
                if any(k[0] == m.group(1) for k in samples):
                    raise FormatError(f"TYPE of {m.group(1)} after its samples")
                enter(m.group(1))
                types[m.group(1)] = m.group(2)
            elif len(parts) >= 2 and parts[1] == "HELP" and not re.fullmatch(rf"# HELP {NAME}( .*)?", line):
                raise FormatError(f"bad HELP line {line!r}")
            continue
        m = re.fullmatch(rf"({NAME})(?:\{{(.*)\}})? (\S+)(?: (-?\d+))?", line)
        if not m:
            raise FormatError(f"bad sample line {line!r}")
        name, labels, value = m.group(1), parse_labels(m.group(2) or ""), m.group(3)
        if not FLOAT.fullmatch(value):
            raise FormatError(f"bad value {value!r} in {line!r}")
        if name not in types:
            raise FormatError(f"sample {name} without a TYPE line")
        enter(name)
        key = (name, frozenset(labels.items()))
        if key in samples:
            raise FormatError(f"series twice: {line!r}")
        samples[key] = float(value)
    return types, samples


def test_the_strict_parser_refuses_what_the_format_forbids():
    ok = '# TYPE a gauge\na{x="q\\"\\\\\\n"} 1.5e3\n'
    assert parse_prometheus(ok)[1] == {("a", frozenset({("x", 'q"\\\n')})): 1500.0}
    for bad in ('a 1\n', '# TYPE a gauge\n# TYPE a gauge\n', '# TYPE a gauge\na{x="\\t"} 1\n',
                '# TYPE a gauge\na{x="1",x="2"} 1\n', '# TYPE a gauge\na 1\na 2\n', '# TYPE a gauge\na one\n',
                '# TYPE a gauge\na{x="1} 1\n', '# TYPE a number\n', '# TYPE a gauge\na{1x="1"} 1\n',
                '# TYPE a gauge\n# TYPE b gauge\na 1\n', '# TYPE a gauge\na{x="1"} 1\n# TYPE b gauge\na{x="2"} 1\n'):
        with pytest.raises(FormatError):
            parse_prometheus(bad)


# -- what the collector should say, from the document ---------------------------------

AGENT_STATES = ("disabled", "connecting", "connected", "degraded", "stopped", "error")
SESSION_STATES = ("connected", "disconnected")
LINK_STATES = ("closed", "connect_sent", "connect_rcvd", "established", "closing")
UPLINK_STATES = ("up", "waiting", "error")


def expected_prometheus(doc: dict | None) -> dict:
    """(name, labels) -> value, the mapping docs/monitoring.md describes."""
    out: dict[tuple, float] = {}

    def put(name, labels, v):
        if isinstance(v, bool):
            v = int(v)
        if v is not None:
            out[(name, frozenset(labels.items()))] = float(v)

    def one_hot(name, labels, states, cur):
        for s in states:
            put(name, dict(labels, state=s), s == cur)
        if cur not in states:
            put(name, dict(labels, state=cur), 1)

    put("orayboxvpn_up", {}, doc is not None)
    if doc is None:
        return out
    put("orayboxvpn_info", {k: doc[k] for k in ("name", "role", "mode", "version")}, 1)
    one_hot("orayboxvpn_state", {}, AGENT_STATES, doc["state"])
    put("orayboxvpn_uptime_seconds", {}, doc["uptime"])
    put("orayboxvpn_state_seconds", {}, doc["since"])
    for s in doc["sessions"]:
        one_hot("orayboxvpn_session_state", {"peer": s["name"]}, SESSION_STATES, s["state"])
    for u in doc["uplinks"]:
        one_hot("orayboxvpn_uplink_state", {"uplink": u["name"], "type": u["type"]}, UPLINK_STATES, u["state"])
    for ln in doc["links"]:
        lab = {"peer": ln["peer"], "link": ln["name"], "type": ln["type"]}
        one_hot("orayboxvpn_link_state", lab, LINK_STATES, ln["state"])
        put("orayboxvpn_link_up", lab, ln["state"] == "established")
        scale = {"rtt_ms": 1e-3, "rttvar_ms": 1e-3, "rate_kbps": 1e3}
        for field, name in (("rtt_ms", "rtt_seconds"), ("rttvar_ms", "rttvar_seconds"),
                            ("rate_kbps", "rate_estimate_bits_per_second"), ("rate_measured", "rate_measured"),
                            ("weight", "weight"), ("quality", "quality"),
                            ("last_rx_age", "last_receive_age_seconds"),
                            ("tx_bytes", "transmit_bytes_total"), ("rx_bytes", "receive_bytes_total"),
                            ("tx_packets", "transmit_packets_total"), ("rx_packets", "receive_packets_total"),
                            ("ups", "ups_total"), ("downs", "downs_total")):
            v = ln[field]
            put(f"orayboxvpn_link_{name}", lab, None if v is None else v * scale.get(field, 1))
        put("orayboxvpn_link_loss_ratio", dict(lab, direction="out"), ln["loss"])
        put("orayboxvpn_link_loss_ratio", dict(lab, direction="in"), ln["loss_in"])
    for k, v in doc["counters"].items():
        put(f"orayboxvpn_{k}_total", {}, v)
    return out


def run_exporter(bus: Path | None, env_extra: dict | None = None, pre: tuple = ()) -> tuple[dict, dict, str]:
    env = lua_env(bus)
    env.update(env_extra or {})
    r = subprocess.run([LUA, *pre, str(FIXTURES / "exporter.lua"), "orayboxvpn"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", f"the collector failed: {r.stderr}"
    types, samples = parse_prometheus(r.stdout)
    return types, samples, r.stdout


def ours(samples: dict) -> dict:
    return {k: v for k, v in samples.items() if k[0].startswith("orayboxvpn_")}


def assert_same(got: dict, want: dict):
    assert set(got) == set(want), (f"missing: {sorted(map(str, set(want) - set(got)))}\n"
                                   f"unexpected: {sorted(map(str, set(got) - set(want)))}")
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


def second_opinion(text: str) -> set:
    """prometheus_client's parser (a dev-only dependency) reads the same samples."""
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client not installed "
                                 "(pip install prometheus-client; in the project's test extras)")
    out = set()
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("orayboxvpn_"):
                out.add((s.name, frozenset(s.labels.items()), s.value))
    return out


@needs_lua
@pytest.mark.parametrize("which", ["client", "server", "fresh"])
def test_the_collector_exports_every_figure_of_the_document(docs, tmp_path, which):
    doc = dict(zip(("client", "server", "fresh"), docs))[which]
    types, samples, text = run_exporter(write_bus(tmp_path / "bus.lua", doc))
    assert samples[("node_scrape_collector_success", frozenset({("collector", "orayboxvpn")}))] == 1
    want = expected_prometheus(doc)
    assert_same(ours(samples), want)
    for name, _labels in want:
        assert types[name] == ("counter" if name.endswith("_total") else "gauge"), name
    if which != "fresh":  # the figures are there, not only their names
        assert sum(1 for k in want if k[0] == "orayboxvpn_link_rtt_seconds") == len(doc["links"]) == 3
        assert sum(1 for k in want if k[0] == "orayboxvpn_link_loss_ratio") == 6
        assert any(v > 0 for k, v in want.items() if k[0] == "orayboxvpn_link_loss_ratio")
    assert second_opinion(text) == {(n, lab, v) for (n, lab), v in ours(samples).items()}


@needs_lua
def test_unknown_figures_give_no_sample_and_labels_are_escaped(docs, tmp_path):
    doc = json.loads(json.dumps(docs[0]))
    doc["links"][0].update(rtt_ms=None, rttvar_ms=None, loss=None, rate_kbps=None, last_rx_age=None)
    weird = 'site "b"\\\nx'
    for ln in doc["links"]:
        ln["peer"] = weird
    doc["sessions"][0]["name"] = weird
    types, samples, text = run_exporter(write_bus(tmp_path / "bus.lua", doc))
    assert_same(ours(samples), expected_prometheus(doc))
    first = frozenset({"peer": weird, "link": doc["links"][0]["name"], "type": doc["links"][0]["type"]}.items())
    assert ("orayboxvpn_link_rtt_seconds", first) not in samples
    assert ("orayboxvpn_link_transmit_bytes_total", first) in samples
    assert second_opinion(text) == {(n, lab, v) for (n, lab), v in ours(samples).items()}


@needs_lua
@pytest.mark.parametrize("ubusd", [True, False], ids=["agent-stopped", "no-ubusd"])
def test_a_stopped_agent_is_up_0_not_a_failed_scrape(tmp_path, ubusd):
    types, samples, _ = run_exporter(write_bus(tmp_path / "bus.lua", None, ubusd=ubusd))
    assert ours(samples) == {("orayboxvpn_up", frozenset()): 0.0}
    assert samples[("node_scrape_collector_success", frozenset({("collector", "orayboxvpn")}))] == 1


# -- collectd: types.db and PUTVAL (strict) --------------------------------------------

def read_types_db(path: Path) -> dict[str, list[tuple[str, str, str, str]]]:
    """type -> [(ds name, ds type, min, max)], collectd's types.db syntax
    (collectd src/types.db; src/daemon/types_list.c parse_line)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        # parse_line: fields split at blanks and commas
        name, *dss = [f for f in re.split(r"[\s,]+", line) if f]
        out[name] = [tuple(ds.split(":")) for ds in dss]
        for ds in out[name]:
            assert len(ds) == 4 and ds[1] in ("GAUGE", "DERIVE", "COUNTER", "ABSOLUTE"), line
    return out


def test_the_shipped_types_db_lines_are_collectd_s():
    """tests/data/collectd-types.db quotes collectd's types.db; where collectd
    is installed, its own file has the same definitions."""
    ours_ = read_types_db(TYPES_DB)
    assert {"gauge", "ping", "ping_stddev", "ping_droprate", "if_octets", "if_packets", "bitrate",
            "uptime", "derive"} <= set(ours_)
    system = Path("/usr/share/collectd/types.db")
    if not system.exists():
        pytest.skip("collectd is not installed here (/usr/share/collectd/types.db): nothing to compare with")
    real = read_types_db(system)
    for name, dss in ours_.items():
        assert real.get(name) == dss, name


DATA_MAX_NAME_LEN = 128  # collectd src/daemon/plugin.h (including the NUL)


def parse_putval(line: str, types: dict) -> tuple[tuple[str, str, str, str, str], list[float], float]:
    """((host, plugin, plugin instance, type, type instance), values, interval)
    of one PUTVAL line, as collectd's cmd_parse_putval / parse_identifier /
    parse_values (src/utils/cmds/putval.c, src/utils/common/common.c) read it,
    and refusing what they refuse: an identifier of other than host/plugin/type,
    an unknown type, a value count other than the type's data sources, a
    non-integer for a DERIVE or COUNTER."""
    m = re.fullmatch(r'PUTVAL ("(?:[^"\\]|\\.)*"|\S+)((?: [a-z_]+=\S+)*) (\S+)', line)
    if not m:
        raise FormatError(f"not a PUTVAL line: {line!r}")
    ident = m.group(1)
    if ident.startswith('"'):
        ident = re.sub(r"\\(.)", r"\1", ident[1:-1])
    parts = ident.split("/")
    if len(parts) != 3 or not all(parts):
        raise FormatError(f"identifier {ident!r} is not host/plugin[-instance]/type[-instance]")
    host, plugin, typ = parts
    plugin, _, pinst = plugin.partition("-")
    typ, _, tinst = typ.partition("-")
    for f in (host, plugin, pinst, typ, tinst):
        if len(f) >= DATA_MAX_NAME_LEN:
            raise FormatError(f"{f!r} longer than collectd takes")
    if typ not in types:
        raise FormatError(f"type {typ!r} is not in types.db")
    interval = None
    for opt in m.group(2).split():
        k, v = opt.split("=", 1)
        if k != "interval":
            raise FormatError(f"option {k} is not one PUTVAL takes")
        interval = float(v)
        if not interval > 0:
            raise FormatError("interval must be positive")
    fields = m.group(3).split(":")
    when, raw = fields[0], fields[1:]
    if when != "N" and not re.fullmatch(r"\d+(\.\d+)?", when):
        raise FormatError(f"bad time {when!r}")
    dss = types[typ]
    if len(raw) != len(dss):
        raise FormatError(f"{typ} has {len(dss)} data source(s), the line gives {len(raw)}")
    values = []
    for v, (_ds, dstype, lo, hi) in zip(raw, dss):
        if dstype == "GAUGE":
            if not FLOAT.fullmatch(v) and v != "U":
                raise FormatError(f"bad gauge {v!r}")
            x = float("nan") if v == "U" else float(v)
        elif dstype == "DERIVE":
            if not re.fullmatch(r"-?\d+", v):
                raise FormatError(f"a DERIVE takes an integer, not {v!r}")
            x = int(v)
        else:
            if not re.fullmatch(r"\d+", v):
                raise FormatError(f"a {dstype} takes an unsigned integer, not {v!r}")
            x = int(v)
        # rrdtool stores a value outside [min, max] as unknown: a gap in the graph
        if (lo != "U" and x < float(lo)) or (hi != "U" and x > float(hi)):
            raise FormatError(f"{v} outside {typ}'s range [{lo}, {hi}]")
        values.append(x)
    return (host, plugin, pinst, typ, tinst), values, interval


def test_the_putval_parser_refuses_what_collectd_refuses():
    types = read_types_db(TYPES_DB)
    ok = 'PUTVAL "h/orayboxvpn-a.b/if_octets" interval=10 N:1:2'
    assert parse_putval(ok, types) == (("h", "orayboxvpn", "a.b", "if_octets", ""), [1, 2], 10.0)
    for bad in ('PUTVAL "h/orayboxvpn/if_octets" N:1', 'PUTVAL "orayboxvpn/gauge" N:1',
                'PUTVAL "h/orayboxvpn/nosuchtype" N:1', 'PUTVAL "h/orayboxvpn/if_octets" N:1.5:2',
                'PUTVAL "h/orayboxvpn/ping_droprate" N:2', 'PUTVAL "h/orayboxvpn/gauge" N:x',
                'PUTVAL "h/orayboxvpn/gauge" size=3 N:1', 'PUTVAL "h//gauge" N:1'):
        with pytest.raises(FormatError):
            parse_putval(bad, types)


def cname(s) -> str:
    """The script's reduction of a name to [A-Za-z0-9_-], at most 63 characters."""
    return (re.sub(r"[^A-Za-z0-9_-]", "_", str(s)) or "_")[:63]


def expected_collectd(doc: dict | None) -> dict:
    """(plugin instance, type, type instance) -> values."""
    out: dict[tuple, list] = {}

    def put(pinst, typ, tinst, *values):
        if all(v is not None for v in values):
            out[(pinst, typ, tinst)] = [float(v) for v in values]

    put("", "gauge", "up", doc is not None)
    if doc is None:
        return out
    put("", "gauge", "connected", doc["state"] == "connected")
    put("", "uptime", "", doc["uptime"])
    for s in doc["sessions"]:
        put("", "gauge", f"session.{cname(s['name'])}", s["state"] == "connected")
    for u in doc["uplinks"]:
        put("", "gauge", f"uplink.{cname(u['name'])}", u["state"] == "up")
    for k, v in doc["counters"].items():
        put("", "derive", cname(k), v)
    for ln in doc["links"]:
        inst = f"{cname(ln['peer'])}.{cname(ln['name'])}"
        put(inst, "gauge", "up", ln["state"] == "established")
        put(inst, "ping", "rtt", ln["rtt_ms"])
        put(inst, "ping_stddev", "rtt", ln["rttvar_ms"])
        put(inst, "ping_droprate", "out", ln["loss"])
        put(inst, "ping_droprate", "in", ln["loss_in"])
        put(inst, "if_octets", "", ln["rx_bytes"], ln["tx_bytes"])
        put(inst, "if_packets", "", ln["rx_packets"], ln["tx_packets"])
        put(inst, "bitrate", "estimate", None if ln["rate_kbps"] is None else ln["rate_kbps"] * 1000)
        put(inst, "gauge", "weight", ln["weight"])
        put(inst, "gauge", "quality", ln["quality"])
    return out


def run_script_once(bus: Path | None, host="router1", interval="10.000", env_extra: dict | None = None,
                    pre: tuple = (), user: str | None = None) -> list[str]:
    env = lua_env(bus)
    env.update(COLLECTD_HOSTNAME=host, COLLECTD_INTERVAL=interval, **(env_extra or {}))
    r = subprocess.run([LUA, *pre, str(SCRIPT), "--once"], capture_output=True, text=True, env=env, timeout=60,
                       user=user)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.endswith("\n")
    return r.stdout.splitlines()


def check_putvals(lines: list[str], doc: dict | None, host="router1", interval=10.0):
    types = read_types_db(TYPES_DB)
    got = {}
    for line in lines:
        (h, plugin, pinst, typ, tinst), values, ivl = parse_putval(line, types)
        assert (h, plugin, ivl) == (host, "orayboxvpn", interval), line
        key = (pinst, typ, tinst)
        assert key not in got, f"twice in one round: {line}"
        got[key] = values
    want = expected_collectd(doc)
    assert set(got) == set(want), (f"missing: {sorted(set(want) - set(got))}\n"
                                   f"unexpected: {sorted(set(got) - set(want))}")
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


@needs_lua
@pytest.mark.parametrize("which", ["client", "server", "fresh"])
def test_the_collectd_script_puts_every_figure_of_the_document(docs, tmp_path, which):
    doc = dict(zip(("client", "server", "fresh"), docs))[which]
    lines = run_script_once(write_bus(tmp_path / "bus.lua", doc))
    check_putvals(lines, doc)
    if which == "client":
        assert sum(1 for ln in lines if "/ping-rtt" in ln) == 3
        assert sum(1 for ln in lines if "/ping_droprate-" in ln) == 6


@needs_lua
def test_the_collectd_script_skips_unknown_figures_and_reduces_names(docs, tmp_path):
    doc = json.loads(json.dumps(docs[0]))
    doc["links"][0].update(rtt_ms=None, loss_in=None, rate_kbps=None)
    for ln in doc["links"]:
        ln["peer"] = 'site "b"/x y'
    lines = run_script_once(write_bus(tmp_path / "bus.lua", doc), interval="2.5")
    check_putvals(lines, doc, interval=3.0)
    assert any('orayboxvpn-site__b__x_y.' in ln for ln in lines)


@needs_lua
@pytest.mark.parametrize("ubusd", [True, False], ids=["agent-stopped", "no-ubusd"])
def test_a_stopped_agent_is_gauge_up_0_for_collectd(tmp_path, ubusd):
    lines = run_script_once(write_bus(tmp_path / "bus.lua", None, ubusd=ubusd))
    assert lines == ['PUTVAL "router1/orayboxvpn/gauge-up" interval=10 N:0']
    check_putvals(lines, None)


@needs_lua
def test_the_collectd_script_keeps_running_and_stops_with_collectd(docs, tmp_path):
    """collectd's exec plugin keeps the script running: a round every
    COLLECTD_INTERVAL, then the script ends when collectd closes its pipe."""
    bus = write_bus(tmp_path / "bus.lua", docs[0])
    env = lua_env(bus)
    env.update(COLLECTD_HOSTNAME="router1", COLLECTD_INTERVAL="1.000")
    p = subprocess.Popen([LUA, str(SCRIPT)], stdout=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(120, p.kill)  # a script that hangs ends the reads below
    watchdog.start()
    try:
        ups = 0
        while ups < 2:  # two rounds
            line = p.stdout.readline()
            assert line, "the script ended"
            ups += line.startswith('PUTVAL "router1/orayboxvpn/gauge-up"')
        write_bus(bus, None)  # the agent stops
        while True:
            line = p.stdout.readline()
            assert line, "the script ended"
            if line.startswith('PUTVAL "router1/orayboxvpn/gauge-up"') and line.endswith(" N:0\n"):
                break
        p.stdout.close()  # collectd goes away
        p.wait(timeout=60)  # ended (SIGPIPE or a failed write), not hanging on
    finally:
        watchdog.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()


# -- collectd itself, running the script through its exec plugin ----------------------

COLLECTD = shutil.which("collectd") or next((p for p in ("/usr/sbin/collectd", "/sbin/collectd")
                                              if os.path.exists(p)), None)


@needs_lua
@pytest.mark.skipif(COLLECTD is None, reason="collectd not installed (Debian package collectd-core; "
                    ".ci/run installs it)")
def test_collectd_accepts_every_line_through_its_exec_plugin(docs, tmp_path):
    """collectd (exec + csv plugins) runs the script as luci-app-statistics
    would (Exec "nobody" ...: collectd refuses to exec as root) and writes
    every value it accepted: each expected identifier arrives with the
    document's values."""
    doc = docs[0]
    work = Path(tempfile.mkdtemp(prefix="mpvpn-collectd-"))
    try:
        work.chmod(0o755)  # the exec'd user reads the bus, the script and the stand-in binding
        for f in (SCRIPT, FIXTURES / "standin" / "ubus.lua"):
            shutil.copy(f, work / f.name)
            (work / f.name).chmod(0o755)
        bus = write_bus(work / "bus.lua", doc)
        user = "nobody" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
        data = work / "csv"
        conf = work / "collectd.conf"
        conf.write_text(f"""Hostname "router1"
BaseDir "{work}"
PIDFile "{work}/collectd.pid"
TypesDB "/usr/share/collectd/types.db"
Interval 1
LoadPlugin logfile
<Plugin logfile>
  LogLevel info
  File "{work}/collectd.log"
</Plugin>
LoadPlugin exec
LoadPlugin csv
<Plugin csv>
  DataDir "{data}"
  StoreRates false
</Plugin>
<Plugin exec>
  Exec "{user}" "{LUA}" "{work}/orayboxvpn"
</Plugin>
""")
        env = lua_env(bus)
        env["LUA_PATH"] = f"{work}/?.lua;;"
        want = expected_collectd(doc)

        def csv_name(k):
            pinst, typ, tinst = k
            return (f"orayboxvpn-{pinst}" if pinst else "orayboxvpn", f"{typ}-{tinst}" if tinst else typ)

        p = subprocess.Popen([COLLECTD, "-f", "-C", str(conf)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                have = {k for k in want if list((data / "router1" / csv_name(k)[0]).glob(csv_name(k)[1] + "-*"))}
                if have == set(want) or time.monotonic() > deadline or p.poll() is not None:
                    break
                time.sleep(0.2)
            time.sleep(0.3)  # the row being written
        finally:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # (collectd's log can hold non-UTF-8 bytes -- seen once, from a line
        # cut by the SIGTERM; it is read for the messages only)
        log = (work / "collectd.log").read_text(errors="replace") if (work / "collectd.log").exists() else ""
        assert have == set(want), f"collectd did not store {sorted(set(want) - have)}\nlog:\n{log}"
        assert "exec plugin" not in log or "Unable" not in log, log
        for k, values in want.items():
            d, prefix = csv_name(k)
            (f,) = (data / "router1" / d).glob(prefix + "-*")
            rows = list(csv.reader(f.read_text().splitlines()))
            assert rows[0][0] == "epoch" and len(rows[0]) == 1 + len(values), (f, rows[0])
            got = [float(x) for x in rows[-1][1:]]
            assert got == pytest.approx(values, rel=1e-6, abs=2e-6), (k, got, values)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the package recipes ---------------------------------------------------------------

@pytest.mark.parametrize("pkg", [PROM_PKG, COLLECTD_PKG], ids=lambda p: p.name)
def test_the_recipes_install_every_file_they_carry(pkg):
    from mpvpn import __version__
    from mpvpn.tools import ipk

    mk = ipk.parse_makefile(pkg / "Makefile")
    name = pkg.name
    assert mk.var("PKG_NAME") == name and mk.var("PKG_VERSION") == __version__
    assert mk.var("PKG_RELEASE") == ipk.parse_makefile(ROOT / "package" / "orayboxvpn" / "Makefile").var("PKG_RELEASE")
    fields = mk.package_fields(name)
    assert fields["PKGARCH"] == "all" and fields["TITLE"] and mk.define(f"Package/{name}/description").strip()
    depends = fields["DEPENDS"].split()
    assert "+orayboxvpn" in depends and "+libubus-lua" in depends  # require "ubus"
    installed = {}
    for line in mk.define(f"Package/{name}/install").splitlines():
        m = re.fullmatch(r"\t\$\((INSTALL_\w+)\) (\S+)(?: +(\S+))?", line)
        assert m, line
        if m.group(1) == "INSTALL_DIR":
            continue
        src, dest = m.group(2), m.group(3).replace("$(1)", "")
        assert src.startswith("./files/") and (pkg / src).is_file(), src
        if dest.endswith("/"):
            dest += Path(src).name
        assert dest == src.removeprefix("./files"), "files/ holds files at their router paths"
        installed[dest] = m.group(1)
    carried = {"/" + str(p.relative_to(pkg / "files")) for p in (pkg / "files").rglob("*") if p.is_file()}
    assert set(installed) == carried
    for dest, how in installed.items():
        f = pkg / "files" / dest.lstrip("/")
        executable = f.read_text().startswith("#!/usr/bin/lua\n")
        assert (how == "INSTALL_BIN") == executable == bool(f.stat().st_mode & 0o111), dest
    lines = [ln for ln in (pkg / "Makefile").read_text().splitlines() if ln.strip()]
    assert lines[-1] == f"$(eval $(call BuildPackage,{name}))"


def test_the_exporter_collector_is_packaged_as_openwrt_packages_does():
    """openwrt/packages utils/prometheus-node-exporter-lua: each optional
    collector is package prometheus-node-exporter-lua-<name>, depends on the
    exporter itself (not +: it must be selected) and installs one file."""
    from mpvpn.tools import ipk

    fields = ipk.parse_makefile(PROM_PKG / "Makefile").package_fields(PROM_PKG.name)
    assert fields["DEPENDS"].split()[0] == "prometheus-node-exporter-lua"
    assert (fields["SECTION"], fields["CATEGORY"]) == ("utils", "Utilities")
    assert [p.name for p in (COLLECTOR_LUA_ROOT / "prometheus-collectors").iterdir()] == ["orayboxvpn.lua"]
    deps = ipk.parse_makefile(COLLECTD_PKG / "Makefile").package_fields(COLLECTD_PKG.name)["DEPENDS"].split()
    assert {"+collectd-mod-exec", "+lua"} <= set(deps)


def test_the_acl_lets_collectd_s_user_read_the_status_and_nothing_else():
    """ubusd_acl.c (ubusd_acl_load_file): {"user", "access": {object:
    {"methods": [...]}}}; luci-app-statistics runs exec scripts as nobody
    (stat-genconfig config_exec: cmduser defaults to nobody)."""
    acl = json.loads(ACL.read_text())
    assert acl == {"user": "nobody", "access": {"orayboxvpn": {"methods": ["status"]}}}
    assert not ACL.stat().st_mode & 0o023  # ubusd skips a file writable by group/others or executable


# -- the real Lua binding and OpenWrt's ubusd -------------------------------------------

LUA_UBUS = os.environ.get("MPVPN_LUA_UBUS")  # a directory holding libubus-lua's ubus.so
UBUSD = shutil.which("ubusd")


def real_binding_missing() -> str | None:
    if LUA is None:
        return "lua5.1 not installed"
    if not UBUSD:
        return "OpenWrt's ubusd not on PATH"
    if not LUA_UBUS:
        return "MPVPN_LUA_UBUS (the directory of libubus-lua's ubus.so, ubus.git lua/) not set"
    r = subprocess.run([LUA, "-e", 'require "ubus"'], env={**os.environ, "LUA_CPATH": f"{LUA_UBUS}/?.so"},
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"the Lua ubus binding does not load: {r.stderr.strip()}"


@pytest.fixture
def real_ubus(tmp_path, docs):
    """OpenWrt's ubusd (ACLs from acl/) with the agent's own ubus transport
    publishing object orayboxvpn, whose status is the client's document."""
    why = real_binding_missing()
    if why:
        sys.stderr.write(f"\nreal-binding monitoring tests skipped: {why}\n")
        pytest.skip(why)
    from mpvpn.io import ubus as ubusmod
    from test_ubus import inline_post

    run = Path(tempfile.mkdtemp(prefix="mpvpn-ubus-"))
    run.chmod(0o755)
    acl = run / "acl"
    acl.mkdir()
    sock = run / "ubus.sock"
    p = subprocess.Popen([UBUSD, "-s", str(sock), "-A", str(acl)])
    transport = None
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline and p.poll() is None, "ubusd did not start"
            time.sleep(0.05)
        transport = ubusmod.UbusTransport({"status": lambda args: docs[0]}, inline_post, socket_path=str(sock))
        assert transport.start(10), transport.error
        yield {"sock": sock, "acl": acl, "ubusd": p, "transport": transport}
    finally:
        if transport is not None:
            transport.stop()
        p.terminate()
        p.wait(10)
        shutil.rmtree(run, ignore_errors=True)


def real_env(sock: Path) -> dict:
    return {"LUA_CPATH": f"{LUA_UBUS}/?.so;;", "MPVPN_UBUS_SOCKET": str(sock)}


HOOK = ("-e", f'dofile("{FIXTURES}/ubus_socket.lua")')


def test_through_the_real_binding_and_ubusd_the_same_figures_arrive(real_ubus, docs):
    types, samples, text = run_exporter(None, real_env(real_ubus["sock"]), HOOK)
    assert_same(ours(samples), expected_prometheus(docs[0]))
    check_putvals(run_script_once(None, env_extra=real_env(real_ubus["sock"]), pre=HOOK), docs[0])
    real_ubus["transport"].stop()  # the agent stops: its object goes
    deadline = time.monotonic() + 20
    while True:
        _t, samples, _ = run_exporter(None, real_env(real_ubus["sock"]), HOOK)
        if ours(samples) == {("orayboxvpn_up", frozenset()): 0.0} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ours(samples) == {("orayboxvpn_up", frozenset()): 0.0}
    assert run_script_once(None, env_extra=real_env(real_ubus["sock"]), pre=HOOK) == \
        ['PUTVAL "router1/orayboxvpn/gauge-up" interval=10 N:0']


@pytest.mark.skipif(os.getuid() != 0, reason="running the script as nobody needs root")
def test_the_shipped_acl_is_what_lets_nobody_read_the_status(real_ubus, docs):
    """collectd runs the script as nobody; ubusd lets a non-root client call
    only what an ACL file grants (ubusd_acl.c)."""
    env = real_env(real_ubus["sock"])
    assert run_script_once(None, env_extra=env, pre=HOOK, user="nobody") == \
        ['PUTVAL "router1/orayboxvpn/gauge-up" interval=10 N:0'], "nobody may call status without the ACL"
    shutil.copy(ACL, real_ubus["acl"] / ACL.name)
    (real_ubus["acl"] / ACL.name).chmod(0o644)
    real_ubus["ubusd"].send_signal(signal.SIGHUP)  # ubusd reloads its ACLs on SIGHUP
    deadline = time.monotonic() + 20
    while True:
        lines = run_script_once(None, env_extra=env, pre=HOOK, user="nobody")
        if len(lines) > 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    check_putvals(lines, docs[0])


# -- luci-app-statistics graphs ----------------------------------------------------------

DEFINITION = COLLECTD_PKG / "files" / "www" / "luci-static" / "resources" / "statistics" / "rrdtool" / \
    "definitions" / "orayboxvpn.js"
NODE = shutil.which("node")


@needs_lua
@pytest.mark.skipif(NODE is None, reason="node not installed (it runs the LuCI graph definition)")
@pytest.mark.parametrize("which", ["client", "server", "fresh", "stopped"])
def test_luci_statistics_graphs_read_exactly_the_files_collectd_writes(docs, tmp_path, which):
    """The graph definition (luci-app-statistics, plugin orayboxvpn) names
    only rrd files and data sources that collectd's rrdtool plugin writes
    from the script's lines (a missing one fails the whole graph), and
    graphs every one of them."""
    doc = dict(zip(("client", "server", "fresh", "stopped"), (*docs, None)))[which]
    if doc is not None and which == "client":
        doc = json.loads(json.dumps(doc))
        doc["links"][0]["rtt_ms"] = None  # no file for it: its graph keeps the other figures
        doc["links"][0]["rttvar_ms"] = None
    types = read_types_db(TYPES_DB)
    tree: dict[str, dict[str, list[str]]] = {}
    files = set()
    for line in run_script_once(write_bus(tmp_path / "bus.lua", doc)):
        (_h, _p, pinst, typ, tinst), _values, _i = parse_putval(line, types)
        tree.setdefault(pinst, {}).setdefault(typ, []).append(tinst)
        files |= {(pinst, typ, tinst, ds[0]) for ds in types[typ]}
    r = subprocess.run([NODE, str(FIXTURES / "luci_statistics.js")], capture_output=True, text=True, timeout=60,
                       input=json.dumps({"definition": str(DEFINITION), "host": "router1", "plugin": "orayboxvpn",
                                         "tree": tree}))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    graphed = {tuple(s) for s in out["sources"]}
    assert graphed - files == set(), "graphs name files or data sources collectd does not write"
    assert files - graphed == set(), "figures no graph shows"
    assert out["graphs"] >= (1 if doc is None else 3)
