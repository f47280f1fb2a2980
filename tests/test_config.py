"""Tests for mpvpn.agent.config: typed values, and every problem explained."""

from __future__ import annotations

import base64
import ipaddress
import re
import shutil
from pathlib import Path

import pytest

from mpvpn.agent import config
from mpvpn.agent.config import ERROR, WARNING, HostPort, load_config, parse_hostport
from mpvpn.io import uci

ROOT = Path(__file__).resolve().parents[1]
PSK = base64.b64encode(bytes(range(1, 33))).decode()

SITE_A = f"""
config base 'base'
	option role 'client'
	option server_address '10.1.0.2:7000'
	option psk '{PSK}'

config vnc 'vnc'
	option ipaddr '172.30.0.1'
	option netmask '255.255.255.252'

config smpu 'telecom'
	option type 'telecom'
	option bind_ip '10.1.0.1'

config smpu 'unicom'
	option type 'unicom'
	option bind_ip '10.2.0.1'

config smpu 'mobile'
	option type 'mobile'
	option bind_ip '10.3.0.1'
"""

NETWORK_A = """
config interface 'loopback'
	option device 'lo'
	option proto 'static'
	option ipaddr '127.0.0.1'
	option netmask '255.0.0.0'

config globals 'globals'
	option ula_prefix 'fd12:3456:789a::/48'

config device
	option name 'br-lan'
	option type 'bridge'
	list ports 'lan1'

config interface 'lan'
	option device 'br-lan'
	option proto 'static'
	option ipaddr '192.168.10.1'
	option netmask '255.255.255.0'
	option ip6assign '60'
"""

SITE_B = f"""
config base 'base'
	option role 'server'
	option listen_address '0.0.0.0:7000'
	option psk '{PSK}'

config vnc 'vnc'
	option ipaddr '172.30.0.2'
	option netmask '255.255.255.252'

config smpu 'telecom'
	option type 'telecom'
	option bind_ip '10.1.0.2'

config smpu 'unicom'
	option type 'unicom'
	option bind_ip '10.2.0.2'

config smpu 'mobile'
	option type 'mobile'
	option bind_ip '10.3.0.2'
"""

NETWORK_B = """
config interface 'lan'
	option device 'br-lan'
	option proto 'static'
	option ipaddr '192.168.20.1'
	option netmask '255.255.255.0'
"""


def write(d: Path, orayboxvpn: str | None, network: str | None = NETWORK_A) -> str:
    """The two files, orayboxvpn with uci's mode for a new file (0600: it holds the PSK)."""
    d.mkdir(parents=True, exist_ok=True)
    if orayboxvpn is not None:
        (d / "orayboxvpn").write_text(orayboxvpn)
        (d / "orayboxvpn").chmod(uci.UCI_FILEMODE)
    if network is not None:
        (d / "network").write_text(network)
    return str(d)


def check(text: str, network: str | None = NETWORK_A):
    pkg = uci.parse(text, "orayboxvpn")
    net = uci.parse(network, "network") if network is not None else None
    return config.validate(pkg, net, None if net else "no network file")


def lines(problems) -> list[str]:
    return [str(p) for p in problems]


def errors(problems) -> list[str]:
    return [str(p) for p in problems if p.severity == ERROR]


def warnings(problems) -> list[str]:
    return [str(p) for p in problems if p.severity == WARNING]


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


# --- the example sites of issue 4, unchanged ------------------------------------

def test_site_a_client(tmp_path):
    cfg, problems = load_config(write(tmp_path, SITE_A, NETWORK_A))
    assert problems == []
    assert cfg.enabled and cfg.base.role == "client"
    assert cfg.base.server_address == (HostPort("10.1.0.2", 7000),)
    assert cfg.base.listen_address is None
    assert cfg.base.psk == bytes(range(1, 33))
    assert PSK not in repr(cfg)  # the key never shows up in logs
    assert cfg.base.mode == "duplicate"
    assert (cfg.base.keepalive_idle, cfg.base.keepalive_active, cfg.base.dead_after) == (0.75, 0.1, 3)
    assert (cfg.base.hold_max_ms, cfg.base.reorder_capacity, cfg.base.mtu) == (200, 4096, 1400)
    assert cfg.base.rx_buffer is None  # unset: the kernel caps the agent's 4 MiB request
    assert cfg.vnc.ipaddr == ipaddress.IPv4Address("172.30.0.1")
    assert str(cfg.vnc.interface) == "172.30.0.1/30"
    assert str(cfg.vnc.netmask) == "255.255.255.252"
    assert (cfg.vnc.ifname, cfg.vnc.mtu) == ("mpvpn0", 1400)
    assert [(u.name, u.type, str(u.bind_ip), u.port, u.enabled) for u in cfg.uplinks] == [
        ("telecom", "telecom", "10.1.0.1", 7000, True),
        ("unicom", "unicom", "10.2.0.1", 7000, True),
        ("mobile", "mobile", "10.3.0.1", 7000, True),
    ]
    assert [str(n) for n in cfg.lan.subnets] == ["192.168.10.0/24"]
    assert [str(a) for a in cfg.lan.addresses] == ["192.168.10.1/24"]


def test_site_b_server(tmp_path):
    cfg, problems = load_config(write(tmp_path, SITE_B, NETWORK_B))
    assert problems == []
    assert cfg.base.role == "server"
    assert cfg.base.listen_address == HostPort("0.0.0.0", 7000)
    assert cfg.base.server_address == ()
    assert str(cfg.vnc.interface) == "172.30.0.2/30"
    assert [str(u.bind_ip) for u in cfg.uplinks] == ["10.1.0.2", "10.2.0.2", "10.3.0.2"]
    assert [str(n) for n in cfg.lan.subnets] == ["192.168.20.0/24"]


@pytest.mark.parametrize(
    "lan",
    [
        "option ipaddr '192.168.20.1/24'",
        "list ipaddr '192.168.20.1/24'",
        "option ipaddr '192.168.20.1'\n\toption netmask '24'",
    ],
)
def test_lan_forms(lan):
    cfg, problems = check(SITE_B, f"config interface 'lan'\n\toption proto 'static'\n\t{lan}\n")
    assert problems == []
    assert [str(n) for n in cfg.lan.subnets] == ["192.168.20.0/24"]


def test_lan_several_addresses_and_ipv6():
    net = (
        "config interface 'lan'\n\tlist ipaddr '192.168.20.1/24'\n\tlist ipaddr '10.20.0.1/16'\n"
        "\tlist ip6addr 'fd00:20::1/64'\n"
    )
    cfg, problems = check(SITE_B, net)
    assert problems == []
    assert [str(n) for n in cfg.lan.subnets] == ["192.168.20.0/24", "10.20.0.0/16", "fd00:20::/64"]


# --- the shipped default and `enabled` -----------------------------------------

