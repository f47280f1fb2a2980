"""The agent's typed, validated configuration.

Read from the UCI files ``<uci_dir>/orayboxvpn`` (sections ``base``, ``vnc``
and one ``smpu`` per uplink) and ``<uci_dir>/network`` (the LAN, from
``config interface 'lan'``). :func:`load_config` never raises for bad input:
it returns the problems it found, each naming the UCI option it is about
(``orayboxvpn.<section>.<option>: <what is wrong>``), and a :class:`Config`
only when there is no error.

:data:`OPTIONS` is the single list of every option the agent reads; the
reference in docs/config.md and the procd validation spec of the init
script are checked against it.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple, Union

from mpvpn.io import uci

__all__ = [
    "Base",
    "Config",
    "HostPort",
    "KINDS",
    "Lan",
    "OPTIONS",
    "Option",
    "Problem",
    "RelayConf",
    "Uplink",
    "Vnc",
    "load_config",
    "options_markdown",
    "parse_hostport",
    "validate",
]

PACKAGE = "orayboxvpn"
DEFAULT_PORT = 7000
STUN_PORT = 3478  # RFC 8489 18.2
MAX_STUN = 4  # servers a BindingClient asks at once (mpvpn.core.stun)
RELAY_AFTER_PUNCH = 2.0  # below this base.relay_after relays pairs punching would open (docs/nat.md)
PSK_BYTES = 32
TURN_PORT = 3478  # RFC 8656 default
MAX_RELAYS = 8
CREDENTIAL_MAX = 128
CARRIER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")  # smpu.type, policy.carrier
# Per-packet overhead of the tunnel (docs/protocol.md): SMPU 20 + tag 16 + UDP 8 + IP.
OVERHEAD_IPV4 = 64
OVERHEAD_IPV6 = 84

ERROR = "error"
WARNING = "warning"

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]


# --- the option table ----------------------------------------------------------

class Option(NamedTuple):
    kind: str  # a key of KINDS
    default: str | None  # as written in UCI; None: no default (required or optional)
    description: str


# kind -> (what the docs call it, procd validation datatype for the init script)
KINDS: dict[str, tuple[str, str]] = {
    "bool": ("boolean: 1/0, yes/no, on/off, true/false, enabled/disabled", "bool"),
    "role": ("`client` or `server`", 'or("client","server")'),
    "mode": ("`duplicate`, `aggregate` or `adaptive`", 'or("duplicate","aggregate","adaptive")'),
    "nack": ("`auto`, `1` or `0`", 'or("auto","1","0")'),
    "log_level": ("`debug`, `info`, `warning` or `error`", 'or("debug","info","warning","error")'),
    "hostport": ("host:port (IPv6 as `[addr]:port`)", "string"),
    "hostport_list": ("host:port, several as a list or separated by spaces", "list(string)"),
    "psk": ("base64 of exactly 32 bytes", "string"),
    "key32": ("base64 of exactly 32 bytes (an X25519 key)", "string"),
    "seconds": ("seconds (decimal)", "ufloat"),
    "fraction": ("fraction (decimal; 0.001 = 0.1 %)", "ufloat"),
    "count": ("whole number", "uinteger"),
    "ms": ("milliseconds (whole number)", "uinteger"),
    "packets": ("packets (whole number)", "uinteger"),
    "mtu": ("bytes, 576 to 9000", "range(576,9000)"),
    "ip4cidr": ("IPv4 address, optionally with /prefix", "or(ip4addr,cidr4)"),
    "netmask": ("dotted netmask or prefix length, /8 to /30", "string"),
    "ifname": ("Linux interface name, at most 15 characters", "string"),
    "cidr_list": ("subnets (CIDR), several as a list or separated by spaces", "list(string)"),
    "carrier": ("word: letters, digits, `_`, `-`, `.`", "string"),
    "site_name": ("word: letters, digits, `_`, `-`, `.`, at most 64, starting with a letter or digit",
                  "string"),
    "pin_list": ("`site name=public key` (base64 of 32 bytes), several as a list", "list(string)"),
    "ipaddr": ("IPv4 or IPv6 address", "ipaddr"),
    "network": ("OpenWrt interface (UCI section name in /etc/config/network)", "uciname"),
    "device": ("Linux network device", "string"),
    "port": ("port, 1 to 65535", "port"),
    "net": ("address or subnet (CIDR)", "or(ipaddr,cidr)"),
    "carrier_list": ("carrier types (`smpu` `type`), several as a list", "list(string)"),
    "kbit": ("kbit/s, whole number, 8 to 100000000", "uinteger"),
    "kib": ("KiB, whole number, 32 to 16384", "range(32,16384)"),
    "relay_address": ("host:port (IPv6 as `[addr]:port`); the port defaults to 3478", "string"),
    "credential": ("printable ASCII, at most 128 characters", "string"),
    "workers": ("`auto`, or a whole number 1 to 64", "string"),
}

OPTIONS: dict[str, dict[str, Option]] = {
    "base": {
        "enabled": Option(
            "bool", "1",
            "Run the agent. A missing `enabled` counts as enabled; the shipped default "
            "file sets `0` until the other options are filled in.",
        ),
        "role": Option(
            "role", None,
            "Required. `client` opens the control connection, `server` accepts it. "
            "Start the server side first.",
        ),
        "server_address": Option(
            "hostport_list", None,
            "Client: required. Where the server's control connection listens; the port "
            "defaults to 7000. Several addresses (e.g. the server's address on each "
            "carrier) are tried in order.",
        ),
        "listen_address": Option(
            "hostport", None,
            "Server: required. Address and TCP port the control connection is accepted "
            "on, e.g. `0.0.0.0:7000` or `[::]:7000`; the port defaults to 7000.",
        ),
        "psk": Option(
            "psk", None,
            "Required (a server with `config site` sections may leave it out). Shared secret, the "
            "same on both sides: 32 random bytes in base64 (`mpvpn genpsk`).",
        ),
        "name": Option(
            "site_name", None,
            "This site's name, as the peer's status, its logs and LuCI show it (`mpvpn pair "
            "--a-name/--b-name` writes it). Unset: `<hostname>-<vNIC address>`. A name, not an "
            "identity: a hub knows a site by the key it proved and refuses a second site "
            "with a name already in use.",
        ),
        "pair_unmatched": Option(
            "bool", "0",
            "Carriers without a same-type partner on the peer stay idle (the seed's rule); `1` "
            "pairs the leftovers across carriers. Either side may turn it on.",
        ),
        "hub_forward": Option(
            "bool", "0",
            "Server only: forward between client sites (site-to-site through this hub). `1`: "
            "every site is told the vNIC address and LANs of every other site and routes them "
            "into its tunnel; the hub passes packets between the sites' sessions itself. `0`: "
            "sites reach only this hub's LAN, and packets a site sends towards another site "
            "are dropped and counted.",
        ),
        "direct": Option(
            "bool", "1",
            "Direct paths between sites (with a hub's `hub_forward 1`). On a site: `1` lets two "
            "sites of one hub that talk to each other open a session of their own, straight "
            "between their carriers (NAT hole punching as with the hub), keyed by a handshake "
            "between the two sites that the hub cannot read; their traffic goes back through "
            "the hub within the dead-detection time when that path fails. `0`: everything "
            "between sites goes through the hub. On the hub: `0` offers no direct paths to "
            "any site. Both sites and the hub must allow it.",
        ),
        "direct_private_key": Option(
            "key32", None,
            "Site: this site's static direct key (`mpvpn genkey`), so that other sites can pin "
            "its public key (`direct_peer_key`; `mpvpn status` prints it). Unset: "
            "`private_key` if set, else a key made at each start (nobody can pin it).",
        ),
        "direct_peer_key": Option(
            "pin_list", None,
            "Site: pins the direct keys of other sites, e.g. `list direct_peer_key "
            "'branch-c=BASE64'` (the other site's `mpvpn status` prints its key). An offer "
            "from the hub for that site with another key is refused (`key_mismatch`, logged "
            "as an error, shown in the status), so an active hub cannot sit in the middle of "
            "a direct session: that traffic stays through the hub.",
        ),
        "direct_pinned_only": Option(
            "bool", "0",
            "Site: `1` goes direct only with the sites pinned in `direct_peer_key`; the "
            "others' traffic stays through the hub (`not_pinned`).",
        ),
        "private_key": Option(
            "key32", None,
            "Optional: this site's X25519 private key (`mpvpn genkey`). With `peer_public_key` the "
            "handshake also proves both sites' static keys (Noise KKpsk0), so a leaked PSK alone "
            "cannot impersonate a site. Set both or neither; one client per server in this mode.",
        ),
        "peer_public_key": Option(
            "key32", None,
            "Optional: the peer site's X25519 public key (`mpvpn pubkey` on the peer prints it).",
        ),
        "mode": Option(
            "mode", "duplicate",
            "`duplicate` sends every packet on every subflow (the seed's scheme); "
            "`aggregate` sends each packet on one subflow, spread by link quality; "
            "`adaptive` duplicates over lossy links and spreads over good ones.",
        ),
        "nack": Option(
            "nack", "auto",
            "Ask the peer to re-send packets missing on every subflow (NACK). `auto`: on in "
            "every mode. In duplicate mode it repairs what the carriers' own loss explains (TCP "
            "at 20 % loss per carrier keeps 0.95-0.98 of its clean speed instead of 0.86) and "
            "gives up the rest at once, since the same packet lost on every carrier is usually a "
            "full queue, TCP's signal to slow down. Set it on the receiving site (both, for both "
            "directions).",
        ),
        "keepalive_idle": Option(
            "seconds", "0.75", "Keepalive interval of a subflow without traffic (0.05 to 60)."
        ),
        "keepalive_active": Option(
            "seconds", "0.1", "Keepalive interval of a subflow while data flows (0.01 to 60)."
        ),
        "dead_after": Option(
            "count", "3",
            "A subflow is dead after this many consecutive unanswered keepalives on a clean path "
            "(1 to 100); on a lossy or not yet measured one more, sent faster to the same window "
            "(docs/protocol.md \"Liveness\").",
        ),
        "target_loss": Option(
            "fraction", "0.001",
            "`adaptive` mode: the loss each packet may have; a packet goes on the fewest "
            "subflows whose combined loss meets it (0.000001 to 0.5).",
        ),
        "hold_max_ms": Option(
            "ms", "200",
            "Longest wait of a packet in the reorder buffer for a missing predecessor "
            "(0 to 10000). With NACKs on, a path where one repair and a retry take longer "
            "(RTT above ~70 ms) stretches it to fit them, up to 1000.",
        ),
        "rekey_interval": Option(
            "seconds", "120",
            "New data-plane keys from a fresh handshake (forward secrecy) this often; "
            "traffic is not interrupted (1 to 86400).",
        ),
        "rekey_packets": Option(
            "packets", "67108864",
            "Advanced: also rekey after this many packets under one key (1000 to 67108864 = "
            "2^26, the AEAD usage limit we keep; see docs/security.md). Only tests lower it.",
        ),
        "reorder_capacity": Option(
            "packets", "4096",
            "Reorder buffer size; when it is full everything in it is delivered "
            "(16 to 65536). It must hold a repair's round trip of packets: TCP at "
            "~500 Mbit/s with 10-20 ms of queueing in the agents needs 1000-2000 "
            "(1024 overflowed at 20 % loss per carrier). Up to ~6 MB per peer while full.",
        ),
        "rx_buffer": Option(
            "kib", None,
            "Optional: kernel receive buffer of each uplink's socket, in KiB (32 to 16384; the "
            "kernel accounts twice this in packet memory), applied as set (beyond "
            "net.core.rmem_max: the agent runs as root). When this agent's CPU is the "
            "bottleneck, bulk TCP keeps it full and every other packet (a ping, a VoIP frame) "
            "waits behind it: its size is the delay under load. Unset: the agent asks for 4096 "
            "and the kernel caps that at net.core.rmem_max (212992 bytes on many kernels). In "
            "the lab (rmem_max 4 MiB) 256 instead of 4096 cut a ping's added delay under a "
            "cubic download 5x and under bbr 1.3x, for 0.6x of cubic's bulk throughput "
            "(docs/performance.md \"Latency\").",
        ),
        "mtu": Option(
            "mtu", "1400",
            "MTU of the tun vNIC. 1400 keeps encapsulated packets within a 1500-byte "
            "path (overhead: 64 bytes over IPv4 uplinks, 84 over IPv6).",
        ),
        "mss_clamp": Option(
            "bool", "1",
            "Lower the MSS of TCP connections opened through the tunnel to what the vNIC "
            "carries (MTU - 40 over IPv4, - 60 over IPv6), so full-size segments never wait "
            "for path-MTU discovery or stall where ICMP is filtered. `0` leaves SYNs alone "
            "(e.g. when the firewall already clamps on this interface).",
        ),
        "log_level": Option("log_level", "info", "Log verbosity (to logd as `orayboxvpn`, see docs/openwrt.md)."),
        "lan_subnet": Option(
            "cidr_list", None,
            "Extra subnets behind this router, besides the LAN of `network.lan`, that "
            "the peer routes into the tunnel.",
        ),
        "stun": Option(
            "hostport_list", None,
            "STUN servers (host:port, port default 3478; at most 4 are used) each uplink asks "
            "for its public address and port and its kind of NAT, from the uplink's own socket "
            "(docs/nat.md). The results are sent to the peer as candidates for hole punching. "
            "Two servers (or one with RFC 5780 OTHER-ADDRESS, as coturn with two addresses) "
            "tell endpoint-independent from endpoint-dependent NAT. Empty: no STUN.",
        ),
        "nat_keepalive": Option(
            "seconds", "25",
            "Longest idle keepalive interval of a subflow, so that NAT mappings on the way stay "
            "open (below the common 30 s UDP timeout of NATs; 1 to 300). Caps `keepalive_idle`.",
        ),
        "relay_after": Option(
            "seconds", "4",
            "With `config relay` sections: how long a subflow may stay unestablished (its direct "
            "open and hole punching failed) before its uplink asks a relay (1 to 600). Shorter "
            "than ~2 s relays pairs that punching would still have opened.",
        ),
        "relay_retry": Option(
            "seconds", "10",
            "With `config relay` sections: a relay that failed (no answer, an error) is skipped "
            "for this long before it is tried again; when every relay failed, the uplink tries "
            "again after this long (1 to 3600).",
        ),
        "workers": Option(
            "workers", "1",
            "Server only: processes that carry the data path, each holding the sessions whose "
            "ID modulo this number is its index (the kernel steers every datagram to its "
            "process; the main one keeps control, routes and status). `1`: one process, as "
            "without the option. `auto`: one per CPU core. For a hub with many sites on a "
            "multi-core router; not with `config relay` or `stun`.",
        ),
    },
    "vnc": {
        "ipaddr": Option(
            "ip4cidr", None,
            "Required. This side's vNIC address, e.g. `172.30.0.1`; the peer uses another "
            "address of the same subnet. May carry the prefix (`172.30.0.1/30`).",
        ),
        "netmask": Option(
            "netmask", None,
            "Required unless `ipaddr` has a /prefix. `255.255.255.252` or `30`.",
        ),
        "ifname": Option("ifname", "mpvpn0", "Name of the tun device."),
        "mtu": Option("mtu", None, "MTU of the vNIC; overrides `base.mtu` when set."),
    },
    "smpu": {
        "type": Option(
            "carrier", None,
            "Required. Carrier of this uplink, e.g. `telecom`, `unicom`, `mobile`. Each "
            "uplink is paired with the peer's uplink of the same type.",
        ),
        "bind_ip": Option(
            "ipaddr", None,
            "This uplink's own address; the subflow's UDP socket is bound to it. "
            "`bind_ip` or `interface` is required.",
        ),
        "interface": Option(
            "network", None,
            "OpenWrt interface of the uplink, e.g. `wan2`; its address (and changes of "
            "it) come from ubus. `bind_ip` or `interface` is required.",
        ),
        "device": Option(
            "device", None,
            "Linux device to bind the socket to (SO_BINDTODEVICE); found from "
            "`interface` when that is set.",
        ),
        "port": Option(
            "port", None,
            "Local UDP port of the subflow. Default: the port of `base.listen_address` "
            "(server) or of the first `base.server_address` (client), else 7000.",
        ),
        "upload": Option(
            "kbit", None,
            "Upload speed of this uplink in kbit/s, as in sqm (e.g. `20000` for 20 Mbit/s). "
            "Optional: aggregate and adaptive modes start from it instead of assuming "
            "10 Mbit/s until the link is measured; the measurement takes over after.",
        ),
        "enabled": Option("bool", "1", "`0` leaves this uplink unused."),
    },
    "site": {
        "psk": Option(
            "psk", None,
            "Required. Server with several client sites (a hub): this site's own key, the "
            "`base.psk` of that client. A site whose key leaks can be cut off alone, and the "
            "status names the site each session authenticated as. Without `base.psk` on the "
            "server only site keys are accepted.",
        ),
        "vnc_ipaddr": Option(
            "ipaddr", None,
            "The vNIC address this site must use (its `vnc.ipaddr`); the hub refuses any "
            "other. Unset: any free address of the vNIC subnet.",
        ),
        "lan_subnet": Option(
            "cidr_list", None,
            "The LAN subnets this site may announce: each of its LANs must lie inside one "
            "of them, or the hub refuses it. Unset: any LAN that collides with no other site's.",
        ),
        "forward": Option(
            "bool", "1",
            "With the hub's `base.hub_forward 1`: `0` keeps this site out of site-to-site "
            "forwarding: it is not told about the other sites, they are not told about it, and "
            "nothing passes between it and them (it still reaches the hub's LAN).",
        ),
        "direct": Option(
            "bool", "1",
            "With the hub's `base.direct 1`: `0` offers this site no direct paths to other "
            "sites, so everything between it and them passes the hub (to filter or log it "
            "there). The site may also refuse them itself (its own `base.direct`).",
        ),
        "enabled": Option("bool", "1", "`0` refuses this site's key."),
    },
    "policy": {
        "src": Option(
            "net", None,
            "Required. The LAN host or subnet whose traffic this policy steers (seed 004), "
            "e.g. '192.168.10.50' or '192.168.10.0/25'.",
        ),
        "dst": Option("net", None, "Only traffic to this host or subnet (at the peer); any if unset."),
        "carrier": Option(
            "carrier_list", None,
            "The carriers (`smpu` `type`) this traffic may use, least loaded first; any if unset.",
        ),
        "exclusive": Option(
            "bool", "0", "Reserve those carriers for this traffic: other traffic may not use them.",
        ),
        "mode": Option("mode", None, "This traffic's mode, instead of `base.mode`."),
        "priority": Option(
            "bool", "0",
            "Serve this traffic first: a strict priority class ahead of the fair share of all other "
            "traffic (aggregate and adaptive modes, which queue; TCP handshakes, DNS and other "
            "urgent packets still go before it).",
        ),
        "enabled": Option("bool", "1", "`0` ignores this policy."),
    },
    "relay": {
        "address": Option(
            "relay_address", None,
            "Required. A TURN relay (RFC 8656 over UDP, e.g. coturn) that carries a subflow whose "
            "direct and punched paths both fail (endpoint-dependent NAT on both ends). Several "
            "`config relay` sections are tried in order; one that fails is skipped for the next "
            "for `base.relay_retry` (10 s). Configure relays on both sites. The relay sees only "
            "ciphertext.",
        ),
        "username": Option("credential", None, "Required. The relay's long-term credential: user name."),
        "password": Option(
            "credential", None,
            "Required. The relay's long-term credential: password (keep the file mode 600).",
        ),
        "enabled": Option("bool", "1", "`0` leaves this relay out."),
    },
}

# What the agent reads from /etc/config/network (documentation only).
NETWORK_OPTIONS: dict[str, str] = {
    "ipaddr": "LAN address(es): `option ipaddr` with `option netmask`, CIDR form, "
    "or `list ipaddr` of CIDRs (OpenWrt 21.02 and later).",
    "netmask": "Netmask for addresses of `ipaddr` without a /prefix.",
    "ip6addr": "Static IPv6 LAN prefixes (CIDR), also routed by the peer.",
}


def options_markdown() -> str:
    """The option tables of docs/config.md, generated from OPTIONS."""
    out = []
    for section, options in OPTIONS.items():
        out.append(f"### `config {section}`\n\n")
        out.append("| option | type | default | description |\n")
        out.append("|---|---|---|---|\n")
        for name, opt in options.items():
            default = "—" if opt.default is None else f"`{opt.default}`"
            kind = KINDS[opt.kind][0].replace("|", "\\|")
            desc = opt.description.replace("|", "\\|")  # a | would end the table cell
            out.append(f"| `{name}` | {kind} | {default} | {desc} |\n")
        out.append("\n")
    return "".join(out)


# --- problems ---------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    severity: str  # ERROR or WARNING
    path: str  # "orayboxvpn.base.psk", "orayboxvpn.@smpu[0].bind_ip", "network.lan.ipaddr"
    message: str

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def __str__(self) -> str:
        if self.is_error:
            return f"{self.path}: {self.message}"
        return f"{self.path}: warning: {self.message}"


def _q(value: str, limit: int = 60) -> str:
    """A value quoted for a message: never long, never a control character."""
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    out = []
    for ch in value:
        if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "'" + "".join(out) + "'"


# --- the typed configuration -----------------------------------------------------------

@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Base:
    enabled: bool
    role: str  # "client" | "server"
    psk: bytes | None = field(repr=False)  # None: a hub with only per-site keys
    server_address: tuple[HostPort, ...] = ()
    listen_address: HostPort | None = None
    mode: str = "duplicate"
    nack: bool | None = None  # None: the mode's default (scheduler)
    keepalive_idle: float = 0.75
    keepalive_active: float = 0.1
    dead_after: int = 3
    hold_max_ms: int = 200
    target_loss: float = 0.001
    rekey_interval: float = 120.0
    rekey_packets: int = 1 << 26
    reorder_capacity: int = 4096
    rx_buffer: int | None = None  # KiB: each uplink socket's SO_RCVBUF (None: 4 MiB asked, rmem_max caps)
    pair_unmatched: bool = False
    hub_forward: bool = False
    direct: bool = True
    private_key: bytes | None = field(default=None, repr=False)
    direct_private_key: bytes | None = field(default=None, repr=False)
    direct_peer_key: tuple = ()  # ((site name, 32-byte public key), ...): pinned direct keys
    direct_pinned_only: bool = False
    peer_public_key: bytes | None = None
    mtu: int = 1400
    mss_clamp: bool = True
    log_level: str = "info"
    name: str | None = None  # None: <hostname>-<vNIC address>
    stun: tuple[HostPort, ...] = ()
    nat_keepalive: float = 25.0
    relay_after: float = 4.0
    relay_retry: float = 10.0
    workers: int | str = 1  # data-path processes (server); "auto": one per CPU core

    @property
    def port(self) -> int:
        """This side's port: the listen port (server) or the first server port."""
        if self.role == "server" and self.listen_address:
            return self.listen_address.port
        if self.server_address:
            return self.server_address[0].port
        return DEFAULT_PORT


