"""The ``mpvpn`` command line."""

from __future__ import annotations

import argparse
import sys

from mpvpn import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    if not _tools_installed():
        return _not_on_router(args)
    from mpvpn.tools import demo

    return demo.main(["--packets", str(args.packets), "--loss", str(args.loss)])


def _cmd_genpsk(args: argparse.Namespace) -> int:
    from mpvpn.core import noise

    print(noise.genpsk())
    return 0


DEFAULT_UCI_DIR = "/etc/config"
DEFAULT_RUN_DIR = "/var/run/orayboxvpn"


def _cmd_run(args: argparse.Namespace) -> int:
    import logging

    from mpvpn.agent import config as cfgmod
    from mpvpn.io import logsink

    cfg, problems = cfgmod.load_config(args.uci_dir)
    level = cfg.base.log_level.upper() if cfg is not None else "INFO"
    logsink.setup(args.log, getattr(logging, level, logging.INFO))
    log = logging.getLogger("mpvpn")
    for p in problems:
        (log.error if p.severity == cfgmod.ERROR else log.warning)("%s", p)
    if cfg is None or any(p.severity == cfgmod.ERROR for p in problems):
        log.error("not starting: fix the configuration (mpvpn check --uci-dir %s)", args.uci_dir)
        return 1
    if not cfg.enabled:
        log.warning("orayboxvpn is disabled (orayboxvpn.base.enabled=0): not starting")
        return 0
    from mpvpn.agent.agent import Agent

    agent = Agent(cfg, uci_dir=args.uci_dir, run_dir=args.run_dir, ubus_socket=args.ubus_socket)
    try:
        return agent.run()
    except OSError as e:
        log.error("cannot run: %s", e.strerror or e)
        return 1


def relay_words(ln: dict) -> str | None:
    """A relayed link in words: "via relay 203.0.113.7:3478: <why>"."""
    if ln.get("path") != "relayed" or not ln.get("relay"):
        return None
    why = ln.get("relay_reason")
    return f"via relay {ln['relay']}" + (f": {why}" if why else "")


def _print_status(st: dict) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    print(f"orayboxvpn {st.get('role')} '{st.get('name')}': {st.get('state')} - {st.get('state_text')}")
    v = st.get("vnc") or {}
    print(f"  vNIC {v.get('ifname')} {v.get('address')}/{v.get('netmask')} mtu {v.get('mtu')}, "
          f"mode {st.get('mode')}, up {st.get('uptime', 0):.0f} s")
    if st.get("routes"):
        print(f"  routes via vNIC: {', '.join(st['routes'])}")
    if st.get("last_error"):
        print(f"  last error: {st['last_error']}")
    for up in st.get("uplinks", []):
        extra = f" ({up['error']})" if up.get("error") else ""
        if up.get("nat") is not None:  # base.stun set (docs/nat.md)
            nat = {"none": "no NAT", "unknown": "NAT unknown"}.get(up["nat"], f"{up['nat']} NAT")
            extra += f", public {up['public']} ({nat})" if up.get("public") else f", {nat}"
        print(f"  uplink {up['name']:<10} {up.get('type', ''):<10} {up.get('bind_ip')}:{up.get('port')} "
              f"{up.get('state')}{extra}")
        r = up.get("relay") or {}
        if r.get("started") and r.get("state") != "ready" and r.get("last_error"):
            print(f"      relay: {r.get('state')}: {r['last_error']}")
    links = st.get("links") or []
    if links:
        print(f"  {'peer':<12}{'#':>3} {'carrier':<10}{'local':<22}{'remote':<22}{'state':<13}"
              f"{'rtt ms':>8}{'loss':>7}{'tx pkts':>10}{'rx pkts':>10}")
        for ln in links:
            rtt = "-" if ln.get("rtt_ms") is None else f"{ln['rtt_ms']:.1f}"
            print(f"  {str(ln.get('peer', '')):<12}{ln['member']:>3} {str(ln.get('type', '')):<10}"
                  f"{str(ln.get('local', '')):<22}{str(ln.get('remote', '')):<22}{ln['state']:<13}"
                  f"{rtt:>8}{pct(ln.get('loss')):>7}{ln['tx_packets']:>10}{ln['rx_packets']:>10}"
                  + (f"  {ln['path']}" if ln.get("path") == "punched" else ""))
            words = relay_words(ln)
            if words:
                print(f"      {words}")
    for se in st.get("sessions") or []:
        peer = se.get("peer") or {}
        fwd = se.get("forwarded")
        if fwd is not None:  # a hub: its sites and what it passed between them
            print(f"  site {se.get('name')} {(peer.get('vnc') or {}).get('ip')} "
                  f"LANs {', '.join(peer.get('lans') or []) or 'none'}: forwarded to others "
                  f"{fwd['from_packets']} pkts, from others {fwd['to_packets']} pkts"
                  + (f", refused {fwd['refused']}" if fwd.get("refused") else "")
                  + (f", spoofed {fwd['spoofed']}" if fwd.get("spoofed") else ""))
        for v in se.get("via") or []:  # a site: the others it reaches through its hub
            if v.get("path") == "direct":  # (a direct session carries it; the hub stands by)
                print(f"  direct (hub {se.get('name')} stands by): {v['name']} {v['vnc']} "
                      f"LANs {', '.join(v['lans']) or 'none'}")
            else:
                print(f"  via hub {se.get('name')}: {v['name']} {v['vnc']} "
                      f"LANs {', '.join(v['lans']) or 'none'}")
        for r in se.get("via_refused") or []:
            print(f"  not routed (hub {se.get('name')} offers it): {r['name']}: {r['why']}")
    _print_direct(st.get("direct") or {}, st.get("name"))
    c = st.get("counters") or {}
    if c:
        keys = ("sent", "delivered", "duplicates", "late", "deadline_releases", "reorder_flushes",
                "malformed", "auth_failures", "replays", "unknown_session")
        print("  " + ", ".join(f"{k} {c.get(k, 0)}" for k in keys))