def test_shipped_default_is_disabled_and_says_what_to_fill_in(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    shutil.copy(ROOT / "files/etc/config/orayboxvpn", d / "orayboxvpn")
    (d / "network").write_text(NETWORK_A)
    cfg, problems = load_config(str(d))
    assert cfg is None
    out = lines(problems)
    assert out[0].startswith("orayboxvpn.base.enabled: warning: the service is disabled")
    assert "uci set orayboxvpn.base.enabled=1" in out[0]
    paths = [p.path for p in problems if p.severity == ERROR]
    assert paths == [
        "orayboxvpn.base.psk",
        "orayboxvpn.base.server_address",
        "orayboxvpn.vnc.ipaddr",
        "orayboxvpn.telecom.bind_ip",
        "orayboxvpn.unicom.bind_ip",
        "orayboxvpn.mobile.bind_ip",
    ]
    assert all(re.match(r"^orayboxvpn\.[\w@\[\]-]+(\.\w+)?: ", line) for line in out)


def test_disabled_but_complete_config_is_returned():
    cfg, problems = check(edit(SITE_A, "option role 'client'", "option enabled '0'\n\toption role 'client'"))
    assert cfg is not None and cfg.enabled is False
    assert lines(problems) == [
        "orayboxvpn.base.enabled: warning: the service is disabled (enabled '0'): the configuration "
        "is complete; start it with `uci set orayboxvpn.base.enabled=1; uci commit orayboxvpn; "
        "/etc/init.d/orayboxvpn restart`"
    ]


@pytest.mark.parametrize("word, value", [("1", True), ("yes", True), ("on", True), ("true", True),
                                         ("enabled", True), ("0", False), ("off", False), ("disabled", False)])
def test_booleans(word, value):
    cfg, _ = check(edit(SITE_A, "option role", f"option enabled '{word}'\n\toption role"))
    assert cfg.enabled is value


def test_bad_boolean():
    _, problems = check(edit(SITE_A, "option role", "option enabled 'maybe'\n\toption role"))
    assert errors(problems) == ["orayboxvpn.base.enabled: 'maybe' is not a boolean: use '1' or '0'"]


# --- files ----------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    cfg, problems = load_config(str(tmp_path / "nope"))
    assert cfg is None
    assert lines(problems) == [f"orayboxvpn: config directory {tmp_path / 'nope'} does not exist (use --uci-dir DIR)"]


def test_missing_orayboxvpn_file(tmp_path):
    cfg, problems = load_config(write(tmp_path, None))
    assert cfg is None and len(problems) == 1
    assert str(problems[0]).startswith(f"orayboxvpn: {tmp_path / 'orayboxvpn'} not found: install")


def test_missing_network_file_is_a_warning(tmp_path):
    cfg, problems = load_config(write(tmp_path, SITE_A, None))
    assert cfg is not None and cfg.lan.subnets == ()
    assert lines(problems) == [
        f"network: warning: {tmp_path / 'network'} not found: no LAN subnet from network.lan; "
        "the peer only gets routes for orayboxvpn.base.lan_subnet"
    ]


def test_parse_errors_name_the_line(tmp_path):
    cfg, problems = load_config(write(tmp_path, SITE_A + "\toption bind_ip 'unterminated\n"))
    assert cfg is None
    assert lines(problems) == [
        f"orayboxvpn: {tmp_path / 'orayboxvpn'}: EOF with unterminated ' at line 22, byte 30 (uci: Parse error)"
    ]
    cfg, problems = load_config(write(tmp_path, SITE_A, "config interface 'lan'\n\tbogus\n"))
    assert cfg is None
    assert lines(problems) == [
        f"network: {tmp_path / 'network'}: invalid command at line 2, byte 1 (uci: Parse error)"
    ]


def test_unreadable_file(tmp_path):
    d = write(tmp_path, SITE_A)
    (tmp_path / "orayboxvpn").unlink()
    (tmp_path / "orayboxvpn").mkdir()  # a directory where the file should be
    cfg, problems = load_config(d)
    assert cfg is None and lines(problems)[0].startswith("orayboxvpn: cannot read")


# --- base -------------------------------------------------------------------------------

def test_missing_sections():
    _, problems = check("config smpu 'x'\n\toption type 'x'\n\toption bind_ip '10.9.0.1'\n")
    assert errors(problems) == [
        "orayboxvpn.base: missing section: add `config base 'base'` with role, psk and "
        "server_address (client) or listen_address (server)",
        "orayboxvpn.vnc: missing section: add `config vnc 'vnc'` with ipaddr and netmask "
        "(e.g. '172.30.0.1' and '255.255.255.252')",
    ]


def test_duplicate_base_section():
    _, problems = check(SITE_A + "\nconfig base\n\toption role 'server'\n")
    assert errors(problems) == ["orayboxvpn.@base[1]: only one `config base` section is allowed (this one is ignored)"]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("option role 'client'", "option role 'master'",
         "orayboxvpn.base.role: 'master' is not allowed: use 'client' or 'server'"),
        ("option role 'client'", "option role 'client'\n\toption name 'shop 2'",
         "orayboxvpn.base.name: 'shop 2' is not a site name: letters, digits, '_', '-' and '.', at most 64, "
         "starting with a letter or digit"),
        ("option role 'client'", "", "orayboxvpn.base.role: missing: set 'client' (this side connects) or 'server' (this side listens)"),
        ("option role 'client'", "list role 'client'", "orayboxvpn.base.role: must be a single value: write `option`, not `list`"),
        ("option server_address '10.1.0.2:7000'", "",
         "orayboxvpn.base.server_address: missing: required for role 'client': the server's host:port, e.g. '203.0.113.10:7000'"),
        ("option server_address '10.1.0.2:7000'", "option server_address '10.1.0.2:70000'",
         "orayboxvpn.base.server_address: port '70000' is not a number from 1 to 65535"),
        ("option server_address '10.1.0.2:7000'", "option server_address '10.1.0:7000'",
         "orayboxvpn.base.server_address: '10.1.0' is neither an IP address nor a host name"),
        ("option server_address '10.1.0.2:7000'", "option server_address '2001:db8::1:7000'",
         "orayboxvpn.base.server_address: '2001:db8::1:7000': write an IPv6 address as [addr]:port"),
        ("option server_address '10.1.0.2:7000'", "option server_address '[10.1.0.2]:7000'",
         "orayboxvpn.base.server_address: '10.1.0.2' in brackets is not an IPv6 address"),
        ("option server_address '10.1.0.2:7000'", "option server_address '0.0.0.0:7000'",
         "orayboxvpn.base.server_address: cannot connect to 0.0.0.0:7000: give the server's address"),
        ("option server_address '10.1.0.2:7000'", "option server_address '172.30.0.2:7000'",
         "orayboxvpn.base.server_address: 172.30.0.2:7000 is inside the vNIC subnet 172.30.0.0/30: "
         "the control connection would run through the tunnel it sets up"),
    ],
)
def test_base_errors(old, new, expected):
    _, problems = check(edit(SITE_A, old, new))
    assert errors(problems) == [expected]


@pytest.mark.parametrize(
    "psk, message",
    [
        ("not base64!", "is not valid base64 (make one with `mpvpn genpsk`)"),
        (base64.b64encode(b"x" * 16).decode(), "decodes to 16 bytes; it must be exactly 32"),
        (base64.b64encode(bytes(32)).decode(), "is all zero bytes: use a random key"),
        (PSK[:-2], "is not valid base64 (make one with `mpvpn genpsk`)"),
    ],
)
def test_psk_errors_never_echo_the_key(psk, message):
    _, problems = check(edit(SITE_A, PSK, psk))
    assert errors(problems) == [f"orayboxvpn.base.psk: {message}"]
    assert psk not in str(problems)


def test_missing_psk():
    _, problems = check(edit(SITE_A, f"option psk '{PSK}'", ""))
    assert errors(problems) == [
        "orayboxvpn.base.psk: missing: the shared secret, 32 random bytes in base64, the same on "
        "both sides (make one with `mpvpn genpsk`)"
    ]


def test_server_address_forms():
    text = edit(SITE_A, "option server_address '10.1.0.2:7000'",
                "list server_address '10.1.0.2'\n\tlist server_address '[2001:db8::2]:7100 vpn.example.org:7200'")
    cfg, problems = check(text)
    assert problems == []
    assert [str(a) for a in cfg.base.server_address] == ["10.1.0.2:7000", "[2001:db8::2]:7100", "vpn.example.org:7200"]
    assert cfg.base.port == 7000 and cfg.uplinks[0].port == 7000