@dataclass(frozen=True)
class Vnc:
    ipaddr: ipaddress.IPv4Address
    prefixlen: int
    ifname: str = "mpvpn0"
    mtu: int = 1400

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.ipaddr}/{self.prefixlen}")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.interface.network

    @property
    def netmask(self) -> ipaddress.IPv4Address:
        return self.interface.netmask


@dataclass(frozen=True)
class Uplink:
    name: str  # section name, or "@smpu[n]" for an anonymous section
    type: str  # carrier type word
    port: int
    bind_ip: IPAddress | None = None
    interface: str | None = None  # OpenWrt logical interface
    device: str | None = None  # Linux device
    enabled: bool = True
    upload_kbit: int | None = None  # configured upload speed (seeds the link's rate estimate)


@dataclass(frozen=True)
class Lan:
    subnets: tuple[IPNetwork, ...] = ()  # everything the peer should route to us
    addresses: tuple[IPInterface, ...] = ()  # the router's own LAN addresses (network.lan)
    extra: tuple[IPNetwork, ...] = ()  # the part from orayboxvpn.base.lan_subnet


@dataclass(frozen=True)
class Policy:
    """A per-host link policy (seed 004): which carriers a LAN host's traffic uses."""

    name: str
    src: IPNetwork
    dst: IPNetwork | None = None
    carriers: tuple[str, ...] | None = None
    exclusive: bool = False
    mode: str | None = None
    priority: bool = False