def _print_direct(d: dict, name) -> None:
    """Direct paths between sites (status ``direct``) in words."""
    if d.get("key"):
        print(f"  this site's direct key: {d['key']} "
              + (f"(static: other sites may pin it with list direct_peer_key '{name}={d['key']}')"
                 if d.get("key_static") else
                 "(made at this start: set base.direct_private_key so other sites can pin it)"))
    for pin in d.get("pins") or []:
        if pin.get("state") == "mismatch":
            print(f"  direct pin {pin['name']}: KEY MISMATCH: refused {pin['mismatches']} offer(s) "
                  f"from the hub with key {pin['last_key']} (last {pin.get('last_age') or 0:.0f} s "
                  f"ago); pinned {pin['key']}; its traffic stays through the hub")
        else:
            print(f"  direct pin {pin['name']}: {pin.get('state')} ({pin['key']})")
    phases = {"handshake": "handshake through the hub", "up": "subflow up",
              "down": "no subflow up, traffic through the hub"}
    for p in d.get("peers") or []:
        moves = f", back to the hub {p['downs']}x" if p.get("downs") else ""
        print(f"  direct peer {p['name']}: {p['state']} ({phases.get(p.get('phase'), p.get('phase'))} "
              f"for {p.get('since', 0):.0f} s, session {p['session_id']:#x}{moves})")
    for pair in d.get("pairs") or []:
        path = pair.get("path")
        age = pair.get("forwarded_age")
        seen = ("nothing forwarded between them since the offer" if age is None
                else f"last forwarded between them {age:.0f} s ago")
        how = ("direct (inferred: " if path == "direct" else "via hub (") + seen + ")"
        print(f"  direct pair {' <-> '.join(pair['sites'])}: {pair['state']}"
              + (f", {how}" if pair.get("state") == "keyed" else ""))
    refused = {k: v for k, v in (d.get("counters") or {}).items()
               if v and (k.startswith(("direct_refused", "direct_ended_")) or k == "direct_spoofed")}
    if refused:
        print("  direct paths refused: " + ", ".join(f"{k} {v}" for k, v in sorted(refused.items())))


def _show(doc: dict, as_json: bool, text) -> None:
    """Print an agent's document as JSON or through ``text(doc)``."""
    if as_json:
        import json

        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        text(doc)


def _cmd_status(args: argparse.Namespace) -> int:
    from mpvpn.io import rpc

    try:
        st = rpc.call(rpc.socket_path(args.run_dir), "status")
    except rpc.RpcError as e:
        if args.json:  # a script reading stdout still gets a document
            _show({"state": "stopped", "error": str(e)}, True, None)
        else:
            print(f"orayboxvpn: {e}", file=sys.stderr)
        return 3
    _show(st, args.json, _print_status)
    return 0


def _num(x, fmt: str) -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else fmt.format(x)


