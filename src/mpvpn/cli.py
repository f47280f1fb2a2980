"""The ``mpvpn`` command line."""

from __future__ import annotations

import argparse
import sys

from mpvpn import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from mpvpn import demo

    return demo.main(["--packets", str(args.packets), "--loss", str(args.loss)])


def _cmd_genpsk(args: argparse.Namespace) -> int:
    from mpvpn import noise

    print(noise.genpsk())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpvpn", description="orayboxvpn multipath VPN agent")
    p.add_argument("--version", action="version", version=f"mpvpn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="in-memory SMPU demo over simulated lossy carriers")
    d.add_argument("--packets", type=int, default=20000)
    d.add_argument("--loss", type=float, default=20.0, help="loss per carrier, percent")
    d.set_defaults(func=_cmd_demo)
    g = sub.add_parser("genpsk", help="print a new pre-shared key (32 random bytes, base64)")
    g.set_defaults(func=_cmd_genpsk)
    from mpvpn import check

    check.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)