@dataclass(frozen=True)
class SiteKey:
    """A client site's own PSK on a hub (``config site``)."""

    name: str
    psk: bytes = field(repr=False)
    vnc_ipaddr: str | None = None  # the vNIC address it must use
    lan_subnets: tuple[str, ...] | None = None  # the LANs it may announce (inside these)
    forward: bool = True  # takes part in site-to-site forwarding (base.hub_forward)
    direct: bool = True  # may be offered direct paths to other sites (base.direct)


@dataclass(frozen=True)
class RelayConf:
    """A TURN relay (``config relay``), in the configured order."""

    name: str
    address: HostPort  # a host name is resolved by the agent when it uses the relay
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Config:
    base: Base
    vnc: Vnc
    uplinks: tuple[Uplink, ...]
    lan: Lan
    policies: tuple[Policy, ...] = ()
    sites: tuple[SiteKey, ...] = ()
    relays: tuple[RelayConf, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.base.enabled

    @property
    def enabled_uplinks(self) -> tuple[Uplink, ...]:
        return tuple(u for u in self.uplinks if u.enabled)


# --- value parsers (raise ValueError with the message for the user) -------------------

_TRUE = ("1", "yes", "on", "true", "enabled")
_FALSE = ("0", "no", "off", "false", "disabled")


def _parse_bool(s: str) -> bool:
    # the words procd's validator (libvalidate dt_type_bool) accepts
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"{_q(s)} is not a boolean: use '1' or '0'")


def _parse_choice(s: str, choices: tuple[str, ...]) -> str:
    if s in choices:
        return s
    alts = ", ".join(f"'{c}'" for c in choices[:-1]) + f" or '{choices[-1]}'"
    raise ValueError(f"{_q(s)} is not allowed: use {alts}")


_SITE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # = controlmsg.NODE_RE