def format_link_test(doc: dict) -> str:
    """The results table of a link test document (status ``link_test``)."""
    lines = [f"link test {doc.get('id')} with {doc.get('peer', 'the peer')}: {doc.get('state')}"
             + (f" ({doc['error']})" if doc.get("error") else "")]
    lines.append(f"  {'link':<28}{'dir':<6}{'Mbit/s':>9}{'goodput':>9}{'rtt ms':>9}{'loss':>8}")
    for r in doc.get("results") or []:
        loss = r.get("loss")
        lines.append(f"  {str(r.get('name'))[:27]:<28}{str(r.get('direction')):<6}"
                     f"{_num(r.get('mbps'), '{:.1f}'):>9}{_num(r.get('goodput_mbps'), '{:.1f}'):>9}"
                     f"{_num(r.get('rtt_ms'), '{:.1f}'):>9}"
                     f"{_num(None if loss is None else 100 * loss, '{:.2f}%'):>8}")
    return "\n".join(lines)


def format_phase_result(index: int, total: int, r: dict) -> str:
    """One finished phase of a link test, as ``mpvpn test-links`` prints it when it ends."""
    loss = r.get("loss")
    return (f"  [{index + 1}/{total}] {r.get('name')} {r.get('direction')}: "
            f"{_num(r.get('mbps'), '{:.1f}')} Mbit/s, goodput {_num(r.get('goodput_mbps'), '{:.1f}')} Mbit/s, "
            f"rtt {_num(r.get('rtt_ms'), '{:.1f}')} ms, "
            f"loss {_num(None if loss is None else 100 * loss, '{:.2f} %')}")


def format_phase_start(index: int, total: int, doc: dict) -> str:
    """The phase a link test is running now (the document's ``plan`` names it)."""
    plan = doc.get("plan") or []
    ph = plan[index] if 0 <= index < len(plan) and isinstance(plan[index], dict) else {}
    what = f"{ph.get('name')} {ph.get('direction')}" if ph else f"phase {index + 1}"
    return f"  [{index + 1}/{total}] {what} ..."


class LinkTestProgress:
    """What ``mpvpn test-links`` prints while it polls the agent's ``link_test`` document:
    a line when a phase starts, its result row when it ends (each once, in order)."""

    def __init__(self, total: int):
        self.total = total
        self.shown = 0       # results printed
        self.announced = 0   # phases whose start was printed (index + 1)

    def update(self, doc: dict) -> list[str]:
        out = []
        results = doc.get("results") or []
        total = doc.get("phases") if isinstance(doc.get("phases"), int) else self.total
        for i in range(self.shown, len(results)):
            out.append(format_phase_result(i, total, results[i]))
        self.shown = max(self.shown, len(results))
        self.announced = max(self.announced, self.shown)
        cur = doc.get("phase")
        if doc.get("state") == "running" and isinstance(cur, int) and not isinstance(cur, bool) \
                and cur >= self.announced:
            out.append(format_phase_start(cur, total, doc))
            self.announced = cur + 1
        return out


def _cmd_test_links(args: argparse.Namespace) -> int:
    import time

    from mpvpn.io import rpc

    path = rpc.socket_path(args.run_dir)
    req = {"duration": args.duration}
    if args.peer:
        req["peer"] = args.peer
    try:
        started = rpc.call(path, "test_links", req)
        if started.get("error"):
            print(f"mpvpn test-links: {started['error']}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"testing {started.get('phases')} phases of {args.duration:g} s with "
                  f"{started.get('peer')} (each link alone, then all; up = from here) ...", flush=True)
        progress = LinkTestProgress(started.get("phases") or 0)
        while True:
            doc = (rpc.call(path, "status") or {}).get("link_test") or {}
            if doc.get("id") != started.get("id"):
                print("mpvpn test-links: the test was replaced or lost", file=sys.stderr)
                return 1
            if not args.json:
                for line in progress.update(doc):
                    print(line, flush=True)
            if doc.get("state") != "running":
                break
            time.sleep(0.5)
    except rpc.RpcError as e:
        print(f"mpvpn test-links: {e}", file=sys.stderr)
        return 3
    if not args.json:
        print()
    _show(doc, args.json, lambda d: print(format_link_test(d)))
    return 0 if doc.get("state") == "done" else 1


def _cmd_genkey(args: argparse.Namespace) -> int:
    import base64

    from mpvpn.core import noise

    private, _public = noise.generate_keypair()
    print(base64.b64encode(private).decode())
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    import base64
    import binascii

    from mpvpn.core import noise

    text = sys.stdin.read().strip()
    try:
        private = base64.b64decode(text, validate=True)
        if len(private) != 32:
            raise ValueError
    except (binascii.Error, ValueError):
        print("mpvpn pubkey: expected a private key (base64 of 32 bytes) on standard input",
              file=sys.stderr)
        return 1
    print(base64.b64encode(noise.public_key(private)).decode())
    return 0


