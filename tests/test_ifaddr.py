"""OpenWrt interface addresses through the ubus CLI (a stand-in script here)."""

import json

from mpvpn.io import ifaddr

FAKE = """#!/bin/sh
name="${2#network.interface.}"
f="$FAKE_DIR/$name.json"
[ "$1" = call ] && [ "$3" = status ] && [ -f "$f" ] || { echo "Command failed: Not found" >&2; exit 4; }
cat "$f"
"""


def fake_ubus(tmp_path, monkeypatch, **ifaces):
    cmd = tmp_path / "ubus"
    cmd.write_text(FAKE)
    cmd.chmod(0o755)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    for name, st in ifaces.items():
        (tmp_path / f"{name}.json").write_text(st if isinstance(st, str) else json.dumps(st))
    return str(cmd)


def test_address_and_device_of_an_up_interface(tmp_path, monkeypatch):
    cmd = fake_ubus(tmp_path, monkeypatch, wan={
        "up": True, "l3_device": "pppoe-wan",
        "ipv4-address": [{"address": "100.64.1.2", "mask": 32}],
        "ipv6-address": [{"address": "2001:db8::2", "mask": 64}]})
    assert ifaddr.lookup("wan", ubus_cmd=cmd) == ifaddr.IfaceAddr("100.64.1.2", "pppoe-wan")
    assert ifaddr.lookup("wan", want_ipv6=True, ubus_cmd=cmd).address == "2001:db8::2"


def test_down_missing_and_garbage_are_reasons_not_exceptions(tmp_path, monkeypatch):
    cmd = fake_ubus(tmp_path, monkeypatch, wan2={"up": False, "l3_device": "eth2"},
                    wan3={"up": True, "ipv4-address": []}, bad="not json",
                    odd={"up": True, "ipv4-address": [{"address": "nonsense"}, 5]})
    r = ifaddr.lookup("wan2", ubus_cmd=cmd)
    assert r.address is None and r.device == "eth2" and "down" in r.error
    assert "no IPv4 address yet" in ifaddr.lookup("wan3", ubus_cmd=cmd).error
    assert "no OpenWrt interface 'nope'" in ifaddr.lookup("nope", ubus_cmd=cmd).error
    assert "unexpected answer" in ifaddr.lookup("bad", ubus_cmd=cmd).error
    assert ifaddr.lookup("odd", ubus_cmd=cmd).address is None


def test_no_ubus_on_a_plain_host(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    r = ifaddr.lookup("wan")
    assert r.address is None and "no ubus here" in r.error


def test_lan_subnets_from_netifd(tmp_path, monkeypatch):
    cmd = fake_ubus(tmp_path, monkeypatch, lan={
        "up": True, "l3_device": "br-lan",
        "ipv4-address": [{"address": "192.168.10.1", "mask": 24}, {"address": "10.9.0.1", "mask": 16}],
        "ipv6-address": [{"address": "fe80::1", "mask": 64}],
        "ipv6-prefix-assignment": [{"address": "fd10::", "mask": 64}]})
    assert ifaddr.subnets("lan", ubus_cmd=cmd) == ["192.168.10.0/24", "10.9.0.0/16", "fd10::/64"]
    assert ifaddr.subnets("nope", ubus_cmd=cmd) is None


def test_agent_takes_the_lan_from_netifd_where_ubus_is(tmp_path, monkeypatch):
    from agentlab import site_config

    from mpvpn.agent import config as cfgmod
    from mpvpn.agent.agent import Agent
    from mpvpn.core.noise import genpsk

    text, net = site_config("client", genpsk(), 1, "172.30.0.1", "192.168.10.1",
                            extra_base="\tlist lan_subnet '192.168.99.0/24'\n")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "orayboxvpn").write_text(text)
    (conf / "network").write_text(net)
    cfg, _ = cfgmod.load_config(str(conf))
    monkeypatch.setenv("PATH", "/nonexistent")  # a plain host: UCI network.lan
    assert Agent(cfg).lans == ["192.168.10.0/24", "192.168.99.0/24"]
    cmd = fake_ubus(tmp_path, monkeypatch, lan={
        "up": True, "ipv4-address": [{"address": "192.168.11.1", "mask": 24}]})
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert cmd.startswith(str(tmp_path))
    assert Agent(cfg).lans == ["192.168.11.0/24", "192.168.99.0/24"]  # netifd's live address wins