def _remote_hostports(chk: "_Checker", sec: "_Sec", option: str, port: int, unusable,
                      unique: bool = False) -> list[HostPort]:
    """Each item of a list option as a host:port to send to (a name, or an
    address neither unspecified nor multicast: else ``unusable(hp)`` is the
    error); with ``unique`` an item given twice is an error too."""
    out: list[HostPort] = []
    for item in sec.multi(option):
        try:
            hp = parse_hostport(item, port, allow_name=True)
        except ValueError as e:
            chk.err(sec.path(option), str(e))
            continue
        ip = hp.ip
        if ip is not None and (ip.is_unspecified or ip.is_multicast):
            chk.err(sec.path(option), unusable(hp))
            continue
        if unique and hp in out:
            chk.err(sec.path(option), f"{hp} is given twice")
            continue
        out.append(hp)
    return out


def _parse_site_name(s: str) -> str:
    if _SITE_NAME_RE.fullmatch(s):
        return s
    raise ValueError(f"{_q(s)} is not a site name: letters, digits, '_', '-' and '.', at most 64, "
                     "starting with a letter or digit")


def _parse_float(s: str, lo: float, hi: float, unit: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"{_q(s)} is not a number") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{_q(s)} is out of range: use {lo:g} to {hi:g} {unit}".rstrip())
    return v


def _parse_int(s: str, lo: int, hi: int, unit: str = "") -> int:
    if not re.fullmatch(r"[0-9]{1,9}", s):
        raise ValueError(f"{_q(s)} is not a whole number")
    v = int(s)
    if not lo <= v <= hi:
        raise ValueError(f"{_q(s)} is out of range: use {lo} to {hi} {unit}".rstrip())
    return v


def _parse_workers(s: str) -> int | str:
    if s.strip().lower() == "auto":
        return "auto"
    if not re.fullmatch(r"[0-9]{1,3}", s.strip()) or not 1 <= int(s) <= 64:
        raise ValueError(f"{_q(s)} is neither `auto` nor a whole number of processes 1 to 64")
    return int(s)


