"""Tests for `mpvpn check` (mpvpn.agent.check.run and register)."""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

from test_config import NETWORK_A, NETWORK_B, PSK, SITE_A, SITE_B, edit, write

from mpvpn.agent import check

ROOT = Path(__file__).resolve().parents[1]


def run(d: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = check.run(d, out)
    return code, out.getvalue().splitlines()


def test_site_a_is_ok(tmp_path):
    code, out = run(write(tmp_path, SITE_A, NETWORK_A))
    assert code == 0
    assert out == [
        "config OK: role client; mode duplicate; vNIC mpvpn0 172.30.0.1/30 mtu 1400; "
        "server 10.1.0.2:7000; 3 uplink(s): telecom 10.1.0.1, unicom 10.2.0.1, mobile 10.3.0.1; "
        "LAN 192.168.10.0/24"
    ]


def test_site_b_is_ok(tmp_path):
    code, out = run(write(tmp_path, SITE_B, NETWORK_B))
    assert code == 0
    assert out == [
        "config OK: role server; mode duplicate; vNIC mpvpn0 172.30.0.2/30 mtu 1400; "
        "listening on 0.0.0.0:7000; site-to-site forwarding off; 3 uplink(s): telecom 10.1.0.2, unicom 10.2.0.2, mobile 10.3.0.2; "
        "LAN 192.168.20.0/24"
    ]


def test_shipped_default_explains_what_to_fill_in(tmp_path):
    shutil.copy(ROOT / "files/etc/config/orayboxvpn", tmp_path / "orayboxvpn")
    (tmp_path / "network").write_text(NETWORK_A)
    code, out = run(str(tmp_path))
    assert code == 1
    assert out[0].startswith("orayboxvpn.base.enabled: warning: the service is disabled (enabled '0')")
    assert [line.split(":")[0] for line in out[1:-1]] == [
        "orayboxvpn.base.psk",
        "orayboxvpn.base.server_address",
        "orayboxvpn.vnc.ipaddr",
        "orayboxvpn.telecom.bind_ip",
        "orayboxvpn.unicom.bind_ip",
        "orayboxvpn.mobile.bind_ip",
    ]
    assert out[-1] == f"config NOT OK: 6 error(s), 1 warning(s) in {tmp_path}"


def test_disabled_complete_config_exits_zero(tmp_path):
    text = edit(SITE_A, "option role", "option enabled '0'\n\toption role")
    code, out = run(write(tmp_path, text))
    assert code == 0
    assert out[0].startswith("orayboxvpn.base.enabled: warning: the service is disabled")
    assert out[1].startswith("config OK: role client") and out[1].endswith("(1 warning(s))")
    assert out[2] == "the service is disabled: set orayboxvpn.base.enabled to 1 to start it"


def test_warnings_only_exit_zero(tmp_path):
    code, out = run(write(tmp_path, SITE_A, None))
    assert code == 0
    assert out[0].startswith("network: warning: ")
    assert out[1].startswith("config OK: ") and out[1].endswith("LAN none (1 warning(s))")


def test_errors_exit_one(tmp_path):
    text = edit(SITE_A, "option bind_ip '10.2.0.1'", "option bind_ip '10.2.0.1/24'")
    code, out = run(write(tmp_path, text))
    assert code == 1
    assert out == [
        "orayboxvpn.unicom.bind_ip: '10.2.0.1/24': give a single address, without /prefix",
        f"config NOT OK: 1 error(s), 0 warning(s) in {tmp_path}",
    ]


def test_missing_directory(tmp_path):
    code, out = run(str(tmp_path / "none"))
    assert code == 1
    assert out[0] == f"orayboxvpn: config directory {tmp_path / 'none'} does not exist (use --uci-dir DIR)"


def test_output_survives_an_ascii_terminal(tmp_path):
    text = edit(SITE_A, "option type 'unicom'", "option type 'unicöm'")
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    assert check.run(write(tmp_path, text), out) == 1
    out.flush()
    assert b"orayboxvpn.unicom.type: 'unic\\xf6m' is not a carrier word" in raw.getvalue()


def test_internal_error_is_not_a_traceback(tmp_path, monkeypatch):
    def boom(uci_dir):
        raise RuntimeError("bug")

    monkeypatch.setattr(check, "load_config", boom)
    code, out = run(str(tmp_path))
    assert code == 2 and out == ["mpvpn check: internal error: RuntimeError: bug"]


def test_register_adds_the_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mpvpn")
    sub = parser.add_subparsers(dest="command")
    check.register(sub)
    args = parser.parse_args(["check"])
    assert args.uci_dir == "/etc/config"
    args = parser.parse_args(["check", "--uci-dir", write(tmp_path, SITE_A)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("config OK: role client")


def test_a_section_written_twice_under_one_name_is_named_with_both_lines(tmp_path):
    """uci merges `config smpu 'telecom'` written twice into one section (the
    later options win): a fourth uplink silently replaces the first one."""
    text = SITE_A + "\nconfig smpu 'telecom'\n\toption type 'broadband'\n\toption bind_ip '10.4.0.1'\n"
    lines = text.split("\n")
    first = lines.index("config smpu 'telecom'") + 1
    again = len(lines) - lines[::-1].index("config smpu 'telecom'")
    assert again > first
    code, out = run(write(tmp_path, text, NETWORK_A))
    assert code == 0, out
    assert out[0] == (f"orayboxvpn.telecom: warning: config smpu 'telecom' at line {again} has the name "
                      f"of the section at line {first}: uci merges them into one (the later options win), "
                      "so it is not a second smpu; give one of them another name")
    assert "3 uplink(s): broadband 10.4.0.1, unicom 10.2.0.1, mobile 10.3.0.1" in out[-1]  # uci's result
    assert out[-1].endswith("(1 warning(s))")


def test_network_sections_merged_are_named_too(tmp_path):
    network = NETWORK_A + "\nconfig interface 'lan'\n\toption ipaddr '192.168.99.1'\n"
    code, out = run(write(tmp_path, SITE_A, network))
    assert code == 0
    assert [line.split(": warning: ")[0] for line in out[:-1]] == ["network.lan"]
    assert "config interface 'lan' at line" in out[0] and "LAN 192.168.99.0/24" in out[-1]


def test_a_key_file_others_can_read_is_a_warning_with_the_fix(tmp_path):
    d = write(tmp_path, SITE_A, NETWORK_A)
    conf = tmp_path / "orayboxvpn"
    for mode, who in ((0o644, "group and others"), (0o640, "group"), (0o604, "others")):
        conf.chmod(mode)
        code, out = run(d)
        assert code == 0
        assert out[0] == (f"orayboxvpn: warning: {conf} holds a secret (psk) and is readable by {who} "
                          f"(mode {mode:04o}): chmod 600 {conf}")
    conf.chmod(0o600)
    code, out = run(d)
    assert code == 0 and len(out) == 1 and out[0].startswith("config OK")
    # no secret in the file (the default before it is filled in): nothing to protect
    conf.write_text(SITE_A.replace(f"\toption psk '{PSK}'\n", ""))
    conf.chmod(0o644)
    assert not any("chmod" in line for line in run(d)[1])


def test_a_static_private_key_counts_as_a_secret(tmp_path):
    import base64

    from mpvpn.core.noise import generate_keypair

    priv, _ = generate_keypair()
    text = SITE_A.replace("config base 'base'\n", "config base 'base'\n\toption private_key "
                          f"'{base64.b64encode(priv).decode()}'\n")
    d = write(tmp_path, text, NETWORK_A)
    (tmp_path / "orayboxvpn").chmod(0o644)
    out = run(d)[1]
    assert any("holds a secret (private_key, psk)" in line for line in out), out


def test_a_relay_password_counts_as_a_secret(tmp_path):
    text = SITE_A + ("\nconfig relay\n\toption address '203.0.113.7'\n"
                     "\toption username 'branch-a'\n\toption password 'hunter2-turn'\n")
    d = write(tmp_path, text, NETWORK_A)
    (tmp_path / "orayboxvpn").chmod(0o640)
    code, out = run(d)
    assert code == 0, out
    assert any("holds a secret (password, psk) and is readable by group" in line for line in out), out
    assert "relay 203.0.113.7:3478" in out[-1]
    assert not any("hunter2-turn" in line for line in out)
