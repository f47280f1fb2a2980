"""``mpvpn pair``: two matching configs that pass `mpvpn check` and read back
identically through mpvpn.io.uci."""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import os
import re
import stat
import sys

import pytest

from mpvpn.agent import check, config
from mpvpn.core import noise
from mpvpn.io import uci
from mpvpn.tools import pair

THREE = [
    "--a-uplink", "telecom=10.1.0.1", "--a-uplink", "unicom=10.2.0.1", "--a-uplink", "mobile=10.3.0.1",
    "--b-uplink", "telecom=10.1.0.2", "--b-uplink", "unicom=10.2.0.2", "--b-uplink", "mobile=10.3.0.2",
    "--a-lan", "192.168.10.0/24", "--b-lan", "192.168.20.0/24",
]


def run_pair(argv, capsys=None):
    parser = argparse.ArgumentParser(prog="mpvpn")
    pair.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pair", *argv])
    return args.func(args)


def network_file(directory, lan: str) -> None:
    net = ipaddress.ip_network(lan)
    (directory / "network").write_text(
        "config interface 'lan'\n\toption device 'br-lan'\n\toption proto 'static'\n"
        f"\toption ipaddr '{net.network_address + 1}'\n\toption netmask '{net.netmask}'\n")


def strip_comments(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


@pytest.fixture
def three(tmp_path, capsys):
    assert run_pair([*THREE, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    a, b = tmp_path / "out" / "site-a", tmp_path / "out" / "site-b"
    network_file(a, "192.168.10.0/24")
    network_file(b, "192.168.20.0/24")
    return a, b, out


def test_both_files_pass_mpvpn_check(three):
    a, b, out = three
    for d in (a, b):
        cfg, problems = config.load_config(str(d))
        assert cfg is not None and not [p for p in problems if p.is_error], [str(p) for p in problems]
        assert not problems, [str(p) for p in problems]  # not even a warning
        buf = io.StringIO()
        assert check.run(str(d), buf) == 0
        assert buf.getvalue().startswith("config OK:")
        assert stat.S_IMODE(os.stat(d / "orayboxvpn").st_mode) == 0o600
    assert "site-b (the server) first" in out


def test_files_match_each_other(three):
    a, b, _ = three
    ca, _ = config.load_config(str(a))
    cb, _ = config.load_config(str(b))
    assert (ca.base.role, cb.base.role) == ("client", "server")
    assert ca.base.psk == cb.base.psk and len(ca.base.psk) == 32
    assert [str(s) for s in ca.base.server_address] == ["10.1.0.2:7000", "10.2.0.2:7000", "10.3.0.2:7000"]
    assert str(cb.base.listen_address) == "0.0.0.0:7000"
    assert ca.vnc.network == cb.vnc.network == ipaddress.ip_network("172.30.0.0/30")
    assert (str(ca.vnc.ipaddr), str(cb.vnc.ipaddr)) == ("172.30.0.1", "172.30.0.2")
    assert [(u.name, u.type, str(u.bind_ip)) for u in ca.uplinks] == [
        ("telecom", "telecom", "10.1.0.1"), ("unicom", "unicom", "10.2.0.1"), ("mobile", "mobile", "10.3.0.1")]
    assert [u.type for u in cb.uplinks] == [u.type for u in ca.uplinks]
    assert ca.enabled and cb.enabled
    for lan in ("192.168.10.0/24", "192.168.20.0/24"):
        assert not ca.vnc.network.overlaps(ipaddress.ip_network(lan))


def test_uci_roundtrip_and_canonical_format(three):
    a, b, _ = three
    for d in (a, b):
        text = (d / "orayboxvpn").read_text()
        pkg = uci.parse(text, "orayboxvpn")
        assert uci.parse(uci.dump(pkg), "orayboxvpn") == pkg
        # apart from the comments, byte for byte what `uci commit` writes
        assert strip_comments(text) == uci.dump(pkg)
        assert text.startswith("# orayboxvpn: ")


def test_fresh_psk_every_time(tmp_path):
    texts = []
    for n in range(2):
        res = pair.generate(a_uplinks=["telecom=10.1.0.1"], b_uplinks=["telecom=10.1.0.2"],
                            a_lans=["192.168.10.0/24"], b_lans=["192.168.20.0/24"])
        psks = {uci.parse(t, "orayboxvpn").get("base", "psk") for t in res.texts.values()}
        assert len(psks) == 1
        noise.load_psk(psks.pop())
        texts.append(res.texts["site-a"])
    assert texts[0] != texts[1]


def test_vnc_avoids_lans_and_addresses():
    res = pair.generate(a_uplinks=["telecom=172.30.1.1"], b_uplinks=["telecom=172.30.1.5"],
                        a_lans=["172.30.0.0/24"], b_lans=["192.168.20.0/24"])
    assert res.vnc == ipaddress.ip_network("172.30.1.8/30")
    assert pair.choose_vnc([ipaddress.ip_network("172.30.0.0/16")]) == ipaddress.ip_network("172.31.0.0/30")


def test_interfaces_names_and_json_file(tmp_path, capsys):
    desc = {
        "a-uplink": ["telecom=@wan", "china-unicom=10.2.0.1@wan2"],
        "b-uplink": ["telecom=10.1.0.2", "china-unicom=10.2.0.2"],
        "a-lan": "192.168.10.0/24", "b-lan": ["192.168.20.0/24"],
        "b-extra-lan": ["192.168.30.0/24"], "port": 7443, "a-name": "beijing", "b-name": "shanghai",
        "mode": "adaptive",
    }
    (tmp_path / "pair.json").write_text(json.dumps(desc))
    assert run_pair(["--from", str(tmp_path / "pair.json"), "--mode", "duplicate",
                     "--out", str(tmp_path / "o")]) == 0
    a, b = tmp_path / "o" / "beijing", tmp_path / "o" / "shanghai"
    network_file(a, "192.168.10.0/24")
    network_file(b, "192.168.20.0/24")
    ca, pa = config.load_config(str(a))
    cb, pb = config.load_config(str(b))
    assert ca and cb, [str(p) for p in pa + pb]
    assert ca.base.mode == "duplicate"  # the command line wins over the file
    assert [(u.name, u.type, u.interface, str(u.bind_ip) if u.bind_ip else None) for u in ca.uplinks] == [
        ("telecom", "telecom", "wan", None), ("china_unicom", "china-unicom", "wan2", "10.2.0.1")]
    assert [str(s) for s in ca.base.server_address] == ["10.1.0.2:7443", "10.2.0.2:7443"]
    assert str(cb.base.listen_address) == "0.0.0.0:7443"
    assert [str(n) for n in cb.lan.extra] == ["192.168.30.0/24"]


def test_ipv6_server_addresses():
    res = pair.generate(a_uplinks=["telecom=2001:db8:1::1"], b_uplinks=["telecom=2001:db8:1::2"],
                        a_lans=["192.168.10.0/24"], b_lans=["192.168.20.0/24"])
    assert res.server_address == ["[2001:db8:1::2]:7000"]
    assert res.listen_address == "[::]:7000"


def test_explicit_server_address_and_vnc_subnet():
    res = pair.generate(a_uplinks=["telecom=@wan"], b_uplinks=["telecom=@wan"],
                        a_lans=["192.168.10.0/24"], b_lans=["192.168.20.0/24"],
                        server_address=["vpn.example.net", "203.0.113.10:7001"],
                        vnc_subnet="10.99.0.0/30")
    assert res.server_address == ["vpn.example.net:7000", "203.0.113.10:7001"]
    assert res.vnc == ipaddress.ip_network("10.99.0.0/30")
    a = uci.parse(res.texts["site-a"], "orayboxvpn")
    assert a.get("vnc", "ipaddr") == "10.99.0.1" and a.get("base", "server_address") == res.server_address


def test_the_names_given_to_pair_are_the_sites_names():
    res = pair.generate(a_uplinks=["telecom=@wan"], b_uplinks=["telecom=10.1.0.2"],
                        a_lans=["192.168.10.0/24"], b_lans=["192.168.20.0/24"],
                        a_name="shanghai", b_name="beijing-hq")
    for name in ("shanghai", "beijing-hq"):
        assert uci.parse(res.texts[name], "orayboxvpn").get("base", "name") == name


@pytest.mark.parametrize("kwargs,message", [
    (dict(b_uplinks=["mobile=10.3.0.2"]), "the carriers differ"),
    (dict(b_lans=["192.168.10.128/25"]), "the LANs overlap"),
    (dict(a_uplinks=["telecom"]), "TYPE=ADDRESS"),
    (dict(a_uplinks=["telecom=10.1.0.300"]), "not an IP address"),
    (dict(a_uplinks=["telecom=@wan-2"]), "not an OpenWrt interface name"),
    (dict(b_uplinks=["telecom=@wan"]), "--server-address"),
    (dict(vnc_subnet="192.168.10.0/30"), "overlaps"),
    (dict(vnc_subnet="10.0.0.0/31"), "/8 to /30"),
    (dict(a_lans=[]), "--a-lan"),
    (dict(psk="c2hvcnQ="), "psk"),
    (dict(a_name="site b"), "site name"),
])
def test_description_errors(kwargs, message):
    base = dict(a_uplinks=["telecom=10.1.0.1"], b_uplinks=["telecom=10.1.0.2"],
                a_lans=["192.168.10.0/24"], b_lans=["192.168.20.0/24"])
    base.update(kwargs)
    with pytest.raises(pair.PairError, match=re.escape(message)):
        pair.generate(**base)


def test_cli_errors_and_no_overwrite(tmp_path, capsys):
    assert run_pair([*THREE]) == 2
    assert "--out" in capsys.readouterr().err
    assert run_pair([*THREE, "--out", str(tmp_path)]) == 0
    before = (tmp_path / "site-a" / "orayboxvpn").read_text()
    assert run_pair([*THREE, "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "site-a" / "orayboxvpn").read_text() == before
    assert run_pair([*THREE, "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "site-a" / "orayboxvpn").read_text() != before  # a fresh psk


def test_warns_on_uneven_carriers(capsys, tmp_path):
    assert run_pair(["--a-uplink", "telecom=10.1.0.1", "--a-uplink", "telecom=10.1.1.1",
                     "--b-uplink", "telecom=10.1.0.2", "--a-lan", "192.168.10.0/24",
                     "--b-lan", "192.168.20.0/24", "--out", str(tmp_path)]) == 0
    assert "warning: carrier telecom: 2 uplink(s)" in capsys.readouterr().out
    a = uci.parse((tmp_path / "site-a" / "orayboxvpn").read_text(), "orayboxvpn")
    assert [s.name for s in a.sections("smpu")] == ["telecom", "telecom_2"]


def test_without_jinja2(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(pair.PairError, match="jinja2"):
        pair.generate(a_uplinks=["telecom=10.1.0.1"], b_uplinks=["telecom=10.1.0.2"],
                      a_lans=["192.168.10.0/24"], b_lans=["192.168.20.0/24"])


def test_template_is_package_data():
    assert (pair.TEMPLATE_DIR / pair.TEMPLATE).is_file()