def _parse_kbit(s: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", s) or not 8 <= int(s) <= 100_000_000:
        raise ValueError(f"{_q(s)} is not a speed in kbit/s from 8 to 100000000 (e.g. 20000 for 20 Mbit/s)")
    return int(s)


def _parse_port(s: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", s) or not 1 <= int(s) <= 65535:
        raise ValueError(f"port {_q(s)} is not a number from 1 to 65535")
    return int(s)


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _valid_hostname(h: str) -> bool:
    h = h[:-1] if h.endswith(".") else h
    if not h or len(h) > 253:
        return False
    labels = h.split(".")
    if all(label.isdigit() for label in labels):
        return False  # looks like a (bad) IPv4 address, not a name
    return all(_LABEL.fullmatch(label) for label in labels)


def parse_hostport(text: str, default_port: int = DEFAULT_PORT, allow_name: bool = True) -> HostPort:
    """``host:port``, ``[v6addr]:port``, or a host alone (``default_port``).

    Raises ValueError with a message for the user."""
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"{_q(s)}: missing ']' after the IPv6 address")
        host, rest = s[1:end], s[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_q(host)} in brackets is not an IPv6 address") from None
        if rest == "":
            return HostPort(host, default_port)
        if not rest.startswith(":"):
            raise ValueError(f"{_q(s)}: expected ':port' after ']'")
        return HostPort(host, _parse_port(rest[1:]))
    if s.count(":") > 1:
        raise ValueError(f"{_q(s)}: write an IPv6 address as [addr]:port")
    host, sep, port_s = s.partition(":")
    port = _parse_port(port_s) if sep else default_port
    if not host:
        raise ValueError(f"{_q(s)}: the host is missing")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not allow_name:
            raise ValueError(f"{_q(host)} is not an IP address") from None
        if not _valid_hostname(host):
            raise ValueError(f"{_q(host)} is neither an IP address nor a host name") from None
    return HostPort(host, port)


def _parse_ip(s: str) -> IPAddress:
    if "/" in s:
        raise ValueError(f"{_q(s)}: give a single address, without /prefix")
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        raise ValueError(f"{_q(s)} is not an IPv4 or IPv6 address") from None


def _parse_netmask4(s: str) -> int:
    """Dotted netmask or prefix length ('30', '/30') -> prefix length."""
    t = s[1:] if s.startswith("/") else s
    if re.fullmatch(r"[0-9]{1,2}", t):
        n = int(t)
        if n > 32:
            raise ValueError(f"{_q(s)} is not a prefix length (0 to 32)")
        return n
    try:
        m = int(ipaddress.IPv4Address(t))
    except ValueError:
        raise ValueError(f"{_q(s)} is not a netmask (e.g. '255.255.255.252' or '30')") from None
    inv = ~m & 0xFFFFFFFF
    if inv & (inv + 1):
        raise ValueError(f"{_q(s)} is not a netmask: its one bits must be contiguous")
    return 32 - inv.bit_length()


def _lan_subnets(chk, sec):
    """The networks of a section's ``lan_subnet`` list: an unparsable item is an error
    and left out, host bits are a warning (the network is used)."""
    for item in sec.multi("lan_subnet"):
        try:
            net, hostbits = _parse_network(item)
        except ValueError as e:
            chk.err(sec.path("lan_subnet"), str(e))
            continue
        if hostbits:
            chk.warn(sec.path("lan_subnet"), f"{_q(item)} has host bits set; using {net}")
        yield net


def _key32(chk, path: str, raw: str) -> bytes | None:
    """A base64 X25519 key, or None with the problem reported (never echoing it)."""
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        chk.err(path, "is not valid base64 (make a key pair with `mpvpn genkey`)")
        return None
    if len(key) != PSK_BYTES:
        chk.err(path, f"decodes to {len(key)} bytes; an X25519 key is exactly {PSK_BYTES}")
        return None
    return key


def _direct_pins(chk, sec, b: dict, role) -> None:
    """base.direct_private_key, direct_peer_key (``name=key`` pins) and
    direct_pinned_only (docs/security.md "pinning direct keys")."""
    raw = sec.single("direct_private_key")
    b["direct_private_key"] = None if raw is None else _key32(chk, sec.path("direct_private_key"), raw)
    pins: dict = {}
    for item in sec.multi("direct_peer_key"):
        name, sep, key = item.partition("=")
        if not sep or not _SITE_NAME_RE.fullmatch(name):
            chk.err(sec.path("direct_peer_key"), f"{_q(item[:80])} is not `site name=public key`")
            continue
        k = _key32(chk, sec.path("direct_peer_key"), key)
        if k is None:
            continue
        if name in pins and pins[name] != k:
            chk.err(sec.path("direct_peer_key"), f"two different keys pinned for {name}")
            continue
        pins[name] = k
    b["direct_peer_key"] = tuple(sorted(pins.items()))
    b["direct_pinned_only"] = sec.parsed("direct_pinned_only", _parse_bool, False)
    direct_opts = [n for n in ("direct_private_key", "direct_peer_key", "direct_pinned_only") if sec.has(n)]
    if role == "server" and direct_opts:
        chk.warn(sec.path(direct_opts[0]), "is a site (client) option; a hub ignores it")
    elif b["direct_pinned_only"] and not pins:
        chk.warn(sec.path("direct_pinned_only"), "with no `direct_peer_key`: no site goes direct")
    if role == "client" and pins and b["direct_private_key"] is None and b.get("private_key") is None:
        chk.warn(sec.path("direct_peer_key"),
                 "this site's own direct key is made at each start, so the sites that pin it "
                 "refuse it after a restart: set `direct_private_key` (`mpvpn genkey`) and give "
                 "them its public key (`mpvpn status` prints it)")


def _parse_network(s: str) -> tuple[IPNetwork, bool]:
    """A subnet; bare addresses are host routes. Returns (network, had host bits)."""
    try:
        iface = ipaddress.ip_interface(s)
    except ValueError:
        raise ValueError(f"{_q(s)} is not a subnet (e.g. '192.168.30.0/24')") from None
    return iface.network, iface.ip != iface.network.network_address


def _valid_ifname(s: str) -> bool:
    # Linux dev_valid_name()
    b = s.encode("utf-8", "surrogateescape")
    return 0 < len(b) < 16 and s not in (".", "..") and not any(c in "/:" or c.isspace() for c in s)


# --- validation ------------------------------------------------------------------------

class _Checker:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def err(self, path: str, msg: str) -> None:
        self.problems.append(Problem(ERROR, path, msg))

    def warn(self, path: str, msg: str) -> None:
        self.problems.append(Problem(WARNING, path, msg))

    @property
    def has_errors(self) -> bool:
        return any(p.is_error for p in self.problems)


class _Sec:
    """One UCI section being read: typed getters that report problems."""

    def __init__(self, chk: _Checker, pkg: uci.Package, section: uci.Section):
        self.chk = chk
        self.s = section
        self.ref = pkg.ref(section)
        self.prefix = f"{pkg.name}.{self.ref}"
        self.type = section.type

    def path(self, option: str) -> str:
        return f"{self.prefix}.{option}"

    def has(self, option: str) -> bool:
        return option in self.s.options

    def single(self, option: str) -> str | None:
        """The value of a plain ``option``; a ``list`` here is an error."""
        v = self.s.options.get(option)
        if isinstance(v, list):
            self.chk.err(self.path(option), "must be a single value: write `option`, not `list`")
            return None
        if v is not None:
            v = v.strip()
        return v

    def multi(self, option: str) -> list[str]:
        """Values of an option that may be a ``list`` or space-separated."""
        v = self.s.options.get(option)
        if v is None:
            return []
        items = [v] if isinstance(v, str) else v
        return [w for item in items for w in item.split()]

    def parsed(self, option: str, parser, default=None):
        """Parse the option with ``parser``; the default if absent or invalid."""
        raw = self.single(option)
        if raw is None:
            return default
        try:
            return parser(raw)
        except ValueError as e:
            self.chk.err(self.path(option), str(e))
            return default

    def unknown_options(self) -> None:
        known = OPTIONS.get(self.type, {})
        for name in self.s.options:
            if name in known:
                continue
            hint = difflib.get_close_matches(name, list(known), n=1)
            msg = "unknown option (ignored)"
            if hint:
                msg += f"; did you mean '{hint[0]}'?"
            self.chk.warn(self.path(name), msg)


def _one_section(chk: _Checker, pkg: uci.Package, type_: str, hint: str) -> _Sec | None:
    found = pkg.sections(type_)
    if not found:
        chk.err(f"{pkg.name}.{type_}", f"missing section: add `config {type_} '{type_}'` with {hint}")
        return None
    for extra in found[1:]:
        chk.err(f"{pkg.name}.{pkg.ref(extra)}", f"only one `config {type_}` section is allowed (this one is ignored)")
    return _Sec(chk, pkg, found[0])


def _default(option: str, conv=str, section: str = "base"):
    """The default of an option, from OPTIONS (the single source)."""
    return conv(OPTIONS[section][option].default)


def _check_base(chk: _Checker, pkg: uci.Package) -> dict | None:
    sec = _one_section(chk, pkg, "base", "role, psk and server_address (client) or listen_address (server)")
    if sec is None:
        return None
    sec.unknown_options()
    b: dict = {}
    b["enabled"] = sec.parsed("enabled", _parse_bool, True)

    role = sec.parsed("role", lambda s: _parse_choice(s, ("client", "server")))
    if role is None and not sec.has("role"):
        chk.err(sec.path("role"), "missing: set 'client' (this side connects) or 'server' (this side listens)")
    b["role"] = role

    # psk (a server's missing psk is reported once its sites are known: a hub may do without)
    b["psk"] = _parse_psk(chk, sec)
    b["psk_missing"] = not sec.has("psk") and role == "server"
    if not sec.has("psk") and role != "server":
        chk.err(sec.path("psk"), MISSING_PSK)
    b["pair_unmatched"] = sec.parsed("pair_unmatched", _parse_bool, False)
    b["hub_forward"] = sec.parsed("hub_forward", _parse_bool, False)
    b["direct"] = sec.parsed("direct", _parse_bool, True)
    if b["hub_forward"] and role == "client":
        chk.warn(sec.path("hub_forward"), "is a server option; a client ignores it")

    # optional static keys (Noise KKpsk0): both or neither; never echo the private one
    for name in ("private_key", "peer_public_key"):
        raw = sec.single(name)
        b[name] = None if raw is None else _key32(chk, sec.path(name), raw)
    if (b["private_key"] is None) != (b["peer_public_key"] is None) and not (
            sec.has("private_key") and sec.has("peer_public_key")):
        missing = "peer_public_key" if b["private_key"] is not None else "private_key"
        chk.err(sec.path(missing), "missing: static keys are used only in pairs "
                                   "(private_key here and the peer's public key), or not at all")
    _direct_pins(chk, sec, b, role)

    b["mode"] = sec.parsed("mode", lambda s: _parse_choice(s, ("duplicate", "aggregate", "adaptive")), _default("mode"))
    b["nack"] = {"auto": None, "1": True, "0": False}[
        sec.parsed("nack", lambda s: _parse_choice(s, ("auto", "1", "0")), _default("nack"))]
    b["keepalive_idle"] = sec.parsed("keepalive_idle", lambda s: _parse_float(s, 0.05, 60, "seconds"), _default("keepalive_idle", float))
    b["keepalive_active"] = sec.parsed("keepalive_active", lambda s: _parse_float(s, 0.01, 60, "seconds"), _default("keepalive_active", float))
    if b["keepalive_active"] > b["keepalive_idle"]:
        chk.warn(sec.path("keepalive_active"), "is longer than keepalive_idle: a busy subflow is then watched less closely than an idle one")
    b["dead_after"] = sec.parsed("dead_after", lambda s: _parse_int(s, 1, 100), _default("dead_after", int))
    if b["dead_after"] == 1:
        chk.warn(sec.path("dead_after"), "1: a single lost keepalive takes a subflow down")
    b["target_loss"] = sec.parsed(
        "target_loss", lambda s: _parse_float(s, 0.000001, 0.5, ""), _default("target_loss", float)
    )
    b["hold_max_ms"] = sec.parsed("hold_max_ms", lambda s: _parse_int(s, 0, 10000, "ms"), _default("hold_max_ms", int))
    b["rekey_interval"] = sec.parsed(
        "rekey_interval", lambda s: _parse_float(s, 1, 86400, "seconds"), _default("rekey_interval", float)
    )
    b["rekey_packets"] = sec.parsed(
        "rekey_packets", lambda s: _parse_int(s, 1000, 1 << 26, "packets"), _default("rekey_packets", int)
    )
    b["reorder_capacity"] = sec.parsed(
        "reorder_capacity", lambda s: _parse_int(s, 16, 65536, "packets"), _default("reorder_capacity", int)
    )
    b["rx_buffer"] = sec.parsed("rx_buffer", lambda s: _parse_int(s, 32, 16384, "KiB"), None)
    b["mtu"] = sec.parsed("mtu", lambda s: _parse_int(s, 576, 9000, "bytes"), _default("mtu", int))
    b["mss_clamp"] = sec.parsed("mss_clamp", _parse_bool, True)
    b["log_level"] = sec.parsed(
        "log_level", lambda s: _parse_choice(s, ("debug", "info", "warning", "error")), _default("log_level")
    )
    b["name"] = sec.parsed("name", _parse_site_name, None)

    # addresses
    servers = _remote_hostports(chk, sec, "server_address", DEFAULT_PORT,
                                lambda hp: f"cannot connect to {hp}: give the server's address")
    listen = None
    if sec.has("listen_address"):
        raw = sec.single("listen_address")
        if raw is not None:
            try:
                listen = parse_hostport(raw, DEFAULT_PORT, allow_name=False)
            except ValueError as e:
                chk.err(sec.path("listen_address"), str(e))
            else:
                if listen.ip is not None and listen.ip.is_multicast:
                    chk.err(sec.path("listen_address"), f"{listen} is a multicast address")
                    listen = None
    if role == "client":
        if not sec.has("server_address"):
            chk.err(sec.path("server_address"), "missing: required for role 'client': the server's host:port, e.g. '203.0.113.10:7000'")
        elif not sec.multi("server_address"):
            chk.err(sec.path("server_address"), "is empty: required for role 'client'")
        if sec.has("listen_address"):
            chk.warn(sec.path("listen_address"), "is ignored for role 'client'")
    elif role == "server":
        if not sec.has("listen_address"):
            chk.err(sec.path("listen_address"), "missing: required for role 'server': address:port to listen on, e.g. '0.0.0.0:7000'")
        if sec.has("server_address"):
            chk.warn(sec.path("server_address"), "is ignored for role 'server'")
    b["server_address"] = tuple(servers)
    b["listen_address"] = listen

    # NAT traversal (docs/nat.md)
    stun = _remote_hostports(chk, sec, "stun", STUN_PORT, lambda hp: f"{hp} is not a STUN server's address",
                             unique=True)
    if len(stun) > MAX_STUN:
        chk.warn(sec.path("stun"), f"{len(stun)} servers: only the first {MAX_STUN} are asked")
    b["stun"] = tuple(stun)
    b["nat_keepalive"] = sec.parsed(
        "nat_keepalive", lambda s: _parse_float(s, 1, 300, "seconds"), _default("nat_keepalive", float))
    b["relay_after"] = sec.parsed(
        "relay_after", lambda s: _parse_float(s, 1, 600, "seconds"), _default("relay_after", float))
    if sec.has("relay_after") and b["relay_after"] < RELAY_AFTER_PUNCH:
        chk.warn(sec.path("relay_after"), f"{b['relay_after']:g} s: hole punching often needs "
                 f"{RELAY_AFTER_PUNCH:g} s or more, so pairs it would open go through a relay")
    b["relay_retry"] = sec.parsed(
        "relay_retry", lambda s: _parse_float(s, 1, 3600, "seconds"), _default("relay_retry", float))
    b["workers"] = sec.parsed("workers", _parse_workers, 1)
    if b["workers"] != 1 and role == "client":
        chk.warn(sec.path("workers"), "is a server option; a client ignores it")
    elif b["workers"] != 1 and stun:
        chk.err(sec.path("workers"), "several data-path processes cannot use `stun` (NAT "
                                     "discovery and hole punching live in one process): set "
                                     "workers 1 or remove stun")

    # extra LAN subnets
    extra: list[IPNetwork] = []
    for net in _lan_subnets(chk, sec):
        if net.prefixlen == 0:
            chk.err(sec.path("lan_subnet"), f"{net} would send all traffic, the tunnel's own included, into the tunnel")
            continue
        if net in extra:
            chk.warn(sec.path("lan_subnet"), f"{net} is listed twice")
            continue
        extra.append(net)
    b["lan_subnet"] = extra
    b["_sec"] = sec
    return b


def _check_vnc(chk: _Checker, pkg: uci.Package, base_mtu: int) -> tuple[Vnc | None, _Sec | None]:
    sec = _one_section(chk, pkg, "vnc", "ipaddr and netmask (e.g. '172.30.0.1' and '255.255.255.252')")
    if sec is None:
        return None, None
    sec.unknown_options()
    ok = True
    addr = None
    prefix_from_addr = None
    raw = sec.single("ipaddr")
    if raw is None:
        if not sec.has("ipaddr"):
            chk.err(sec.path("ipaddr"), "missing: this side's vNIC address, e.g. '172.30.0.1' (the peer then uses '172.30.0.2')")
        ok = False
    else:
        a, _, p = raw.partition("/")
        try:
            addr = ipaddress.IPv4Address(a)
        except ValueError:
            chk.err(sec.path("ipaddr"), f"{_q(raw)} is not an IPv4 address")
            ok = False
        if addr is not None and p:
            if re.fullmatch(r"[0-9]{1,2}", p) and int(p) <= 32:
                prefix_from_addr = int(p)
            else:
                chk.err(sec.path("ipaddr"), f"{_q(raw)}: bad prefix length")
                ok = False
    prefix = None
    if sec.has("netmask"):
        prefix = sec.parsed("netmask", _parse_netmask4)
        if prefix is None:
            ok = False
        elif prefix_from_addr is not None and prefix != prefix_from_addr:
            chk.err(sec.path("netmask"), f"/{prefix} contradicts the /{prefix_from_addr} of ipaddr")
            ok = False
    if prefix is None:
        prefix = prefix_from_addr
    if prefix is None and ok:
        chk.err(sec.path("netmask"), "missing: e.g. '255.255.255.252' (a /30 holds both ends)")
        ok = False
    if ok and prefix is not None:
        if prefix > 30:
            chk.err(sec.path("netmask"), f"/{prefix} leaves no room for both ends of the tunnel: use /30 ('255.255.255.252') or larger")
            ok = False
        elif prefix < 8:
            chk.err(sec.path("netmask"), f"/{prefix} is far too large for a point-to-point link: use /8 to /30")
            ok = False
    if ok and addr is not None and prefix is not None:
        iface = ipaddress.IPv4Interface(f"{addr}/{prefix}")
        if addr == iface.network.network_address:
            chk.err(sec.path("ipaddr"), f"{addr} is the network address of {iface.network}: use a host address")
            ok = False
        elif addr == iface.network.broadcast_address:
            chk.err(sec.path("ipaddr"), f"{addr} is the broadcast address of {iface.network}: use a host address")
            ok = False
        elif addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_link_local or addr.is_reserved:
            chk.err(sec.path("ipaddr"), f"{addr} cannot be a vNIC address: use a private address such as 172.30.0.1")
            ok = False
        elif not addr.is_private:
            chk.warn(sec.path("ipaddr"), f"{addr} is a public address: a private range such as 172.30.0.0/30 avoids clashes")
    ifname = _default("ifname", section="vnc")
    raw = sec.single("ifname")
    if raw is not None:
        if _valid_ifname(raw):
            ifname = raw
        else:
            chk.err(sec.path("ifname"), f"{_q(raw)} is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)")
            ok = False
    mtu = sec.parsed("mtu", lambda s: _parse_int(s, 576, 9000, "bytes"), None)
    if mtu is None:
        mtu = base_mtu
        if sec.has("mtu"):
            ok = False
    if not ok:
        return None, sec
    return Vnc(ipaddr=addr, prefixlen=prefix, ifname=ifname, mtu=mtu), sec


def _check_uplinks(chk: _Checker, pkg: uci.Package, default_port: int) -> list[Uplink]:
    uplinks: list[Uplink] = []
    sections = [_Sec(chk, pkg, s) for s in pkg.sections("smpu")]
    wanted: list[_Sec] = []  # sections meant to be used, valid or not
    for sec in sections:
        sec.unknown_options()
        ok = True
        enabled = sec.parsed("enabled", _parse_bool, True)
        if enabled:
            wanted.append(sec)
        type_ = sec.single("type")
        if type_ is None:
            if not sec.has("type"):
                chk.err(sec.path("type"), "missing: the carrier of this uplink, e.g. 'telecom' (uplinks pair with the peer's uplink of the same type)")
            ok = False
        elif not CARRIER_RE.fullmatch(type_):
            chk.err(sec.path("type"), f"{_q(type_)} is not a carrier word (letters, digits, '_', '-', '.'; at most 32)")
            ok = False
        bind_ip = None
        if sec.has("bind_ip"):
            bind_ip = sec.parsed("bind_ip", _parse_ip)
            if bind_ip is None:
                ok = False
            elif bind_ip.is_unspecified or bind_ip.is_multicast:
                chk.err(sec.path("bind_ip"), f"{bind_ip} is not an address of this uplink")
                bind_ip, ok = None, False
            elif bind_ip.is_loopback:
                chk.warn(sec.path("bind_ip"), f"{bind_ip} is a loopback address")
        interface = None
        raw = sec.single("interface")
        if raw is not None:
            if uci.validate_name(raw):
                interface = raw
            else:
                chk.err(sec.path("interface"), f"{_q(raw)} is not an OpenWrt interface name (letters, digits, '_')")
                ok = False
        device = None
        raw = sec.single("device")
        if raw is not None:
            if _valid_ifname(raw):
                device = raw
            else:
                chk.err(sec.path("device"), f"{_q(raw)} is not a valid device name")
                ok = False
        if not sec.has("bind_ip") and not sec.has("interface"):
            chk.err(
                sec.path("bind_ip"),
                "missing: set bind_ip (this uplink's own address) or interface (its OpenWrt network, e.g. 'wan')",
            )
            ok = False
        port = sec.parsed("port", _parse_port, None)
        if port is None:
            if sec.has("port"):
                ok = False
            port = default_port
        upload = None
        if sec.has("upload"):
            upload = sec.parsed("upload", _parse_kbit, None)
            if upload is None:
                ok = False
        if ok:
            uplinks.append(Uplink(sec.ref, type_, port, bind_ip, interface, device, enabled, upload))

    active = [u for u in uplinks if u.enabled]
    by_path = {u.name: f"{pkg.name}.{u.name}" for u in uplinks}
    seen_type: dict[str, Uplink] = {}
    seen_ip: dict[tuple, Uplink] = {}
    seen_if: dict[tuple, Uplink] = {}
    for u in active:
        if u.type in seen_type:
            chk.warn(
                f"{by_path[u.name]}.type",
                f"carrier type '{u.type}' is also used by {by_path[seen_type[u.type].name]}: "
                "uplinks of one type are paired with the peer's uplinks of that type in order",
            )
        else:
            seen_type[u.type] = u
        if u.bind_ip is not None:
            key = (u.bind_ip, u.port)
            if key in seen_ip:
                chk.err(f"{by_path[u.name]}.bind_ip", f"{u.bind_ip} port {u.port} is already used by {by_path[seen_ip[key].name]}")
            seen_ip[key] = u
        if u.interface is not None and u.bind_ip is None:
            key = (u.interface, u.port)
            if key in seen_if:
                chk.err(f"{by_path[u.name]}.interface", f"interface '{u.interface}' is already used by {by_path[seen_if[key].name]}")
            seen_if[key] = u
    if not sections:
        chk.err(
            f"{pkg.name}.@smpu",
            "no uplink: add one `config smpu` section per carrier, with type and bind_ip or interface",
        )
    elif not wanted:
        chk.err(f"{pkg.name}.@smpu", "no enabled uplink: set enabled '1' on at least one smpu section")
    elif len(wanted) == 1:
        chk.warn(wanted[0].prefix, "only one enabled uplink: there is no second carrier to carry copies or to fall back on")
    return uplinks


def _check_lan(chk: _Checker, network: uci.Package | None, missing: str | None) -> tuple[list, list]:
    """(subnets, addresses) of the LAN in the network package."""
    if network is None:
        if missing:
            chk.warn("network", missing)
        return [], []
    lan = network.section("lan")
    if lan is None or lan.type != "interface":
        chk.warn("network.lan", "no `config interface 'lan'`: the peer only gets routes for orayboxvpn.base.lan_subnet")
        return [], []
    sec = _Sec(chk, network, lan)
    subnets: list[IPNetwork] = []
    addresses: list[IPInterface] = []
    mask = None
    if sec.has("netmask"):
        mask = sec.parsed("netmask", _parse_netmask4)
        if mask is None:
            return [], []
    values = sec.multi("ipaddr")
    if not values:
        proto = sec.single("proto") or "none"
        chk.warn(
            sec.path("ipaddr"),
            f"not set (proto {_q(proto)}): no LAN subnet from the network config; "
            "list it in orayboxvpn.base.lan_subnet if the peer should route to it",
        )
    need_mask = False
    for v in values:
        a, slash, p = v.partition("/")
        try:
            ip = ipaddress.IPv4Address(a)
        except ValueError:
            chk.err(sec.path("ipaddr"), f"{_q(v)} is not an IPv4 address")
            continue
        if slash:
            try:
                prefix = _parse_netmask4(p)
            except ValueError as e:
                chk.err(sec.path("ipaddr"), str(e))
                continue
        elif mask is not None:
            prefix = mask
        else:
            prefix = 32
            need_mask = True
        iface = ipaddress.IPv4Interface(f"{ip}/{prefix}")
        addresses.append(iface)
        if iface.network not in subnets:
            subnets.append(iface.network)
    if need_mask:
        chk.warn(sec.path("netmask"), "missing: the LAN address without a /prefix is taken as a single host (/32)")
    for v in sec.multi("ip6addr"):
        try:
            iface6 = ipaddress.IPv6Interface(v)
        except ValueError:
            chk.err(sec.path("ip6addr"), f"{_q(v)} is not an IPv6 address or prefix")
            continue
        addresses.append(iface6)
        if iface6.network not in subnets:
            subnets.append(iface6.network)
    return subnets, addresses


def _parse_net(s: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(s, strict=False)
    except ValueError:
        raise ValueError(f"{_q(s)} is not an address or subnet") from None


def _parse_psk(chk: _Checker, sec) -> bytes | None:
    """``option psk`` of a section: 32 bytes, or None (reported). Never echoes the value."""
    raw = sec.single("psk")
    if raw is None:
        return None
    try:
        psk = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        chk.err(sec.path("psk"), "is not valid base64 (make one with `mpvpn genpsk`)")
        return None
    if len(psk) != PSK_BYTES:
        chk.err(sec.path("psk"), f"decodes to {len(psk)} bytes; it must be exactly {PSK_BYTES}")
        return None
    if psk == bytes(PSK_BYTES):
        chk.err(sec.path("psk"), "is all zero bytes: use a random key")
        return None
    return psk


MAX_SITES = 256
MISSING_PSK = ("missing: the shared secret, 32 random bytes in base64, the same on both sides "
               "(make one with `mpvpn genpsk`)")


def _check_sites(chk: _Checker, pkg: uci.Package, b: dict | None,
                 vnc: Vnc | None = None) -> list[SiteKey]:
    """``config site`` sections (a hub's per-site keys), and whether base.psk may be missing."""
    out: list[SiteKey] = []
    secs = [_Sec(chk, pkg, s) for s in pkg.sections("site")]
    role = b["role"] if b else None
    seen: dict[bytes, str] = {}
    for sec in secs:
        sec.unknown_options()
        if role == "client":
            chk.warn(sec.path("psk"), "`config site` is for a server with several client sites; "
                                      "a client uses base.psk (ignored)")
            continue
        psk = _parse_psk(chk, sec)
        if psk is None and not sec.has("psk"):
            chk.err(sec.path("psk"), "missing: this site's key (its base.psk), 32 random bytes in base64")
        if not sec.parsed("enabled", _parse_bool, True) or psk is None:
            continue
        other = seen.get(psk) or ("base" if b and b.get("psk") == psk else None)
        if other:
            chk.err(sec.path("psk"), f"the same key as {pkg.name}.{other}: each site needs its own")
            continue
        seen[psk] = sec.ref
        vip = sec.single("vnc_ipaddr")
        if vip is not None:
            try:
                ip = _parse_ip(vip)
                vip = str(ip)
                if vnc is not None and (ip not in vnc.interface.network or ip == vnc.ipaddr):
                    raise ValueError(f"{vip} is not a peer address of the vNIC subnet "
                                     f"{vnc.interface.network} (ours is {vnc.ipaddr})")
            except ValueError as e:
                chk.err(sec.path("vnc_ipaddr"), str(e))
                vip = None
        lans = None
        if sec.has("lan_subnet"):
            lans = [str(net) for net in _lan_subnets(chk, sec)]
            lans = tuple(lans)
        out.append(SiteKey(sec.ref, psk, vip, lans, sec.parsed("forward", _parse_bool, True),
                           sec.parsed("direct", _parse_bool, True)))
    if len(out) > MAX_SITES:
        chk.err(f"{pkg.name}.@site", f"{len(out)} sites: at most {MAX_SITES}")
    if out and b and b.get("private_key"):
        chk.err(b["_sec"].path("private_key"), "per-site keys (`config site`) work with PSKs only: "
                                               "remove private_key/peer_public_key or the site sections")
    if b and b.get("psk_missing") and not out:
        chk.err(b["_sec"].path("psk"),
                MISSING_PSK + "; or give each client site its own key in `config site` sections")
    return out


def _check_policies(chk: _Checker, pkg: uci.Package, uplinks: list[Uplink]) -> list[Policy]:
    types = {u.type for u in uplinks if u.enabled}
    out: list[Policy] = []
    for sec in (_Sec(chk, pkg, s) for s in pkg.sections("policy")):
        sec.unknown_options()
        if not sec.parsed("enabled", _parse_bool, True):
            continue
        src = sec.parsed("src", _parse_net)
        if src is None and not sec.has("src"):
            chk.err(sec.path("src"), "missing: the LAN host or subnet this policy applies to")
        dst = sec.parsed("dst", _parse_net)
        carriers = sec.multi("carrier")
        for c in carriers:
            if not CARRIER_RE.fullmatch(c):
                chk.err(sec.path("carrier"), f"{_q(c)} is not a carrier word")
            elif types and c not in types:
                chk.warn(sec.path("carrier"), f"no enabled uplink has type {_q(c)}; "
                                              f"known: {', '.join(sorted(types))}")
        exclusive = sec.parsed("exclusive", _parse_bool, False)
        if exclusive and not carriers:
            chk.err(sec.path("exclusive"), "needs `list carrier`: which carriers to reserve")
        mode = sec.parsed("mode", lambda v: _parse_choice(v, ("duplicate", "aggregate", "adaptive")))
        priority = sec.parsed("priority", _parse_bool, False)
        if src is not None:
            out.append(Policy(sec.ref, src, dst, tuple(carriers) or None, exclusive, mode, priority))
    return out


def _parse_credential(s: str) -> str:
    """A TURN user name or password: printable ASCII (we do not implement
    SASLprep/OpaqueString, RFC 8489 9.2.2), at most CREDENTIAL_MAX."""
    if not s:
        raise ValueError("is empty")
    if len(s) > CREDENTIAL_MAX:
        raise ValueError(f"is {len(s)} characters long: at most {CREDENTIAL_MAX}")
    if not all(" " <= ch <= "~" for ch in s):
        raise ValueError("may only hold printable ASCII characters (no tabs, no accents)")
    return s


def _check_relays(chk: _Checker, pkg: uci.Package) -> list[RelayConf]:
    """``config relay`` sections (TURN relays, in order)."""
    out: list[RelayConf] = []
    seen: dict[HostPort, str] = {}
    for sec in (_Sec(chk, pkg, s) for s in pkg.sections("relay")):
        sec.unknown_options()
        enabled = sec.parsed("enabled", _parse_bool, True)
        address = sec.parsed("address", lambda v: parse_hostport(v, TURN_PORT))
        if address is None and not sec.has("address"):
            chk.err(sec.path("address"), "missing: the relay's host:port, e.g. '203.0.113.7:3478'")
        creds = {}
        for opt in ("username", "password"):
            raw = sec.single(opt)
            if raw is None:
                if not sec.has(opt):
                    chk.err(sec.path(opt), f"missing: the relay's {opt} (TURN long-term credential)")
                continue
            try:
                creds[opt] = _parse_credential(raw)
            except ValueError as e:  # never echo the value: it may be the password
                chk.err(sec.path(opt), str(e))
        if address is not None and address.ip is not None and (
                address.ip.is_unspecified or address.ip.is_multicast):
            chk.err(sec.path("address"), f"{address} is not a relay's address")
            address = None
        if not enabled or address is None or len(creds) != 2:
            continue
        if address in seen:
            chk.err(sec.path("address"), f"{address} is already the relay of {pkg.name}.{seen[address]}")
            continue
        seen[address] = sec.ref
        out.append(RelayConf(sec.ref, address, creds["username"], creds["password"]))
    if len(out) > MAX_RELAYS:
        chk.err(f"{pkg.name}.@relay", f"{len(out)} relays: at most {MAX_RELAYS}")
    return out


def validate(
    orayboxvpn: uci.Package,
    network: uci.Package | None = None,
    network_missing: str | None = None,
) -> tuple[Config | None, list[Problem]]:
    """Check parsed packages. ``network_missing`` explains an absent network
    package (a warning). Returns the Config only when there is no error."""
    chk = _Checker()
    pkg = orayboxvpn
    for s in pkg:
        if s.type not in OPTIONS:
            hint = difflib.get_close_matches(s.type, list(OPTIONS), n=1)
            chk.warn(
                f"{pkg.name}.{pkg.ref(s)}",
                f"unknown section type '{s.type}' (ignored)" + (f"; did you mean '{hint[0]}'?" if hint else ""),
            )
    b = _check_base(chk, pkg)
    base_mtu = b["mtu"] if b else _default("mtu", int)
    vnc, vnc_sec = _check_vnc(chk, pkg, base_mtu)
    default_port = DEFAULT_PORT
    if b:
        if b["role"] == "server" and b["listen_address"]:
            default_port = b["listen_address"].port
        elif b["role"] == "client" and b["server_address"]:
            default_port = b["server_address"][0].port
    uplinks = _check_uplinks(chk, pkg, default_port)
    policies = _check_policies(chk, pkg, uplinks)
    sites = _check_sites(chk, pkg, b, vnc)
    relays = _check_relays(chk, pkg)
    if b and not relays:
        for opt in ("relay_after", "relay_retry"):
            if b["_sec"].has(opt):
                chk.warn(b["_sec"].path(opt), "has no effect without a `config relay` section")
    lan_subnets, lan_addresses = _check_lan(chk, network, network_missing)
    if relays and b and b.get("workers", 1) != 1 and b["role"] == "server":
        chk.err("orayboxvpn.base.workers", "several data-path processes cannot use `config relay` "
                                           "(a relayed subflow lives in one process): set workers 1")

    # cross-checks
    extra = b["lan_subnet"] if b else []
    if vnc is not None and b and b.get("hub_forward") and b["role"] == "server" \
            and vnc.network.num_addresses - 2 < 3:
        chk.warn("orayboxvpn.base.hub_forward", f"the vNIC subnet {vnc.network} has room for one "
                 "client site only: forwarding between sites needs a larger one (e.g. netmask "
                 "255.255.255.0 on every site)")
    if vnc is not None:
        vnet = vnc.network
        for net in lan_subnets:
            if net.overlaps(vnet):
                chk.err("network.lan.ipaddr", f"the LAN {net} overlaps the vNIC subnet {vnet} (orayboxvpn.vnc): pick another vNIC subnet")
        for net in extra:
            if net.overlaps(vnet):
                chk.err(f"{b['_sec'].path('lan_subnet')}", f"{net} overlaps the vNIC subnet {vnet} (orayboxvpn.vnc)")
        for u in uplinks:
            if u.bind_ip is not None and u.bind_ip in vnet:
                chk.err(f"{pkg.name}.{u.name}.bind_ip", f"{u.bind_ip} is inside the vNIC subnet {vnet}: the tunnel would carry itself")
        if b:
            for hp in b["server_address"]:
                if hp.ip is not None and hp.ip in vnet:
                    chk.err(b["_sec"].path("server_address"), f"{hp} is inside the vNIC subnet {vnet}: the control connection would run through the tunnel it sets up")
    all_lan = list(lan_subnets)
    for net in extra:
        if net in all_lan:
            chk.warn(b["_sec"].path("lan_subnet"), f"{net} is already the LAN subnet of network.lan")
        else:
            all_lan.append(net)
    for u in uplinks:
        if u.bind_ip is not None and any(u.bind_ip in n for n in all_lan if n.version == u.bind_ip.version):
            chk.warn(f"{pkg.name}.{u.name}.bind_ip", f"{u.bind_ip} is inside a LAN subnet: the peer will route that subnet into the tunnel")
    if b and vnc is not None:
        v6 = any(u.bind_ip is not None and u.bind_ip.version == 6 for u in uplinks)
        overhead = OVERHEAD_IPV6 if v6 else OVERHEAD_IPV4
        where = vnc_sec.path("mtu") if vnc_sec.has("mtu") else b["_sec"].path("mtu")
        if vnc.mtu > 1500 - overhead:
            chk.warn(where, f"{vnc.mtu}: encapsulated packets exceed a 1500-byte path and get fragmented (overhead {overhead} bytes); 1400 is safe")
        if vnc.mtu < 1280:
            chk.warn(where, f"{vnc.mtu} is below 1280: IPv6 inside the tunnel needs at least 1280")

    if b and not b["enabled"]:
        sec = b["_sec"]
        start = f"`uci set {pkg.name}.{sec.ref}.enabled=1; uci commit {pkg.name}; /etc/init.d/{pkg.name} restart`"
        if chk.has_errors:
            msg = f"the service is disabled (enabled '0'): fill in what is reported below, then start it with {start}"
        else:
            msg = f"the service is disabled (enabled '0'): the configuration is complete; start it with {start}"
        chk.problems.insert(0, Problem(WARNING, sec.path("enabled"), msg))
    if chk.has_errors or b is None or vnc is None:
        return None, chk.problems
    base = Base(
        enabled=b["enabled"],
        role=b["role"],
        psk=b["psk"],
        server_address=b["server_address"],
        listen_address=b["listen_address"] if b["role"] == "server" else None,
        mode=b["mode"],
        nack=b["nack"],
        keepalive_idle=b["keepalive_idle"],
        keepalive_active=b["keepalive_active"],
        dead_after=b["dead_after"],
        hold_max_ms=b["hold_max_ms"],
        target_loss=b["target_loss"],
        rekey_interval=b["rekey_interval"],
        rekey_packets=b["rekey_packets"],
        pair_unmatched=b["pair_unmatched"],
        hub_forward=b["hub_forward"] and b["role"] == "server",
        direct=b["direct"],
        private_key=b["private_key"],
        direct_private_key=b["direct_private_key"],
        direct_peer_key=b["direct_peer_key"],
        direct_pinned_only=b["direct_pinned_only"],
        peer_public_key=b["peer_public_key"],
        reorder_capacity=b["reorder_capacity"],
        rx_buffer=b["rx_buffer"],
        mtu=b["mtu"],
        mss_clamp=b["mss_clamp"],
        log_level=b["log_level"],
        name=b["name"],
        stun=b["stun"],
        nat_keepalive=b["nat_keepalive"],
        relay_after=b["relay_after"],
        relay_retry=b["relay_retry"],
        workers=b["workers"] if b["role"] == "server" else 1,
    )
    lan = Lan(subnets=tuple(all_lan), addresses=tuple(lan_addresses), extra=tuple(extra))
    return Config(base=base, vnc=vnc, uplinks=tuple(uplinks), lan=lan,
                  policies=tuple(policies), sites=tuple(sites), relays=tuple(relays)), chk.problems


def load_config(uci_dir: str = "/etc/config") -> tuple[Config | None, list[Problem]]:
    """Read ``<uci_dir>/orayboxvpn`` and ``<uci_dir>/network`` and validate.

    Never raises for missing or bad files: they are problems too."""
    problems: list[Problem] = []
    if not os.path.isdir(uci_dir):
        what = "is not a directory" if os.path.exists(uci_dir) else "does not exist"
        return None, [Problem(ERROR, PACKAGE, f"config directory {uci_dir} {what} (use --uci-dir DIR)")]
    path = os.path.join(uci_dir, PACKAGE)
    try:
        pkg = uci.load(path, PACKAGE)
    except FileNotFoundError:
        return None, [
            Problem(
                ERROR, PACKAGE,
                f"{path} not found: install the orayboxvpn package (it ships a default) "
                "or create the file; see docs/config.md",
            )
        ]
    except uci.UciParseError as e:
        return None, [Problem(ERROR, PACKAGE, f"{path}: {e.reason} at line {e.line}, byte {e.byte} (uci: Parse error)")]
    except OSError as e:
        return None, [Problem(ERROR, PACKAGE, f"cannot read {path}: {e.strerror or e}")]

    network = None
    missing = None
    npath = os.path.join(uci_dir, "network")
    try:
        network = uci.load(npath, "network")
    except FileNotFoundError:
        missing = (
            f"{npath} not found: no LAN subnet from network.lan; the peer only gets routes "
            "for orayboxvpn.base.lan_subnet"
        )
    except uci.UciParseError as e:
        problems.append(Problem(ERROR, "network", f"{npath}: {e.reason} at line {e.line}, byte {e.byte} (uci: Parse error)"))
    except OSError as e:
        problems.append(Problem(ERROR, "network", f"cannot read {npath}: {e.strerror or e}"))

    config, more = validate(pkg, network, missing)
    problems.extend(more)
    if any(p.is_error for p in problems):
        config = None
    return config, problems
