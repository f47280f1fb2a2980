"""``mpvpn pair``: the two matching ``/etc/config/orayboxvpn`` files of a link.

From a short description of both sites, site A (the client) and site B (the
server)::

    mpvpn pair --a-uplink telecom=10.1.0.1 --a-uplink unicom=10.2.0.1 \\
               --b-uplink telecom=10.1.0.2 --b-uplink unicom=10.2.0.2 \\
               --a-lan 192.168.10.0/24 --b-lan 192.168.20.0/24 --out pair

it writes ``pair/site-a/orayboxvpn`` and ``pair/site-b/orayboxvpn`` with a
fresh shared PSK (:func:`mpvpn.core.noise.genpsk`) and a free vNIC /30 (A the
first address, B the second) that overlaps neither LAN, rendered from the
jinja2 template ``templates/orayboxvpn.j2``. An uplink is ``TYPE=ADDRESS``
(``bind_ip``), ``TYPE=@IFACE`` (the OpenWrt interface, ``interface``) or
``TYPE=ADDRESS@IFACE``. The client connects to ``--server-address`` (may be
repeated); without it, to the address of each of B's uplinks. The same
description can come from a JSON file (``--from FILE``) whose keys are the
long option names (``{"a-uplink": ["telecom=10.1.0.1"], ...}``); options
given on the command line win.

Both files are validated with :func:`mpvpn.agent.config.validate` (against a
``network.lan`` holding the given LAN) before anything is written.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mpvpn import __version__
from mpvpn.agent import config
from mpvpn.core import noise
from mpvpn.io import uci

__all__ = ["PairError", "Site", "Uplink", "choose_vnc", "main", "register", "render", "generate"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE = "orayboxvpn.j2"
# Where a free vNIC subnet is looked for, in this order.
VNC_POOLS = ("172.30.0.0/16", "172.31.0.0/16", "10.254.0.0/16", "192.168.254.0/24")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class PairError(ValueError):
    """A problem with the description, in words for the user."""


@dataclass
class Uplink:
    type: str
    bind_ip: str | None = None
    interface: str | None = None
    section: str = ""


@dataclass
class Site:
    name: str
    role: str
    uplinks: list[Uplink]
    lans: list  # IPv4Network / IPv6Network: the LAN of network.lan
    extra_lans: list = field(default_factory=list)  # -> base.lan_subnet


# --- parsing the description ------------------------------------------------------

def parse_uplink(text: str) -> Uplink:
    """``TYPE=ADDRESS``, ``TYPE=@IFACE`` or ``TYPE=ADDRESS@IFACE``."""
    type_, sep, rest = text.partition("=")
    type_ = type_.strip()
    if not sep or not type_ or not rest.strip():
        raise PairError(f"uplink {text!r}: write TYPE=ADDRESS, TYPE=@IFACE or TYPE=ADDRESS@IFACE "
                        "(e.g. telecom=10.1.0.1, unicom=@wan2)")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", type_):
        raise PairError(f"uplink {text!r}: {type_!r} is not a carrier word (letters, digits, '_', '-', '.')")
    addr, at, iface = rest.strip().partition("@")
    up = Uplink(type_)
    if addr:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise PairError(f"uplink {text!r}: {addr!r} is not an IP address") from None
        if ip.is_unspecified or ip.is_multicast:
            raise PairError(f"uplink {text!r}: {ip} is not an address of an uplink")
        up.bind_ip = str(ip)
    if at:
        if not uci.validate_name(iface):
            raise PairError(f"uplink {text!r}: {iface!r} is not an OpenWrt interface name (letters, digits, '_')")
        up.interface = iface
    return up


def parse_subnet(text: str, what: str):
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise PairError(f"{what} {text!r} is not a subnet (CIDR, e.g. 192.168.10.0/24)") from None


def _section_names(uplinks: list[Uplink]) -> None:
    """Name each smpu section after its carrier (a valid UCI name, unique)."""
    used: set[str] = set()
    for up in uplinks:
        base = re.sub(r"[^A-Za-z0-9_]", "_", up.type)
        name, n = base, 2
        while name in used or name in ("base", "vnc"):
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        up.section = name


def _ip(hostport: str):
    try:
        return config.parse_hostport(hostport).ip
    except ValueError:
        return None


def choose_vnc(avoid: list, pools=VNC_POOLS) -> ipaddress.IPv4Network:
    """The first /30 of ``pools`` that overlaps no network and contains no
    address of ``avoid``."""
    nets = [a for a in avoid if isinstance(a, (ipaddress.IPv4Network, ipaddress.IPv6Network))]
    addrs = [a for a in avoid if isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address))]
    for pool in pools:
        for cand in ipaddress.ip_network(pool).subnets(new_prefix=30):
            if any(n.version == 4 and n.overlaps(cand) for n in nets):
                continue
            if any(a.version == 4 and a in cand for a in addrs):
                continue
            return cand
    raise PairError("no free vNIC subnet found: give one with --vnc-subnet")


# --- rendering -------------------------------------------------------------------

def _uci_quote(value) -> str:
    """A value as ``uci commit`` writes it: in single quotes, ' as '\\''."""
    return "'" + str(value).replace("'", "'\\''") + "'"


def _environment():
    try:
        import jinja2
    except ImportError:
        raise PairError("mpvpn pair needs jinja2 (pip install jinja2; on OpenWrt: "
                        "opkg install python3-jinja2)") from None
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["uci"] = _uci_quote
    return env


def render(site: Site, peer: Site, *, psk: str, vnc_ip, vnc_net, server_address: list[str],
           listen_address: str | None, mode: str) -> str:
    """The config file of ``site``."""
    template = _environment().get_template(TEMPLATE)
    return template.render(
        version=__version__,
        site=site,
        peer=peer,
        psk=psk,
        mode=mode,
        server_address=server_address if site.role == "client" else [],
        listen_address=listen_address if site.role == "server" else None,
        vnc={"ipaddr": str(vnc_ip), "netmask": str(vnc_net.netmask), "prefixlen": vnc_net.prefixlen},
    )


def network_package(site: Site) -> uci.Package:
    """A ``network`` package with the site's LAN, as network.lan would hold it."""
    pkg = uci.Package("network")
    pkg.set_section("lan", "interface")
    pkg.set("lan", "proto", "static")
    for net in site.lans:
        host = next(net.hosts(), net.network_address) if net.num_addresses > 2 else net.network_address
        pkg.add_list("lan", "ip6addr" if net.version == 6 else "ipaddr", f"{host}/{net.prefixlen}")
    return pkg