def test_server_listen_address():
    cfg, problems = check(edit(SITE_B, "'0.0.0.0:7000'", "'[::]:7100'"), NETWORK_B)
    assert problems == []
    assert cfg.base.listen_address == HostPort("::", 7100)
    assert str(cfg.base.listen_address) == "[::]:7100"
    assert {u.port for u in cfg.uplinks} == {7100}  # uplink ports default to the listen port
    _, problems = check(edit(SITE_B, "option listen_address '0.0.0.0:7000'", ""), NETWORK_B)
    assert errors(problems) == [
        "orayboxvpn.base.listen_address: missing: required for role 'server': address:port to listen on, e.g. '0.0.0.0:7000'"
    ]
    _, problems = check(edit(SITE_B, "'0.0.0.0:7000'", "'vpn.example.org:7000'"), NETWORK_B)
    assert errors(problems) == ["orayboxvpn.base.listen_address: 'vpn.example.org' is not an IP address"]
    cfg, problems = check(edit(SITE_B, "'0.0.0.0:7000'", "'0.0.0.0'"), NETWORK_B)
    assert problems == [] and cfg.base.listen_address.port == 7000


def test_options_of_the_other_role_are_warned_about():
    text = edit(SITE_A, "option psk", "option listen_address '0.0.0.0:7000'\n\toption psk")
    cfg, problems = check(text)
    assert cfg is not None and cfg.base.listen_address is None
    assert lines(problems) == ["orayboxvpn.base.listen_address: warning: is ignored for role 'client'"]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("keepalive_idle", "abc", "'abc' is not a number"),
        ("keepalive_idle", "nan", "'nan' is out of range: use 0.05 to 60 seconds"),
        ("keepalive_idle", "0", "'0' is out of range: use 0.05 to 60 seconds"),
        ("keepalive_active", "-1", "'-1' is out of range: use 0.01 to 60 seconds"),
        ("dead_after", "2.5", "'2.5' is not a whole number"),
        ("dead_after", "0", "'0' is out of range: use 1 to 100"),
        ("hold_max_ms", "100000", "'100000' is out of range: use 0 to 10000 ms"),
        ("reorder_capacity", "8", "'8' is out of range: use 16 to 65536 packets"),
        ("rx_buffer", "16", "'16' is out of range: use 32 to 16384 KiB"),
        ("rx_buffer", "1M", "'1M' is not a whole number"),
        ("mtu", "100", "'100' is out of range: use 576 to 9000 bytes"),
        ("mode", "striping", "'striping' is not allowed: use 'duplicate', 'aggregate' or 'adaptive'"),
        ("log_level", "loud", "'loud' is not allowed: use 'debug', 'info', 'warning' or 'error'"),
    ],
)
def test_tuning_errors(option, value, message):
    _, problems = check(edit(SITE_A, "option psk", f"option {option} '{value}'\n\toption psk"))
    assert errors(problems) == [f"orayboxvpn.base.{option}: {message}"]


def test_tuning_values():
    extra = ("option mode 'adaptive'\n\toption keepalive_idle '1.5'\n\toption keepalive_active '0.2'\n"
             "\toption dead_after '5'\n\toption hold_max_ms '0'\n\toption reorder_capacity '4096'\n"
             "\toption mtu '1300'\n\toption log_level 'debug'\n\toption rx_buffer '4096'\n\toption psk")
    cfg, problems = check(edit(SITE_A, "option psk", extra))
    assert problems == []
    b = cfg.base
    assert (b.mode, b.keepalive_idle, b.keepalive_active, b.dead_after) == ("adaptive", 1.5, 0.2, 5)
    assert (b.hold_max_ms, b.reorder_capacity, b.mtu, b.log_level) == (0, 4096, 1300, "debug")
    assert b.rx_buffer == 4096
    assert cfg.vnc.mtu == 1300


def test_tuning_warnings():
    text = edit(SITE_A, "option psk", "option keepalive_active '2'\n\toption mtu '1480'\n\toption psk")
    cfg, problems = check(text)
    assert cfg is not None
    assert warnings(problems) == [
        "orayboxvpn.base.keepalive_active: warning: is longer than keepalive_idle: a busy subflow "
        "is then watched less closely than an idle one",
        "orayboxvpn.base.mtu: warning: 1480: encapsulated packets exceed a 1500-byte path and get "
        "fragmented (overhead 64 bytes); 1400 is safe",
    ]


def test_unknown_options_and_sections_are_warnings():
    text = edit(SITE_A, "option psk", "option server_adress 'x'\n\toption psk") + "\nconfig smpuu\n"
    cfg, problems = check(text)
    assert cfg is not None
    assert warnings(problems) == [
        "orayboxvpn.@smpuu[0]: warning: unknown section type 'smpuu' (ignored); did you mean 'smpu'?",
        "orayboxvpn.base.server_adress: warning: unknown option (ignored); did you mean 'server_address'?",
    ]


# --- vnc --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "vnc, interface",
    [
        ("option ipaddr '172.30.0.1'\n\toption netmask '30'", "172.30.0.1/30"),
        ("option ipaddr '172.30.0.1'\n\toption netmask '/29'", "172.30.0.1/29"),
        ("option ipaddr '172.30.0.1/30'", "172.30.0.1/30"),
        ("option ipaddr '172.30.0.1/30'\n\toption netmask '255.255.255.252'", "172.30.0.1/30"),
        ("option ipaddr '10.200.0.1'\n\toption netmask '255.128.0.0'", "10.200.0.1/9"),
    ],
)
def test_vnc_forms(vnc, interface):
    text = edit(SITE_A, "option ipaddr '172.30.0.1'\n\toption netmask '255.255.255.252'", vnc)
    cfg, problems = check(text)
    assert problems == [] and str(cfg.vnc.interface) == interface


@pytest.mark.parametrize(
    "vnc, message",
    [
        ("option netmask '255.255.255.252'",
         "orayboxvpn.vnc.ipaddr: missing: this side's vNIC address, e.g. '172.30.0.1' (the peer then uses '172.30.0.2')"),
        ("option ipaddr '172.30.0.1'", "orayboxvpn.vnc.netmask: missing: e.g. '255.255.255.252' (a /30 holds both ends)"),
        ("option ipaddr 'fd00::1'\n\toption netmask '30'", "orayboxvpn.vnc.ipaddr: 'fd00::1' is not an IPv4 address"),
        ("option ipaddr '172.30.0.1'\n\toption netmask '255.255.255.254'",
         "orayboxvpn.vnc.netmask: /31 leaves no room for both ends of the tunnel: use /30 ('255.255.255.252') or larger"),
        ("option ipaddr '172.30.0.1'\n\toption netmask '32'",
         "orayboxvpn.vnc.netmask: /32 leaves no room for both ends of the tunnel: use /30 ('255.255.255.252') or larger"),
        ("option ipaddr '172.30.0.1'\n\toption netmask '254.0.0.0'",
         "orayboxvpn.vnc.netmask: /7 is far too large for a point-to-point link: use /8 to /30"),
        ("option ipaddr '172.30.0.1'\n\toption netmask '255.0.255.0'",
         "orayboxvpn.vnc.netmask: '255.0.255.0' is not a netmask: its one bits must be contiguous"),
        ("option ipaddr '172.30.0.1'\n\toption netmask '0.0.0.3'",
         "orayboxvpn.vnc.netmask: '0.0.0.3' is not a netmask: its one bits must be contiguous"),
        ("option ipaddr '172.30.0.1'\n\toption netmask 'wide'",
         "orayboxvpn.vnc.netmask: 'wide' is not a netmask (e.g. '255.255.255.252' or '30')"),
        ("option ipaddr '172.30.0.0'\n\toption netmask '30'",
         "orayboxvpn.vnc.ipaddr: 172.30.0.0 is the network address of 172.30.0.0/30: use a host address"),
        ("option ipaddr '172.30.0.3'\n\toption netmask '30'",
         "orayboxvpn.vnc.ipaddr: 172.30.0.3 is the broadcast address of 172.30.0.0/30: use a host address"),
        ("option ipaddr '172.30.0.1/30'\n\toption netmask '29'",
         "orayboxvpn.vnc.netmask: /29 contradicts the /30 of ipaddr"),
        ("option ipaddr '127.0.0.5'\n\toption netmask '30'",
         "orayboxvpn.vnc.ipaddr: 127.0.0.5 cannot be a vNIC address: use a private address such as 172.30.0.1"),
        ("option ipaddr '172.30.0.1'\n\toption netmask '30'\n\toption ifname 'much-too-long-name'",
         "orayboxvpn.vnc.ifname: 'much-too-long-name' is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)"),
    ],
)
def test_vnc_errors(vnc, message):
    text = edit(SITE_A, "option ipaddr '172.30.0.1'\n\toption netmask '255.255.255.252'", vnc)
    _, problems = check(text)
    assert errors(problems) == [message]


