"""``mpvpn check``: validate the UCI configuration and explain every problem.

One line per problem, ``orayboxvpn.<section>.<option>: <what is wrong>``;
warnings read ``<path>: warning: <what>``. Then a summary line starting with
``config OK`` or ``config NOT OK``. Exit status 0 without errors (warnings
allowed), 1 with errors.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import TextIO

from mpvpn.agent.config import PACKAGE, WARNING, Config, Problem, load_config
from mpvpn.io import uci

DEFAULT_UCI_DIR = "/etc/config"


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``check`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "check",
        help="validate the UCI configuration",
        description="Validate DIR/orayboxvpn and DIR/network; print one line per problem "
        "as <config>.<section>.<option>: <what is wrong>. Exit status 1 on errors.",
    )
    p.add_argument(
        "--uci-dir",
        default=DEFAULT_UCI_DIR,
        metavar="DIR",
        help=f"directory with the orayboxvpn and network UCI files (default {DEFAULT_UCI_DIR})",
    )
    p.set_defaults(func=_cmd_check)
    return p


def _cmd_check(args: argparse.Namespace) -> int:
    return run(args.uci_dir, sys.stdout)


def _write(out: TextIO, line: str) -> None:
    try:
        out.write(line + "\n")
    except UnicodeEncodeError:
        out.write(line.encode("ascii", "backslashreplace").decode("ascii") + "\n")


def summary(config: Config) -> str:
    """One line describing a valid configuration."""
    b, v = config.base, config.vnc
    parts = [f"role {b.role}", f"mode {b.mode}", f"vNIC {v.ifname} {v.interface} mtu {v.mtu}"]
    if b.role == "client":
        parts.append("server " + ", ".join(str(a) for a in b.server_address))
    elif b.listen_address:
        parts.append(f"listening on {b.listen_address}")
    if b.role == "server":
        parts.append("site-to-site forwarding " + ("on" if b.hub_forward else "off"))
    ups = []
    for u in config.uplinks:
        where = str(u.bind_ip) if u.bind_ip is not None else f"interface {u.interface}"
        ups.append(f"{u.type} {where}" + ("" if u.enabled else " (disabled)"))
    parts.append(f"{len(config.enabled_uplinks)} uplink(s): " + ", ".join(ups))
    lan = ", ".join(str(n) for n in config.lan.subnets) or "none"
    parts.append(f"LAN {lan}")
    if config.relays:
        parts.append("relay " + ", ".join(str(r.address) for r in config.relays))
    return "; ".join(parts)


SECRET_OPTIONS = ("psk", "private_key", "password")


def file_problems(uci_dir: str) -> list[Problem]:
    """What uci accepts silently but a user would not want: a ``config``
    statement that merges into an earlier section of the same type and name
    (an uplink written twice under one name disappears into the first), and
    a file holding a key that group or others can read."""
    problems = []
    for name in (PACKAGE, "network"):
        path = os.path.join(uci_dir, name)
        try:
            pkg = uci.load(path, name)
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except (OSError, uci.UciError):
            continue  # load_config reports those
        for m in pkg.merges:
            problems.append(Problem(
                WARNING, f"{name}.{m.name}",
                f"config {m.type} '{m.name}' at line {m.line} has the name of the section at line "
                f"{m.first_line}: uci merges them into one (the later options win), so it is not a "
                f"second {m.type}; give one of them another name"))
        secrets = sorted({o for sec in pkg for o in SECRET_OPTIONS if sec.get(o)})
        if secrets and mode & 0o077:
            problems.append(Problem(
                WARNING, name,
                f"{path} holds a secret ({', '.join(secrets)}) and is readable by "
                f"{'group and others' if mode & 0o070 and mode & 0o007 else 'group' if mode & 0o070 else 'others'} "
                f"(mode {mode:04o}): chmod 600 {path}"))
    return problems


def run(uci_dir: str, out: TextIO) -> int:
    """Check ``uci_dir`` and report to ``out``. Returns the exit status."""
    try:
        config, problems = load_config(uci_dir)
        problems = problems + file_problems(uci_dir)
    except Exception as e:  # a bug of ours: still no traceback for the user
        _write(out, f"mpvpn check: internal error: {type(e).__name__}: {e}")
        return 2
    for p in problems:
        _write(out, str(p))
    errors = sum(1 for p in problems if p.is_error)
    warnings = len(problems) - errors
    counts = f"{errors} error(s), {warnings} warning(s)"
    if errors or config is None:
        _write(out, f"config NOT OK: {counts} in {uci_dir}")
        return 1
    line = f"config OK: {summary(config)}"
    if warnings:
        line += f" ({warnings} warning(s))"
    _write(out, line)
    if not config.enabled:
        _write(out, "the service is disabled: set orayboxvpn.base.enabled to 1 to start it")
    return 0