def check_output(text: str, site: Site) -> uci.Package:
    """Parse and validate a rendered file; PairError on any error."""
    try:
        pkg = uci.parse(text, config.PACKAGE)
    except uci.UciParseError as e:  # a bug in the template
        raise PairError(f"internal error: the file for {site.name} does not parse: {e}") from None
    again = uci.parse(uci.dump(pkg), config.PACKAGE)
    if again != pkg:
        raise PairError(f"internal error: the file for {site.name} does not read back identically")
    cfg, problems = config.validate(pkg, network_package(site))
    errors = [p for p in problems if p.is_error]
    if errors or cfg is None:
        raise PairError(f"the file for {site.name} would not pass `mpvpn check`:\n  "
                        + "\n  ".join(str(p) for p in errors))
    return pkg


@dataclass
class Result:
    a: Site
    b: Site
    texts: dict  # site name -> file text
    vnc: ipaddress.IPv4Network
    server_address: list[str]
    listen_address: str
    warnings: list[str] = field(default_factory=list)


def generate(*, a_uplinks: list[str], b_uplinks: list[str], a_lans: list[str], b_lans: list[str],
             a_extra_lans: list[str] = (), b_extra_lans: list[str] = (),
             server_address: list[str] = (), listen_address: str | None = None,
             port: int = config.DEFAULT_PORT, mode: str = "duplicate", vnc_subnet: str | None = None,
             psk: str | None = None, a_name: str = "site-a", b_name: str = "site-b") -> Result:
    """Check the description and render both files (nothing is written)."""
    for n in (a_name, b_name):
        if not _NAME_RE.fullmatch(n):
            raise PairError(f"site name {n!r}: letters, digits, '_', '-', '.' (it names the output folder)")
    if a_name == b_name:
        raise PairError("the two sites need different names")
    if mode not in ("duplicate", "aggregate", "adaptive"):
        raise PairError(f"mode {mode!r}: one of duplicate, aggregate, adaptive")
    if not 1 <= port <= 65535:
        raise PairError(f"port {port}: 1 to 65535")
    if not a_uplinks or not b_uplinks:
        raise PairError("give the uplinks of both sites: --a-uplink TYPE=ADDRESS ... --b-uplink TYPE=ADDRESS ...")
    if not a_lans or not b_lans:
        raise PairError("give the LAN of both sites (--a-lan CIDR --b-lan CIDR): the vNIC subnet must not overlap them")
    a = Site(a_name, "client", [parse_uplink(u) for u in a_uplinks],
             [parse_subnet(n, "--a-lan") for n in a_lans], [parse_subnet(n, "--a-extra-lan") for n in a_extra_lans])
    b = Site(b_name, "server", [parse_uplink(u) for u in b_uplinks],
             [parse_subnet(n, "--b-lan") for n in b_lans], [parse_subnet(n, "--b-extra-lan") for n in b_extra_lans])
    warnings = []
    for site in (a, b):
        _section_names(site.uplinks)
        seen = set()
        for up in site.uplinks:
            if up.bind_ip and up.bind_ip in seen:
                raise PairError(f"{site.name}: uplink address {up.bind_ip} is given twice")
            seen.add(up.bind_ip)
    ta = sorted({u.type for u in a.uplinks})
    tb = sorted({u.type for u in b.uplinks})
    if ta != tb:
        raise PairError(
            f"the carriers differ: {a.name} has {', '.join(ta)}, {b.name} has {', '.join(tb)}; "
            "each uplink is paired with the peer's uplink of the same type")
    for t in ta:
        na = sum(1 for u in a.uplinks if u.type == t)
        nb = sum(1 for u in b.uplinks if u.type == t)
        if na != nb:
            warnings.append(f"carrier {t}: {na} uplink(s) at {a.name}, {nb} at {b.name}; "
                            "they are paired in order, the extra ones stay unused")
    for na_ in a.lans + a.extra_lans:
        for nb_ in b.lans + b.extra_lans:
            if na_.version == nb_.version and na_.overlaps(nb_):
                raise PairError(f"the LANs overlap: {na_} ({a.name}) and {nb_} ({b.name}); "
                                "the routes into the tunnel would collide")

    if server_address:
        servers = []
        for s in server_address:
            try:
                servers.append(str(config.parse_hostport(s, port)))
            except ValueError as e:
                raise PairError(f"--server-address {s!r}: {e}") from None
    else:
        servers = [str(config.HostPort(u.bind_ip, port)) for u in b.uplinks if u.bind_ip]
        if not servers:
            raise PairError(f"{b.name} has no uplink address to connect to: give --server-address HOST[:PORT]")
    if listen_address is None:
        v6_only = all((ip := _ip(s)) is not None and ip.version == 6 for s in servers)
        listen_address = f"[::]:{port}" if v6_only else f"0.0.0.0:{port}"
    else:
        try:
            hp = config.parse_hostport(listen_address, port, allow_name=False)
        except ValueError as e:
            raise PairError(f"--listen-address {listen_address!r}: {e}") from None
        listen_address = str(hp)

    avoid: list = [*a.lans, *a.extra_lans, *b.lans, *b.extra_lans]
    for site in (a, b):
        avoid += [ipaddress.ip_address(u.bind_ip) for u in site.uplinks if u.bind_ip]
    avoid += [ip for s in servers if (ip := _ip(s)) is not None]
    if vnc_subnet:
        try:
            vnet = ipaddress.IPv4Network(vnc_subnet, strict=False)
        except ValueError:
            raise PairError(f"--vnc-subnet {vnc_subnet!r} is not an IPv4 subnet") from None
        if not 8 <= vnet.prefixlen <= 30:
            raise PairError(f"--vnc-subnet {vnet}: the prefix must be /8 to /30")
        for x in avoid:
            hit = x.overlaps(vnet) if isinstance(x, ipaddress.IPv4Network) else (
                x.version == 4 and not isinstance(x, ipaddress.IPv6Network) and x in vnet)
            if hit:
                raise PairError(f"--vnc-subnet {vnet} overlaps {x}")
    else:
        vnet = choose_vnc(avoid)
    hosts = list(vnet.hosts()) if vnet.prefixlen >= 24 else [vnet.network_address + 1, vnet.network_address + 2]

    psk = psk if psk is not None else noise.genpsk()
    try:
        noise.load_psk(psk)
    except ValueError as e:
        raise PairError(str(e)) from None

    texts = {}
    for site, peer, ip in ((a, b, hosts[0]), (b, a, hosts[1])):
        text = render(site, peer, psk=psk, vnc_ip=ip, vnc_net=vnet, server_address=servers,
                      listen_address=listen_address, mode=mode)
        check_output(text, site)
        texts[site.name] = text
    return Result(a, b, texts, vnet, servers, listen_address, warnings)