def test_vnc_public_address_warns_and_mtu_override():
    text = edit(SITE_A, "option ipaddr '172.30.0.1'", "option ipaddr '198.18.0.1'\n\toption mtu '1380'\n\toption ifname 'tun-a'")
    text = edit(text, "option ipaddr '198.18.0.1'", "option ipaddr '8.8.8.1'")
    cfg, problems = check(text)
    assert cfg is not None and cfg.vnc.mtu == 1380 and cfg.base.mtu == 1400 and cfg.vnc.ifname == "tun-a"
    assert warnings(problems) == [
        "orayboxvpn.vnc.ipaddr: warning: 8.8.8.1 is a public address: a private range such as 172.30.0.0/30 avoids clashes"
    ]


# --- uplinks ------------------------------------------------------------------------------------

ANON = f"""
config base 'base'
	option role 'server'
	option listen_address '0.0.0.0:7100'
	option psk '{PSK}'

config vnc 'vnc'
	option ipaddr '172.30.0.2'
	option netmask '30'

config smpu
	option type 'telecom'
	option bind_ip '10.1.0.2'

config smpu
	option type 'unicom'
	option interface 'wan2'
	option device 'eth2'
	option port '7300'

config smpu
	option type 'mobile'
	option bind_ip '2001:db8:3::2'
	option enabled '0'
"""


def test_anonymous_uplinks_and_their_defaults():
    cfg, problems = check(ANON, NETWORK_B)
    assert problems == []
    assert [(u.name, u.type, u.port, u.enabled) for u in cfg.uplinks] == [
        ("@smpu[0]", "telecom", 7100, True),
        ("@smpu[1]", "unicom", 7300, True),
        ("@smpu[2]", "mobile", 7100, False),
    ]
    u = cfg.uplinks[1]
    assert (u.bind_ip, u.interface, u.device) == (None, "wan2", "eth2")
    assert cfg.uplinks[2].bind_ip == ipaddress.ip_address("2001:db8:3::2")
    assert [u.type for u in cfg.enabled_uplinks] == ["telecom", "unicom"]


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("option bind_ip '10.1.0.2'", "", "orayboxvpn.@smpu[0].bind_ip: missing: set bind_ip (this uplink's own "
         "address) or interface (its OpenWrt network, e.g. 'wan')"),
        ("option bind_ip '10.1.0.2'", "option bind_ip '10.1.0.2/24'",
         "orayboxvpn.@smpu[0].bind_ip: '10.1.0.2/24': give a single address, without /prefix"),
        ("option bind_ip '10.1.0.2'", "option bind_ip 'wan'",
         "orayboxvpn.@smpu[0].bind_ip: 'wan' is not an IPv4 or IPv6 address"),
        ("option bind_ip '10.1.0.2'", "option bind_ip '0.0.0.0'",
         "orayboxvpn.@smpu[0].bind_ip: 0.0.0.0 is not an address of this uplink"),
        ("option bind_ip '10.1.0.2'", "option bind_ip '172.30.0.1'",
         "orayboxvpn.@smpu[0].bind_ip: 172.30.0.1 is inside the vNIC subnet 172.30.0.0/30: the tunnel would carry itself"),
        ("option type 'telecom'", "", "orayboxvpn.@smpu[0].type: missing: the carrier of this uplink, e.g. 'telecom' "
         "(uplinks pair with the peer's uplink of the same type)"),
        ("option type 'telecom'", "option type 'tele com'",
         "orayboxvpn.@smpu[0].type: 'tele com' is not a carrier word (letters, digits, '_', '-', '.'; at most 32)"),
        ("option interface 'wan2'", "option interface 'wan-2'",
         "orayboxvpn.@smpu[1].interface: 'wan-2' is not an OpenWrt interface name (letters, digits, '_')"),
        ("option port '7300'", "option port '0'", "orayboxvpn.@smpu[1].port: port '0' is not a number from 1 to 65535"),
        ("option device 'eth2'", "option device 'eth/2'", "orayboxvpn.@smpu[1].device: 'eth/2' is not a valid device name"),
        ("option enabled '0'", "option enabled '0'\n\tlist bind_ip '10.9.0.2'",
         "orayboxvpn.@smpu[2].bind_ip: must be a single value: write `option`, not `list`"),
    ],
)
def test_uplink_errors(old, new, message):
    _, problems = check(edit(ANON, old, new), NETWORK_B)
    assert errors(problems) == [message]


def test_duplicate_carrier_type_is_a_warning():
    cfg, problems = check(edit(ANON, "option type 'unicom'", "option type 'telecom'"), NETWORK_B)
    assert cfg is not None
    assert lines(problems) == [
        "orayboxvpn.@smpu[1].type: warning: carrier type 'telecom' is also used by orayboxvpn.@smpu[0]: "
        "uplinks of one type are paired with the peer's uplinks of that type in order"
    ]


def test_duplicate_addresses_are_errors():
    text = edit(ANON, "option interface 'wan2'", "option bind_ip '10.1.0.2'")
    text = edit(text, "option port '7300'", "option port '7100'")
    _, problems = check(text, NETWORK_B)
    assert errors(problems) == ["orayboxvpn.@smpu[1].bind_ip: 10.1.0.2 port 7100 is already used by orayboxvpn.@smpu[0]"]
    text = ANON + "\nconfig smpu\n\toption type 'x'\n\toption interface 'wan2'\n\toption port '7300'\n"
    _, problems = check(text, NETWORK_B)
    assert errors(problems) == ["orayboxvpn.@smpu[3].interface: interface 'wan2' is already used by orayboxvpn.@smpu[1]"]


def test_no_uplink():
    base_vnc = ANON.split("config smpu")[0]
    _, problems = check(base_vnc, NETWORK_B)
    assert errors(problems) == [
        "orayboxvpn.@smpu: no uplink: add one `config smpu` section per carrier, with type and bind_ip or interface"
    ]
    text = ANON.replace("option type 'telecom'", "option type 'telecom'\n\toption enabled '0'")
    text = text.replace("option type 'unicom'", "option type 'unicom'\n\toption enabled 'no'")
    _, problems = check(text, NETWORK_B)
    assert errors(problems) == ["orayboxvpn.@smpu: no enabled uplink: set enabled '1' on at least one smpu section"]