def _number(kind, lo, hi, what):
    """An argparse type: ``kind`` within lo..hi (None: open), so a bad value
    is refused by this command's own parser, with its own usage line."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: {what}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpvpn", description="orayboxvpn multipath VPN agent")
    p.add_argument("--version", action="version", version=f"mpvpn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    defaults = argparse.ArgumentDefaultsHelpFormatter
    run_dir_help = "the agent's run directory (its status socket)"
    what = "in-memory SMPU demo over simulated lossy carriers"
    d = sub.add_parser("demo", help=what, description=what, formatter_class=defaults)
    d.add_argument("--packets", type=_number(int, 1, None, "a whole number >= 1"), default=20000,
                   help="user packets to send")
    d.add_argument("--loss", type=_number(float, 0, 100, "a percentage 0-100"), default=20.0,
                   help="loss per carrier, percent")
    d.set_defaults(func=_cmd_demo)
    what = "run the agent in the foreground (what procd starts)"
    r = sub.add_parser("run", help=what, description=what, formatter_class=defaults)
    r.add_argument("--uci-dir", default=DEFAULT_UCI_DIR, help="directory with orayboxvpn and network")
    r.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=run_dir_help)
    r.add_argument("--ubus-socket", metavar="PATH",
                   help="ubusd's socket (default: /var/run/ubus/ubus.sock or /var/run/ubus.sock if there; "
                        "without one the agent is not on ubus)")
    r.add_argument("--log", choices=("auto", "syslog", "stderr"), default="auto",
                   help="syslog: to logd (/dev/log) as 'orayboxvpn' at each line's priority; "
                        "auto (default): syslog on OpenWrt, stderr elsewhere")
    r.set_defaults(func=_cmd_run)
    what = "print the running agent's status"
    st = sub.add_parser("status", help=what, description=what + " (exit status 3 when it is not "
                        "running; with --json still a document: {\"state\": \"stopped\", \"error\": ...})",
                        formatter_class=defaults)
    st.add_argument("--json", action="store_true", help="the whole status document as JSON")
    st.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=run_dir_help)
    st.set_defaults(func=_cmd_status)
    what = "measure each link alone, then all together, both ways"
    t = sub.add_parser("test-links", help=what, description=what, formatter_class=defaults)
    t.add_argument("--duration", type=float, default=3.0, help="seconds per phase (0.5-10)")
    t.add_argument("--peer", help="site name of the peer (a hub with several sites)")
    t.add_argument("--json", action="store_true", help="the test's document as JSON")
    t.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=run_dir_help)
    t.set_defaults(func=_cmd_test_links)
    what = "print a new pre-shared key (32 random bytes, base64)"
    g = sub.add_parser("genpsk", help=what, description=what + " for base.psk (the same on both "
                       "sites) or a `config site` section")
    g.set_defaults(func=_cmd_genpsk)
    what = "print a new X25519 private key (base64); see pubkey"
    k = sub.add_parser("genkey", help=what, description="print a new X25519 private key (base64) "
                       "for base.private_key or base.direct_private_key; `mpvpn pubkey` gives the "
                       "public key for the peer's base.peer_public_key (or the other sites' "
                       "direct_peer_key)")
    k.set_defaults(func=_cmd_genkey)
    what = "read a private key on stdin, print its public key"
    pk = sub.add_parser("pubkey", help=what, description="read a private key (base64, e.g. from "
                        "`mpvpn genkey`) on standard input and print its public key (base64)")
    pk.set_defaults(func=_cmd_pubkey)
    from mpvpn.agent import check

    check.register(sub)
    if _tools_installed():
        from mpvpn.tools import pair

        pair.register(sub)
    else:
        what = "write both sites' configs (a PC tool, not in the router package)"
        sub.add_parser("pair", help=what, description=what, add_help=True).set_defaults(
            func=_not_on_router)
    return p


def _tools_installed() -> bool:
    """``mpvpn.tools`` (demo, pair, package builders) runs on a PC; the router
    package leaves it out (package/orayboxvpn/Makefile, Build/Compile)."""
    import importlib.util

    return importlib.util.find_spec("mpvpn.tools") is not None


def _not_on_router(args: argparse.Namespace) -> int:
    print(f"mpvpn {args.command}: not part of the router package; run it on a PC from the "
          "source tree (README, \"Set-up\")", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)