def write(result: Result, out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write ``out_dir/<site>/orayboxvpn`` (mode 0600, as uci writes files)."""
    out = Path(out_dir)
    targets = [out / name / config.PACKAGE for name in result.texts]
    if not force:
        for t in targets:
            if t.exists():
                raise PairError(f"{t} exists: not overwritten without --force")
    paths = []
    for name, text in result.texts.items():
        path = out / name / config.PACKAGE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, uci.UCI_FILEMODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, uci.UCI_FILEMODE)
        os.replace(tmp, path)
        paths.append(path)
    return paths


# --- command line ---------------------------------------------------------------

_LIST_OPTS = ("a_uplink", "b_uplink", "a_lan", "b_lan", "a_extra_lan", "b_extra_lan", "server_address")
_SCALAR_OPTS = ("listen_address", "port", "mode", "vnc_subnet", "psk", "a_name", "b_name", "out")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``pair`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "pair",
        help="write the matching /etc/config/orayboxvpn files of both sites",
        description="Write OUT/<site-a>/orayboxvpn (client) and OUT/<site-b>/orayboxvpn "
        "(server) with a fresh shared psk and a free vNIC /30.",
        epilog="example: mpvpn pair --a-uplink telecom=10.1.0.1 --a-uplink unicom=10.2.0.1 "
        "--b-uplink telecom=10.1.0.2 --b-uplink unicom=10.2.0.2 "
        "--a-lan 192.168.10.0/24 --b-lan 192.168.20.0/24 --out pair",
    )
    p.add_argument("--from", dest="from_file", metavar="FILE",
                   help="JSON file with the description (keys: the long option names)")
    p.add_argument("--a-uplink", action="append", metavar="TYPE=ADDR|TYPE=@IFACE",
                   help="an uplink of site A, the client (repeat per carrier)")
    p.add_argument("--b-uplink", action="append", metavar="TYPE=ADDR|TYPE=@IFACE",
                   help="an uplink of site B, the server (repeat per carrier)")
    p.add_argument("--a-lan", action="append", metavar="CIDR", help="LAN of site A (network.lan)")
    p.add_argument("--b-lan", action="append", metavar="CIDR", help="LAN of site B (network.lan)")
    p.add_argument("--a-extra-lan", action="append", metavar="CIDR",
                   help="another subnet behind site A, routed by B (base.lan_subnet)")
    p.add_argument("--b-extra-lan", action="append", metavar="CIDR",
                   help="another subnet behind site B, routed by A (base.lan_subnet)")
    p.add_argument("--server-address", action="append", metavar="HOST[:PORT]",
                   help="where A reaches B (repeat; default: each of B's uplink addresses)")
    p.add_argument("--listen-address", metavar="ADDR[:PORT]", help="B's listen address (default 0.0.0.0:PORT)")
    p.add_argument("--port", type=int, metavar="PORT", help=f"control and UDP port (default {config.DEFAULT_PORT})")
    p.add_argument("--mode", choices=("duplicate", "aggregate", "adaptive"), help="default duplicate")
    p.add_argument("--vnc-subnet", metavar="CIDR", help="vNIC subnet (default: the first free /30 of 172.30.0.0/16)")
    p.add_argument("--psk", help="use this psk instead of a fresh one")
    p.add_argument("--a-name", metavar="NAME", help="name of site A (default site-a)")
    p.add_argument("--b-name", metavar="NAME", help="name of site B (default site-b)")
    p.add_argument("--out", metavar="DIR", help="output directory (required)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_cmd_pair)
    return p


def _merge_file(args: argparse.Namespace) -> None:
    if not args.from_file:
        return
    try:
        with open(args.from_file, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise PairError(f"{args.from_file}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise PairError(f"{args.from_file}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise PairError(f"{args.from_file}: expected a JSON object")
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest in _LIST_OPTS:
            values = value if isinstance(value, list) else [value]
            if getattr(args, dest) is None:
                setattr(args, dest, [str(v) for v in values])
        elif dest in _SCALAR_OPTS:
            if getattr(args, dest) is None:
                setattr(args, dest, value if dest == "port" else str(value))
        else:
            raise PairError(f"{args.from_file}: unknown key {key!r}")


def run(args: argparse.Namespace, out=None) -> int:
    out = sys.stdout if out is None else out
    _merge_file(args)
    if not args.out:
        raise PairError("give the output directory: --out DIR")
    try:
        port = int(args.port) if args.port is not None else config.DEFAULT_PORT
    except (TypeError, ValueError):
        raise PairError(f"port {args.port!r} is not a number") from None
    result = generate(
        a_uplinks=args.a_uplink or [], b_uplinks=args.b_uplink or [],
        a_lans=args.a_lan or [], b_lans=args.b_lan or [],
        a_extra_lans=args.a_extra_lan or [], b_extra_lans=args.b_extra_lan or [],
        server_address=args.server_address or [], listen_address=args.listen_address,
        port=port, mode=args.mode or "duplicate", vnc_subnet=args.vnc_subnet, psk=args.psk,
        a_name=args.a_name or "site-a", b_name=args.b_name or "site-b",
    )
    paths = write(result, args.out, force=args.force)
    hosts = [result.vnc.network_address + 1, result.vnc.network_address + 2]
    a, b = result.a, result.b
    print(f"{paths[0]}: {a.name}, client, vNIC {hosts[0]}/{result.vnc.prefixlen}, "
          f"uplinks {', '.join(u.type for u in a.uplinks)}, connects to {', '.join(result.server_address)}",
          file=out)
    print(f"{paths[1]}: {b.name}, server, vNIC {hosts[1]}/{result.vnc.prefixlen}, "
          f"uplinks {', '.join(u.type for u in b.uplinks)}, listens on {result.listen_address}", file=out)
    for w in result.warnings:
        print(f"warning: {w}", file=out)
    print("Both files hold the same fresh psk: keep them secret (mode 0600).", file=out)
    print(f"Next: copy each file to /etc/config/orayboxvpn on its router, run `mpvpn check` there, "
          f"then `/etc/init.d/orayboxvpn restart`, {b.name} (the server) first.", file=out)
    return 0


def _cmd_pair(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except PairError as e:
        print(f"mpvpn pair: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m mpvpn.tools.pair ...`` (the same as ``mpvpn pair ...``)."""
    parser = argparse.ArgumentParser(prog="mpvpn")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pair", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