def test_single_uplink_warns():
    text = ANON.replace("option type 'unicom'", "option type 'unicom'\n\toption enabled '0'")
    cfg, problems = check(text, NETWORK_B)
    assert cfg is not None
    assert lines(problems) == [
        "orayboxvpn.@smpu[0]: warning: only one enabled uplink: there is no second carrier to carry copies or to fall back on"
    ]


def test_ipv6_uplink_changes_the_mtu_budget():
    text = edit(ANON, "option enabled '0'", "option enabled '1'")
    text = edit(text, "option psk", "option mtu '1430'\n\toption psk")
    _, problems = check(text, NETWORK_B)
    assert warnings(problems) == [
        "orayboxvpn.base.mtu: warning: 1430: encapsulated packets exceed a 1500-byte path and get "
        "fragmented (overhead 84 bytes); 1400 is safe"
    ]


# --- LAN ---------------------------------------------------------------------------------------

def test_lan_overlapping_the_vnic_is_an_error():
    net = "config interface 'lan'\n\toption ipaddr '172.30.0.1'\n\toption netmask '255.255.0.0'\n"
    _, problems = check(SITE_A, net)
    assert errors(problems) == [
        "network.lan.ipaddr: the LAN 172.30.0.0/16 overlaps the vNIC subnet 172.30.0.0/30 "
        "(orayboxvpn.vnc): pick another vNIC subnet"
    ]


def test_lan_subnet_extras():
    text = edit(SITE_A, "option psk", "list lan_subnet '192.168.30.0/24'\n\tlist lan_subnet "
                "'10.50.0.1/16 192.168.10.0/24'\n\toption psk")
    cfg, problems = check(text)
    assert cfg is not None
    assert [str(n) for n in cfg.lan.subnets] == ["192.168.10.0/24", "192.168.30.0/24", "10.50.0.0/16"]
    assert [str(n) for n in cfg.lan.extra] == ["192.168.30.0/24", "10.50.0.0/16", "192.168.10.0/24"]
    assert warnings(problems) == [
        "orayboxvpn.base.lan_subnet: warning: '10.50.0.1/16' has host bits set; using 10.50.0.0/16",
        "orayboxvpn.base.lan_subnet: warning: 192.168.10.0/24 is already the LAN subnet of network.lan",
    ]


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.0.0.0/0", "0.0.0.0/0 would send all traffic, the tunnel's own included, into the tunnel"),
        ("172.30.0.0/29", "172.30.0.0/29 overlaps the vNIC subnet 172.30.0.0/30 (orayboxvpn.vnc)"),
        ("192.168.300.0/24", "'192.168.300.0/24' is not a subnet (e.g. '192.168.30.0/24')"),
    ],
)
def test_lan_subnet_errors(value, message):
    _, problems = check(edit(SITE_A, "option psk", f"list lan_subnet '{value}'\n\toption psk"))
    assert errors(problems) == [f"orayboxvpn.base.lan_subnet: {message}"]


def test_lan_problems_in_the_network_file():
    _, problems = check(SITE_A, "config interface 'lan'\n\toption ipaddr '192.168.10.1'\n")
    assert lines(problems) == [
        "network.lan.netmask: warning: missing: the LAN address without a /prefix is taken as a single host (/32)"
    ]
    _, problems = check(SITE_A, "config interface 'lan'\n\toption proto 'dhcp'\n")
    assert lines(problems) == [
        "network.lan.ipaddr: warning: not set (proto 'dhcp'): no LAN subnet from the network config; "
        "list it in orayboxvpn.base.lan_subnet if the peer should route to it"
    ]
    _, problems = check(SITE_A, "config interface 'wan'\n\toption proto 'dhcp'\n")
    assert lines(problems) == [
        "network.lan: warning: no `config interface 'lan'`: the peer only gets routes for orayboxvpn.base.lan_subnet"
    ]
    _, problems = check(SITE_A, "config interface 'lan'\n\toption ipaddr '192.168.10.x'\n\toption netmask '24'\n")
    assert errors(problems) == ["network.lan.ipaddr: '192.168.10.x' is not an IPv4 address"]
    _, problems = check(SITE_A, "config interface 'lan'\n\toption ipaddr '192.168.10.1'\n\toption netmask '255.0.255.0'\n")
    assert errors(problems) == ["network.lan.netmask: '255.0.255.0' is not a netmask: its one bits must be contiguous"]


# --- messages, parsing helpers, and the option table -----------------------------------------

def test_messages_stay_printable():
    text = edit(SITE_A, "option role 'client'", "option role 'cli\x1b[31ment\udcff" + "x" * 100 + "'")
    _, problems = check(text)
    (msg,) = errors(problems)
    assert msg.isprintable() and len(msg) < 200 and "\\x1b" in msg


def test_problem_rendering():
    assert str(config.Problem(ERROR, "orayboxvpn.base.psk", "bad")) == "orayboxvpn.base.psk: bad"
    assert str(config.Problem(WARNING, "orayboxvpn.vnc.mtu", "big")) == "orayboxvpn.vnc.mtu: warning: big"


@pytest.mark.parametrize(
    "text, host, port",
    [
        ("10.1.0.2:7000", "10.1.0.2", 7000),
        ("10.1.0.2", "10.1.0.2", 7000),
        ("[2001:db8::1]:7100", "2001:db8::1", 7100),
        ("[2001:db8::1]", "2001:db8::1", 7000),
        ("vpn.example.org:1", "vpn.example.org", 1),
        ("  host-1 ", "host-1", 7000),
    ],
)
def test_parse_hostport(text, host, port):
    assert parse_hostport(text) == HostPort(host, port)


@pytest.mark.parametrize("text", ["", ":7000", "a:b", "[::1", "[::1]x", "[x]:1", "::1", "-bad-.org", "h:0"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_options_table_is_consistent():
    assert set(config.OPTIONS) == {"base", "vnc", "smpu", "site", "policy", "relay"}
    for section, options in config.OPTIONS.items():
        for name, opt in options.items():
            assert uci.validate_name(name)
            assert opt.kind in config.KINDS, (section, name)
            kind, default, description = opt  # a plain 3-tuple
            assert description.endswith(".")
    # defaults in the table are the defaults the parser applies
    cfg, _ = check(SITE_A)
    base = config.OPTIONS["base"]
    assert float(base["keepalive_idle"].default) == cfg.base.keepalive_idle
    assert float(base["keepalive_active"].default) == cfg.base.keepalive_active
    assert int(base["dead_after"].default) == cfg.base.dead_after
    assert int(base["hold_max_ms"].default) == cfg.base.hold_max_ms
    assert int(base["reorder_capacity"].default) == cfg.base.reorder_capacity
    assert int(base["mtu"].default) == cfg.base.mtu
    assert base["mode"].default == cfg.base.mode and base["log_level"].default == cfg.base.log_level
    assert config.OPTIONS["vnc"]["ifname"].default == cfg.vnc.ifname


def test_docs_list_every_option():
    doc = (ROOT / "docs/config.md").read_text()
    for section, options in config.OPTIONS.items():
        assert f"`config {section}`" in doc
        for name in options:
            assert f"| `{name}` |" in doc, f"{section}.{name} missing from docs/config.md"
    assert config.options_markdown() in doc, "docs/config.md tables differ from config.options_markdown()"


def test_validate_in_memory_package():
    # what `mpvpn pair` will do: build packages, validate, write, read back
    pkg = uci.Package("orayboxvpn")
    pkg.set_section("base", "base")
    for k, v in (("role", "client"), ("server_address", "10.1.0.2:7000"), ("psk", PSK)):
        pkg.set("base", k, v)
    pkg.set_section("vnc", "vnc")
    pkg.set("vnc", "ipaddr", "172.30.0.1")
    pkg.set("vnc", "netmask", "255.255.255.252")
    for t, ip in (("telecom", "10.1.0.1"), ("unicom", "10.2.0.1")):
        s = pkg.add("smpu")
        pkg.set(pkg.ref(s), "type", t)
        pkg.set(pkg.ref(s), "bind_ip", ip)
    cfg, problems = config.validate(pkg, None)
    assert problems == [] and [u.name for u in cfg.uplinks] == ["@smpu[0]", "@smpu[1]"]
    again = uci.parse(uci.dump(pkg), "orayboxvpn")
    assert config.validate(again, None)[0] == cfg


# --- property: no input makes validation raise -------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TRICKY = ["", " ", "0", "1", "-1", "1e400", "nan", "inf", "7000", "99999", "client", "server",
           "10.1.0.2", "10.1.0.2:7000", "[::1]:7000", "::", "[::]", "0.0.0.0", "172.30.0.1/30",
           "255.255.255.252", "/30", "33", "a b", "x" * 300, "\udcff", "é", "wan", "br-lan",
           PSK, "AAAA", "192.168.10.0/24", "fd00::/64", "0.0.0.0/0"]


@st.composite
def _site(draw):
    pkg = uci.Package("orayboxvpn")
    for type_ in draw(st.lists(st.sampled_from(["base", "vnc", "smpu", "smpu", "other"]), max_size=5)):
        s = pkg.add(type_)
        ref = pkg.ref(s)
        names = list(config.OPTIONS.get(type_, {})) + ["typo"]
        for name in draw(st.lists(st.sampled_from(names), max_size=6)):
            values = draw(st.lists(st.sampled_from(_TRICKY), min_size=1, max_size=2))
            if draw(st.booleans()):
                for v in values:
                    pkg.add_list(ref, name, v)
            elif values[0]:
                pkg.set(ref, name, values[0])
    return pkg


@settings(max_examples=150, deadline=None)
@given(_site(), st.sampled_from([None, NETWORK_A, "config interface 'lan'\n\tlist ipaddr '0.0.0.0/0'\n"]))
def test_property_validate_never_raises(pkg, network):
    net = uci.parse(network, "network") if network else None
    cfg, problems = config.validate(pkg, net, "missing")
    if any(p.severity == ERROR for p in problems):
        assert cfg is None
    for p in problems:
        s = str(p)
        assert s.startswith(("orayboxvpn", "network")) and "\n" not in s
        if p.path.endswith(".psk"):
            assert PSK not in s


def test_static_keys_are_optional_and_come_in_pairs():
    import base64

    from mpvpn.core.noise import generate_keypair

    priv, _pub = generate_keypair()
    _priv2, peer_pub = generate_keypair()
    b64 = lambda k: base64.b64encode(k).decode()  # noqa: E731
    both = edit(SITE_A, "config base 'base'\n", "config base 'base'\n"
                f"\toption private_key '{b64(priv)}'\n\toption peer_public_key '{b64(peer_pub)}'\n")
    cfg, problems = check(both)
    assert errors(problems) == []
    assert (cfg.base.private_key, cfg.base.peer_public_key) == (priv, peer_pub)
    assert b64(priv) not in repr(cfg)  # the private key never reaches logs
    cfg, problems = check(SITE_A)
    assert cfg.base.private_key is None and cfg.base.peer_public_key is None
    only = edit(SITE_A, "config base 'base'\n", f"config base 'base'\n\toption private_key '{b64(priv)}'\n")
    assert errors(check(only)[1]) == [
        "orayboxvpn.base.peer_public_key: missing: static keys are used only in pairs "
        "(private_key here and the peer's public key), or not at all"]
    bad = edit(both, b64(peer_pub), "c2hvcnQ=")
    assert any("peer_public_key: decodes to 5 bytes" in e for e in errors(check(bad)[1]))
    bad = edit(both, b64(priv), "!!!")
    errs = errors(check(bad)[1])
    assert any("private_key: is not valid base64" in e for e in errs) and all("!!!" not in e for e in errs)


def test_direct_key_pins():
    """base.direct_private_key / direct_peer_key / direct_pinned_only (docs/security.md pinning)."""
    from mpvpn.core.noise import generate_keypair

    priv, _pub = generate_keypair()
    _p, pub_c = generate_keypair()
    b64 = lambda k: base64.b64encode(k).decode()  # noqa: E731
    pins = (f"\tlist direct_peer_key 'site-c={b64(pub_c)}'\n"
            f"\tlist direct_peer_key 'site-d={b64(pub_c)}'\n")
    ok = edit(SITE_A, "config base 'base'\n", "config base 'base'\n"
              f"\toption direct_private_key '{b64(priv)}'\n" + pins + "\toption direct_pinned_only '1'\n")
    cfg, problems = check(ok)
    assert problems == [] and cfg.base.direct_private_key == priv and cfg.base.direct_pinned_only
    assert cfg.base.direct_peer_key == (("site-c", pub_c), ("site-d", pub_c))
    assert b64(priv) not in repr(cfg)
    # pins without a static key of our own: the sites that pin us cannot; check says so
    cfg, problems = check(edit(SITE_A, "config base 'base'\n", "config base 'base'\n" + pins))
    assert errors(problems) == [] and cfg.base.direct_private_key is None
    assert any("direct_peer_key" in str(p) and "made at each start" in str(p) for p in problems)
    for bad, what in ((f"site-c {b64(pub_c)}", "is not `site name=public key`"),
                      ("site-c=c2hvcnQ=", "decodes to 5 bytes"), ("../x=" + b64(pub_c), "is not `site name")):
        errs = errors(check(edit(ok, f"site-c={b64(pub_c)}", bad))[1])
        assert any(what in e for e in errs), (bad, errs)
    two = edit(ok, f"site-d={b64(pub_c)}", f"site-c={b64(priv)}")
    assert any("two different keys pinned for site-c" in e for e in errors(check(two)[1]))


def test_nack_option():
    assert check(SITE_A)[0].base.nack is None  # auto: the mode decides
    for raw, want in (("1", True), ("0", False), ("auto", None)):
        cfg, problems = check(edit(SITE_A, "config base 'base'\n", f"config base 'base'\n\toption nack '{raw}'\n"))
        assert errors(problems) == [] and cfg.base.nack is want
    cfg, problems = check(edit(SITE_A, "config base 'base'\n", "config base 'base'\n\toption nack 'always'\n"))
    assert any("nack" in str(p) for p in errors(problems))


def test_target_loss_option():
    cfg, problems = check(edit(SITE_A, "config base 'base'\n",
                               "config base 'base'\n\toption mode 'adaptive'\n\toption target_loss '0.0001'\n"))
    assert errors(problems) == [] and cfg.base.target_loss == 0.0001
    assert check(SITE_A)[0].base.target_loss == 0.001
    _cfg, problems = check(edit(SITE_A, "config base 'base'\n", "config base 'base'\n\toption target_loss '2'\n"))
    assert errors(problems) == ["orayboxvpn.base.target_loss: '2' is out of range: use 1e-06 to 0.5"]


def test_policy_sections():
    text = SITE_A + (
        "\nconfig policy 'cameras'\n\toption src '192.168.10.50'\n\tlist carrier 'telecom'\n"
        "\tlist carrier 'unicom'\n\toption mode 'duplicate'\n"
        "\nconfig policy 'backup'\n\toption src '192.168.10.0/25'\n\toption dst '192.168.20.10'\n"
        "\tlist carrier 'mobile'\n\toption exclusive '1'\n"
        "\nconfig policy 'off'\n\toption src '10.0.0.0/8'\n\toption enabled '0'\n")
    cfg, problems = check(text)
    assert errors(problems) == [] and warnings(problems) == []
    cams, backup = cfg.policies
    assert (cams.name, str(cams.src), cams.dst, cams.carriers, cams.exclusive, cams.mode) == (
        "cameras", "192.168.10.50/32", None, ("telecom", "unicom"), False, "duplicate")
    assert (str(backup.dst), backup.carriers, backup.exclusive, backup.mode) == (
        "192.168.20.10/32", ("mobile",), True, None)
    bad = SITE_A + ("\nconfig policy 'p'\n\toption dst 'nonsense'\n\toption exclusive '1'\n"
                    "\tlist carrier 'satellite'\n\toption mode 'fast'\n")
    _cfg, problems = check(bad)
    assert set(errors(problems)) == {
        "orayboxvpn.p.src: missing: the LAN host or subnet this policy applies to",
        "orayboxvpn.p.dst: 'nonsense' is not an address or subnet",
        "orayboxvpn.p.mode: 'fast' is not allowed: use 'duplicate', 'aggregate' or 'adaptive'"}
    assert warnings(problems) == [
        "orayboxvpn.p.carrier: warning: no enabled uplink has type 'satellite'; known: mobile, telecom, unicom"]
    _cfg, problems = check(SITE_A + "\nconfig policy 'q'\n\toption src '192.168.10.9'\n\toption exclusive '1'\n")
    assert errors(problems) == ["orayboxvpn.q.exclusive: needs `list carrier`: which carriers to reserve"]


def test_smpu_upload_speed_is_parsed_and_bounded():
    with_upload = edit(SITE_A, "config smpu 'telecom'\n", "config smpu 'telecom'\n\toption upload '20000'\n")
    cfg, problems = check(with_upload)
    assert errors(problems) == []
    assert {u.name: u.upload_kbit for u in cfg.uplinks} == {"telecom": 20000, "unicom": None, "mobile": None}
    for bad in ("20M", "0", "7", "100000001", "-5", "1e4"):
        _, problems = check(edit(with_upload, "'20000'", f"'{bad}'"))
        errs = errors(problems)
        assert len(errs) == 1 and errs[0].startswith("orayboxvpn.telecom.upload: ") and "kbit/s" in errs[0], errs


def test_policy_priority_is_parsed():
    text = SITE_A + "\nconfig policy 'voip'\n\toption src '192.168.10.5'\n\toption priority '1'\n" \
        "\nconfig policy 'rest'\n\toption src '192.168.10.0/24'\n"
    cfg, problems = check(text)
    assert errors(problems) == []
    assert [(p.name, p.priority) for p in cfg.policies] == [("voip", True), ("rest", False)]
    _, problems = check(text.replace("option priority '1'", "option priority 'high'"))
    assert any(e.startswith("orayboxvpn.voip.priority: ") for e in errors(problems)), errors(problems)


def _site_section(name: str, psk_bytes: bytes) -> str:
    return f"\nconfig site '{name}'\n\toption psk '{base64.b64encode(psk_bytes).decode()}'\n"


def test_hub_site_sections_say_what_each_site_may_claim():
    k1, k2 = bytes(range(5, 37)), bytes(range(6, 38))
    site_b = SITE_B.replace("'255.255.255.252'", "'255.255.255.0'")  # a hub's /24
    hub = (site_b + _site_section("branch1", k1) + "\toption vnc_ipaddr '172.30.0.6'\n"
           "\tlist lan_subnet '192.168.10.0/24'\n\tlist lan_subnet '10.20.0.0/16'\n"
           + _site_section("branch2", k2))
    cfg, problems = check(hub, NETWORK_B)
    assert errors(problems) == []
    assert [(s.vnc_ipaddr, s.lan_subnets) for s in cfg.sites] == [
        ("172.30.0.6", ("192.168.10.0/24", "10.20.0.0/16")), (None, None)]
    _, problems = check(site_b + _site_section("branch1", k1) + "\toption vnc_ipaddr 'x.1'\n"
                        "\tlist lan_subnet '192.168.10.0/33'\n", NETWORK_B)
    assert [e.split(":")[0] for e in errors(problems)] == ["orayboxvpn.branch1.vnc_ipaddr",
                                                          "orayboxvpn.branch1.lan_subnet"]
    for other in ("fd00::2", "172.31.0.6", "172.30.0.2"):  # not a peer address of the vNIC subnet
        _, problems = check(site_b + _site_section("b1", k1) + f"\toption vnc_ipaddr '{other}'\n",
                            NETWORK_B)
        assert [e.split(":")[0] for e in errors(problems)] == ["orayboxvpn.b1.vnc_ipaddr"], other
    cfg, _ = check(SITE_B + _site_section("branch1", k1), NETWORK_B)
    assert (cfg.sites[0].vnc_ipaddr, cfg.sites[0].lan_subnets) == (None, None)  # unrestricted


def test_hub_sites_have_their_own_keys():
    k1, k2 = bytes(range(5, 37)), bytes(range(6, 38))
    hub = SITE_B + _site_section("branch1", k1) + _site_section("branch2", k2)
    cfg, problems = check(hub, NETWORK_B)
    assert errors(problems) == []
    assert [(s.name, s.psk) for s in cfg.sites] == [("branch1", k1), ("branch2", k2)]
    # a hub may drop the shared key and accept site keys only...
    no_shared = re.sub(r"\toption psk '[^']*'\n", "", hub, count=1)
    cfg, problems = check(no_shared, NETWORK_B)
    assert errors(problems) == [] and cfg.base.psk is None and len(cfg.sites) == 2
    # ...but not with no key at all
    _, problems = check(re.sub(r"\toption psk '[^']*'\n", "", SITE_B, count=1), NETWORK_B)
    errs = errors(problems)
    assert len(errs) == 1 and errs[0].startswith("orayboxvpn.base.psk: missing") and "config site" in errs[0]
    # a client still needs base.psk, and ignores site sections (with a warning)
    _, problems = check(re.sub(r"\toption psk '[^']*'\n", "", SITE_A, count=1))
    assert any(e.startswith("orayboxvpn.base.psk: missing") for e in errors(problems))
    _, problems = check(SITE_A + _site_section("x", k1))
    assert errors(problems) == [] and any(w.startswith("orayboxvpn.x.psk: warning:") for w in lines(problems))
    # each site its own key, and a valid one; PSKs only (no static keys with sites)
    _, problems = check(SITE_B + _site_section("a", k1) + _site_section("b", k1), NETWORK_B)
    assert [e.split(":")[0] for e in errors(problems)] == ["orayboxvpn.b.psk"]
    _, problems = check(SITE_B + "\nconfig site 'c'\n\toption psk 'bm90IGEga2V5'\n", NETWORK_B)
    assert [e.split(":")[0] for e in errors(problems)] == ["orayboxvpn.c.psk"]
    _, problems = check(SITE_B + "\nconfig site 'd'\n", NETWORK_B)
    assert [e.split(":")[0] for e in errors(problems)] == ["orayboxvpn.d.psk"]


def test_the_configured_site_name_is_the_agents_name():
    from mpvpn.agent.agent import Agent

    cfg, problems = check(edit(SITE_A, "option role 'client'", "option role 'client'\n\toption name 'shop-2'"))
    assert cfg is not None and cfg.base.name == "shop-2" and not errors(problems)
    assert Agent(cfg).name == "shop-2"
    cfg, _ = check(SITE_A)
    assert cfg.base.name is None and Agent(cfg).name.endswith("-172.30.0.1")  # <hostname>-<vNIC>


# --- NAT traversal (docs/nat.md) -------------------------------------------------

def test_stun_and_nat_keepalive_defaults():
    cfg, problems = check(SITE_A)
    assert problems == []
    assert cfg.base.stun == () and cfg.base.nat_keepalive == 25.0


def test_stun_servers_parsed_with_the_stun_port_by_default():
    text = edit(SITE_A, "\toption psk", "\tlist stun '203.0.113.1'\n\tlist stun 'stun.example.net:3479'\n"
                                         "\tlist stun '[2001:db8::1]'\n\toption nat_keepalive '2.5'\n\toption psk")
    cfg, problems = check(text)
    assert problems == []
    assert cfg.base.stun == (HostPort("203.0.113.1", 3478), HostPort("stun.example.net", 3479),
                             HostPort("2001:db8::1", 3478))
    assert cfg.base.nat_keepalive == 2.5


@pytest.mark.parametrize("value, word", [
    ("203.0.113.1:0", "port"), ("0.0.0.0", "STUN server"), ("224.0.0.1", "STUN server"),
    ("a b:x", ""), ("[::1", ""),
])
def test_bad_stun_server_is_an_error(value, word):
    text = edit(SITE_A, "\toption psk", f"\tlist stun '{value}'\n\toption psk")
    cfg, problems = check(text)
    assert cfg is None
    errs = errors(problems)
    assert errs and all("orayboxvpn.base.stun" in e for e in errs), errs
    assert word in errs[0]


def test_duplicate_stun_server_is_an_error_and_more_than_four_a_warning():
    text = edit(SITE_A, "\toption psk", "\tlist stun '203.0.113.1'\n\tlist stun '203.0.113.1:3478'\n\toption psk")
    cfg, problems = check(text)
    assert cfg is None and any("given twice" in e for e in errors(problems))
    five = "".join(f"\tlist stun '203.0.113.{i}'\n" for i in range(1, 6))
    cfg, problems = check(edit(SITE_A, "\toption psk", five + "\toption psk"))
    assert cfg is not None and len(cfg.base.stun) == 5
    assert any("only the first 4" in w for w in warnings(problems))


@pytest.mark.parametrize("value", ["0", "0.5", "301", "x", "nan"])
def test_nat_keepalive_out_of_bounds(value):
    cfg, problems = check(edit(SITE_A, "\toption psk", f"\toption nat_keepalive '{value}'\n\toption psk"))
    assert cfg is None
    assert any("orayboxvpn.base.nat_keepalive" in e for e in errors(problems))



# --- config relay (TURN relays, issue 15) ---------------------------------------

RELAYS = """
config relay 'r1'
	option address 'turn1.example.net:3479'
	option username 'branch-a'
	option password 's3cret pass'

config relay
	option address '203.0.113.7'
	option username 'branch-a'
	option password 'other'

config relay 'off'
	option address '[2001:db8::7]:5000'
	option username 'x'
	option password 'y'
	option enabled '0'
"""


def test_relays_in_order_with_defaults():
    cfg, problems = check(SITE_A + RELAYS)
    assert errors(problems) == [] and warnings(problems) == []
    assert [(r.name, str(r.address), r.username, r.password) for r in cfg.relays] == [
        ("r1", "turn1.example.net:3479", "branch-a", "s3cret pass"),
        ("@relay[1]", "203.0.113.7:3478", "branch-a", "other"),
    ]
    assert "s3cret" not in repr(cfg.relays)          # the password stays out of reprs/logs
    assert check(SITE_A)[0].relays == ()


@pytest.mark.parametrize("old, new, message", [
    ("option address 'turn1.example.net:3479'", "", "orayboxvpn.r1.address: missing: the relay's host:port, e.g. '203.0.113.7:3478'"),
    ("option address 'turn1.example.net:3479'", "option address 'turn1:99999'", "orayboxvpn.r1.address: port '99999' is not a number from 1 to 65535"),
    ("option address 'turn1.example.net:3479'", "option address '0.0.0.0'", "orayboxvpn.r1.address: 0.0.0.0:3478 is not a relay's address"),
    ("option address 'turn1.example.net:3479'", "option address '203.0.113.7:3478'", "orayboxvpn.@relay[1].address: 203.0.113.7:3478 is already the relay of orayboxvpn.r1"),
    ("\toption username 'branch-a'\n\toption password 's3cret pass'", "\toption username 'branch-a'", "orayboxvpn.r1.password: missing: the relay's password (TURN long-term credential)"),
    ("option password 's3cret pass'", "option password 'pässwort'", "orayboxvpn.r1.password: may only hold printable ASCII characters (no tabs, no accents)"),
    ("option password 's3cret pass'", "option password '" + "p" * 129 + "'", "orayboxvpn.r1.password: is 129 characters long: at most 128"),
    ("option username 'branch-a'\n\toption password 's3cret pass'", "option username ' '\n\toption password 's3cret pass'", "orayboxvpn.r1.username: is empty"),
])
def test_relay_errors(old, new, message):
    cfg, problems = check(SITE_A + edit(RELAYS, old, new))
    assert cfg is None
    assert errors(problems) == [message]
    assert "pässwort" not in str(problems) and "p" * 129 not in str(problems)


def test_too_many_relays_and_unknown_options():
    many = "".join(f"\nconfig relay\n\toption address '203.0.113.{i}'\n\toption username 'u'\n"
                   f"\toption password 'p'\n" for i in range(1, 10))
    cfg, problems = check(SITE_A + many)
    assert errors(problems) == ["orayboxvpn.@relay: 9 relays: at most 8"]
    cfg, problems = check(SITE_A + edit(RELAYS, "option username 'x'", "option user 'x'"))
    assert "orayboxvpn.off.user: warning: unknown option (ignored); did you mean 'username'?" in warnings(problems)


def test_relay_trigger_and_retry_defaults_and_values():
    cfg, problems = check(SITE_A + RELAYS)
    assert (cfg.base.relay_after, cfg.base.relay_retry) == (4.0, 10.0)
    text = edit(SITE_A, "\toption psk", "\toption relay_after '6.5'\n\toption relay_retry '30'\n\toption psk")
    cfg, problems = check(text + RELAYS)
    assert errors(problems) == [] and warnings(problems) == []
    assert (cfg.base.relay_after, cfg.base.relay_retry) == (6.5, 30.0)


@pytest.mark.parametrize("option, value, word", [
    ("relay_after", "0", "out of range: use 1 to 600 seconds"), ("relay_after", "601", "out of range"),
    ("relay_after", "soon", "is not a number"), ("relay_retry", "0.5", "out of range: use 1 to 3600 seconds"),
    ("relay_retry", "inf", "out of range"),
])
def test_relay_trigger_and_retry_out_of_bounds(option, value, word):
    cfg, problems = check(edit(SITE_A, "\toption psk", f"\toption {option} '{value}'\n\toption psk") + RELAYS)
    assert cfg is None
    errs = [e for e in errors(problems) if f"orayboxvpn.base.{option}" in e]
    assert errs and word in errs[0], errors(problems)


def test_relay_trigger_warnings():
    # shorter than hole punching takes: the pairs it would open get relayed
    cfg, problems = check(edit(SITE_A, "\toption psk", "\toption relay_after '1.5'\n\toption psk") + RELAYS)
    assert cfg is not None and cfg.base.relay_after == 1.5
    assert any("orayboxvpn.base.relay_after" in w and "hole punching" in w for w in warnings(problems))
    # without a relay to use, both say so
    cfg, problems = check(edit(SITE_A, "\toption psk", "\toption relay_after '8'\n\toption relay_retry '20'\n"
                                                         "\toption psk"))
    assert cfg is not None
    for opt in ("relay_after", "relay_retry"):
        assert any(f"orayboxvpn.base.{opt}" in w and "no effect" in w for w in warnings(problems)), opt
