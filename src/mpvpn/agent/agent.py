"""The agent: configuration -> control connection -> tun vNIC, routes and
carrier-bound subflows -> the data path.

One thread, one ``selectors`` loop.  The protocol logic lives in the
sans-I/O core (:mod:`mpvpn.core.controlconn`, :mod:`mpvpn.core.smpu`); this module keeps
the lifecycle, the event loop and the wiring between them and the kernel
objects (tun, UDP, TCP, netlink: :mod:`mpvpn.io.hostio`).  The per-packet
path is :mod:`mpvpn.agent.send` (tun -> session -> UDP) and :mod:`mpvpn.agent.receive`
(UDP -> session -> tun): plain loops over non-blocking reads in batches,
with no asyncio.  The status document is built by :mod:`mpvpn.agent.statusdoc`.

What the agent adds to the system (the tun device, its address, routes to
the peer's LAN subnets) is removed when it stops.  One agent runs per run
directory and vNIC name (:mod:`mpvpn.io.instance`): a second one refuses to
start and touches nothing.  A vNIC deleted under the agent is made again.  Routes stay in place
while the peer is unreachable (the tunnel fails closed: traffic for the
peer's LAN never leaks out of the default route).
"""

from __future__ import annotations

import concurrent.futures
import errno
import ipaddress
import logging
import math
import os
import queue
import selectors
import signal
import socket
import time
from pathlib import Path
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace

from mpvpn import __version__
from mpvpn.agent import config as cfgmod
from mpvpn.agent import latency, memtrace, receive, send, statusdoc, uplinknat, uplinkrelay
from mpvpn.agent.directpeers import AgentPort, DirectPaths
from mpvpn.agent.statusdoc import SESSION_COUNTERS  # noqa: F401  (where tests and tools look)
from mpvpn.core import (aqm, candidates, controlconn, controlevents, controlmsg, fastpath,
                        hubforward, linktest, mss, pairing, seal)
from mpvpn.core.admission import HandshakeGuard, HandshakeStamps
from mpvpn.core.hubforward import HubForward
from mpvpn.core.peercheck import usable_via
from mpvpn.core.reconnect import ClientReconnect
from mpvpn.core.registry import ServerSessions
from mpvpn.core.scheduler import LinkPolicy, make_scheduler
from mpvpn.core.seal import Sealer
from mpvpn.core.smpu import (Session, SessionConfig, SessionDown, SessionUp, SubflowClosed,
                             SubflowDown, SubflowUp)
from mpvpn.core.subflow import State, SubflowConfig
from mpvpn.io import ifaddr, instance, rpc, stampstore
from mpvpn.io import ubus as ubusmod
from mpvpn.io.hostio import HostIO
from mpvpn.io.resolve import Resolver
from mpvpn.io.udp import BatchSocket, UplinkUnavailable, sockaddr

log = logging.getLogger("mpvpn")

UPLINK_RETRY = 5.0  # seconds between attempts to bind an absent uplink address
MAX_TIMEOUT = 1.0
INITIAL_LINK_RATE = 1_250_000.0  # bytes/s (10 Mbit/s) assumed per subflow before measuring
# a reconnected client keeps routing the other sites of its hub this long
# while it waits for the hub's first announcement (``via``) on the new session
VIA_GRACE = 10.0
# a hub announces site changes at most this often (a site flapping its LANs
# every few milliseconds costs the others one UPDATE per interval)
HUB_ANNOUNCE_INTERVAL = 1.0


def _env_int(name: str, default: int) -> int:
    """A positive integer from the environment (a bench knob), else ``default``."""
    v = os.environ.get(name, "")
    return int(v) if v.isdigit() and int(v) > 0 else default


def _hostname_word(text: str) -> str:
    word = "".join(c if c.isalnum() or c in "_.-" else "-" for c in text)[:40].strip("-.")
    return word if word and word[0].isalnum() else "site"


class DataPathHandler:
    """A selector callback of the data path (the tun, an uplink's socket, a
    data-path worker's channel).  After these alone the loop skips the
    timers' full round unless one is due or the callback returns true (it
    did more than move packets): they only touch sessions, whose deadlines
    it asks again (see :meth:`Agent.step`); anything else (control, ubus,
    rpc) gets the full round."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, mask):
        return self.fn(mask)


@dataclass(eq=False)
class UplinkIO:
    """A local uplink and its UDP socket (absent while its address is missing)."""

    cfg: cfgmod.Uplink
    sock: socket.socket | None = None
    batch: BatchSocket | None = None
    state: str = "waiting"  # up | waiting | error
    error: str | None = None
    retry_at: float = 0.0
    tx_errors: int = 0
    rx_datagrams: int = 0
    resolved: str | None = None  # address of an uplink given by OpenWrt interface
    device: str | None = None  # Linux device for SO_BINDTODEVICE, where known
    nat: uplinknat.UplinkNat | None = None  # STUN on this socket (base.stun set)
    relay: uplinkrelay.UplinkRelay | None = None  # TURN relays on this socket (config relay)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def addr(self) -> str | None:
        return str(self.cfg.bind_ip) if self.cfg.bind_ip is not None else self.resolved

    def resolve(self, lookup=ifaddr.lookup) -> str | None:
        """Refresh ``resolved``/``device`` from the OpenWrt interface; None or a reason."""
        self.device = self.cfg.device
        if not self.cfg.interface:
            return None if self.addr else "no bind_ip, interface or device address"
        res = lookup(self.cfg.interface)
        self.device = self.cfg.device or res.device
        if self.cfg.bind_ip is None:
            self.resolved = res.address
        return None if self.addr else res.error

    @property
    def wire_name(self) -> str:
        """The name announced to the peer (``@smpu[0]`` -> ``smpu_0``)."""
        return self.cfg.name.lstrip("@").replace("[", "_").replace("]", "")


@dataclass(eq=False)
class DataSession:
    """One SMPU session with a peer site, its plan and its routes."""

    sess: Session
    peer: controlmsg.PeerInfo
    plan: dict = field(default_factory=dict)  # member -> pairing.SubflowSpec
    uplink_of: dict = field(default_factory=dict)  # member -> UplinkIO carrying it
    routes: list = field(default_factory=list)  # CIDR strings routed into the tun
    conn: object = None  # control connection (ClientConnection / ServerConnection)
    started: float = 0.0
    via: tuple = ()  # client: the other sites the hub forwards to that we route (ViaSite)
    via_refused: list = field(default_factory=list)  # client: [(site, why)] the hub's we left out
    via_until: float | None = None  # client: ``via`` carried over from the session this replaced
    punch: dict = field(default_factory=dict)  # member -> candidates.Punch (NAT traversal)
    down_since: dict = field(default_factory=dict)  # member -> when it was last seen unestablished
    upgrade_at: dict = field(default_factory=dict)  # relayed member -> next direct probe
    upgrade_targets: dict = field(default_factory=dict)  # relayed member -> direct targets probed
    upgrade: set = field(default_factory=set)  # members whose next flush also goes direct (send.flush)
    keepalives_seen: dict = field(default_factory=dict)  # member -> probes_sent (uplinknat.punch_timers)
    stuck_since: dict = field(default_factory=dict)  # member -> unestablished since (uplinknat.punch_when_stuck)
    punch_anyway: dict = field(default_factory=dict)  # member that did not open directly -> its ups then
    stuck_due: float | None = None  # when punch_when_stuck wants to look again
    direct: bool = False  # a direct session with another site of our hub (agent.directpeers)
    worker: int = 0  # the process holding it (base.workers: mpvpn.agent.workers; 0 = the main one)

    @property
    def session_id(self) -> int:
        return self.sess.session_id

    @property
    def site(self) -> str | None:
        """(server) The `config site` whose key the client proved: its
        connection's (a worker's ConnInfo carries it too); None for
        `base.psk` or a session without a control connection (direct)."""
        return None if self.conn is None else self.conn.site


@dataclass(eq=False)
class ControlIO:
    """A control TCP connection: socket, sans-I/O machine, pending output."""

    sock: socket.socket
    conn: object = None
    out: bytearray = field(default_factory=bytearray)
    connecting: bool = False
    addr: tuple = ()
    closing: bool = False


class Agent:
    """Runs one site's side of orayboxvpn until stopped."""

    def __init__(self, cfg: cfgmod.Config, *, uci_dir: str = "/etc/config",
                 run_dir: str = "/var/run/orayboxvpn", clock=time.monotonic,
                 tun_factory=None, net_factory=None, name: str | None = None,
                 ubus_socket: str | None = None, lock_dir: str | None = None, io=None):
        self.cfg = cfg
        self.ubus_socket = ubus_socket  # None: ubusd's usual sockets, if there
        # one agent per run directory and vNIC name (mpvpn.io.instance); taken by run()
        self.lock_dir = lock_dir or os.environ.get("MPVPN_LOCK_DIR") or instance.LOCK_DIR
        self.instance_lock: instance.InstanceLock | None = None
        self.uci_dir = uci_dir
        self.run_dir = run_dir
        self.clock = clock
        # the kernel objects (mpvpn.io.hostio.HostIO; tests: an in-memory one)
        self.io = io if io is not None else HostIO(tun_factory, net_factory)
        self.name = name or cfg.base.name or _hostname_word(f"{socket.gethostname()}-{cfg.vnc.ipaddr}")
        self.lans = self._lan_subnets()
        self.role = cfg.base.role
        self.sel = selectors.DefaultSelector()
        self.tun = None
        self.net = None
        self.rpc: rpc.RpcServer | None = None
        self.ubus: ubusmod.UbusTransport | None = None
        self._posted: queue.SimpleQueue = queue.SimpleQueue()  # calls from other threads
        self.resolver = Resolver(self.post)  # STUN and relay names looked up off the loop (io/resolve.py)
        self.uplinks: dict[str, UplinkIO] = {}
        self.sessions: dict[int, DataSession] = {}
        self.controls: list[ControlIO] = []
        self.listener: socket.socket | None = None
        self.registry: ServerSessions | None = None
        self.index = 0  # which data-path process this is (mpvpn.agent.workers; 0: the main one)
        self.workers = None  # server with base.workers > 1: the other processes (WorkerPool)
        self._stamps_saved = 0  # HandshakeGuard.changes when its records were last saved
        self.reconnect: ClientReconnect | None = None
        self.stamps = HandshakeStamps()  # freshness of our first handshake messages
        self._routes: dict[str, int] = {}  # CIDR -> reference count
        self.route_table = send.RouteTable()  # destination -> DataSession
        # server: site-to-site through the hub (base.hub_forward; its refusals also when off)
        self.hub = HubForward(cfg.base.hub_forward) if self.role == "server" else None
        # bench/hub.py's comparison: forwarded packets take the trip through our
        # kernel (tun -> routing -> tun) instead of going to the session directly
        self._hub_via_kernel = os.environ.get("MPVPN_HUB_PATH") == "kernel"
        self._hub_out: dict = {}  # DataSession -> packets from other sites, sent after the read
        self._reading = False  # inside receive.read_uplink
        self._hub_dirty = False  # the sites changed: tell each what it reaches through us
        self._hub_syncing = False
        self._hub_next_at = -math.inf  # no announcement round before this
        self._link_test: tuple | None = None  # (session id, last status document)
        self._stop = False
        self._reload = False
        self._wake_r = self._wake_w = None
        self.started = clock()
        self.state = "connecting"
        self.state_since = self.started
        self.last_error: str | None = None
        self.control_counters: dict[str, int] = {}  # rejected/closed control connections by reason
        self._reject_logged_at, self._rejects_quiet = -math.inf, 0  # log limiter for junk
        self.counters = {"unknown_session": 0, "malformed": 0, "wrong_uplink": 0,
                         "tun_write_errors": 0, "tun_no_route": 0, "send_errors": 0,
                         "control_connects": 0, "control_failures": 0, "mss_clamped": 0,
                         "vnic_recreated": 0, "hub_forwarded": 0, "hub_refused": 0,
                         "hub_spoofed": 0, "via_truncated": 0, "via_refused": 0, "tun_aqm_drops": 0,
                         "rx_aqm_drops": 0}
        self._mss = self._mss_limits(cfg)
        # per-stage latency histograms (mpvpn.agent.latency), None unless MPVPN_LATENCY_TRACE=1
        self.trace = latency.LatencyTrace.from_env(clock)
        self._woke: float | None = None  # (trace) when select() last returned
        self._due: float | None = None  # earliest timer deadline (inf: none); None: ask again
        self._touched: set = set()  # sessions the data path touched this turn
        # direct paths between sites (base.direct): the broker on a hub, the peers on a site
        self.direct = DirectPaths(
            AgentPort(sessions=lambda: self.sessions, controls=lambda: self.controls,
                      session_of=self._session_of, new_session=self._new_direct_session,
                      replan=self._replan_direct,
                      drop_session=self._drop_session, routes_changed=self._rebuild_route_table,
                      flush_control=self._control_flush,
                      talking=self._talking_pairs,
                      may_go_direct=self._may_go_direct),
            self.role, self.name, cfg.base.direct, cfg.base.direct_private_key or cfg.base.private_key,
            seal.preferred_ciphers(), cfg.base.hub_forward, cfg.base.rekey_interval,
            dict(cfg.base.direct_peer_key), cfg.base.direct_pinned_only)
        self._wrote_tun = False  # packets went into the tun since the uplink read began
        self._tun_backlog = False  # the last tun turn stopped at its budget: more was waiting
        # CoDel over the tun's ring and over the uplinks' socket buffers (mpvpn.core.aqm):
        # experiments, off unless MPVPN_TUN_AQM=1 / MPVPN_RX_AQM=1 (measured: the first
        # shortens the queue under load but gave back throughput on a CPU-bound agent, the
        # second gained nothing and its stamps cost CPU; docs/performance.md "Latency")
        self.tun_aqm = aqm.StandingQueue() if os.environ.get("MPVPN_TUN_AQM", "0") == "1" else None
        self.rx_aqm = aqm.StandingQueue() if os.environ.get("MPVPN_RX_AQM", "0") == "1" else None
        self._rx_drop = False  # rx_aqm asked for a drop: the next bulk packet delivered
        # each uplink socket's receive buffer in bytes (None: the kernel's cap on 4 MiB)
        self._rcvbuf = None if cfg.base.rx_buffer is None else cfg.base.rx_buffer << 10
        self._tun_budget = _env_int("MPVPN_TUN_BATCH", send.BATCH)  # (experiment knobs)
        self._rx_budget = _env_int("MPVPN_RX_BATCH", receive.BATCH)

    @staticmethod
    def _mss_limits(cfg: cfgmod.Config) -> tuple[int, int] | None:
        """(IPv4, IPv6) MSS for SYNs entering the tunnel, or None (base.mss_clamp off)."""
        return mss.mss_for_mtu(cfg.vnc.mtu) if cfg.base.mss_clamp else None

    # ------------------------------------------------------------------ set-up

    def _lan_subnets(self) -> list[str]:
        """What the peer routes to us: network.interface.lan from netifd where
        ubus is there (the live truth on a router), else UCI network.lan; plus
        base.lan_subnet."""
        live = ifaddr.subnets("lan")
        if live is None:
            return [str(n) for n in self.cfg.lan.subnets]
        out = [n for n in live if not ipaddress.ip_network(n).overlaps(self.cfg.vnc.network)]
        for n in self.cfg.lan.extra:
            if str(n) not in out:
                out.append(str(n))
        return out

    def _policies(self) -> list:
        """config policy sections (seed 004) as the scheduler's LinkPolicy."""
        return [LinkPolicy(src=str(p.src), dst=None if p.dst is None else str(p.dst),
                           carriers=p.carriers, exclusive=p.exclusive, mode=p.mode,
                           name=p.name, priority=p.priority)
                for p in self.cfg.policies]

    def _session_config(self) -> SessionConfig:
        b = self.cfg.base
        idle = min(b.keepalive_idle, b.nat_keepalive)  # NAT mappings stay open (docs/nat.md)
        return SessionConfig(
            subflow=SubflowConfig(keepalive_idle=idle,
                                  keepalive_active=min(b.keepalive_active, idle),
                                  dead_after=b.dead_after),
            reorder_capacity=b.reorder_capacity,
            hold_max=b.hold_max_ms / 1000.0,
            hold_min=min(0.005, b.hold_max_ms / 1000.0),
            hold_initial=min(0.050, b.hold_max_ms / 1000.0),
            # NACK repairs (every mode) need the packets of a few RTTs: at
            # 20 % loss in duplicate mode 1024 lost most repairs to TCP
            send_buffer=4096,
        )

    def _control_config(self) -> controlconn.ControlConfig:
        c = self.cfg
        ups = [pairing.Uplink(up.wire_name, up.cfg.type, up.addr, up.cfg.port, self._candidates(up))
               for up in self.uplinks.values() if up.state == "up"]
        return controlconn.ControlConfig(
            psk=c.base.psk, name=self.name, uplinks=tuple(ups),
            vnc=controlmsg.Vnc(str(c.vnc.ipaddr), str(c.vnc.netmask)),
            lans=tuple(self.lans), mode=c.base.mode,
            rekey_interval=c.base.rekey_interval, rekey_packets=c.base.rekey_packets,
            pair_unmatched=c.base.pair_unmatched,
            **({"pattern": "KKpsk0", "static_key": c.base.private_key,
                "remote_static": c.base.peer_public_key} if c.base.private_key else {}),
            control_port=c.base.listen_address.port if self.role == "server" and c.base.listen_address else None,
            site_psks=tuple((s.name, s.psk) for s in c.sites) if self.role == "server" else (),
            site_claims=tuple((s.name, s.vnc_ipaddr, s.lan_subnets) for s in c.sites) if self.role == "server" else (),
            direct_key=self.direct.public_key,
        )

    @staticmethod
    def _candidates(up: UplinkIO) -> tuple:
        """What an uplink announces: STUN's host/srflx candidates, its relayed address."""
        cands = list(up.nat.candidates()) if up.nat is not None else []
        rc = up.relay.candidate() if up.relay is not None else None
        if rc is not None:
            cands.append(rc)
        return tuple(cands[:candidates.MAX_CANDIDATES])

    def _uplink_by_wire_name(self, name: str) -> UplinkIO | None:
        for up in self.uplinks.values():
            if up.wire_name == name:
                return up
        return None

    def setup(self) -> None:
        now = self.clock()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.net = self.io.netconfig()
        v = self.cfg.vnc
        self._remove_leftovers(v.ifname)
        self._open_vnic()
        if self.role == "server":
            self._start_workers()
        for u in self.cfg.enabled_uplinks:
            self.uplinks[u.name] = UplinkIO(u)
            self._open_uplink(self.uplinks[u.name], now)
        os.makedirs(self.run_dir, exist_ok=True)
        # the local socket also answers `latency` (a debugging aid, not on ubus)
        self.rpc = rpc.RpcServer(rpc.socket_path(self.run_dir),
                                 {**self.rpc_handlers(), "latency": self.latency_report}, self.sel)
        if self.ubus_socket or self.io.find_ubus() is not None:  # a router: publish (and keep publishing)
            self.ubus = ubusmod.UbusTransport(self.rpc_handlers(), self.post, socket_path=self.ubus_socket)
            self.ubus.start(timeout=1.0)
        else:
            log.debug("ubus not used (no ubusd socket); status on %s", self.rpc.path)
        if self.role == "server":
            self._start_server(now)
        else:
            servers = [(hp.host, hp.port) for hp in self.cfg.base.server_address]
            self.reconnect = ClientReconnect(servers, now)
        log.info("orayboxvpn %s started: role %s, vNIC %s %s, %d uplink(s)", __version__, self.role,
                 self.tun.name, v.interface, len(self.uplinks))

    def _remove_leftovers(self, ifname: str) -> None:
        """Remove what a dead agent left under our vNIC name.  Called with the
        vNIC lock held (run()), so whoever made the device is gone: a live
        agent's device and routes are never reached here.  (A non-persistent
        tun vanishes with its owner; what remains is e.g. a persistent one.)"""
        if self.net.index(ifname) is None:
            return
        kind = self.net.link_kind(ifname)
        if kind != "tun":
            raise OSError(errno.EEXIST, f"interface {ifname} exists and is not a tun device "
                                        f"({kind or 'no driver kind'}): set orayboxvpn.vnc.ifname "
                                        "to a free name")
        n = self.net.flush_ours(ifname)
        log.info("removing leftovers of an agent that is gone: interface %s and %d route(s) on it",
                 ifname, n)
        self.net.delete_link(ifname)

    def _open_vnic(self) -> None:
        """Create the tun vNIC, give it its address and MTU, watch it."""
        v = self.cfg.vnc
        n = self._data_processes()
        self.tun = self.io.open_tun(v.ifname, n) if n > 1 else self.io.open_tun(v.ifname)
        self.net.configure(self.tun.name, str(v.interface), v.mtu)
        self.sel.register(self.tun, selectors.EVENT_READ, DataPathHandler(self._on_tun))
        if self.workers is not None:  # made again under them: a queue each
            self.workers.new_tun(self.tun)

    def _vnic_vanished(self, err: OSError) -> None:
        """The tun device was deleted under us (its fd reports EBADFD): make it
        again with its address and the routes we hold, or end the agent with
        the reason (procd respawns it)."""
        name = self.tun.name if self.tun is not None else self.cfg.vnc.ifname
        log.error("vNIC %s vanished (%s: deleted under the agent?); recreating it with its "
                  "address and %d route(s)", name, err.strerror or err, len(self._routes))
        if self.tun is not None:
            try:
                self.sel.unregister(self.tun)
            except (KeyError, ValueError):
                pass
            self.tun.close()
            self.tun = None
        try:
            self._open_vnic()
            for cidr in sorted(self._routes):
                self.net.add_route(cidr, self.tun.name)
        except OSError as e:
            raise OSError(e.errno or errno.ENODEV,
                          f"vNIC {name} vanished and cannot be recreated: {e.strerror or e}") from None
        self.counters["vnic_recreated"] += 1
        self.last_error = f"vNIC {name} vanished and was recreated"
        log.info("vNIC %s recreated", name)

    def _open_uplink(self, up: UplinkIO, now: float) -> None:
        why = up.resolve()
        if up.addr is None:
            if up.state != "waiting" or up.error != why:
                log.warning("uplink %s: %s; retrying every %.0f s", up.name, why, UPLINK_RETRY)
            up.state, up.error = "waiting", why
            up.retry_at = now + UPLINK_RETRY
            return
        try:
            if self.workers is not None:  # a socket per worker, datagrams steered by session
                up.sock, batch = self.workers.open_uplink(up, self._rcvbuf)
            else:
                up.sock, batch = self.io.open_uplink(up.addr, up.cfg.port, up.device, rcvbuf=self._rcvbuf)
        except UplinkUnavailable as e:
            if up.state != "waiting" or up.error != str(e.strerror):
                log.warning("uplink %s: %s; retrying every %.0f s", up.name, e.strerror, UPLINK_RETRY)
            up.state, up.error, up.retry_at = "waiting", e.strerror, now + UPLINK_RETRY
            return
        except OSError as e:
            log.error("uplink %s: %s", up.name, e.strerror or e)
            up.state, up.error, up.retry_at = "error", e.strerror or str(e), now + UPLINK_RETRY
            return
        up.state, up.error = "up", None
        up.batch = batch
        if self.trace is not None or self.rx_aqm is not None:  # the kernel's receive stamps
            batch.stamp(self._on_stamp)
        self.sel.register(up.sock, selectors.EVENT_READ, DataPathHandler(lambda m, u=up: self._on_udp(u)))
        log.info("uplink %s (%s) bound to %s:%d", up.name, up.cfg.type, up.addr, up.cfg.port)
        if self.cfg.base.stun:  # discovery from the uplink's own socket (docs/nat.md)
            up.nat = uplinknat.UplinkNat(self.cfg.base.stun, (up.addr, up.cfg.port), now,
                                         lookup=self.resolver.lookup)
            up.nat.send(up.batch)
        if self.cfg.relays:  # started when a pair needs it (docs/nat.md)
            up.relay = uplinkrelay.UplinkRelay(self.cfg.relays, (up.addr, up.cfg.port),
                                               lookup=self.resolver.lookup, now=now,
                                               retry_after=self.cfg.base.relay_retry)

    def _data_processes(self) -> int:
        """How many processes carry the data path (base.workers, on a server)."""
        if self.role != "server" or self.cfg.base.workers == 1:
            return 1
        from mpvpn.agent import workers
        return workers.resolve_workers(self.cfg.base.workers)

    def _start_workers(self) -> None:
        """base.workers > 1: the data path over that many processes (mpvpn.agent.workers)."""
        from mpvpn.agent import workers

        n = self._data_processes()
        if n > 1:
            self.workers = workers.WorkerPool(self, n)
            self.workers.start(self.tun, os.environ.get("MPVPN_LOG", "auto"))

    def _start_server(self, now: float) -> None:
        la = self.cfg.base.listen_address
        # bench/hub.py --handshakes: the handshake budget raised to find the
        # CPU's own ceiling (MPVPN_HANDSHAKE_RATE handshakes per second)
        rate = float(os.environ.get("MPVPN_HANDSHAKE_RATE") or 0)
        guard = HandshakeGuard(rate, 2 * rate) if rate > 0 else None
        self.registry = ServerSessions(self._control_config(), guard=guard,
                                       reserved=self.direct.reserved_ids)
        self._restore_stamps()
        try:
            s = self.io.listen(la.host, la.port)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {la}: {e.strerror}") from None
        self.listener = s
        self.sel.register(s, selectors.EVENT_READ, self._on_accept)
        log.info("control listening on %s", la)

    def _restore_stamps(self) -> None:
        """The handshake freshness records of the agent before us (run dir):
        a first message it answered stays a replay after a restart."""
        path = Path(self.run_dir) / stampstore.FILENAME
        guard = self.registry.guard
        try:
            n = guard.restore(stampstore.load(path))
        except (ValueError, OSError) as e:
            log.warning("handshake records not restored (replays of older first messages "
                        "are answered once more): %s", e)
            n = 0
        if n:
            log.info("restored %d handshake freshness records", n)
        self._stamps_saved = guard.changes

    def _save_stamps(self) -> None:
        guard = self.registry.guard
        try:
            stampstore.save(Path(self.run_dir) / stampstore.FILENAME, guard.records())
        except OSError as e:
            log.warning("cannot save handshake records: %s", e)
        self._stamps_saved = guard.changes  # tried once per change: no retry storm

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Set up, loop until SIGTERM/SIGINT (reload on SIGHUP), tear down.
        Raises :class:`mpvpn.io.instance.AlreadyRunning` (touching nothing) while
        another agent holds this run directory or vNIC name."""
        lock = instance.InstanceLock(self.run_dir, self.cfg.vnc.ifname, self.lock_dir)
        lock.acquire()
        self.instance_lock = lock
        old = {sig: signal.signal(sig, self._on_signal) for sig in
               (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        trace = memtrace.MemTrace.from_env()  # debug aid, off unless MPVPN_TRACEMALLOC is set
        try:
            self.setup()
            while not self._stop:
                self.step()
                if trace is not None:
                    trace.poll(self.clock())
                if self._reload:
                    self._reload = False
                    self.reload()
            return 0
        finally:
            self.teardown()
            for sig, h in old.items():
                signal.signal(sig, h)
            self.instance_lock.release()
            self.instance_lock = None

    def step(self, max_timeout: float = MAX_TIMEOUT) -> None:
        """One turn of the loop: wait for I/O or the next timer, handle both.

        The timers' full round (every session, control connection, the
        registry, reconnects, uplink retries) runs when a deadline is due,
        when select() timed out, or after any handler but the data path's.
        After the data path alone (most turns under traffic) only the
        sessions it touched are asked for events and their next deadline:
        a lone packet costs its own work, not a round of every timer."""
        now = self.clock()
        due = self._due
        if due is None:
            t = self._next_timer()
            due = self._due = math.inf if t is None else t
        timeout = min(max_timeout, max(0.0, due - now))
        trace = self.trace
        if trace is not None:
            if self._woke is not None:
                trace.time("loop.busy", now - self._woke)
            trace.time("loop.sleep", timeout)
        events = self.sel.select(timeout)
        if trace is not None:
            self._woke = self.clock()
        full = not events
        if self._tun_backlog and len(events) > 1:
            # A tun with a backlog (bulk TCP being sealed) goes last: the
            # uplinks' datagrams (a ping's reply, the ACKs) wait for the
            # turn's bulk otherwise.
            events.sort(key=self._tun_last)
        for key, mask in events:
            if key.data(mask) or key.data.__class__ is not DataPathHandler:
                full = True
        now = self.clock()
        touched = self._touched
        if not full and now < due:
            for ds in touched:
                if self._session_events(ds):
                    full = True  # a subflow or the session changed state: the full round
                    break
                t = ds.sess.get_timer()
                if t is not None and t < due:
                    due = t
            self._due = due
        touched.clear()
        if full or now >= due:
            self._due = None
            self._run_timers(now)
            if trace is not None:
                trace.time("loop.timers", self.clock() - now)

    def _on_stamp(self, waited: float, n: int) -> None:
        """A receive from an uplink: its datagrams waited ``waited`` seconds in
        the socket buffer (the kernel's stamp).  In duplicate mode the copies
        on the other uplinks wait longer, but a copy read in time keeps the
        queue below the target: what CoDel watches is the minimum."""
        if self.trace is not None:
            self.trace.time("udp.queue", waited, n)
        q = self.rx_aqm
        if q is not None and q.on_turn(waited <= aqm.TARGET, self.clock()):
            self._rx_drop = True

    def _tun_last(self, event) -> bool:
        return event[0].fileobj is self.tun

    def stop(self) -> None:
        self._stop = True

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def _on_wake(self, _mask) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                fn, fut = self._posted.get_nowait()
            except queue.Empty:
                break
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def post(self, fn) -> concurrent.futures.Future:
        """Run ``fn()`` on the agent's thread (from any thread); a Future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._posted.put((fn, fut))
        try:
            self._wake_w.send(b"!")
        except (BlockingIOError, OSError, AttributeError):
            pass  # the loop wakes within MAX_TIMEOUT anyway
        return fut

    def _event(self, name: str, data: dict) -> None:
        if self.ubus is not None:
            self.ubus.send_event(name, data)

    def _next_timer(self) -> float | None:
        ts = []
        for ds in self.sessions.values():
            ts.append(ds.sess.get_timer())
        for c in self.controls:
            if c.conn is not None:
                ts.append(c.conn.get_timer())
        if self.registry is not None:
            ts.append(self.registry.get_timer())
        if self._hub_dirty:
            ts.append(self._hub_next_at)
        ts.append(self.direct.next_deadline())
        if self.reconnect is not None and not self._client_connected():
            ts.append(self.reconnect.get_timer())
        for up in self.uplinks.values():
            if up.state != "up":
                ts.append(up.retry_at)
            else:
                if up.nat is not None:
                    ts.append(up.nat.next_deadline())
                if up.relay is not None:
                    ts.append(up.relay.next_deadline())
        for ds in self.sessions.values():
            if ds.punch:
                ts.append(uplinknat.punch_deadline(ds))
            ts.append(ds.stuck_due)
            for member, since in ds.down_since.items():
                up = ds.uplink_of.get(member)
                if up is not None and up.relay is not None:
                    ts.append(up.relay.start_deadline(since + self.cfg.base.relay_after))
            ts.extend(ds.upgrade_at.values())
        ts = [t for t in ts if t is not None]
        return min(ts) if ts else None

    def _run_timers(self, now: float) -> None:
        if uplinknat.run_timers(self.uplinks.values(), now):  # a new public mapping:
            self._uplinks_changed(now)  # candidates to the peers (UPDATE)
            for ds in self.sessions.values():
                uplinknat.update_punch(ds, now)
        self._relay_timers(now)
        for ds in list(self.sessions.values()):
            if ds.via_until is not None and now >= ds.via_until:  # the hub said nothing: withdraw
                ds.peer, ds.via_until = dc_replace(ds.peer, via=()), None
                self._set_routes(ds, self._routes_for(ds))
            t = ds.sess.get_timer()
            if t is not None and t <= now:
                self._deliver(ds.sess.handle_timer(now), ds)
            ds.stuck_due = uplinknat.punch_when_stuck(ds, now)
            if ds.punch:
                uplinknat.punch_timers(ds, now)
            self._session_events(ds)
            self._flush_session(ds)
        for c in list(self.controls):
            if c.conn is None:
                continue
            t = c.conn.get_timer()
            if t is not None and t <= now:
                c.conn.handle_timer(now)
            self._control_pump(c, now)
        if self.registry is not None:
            t = self.registry.get_timer()
            if t is not None and t <= now:
                self.registry.handle_timer(now)
            self._registry_events(now)
            if self.registry.guard.changes != self._stamps_saved:
                self._save_stamps()
            self._hub_sync(now)
            self.direct.hub_round(now)
        else:
            self.direct.site_timers(now)
        if self.reconnect is not None and not self._client_connected():
            t = self.reconnect.get_timer()
            if t is not None and t <= now:
                addr = self.reconnect.handle_timer(now)
                if addr is not None:
                    self._connect(addr, now)
        for up in self.uplinks.values():
            if up.state != "up" and up.retry_at <= now:
                self._open_uplink(up, now)
                if up.state == "up":
                    self._uplinks_changed(now)
        if self.rpc is not None:
            self.rpc.expire()
        self._update_state(now)

    # ------------------------------------------------------------------ data path

    def _route(self, pkt: bytes) -> DataSession | None:
        """The session whose peer owns the packet's destination (send.RouteTable)."""
        return self.route_table.lookup(pkt)

    def _on_tun(self, mask) -> None:
        """The tun is readable: mpvpn.agent.send, from the read to the UDP send."""
        trace = self.trace
        t0 = self.clock() if trace is not None else 0.0
        lone_took = [0.0, 0]  # (trace) the first read's sending time, its packets

        def lone(ds, pkts):  # the turn's first read leaves at once (send.read_tun)
            t = self.clock()
            send.send_batches({ds: pkts}, t, self.counters, trace)
            self._touched.add(ds)
            if trace is not None:
                lone_took[:] = self.clock() - t, len(pkts)
        try:
            touched, drained = send.read_tun(self.tun.read_packets, self._mss, self.route_table.lookup,
                                             self.counters, budget=self._tun_budget, first=lone)
        except OSError as e:
            if e.errno != errno.EBADFD:
                raise
            self._vnic_vanished(e)
            return
        now = self.clock()
        if trace is not None:
            t0 += lone_took[0]  # (tun.read: the reads, not the first read's sending)
        self._tun_backlog = not drained
        if self.tun_aqm is not None and self.tun_aqm.on_turn(drained, now):
            if aqm.drop_one_bulk(touched.values()):  # a standing queue in the tun's ring
                self.counters["tun_aqm_drops"] += 1
        if trace is not None and (touched or lone_took[1]):
            n = sum(len(b) for b in touched.values()) + lone_took[1]
            trace.time("tun.read", now - t0, n)
            trace.count("tun.batch", n)
        send.send_batches(touched, now, self.counters, trace)
        self._touched.update(touched)

    def _on_udp(self, up: UplinkIO) -> None:
        """An uplink is readable: mpvpn.agent.receive, from the receive to the tun write."""
        now = self.clock()
        if up.sock is None:
            return
        trace = self.trace
        n0 = up.rx_datagrams
        self._wrote_tun = False
        self._reading = True
        try:
            touched = receive.read_uplink(up, self.sessions, self.counters, self._deliver, now,
                                          budget=self._rx_budget)
        finally:
            self._reading = False
        if trace is not None and up.rx_datagrams != n0:
            n = up.rx_datagrams - n0
            trace.time("udp.read", self.clock() - now, n)
            trace.count("udp.batch", n)
        if self._hub_out:
            self._hub_flush()
        for ds in touched:
            if self.registry is not None:
                self.registry.touch(ds.session_id, now)
            self._flush_session(ds)
        self._touched.update(touched)
        if self._wrote_tun:
            # The answer takes the shortest path: what the packets just written
            # made the kernel send back (a ping's reply, a TCP ACK) is often in
            # the tun already, written from inside our write.  Read it now,
            # before the other uplinks' events of this turn (in duplicate mode:
            # the stale copies of the same packets) and another select() --
            # unless the tun has a backlog (bulk waiting to be sealed): then
            # it gets its turn after the uplinks (see step()).
            self._wrote_tun = False
            if self.tun is not None and not self._tun_backlog:
                self._on_tun(selectors.EVENT_READ)

    # ------------------------------------------------------------------ TURN relays

    def _relay_timers(self, now: float) -> None:
        """Which uplinks relay (a subflow on it unestablished for base.relay_after,
        or the peer's uplink offers a relay candidate), their peers, timers
        and events; a new relayed address goes to the peers (UPDATE)."""
        if not self.cfg.relays:
            return
        peers: dict = {}  # UplinkIO -> peer addresses its relay must let through
        for ds in self.sessions.values():
            peer_ups = {u.name: u for u in ds.peer.uplinks}
            for member, spec in ds.plan.items():
                up = ds.uplink_of.get(member)
                sub = ds.sess.subflows.get(member)
                pu = peer_ups.get(spec.remote)
                if up is None or up.relay is None or sub is None or pu is None:
                    continue
                if sub.established:
                    ds.down_since.pop(member, None)
                else:
                    since = ds.down_since.setdefault(member, now)
                    after = self.cfg.base.relay_after
                    if now - since >= after and up.relay.want(
                            f"subflow {member} ({spec.type}) did not open in {after:g} s", now):
                        log.info("uplink %s: subflow %d (%s) did not open directly; using a relay",
                                 up.name, member, spec.type)
                if uplinkrelay.has_relay_candidate(pu) and up.relay.want(
                        f"the peer's uplink {pu.name} is relayed", now):
                    log.info("uplink %s: the peer's uplink %s is relayed; relaying too", up.name, pu.name)
                peers.setdefault(up, []).extend(uplinkrelay.relay_peers(pu, sockaddr))
                self._relay_upgrade(ds, member, up, now)
        changed = False
        for up in self.uplinks.values():
            r = up.relay
            if r is None or up.state != "up" or not r.started:
                continue
            if up in peers:
                r.set_peers(peers[up], now)
            t = r.next_deadline()
            if t is not None and t <= now:
                r.on_timer(now)
            for ev in r.take_events():
                text = uplinkrelay.describe(ev)
                if isinstance(ev, (uplinkrelay.RelayUp,)):
                    log.info("uplink %s: %s", up.name, text)
                    changed = True
                elif isinstance(ev, (uplinkrelay.RelayLost, uplinkrelay.NoRelay)):
                    log.warning("uplink %s: %s", up.name, text)
                    changed = True
                else:
                    log.debug("uplink %s: %s", up.name, text)
            self._relay_send(up)
        if changed:
            self._uplinks_changed(now)
            for ds in self.sessions.values():
                uplinknat.update_punch(ds, now)

    def _relay_upgrade(self, ds: DataSession, member: int, up: UplinkIO, now: float) -> None:
        """While relayed, probe the peer's direct candidates now and then
        (at once when they change): an authenticated probe that gets through
        moves the peer's end to the direct path (SMPU follows the source),
        its answer moves ours."""
        sub = ds.sess.subflows.get(member)
        p = ds.punch.get(member)
        relayed = sub is not None and sub.established and sub.remote is not None \
            and up.relay.carries(sub.remote)
        if not relayed or p is None:
            if member in ds.upgrade_at:
                ds.upgrade_at.pop(member, None)
                ds.upgrade_targets.pop(member, None)
                if sub is not None and sub.established:
                    log.info("%s: subflow %d moved from the relay to %s", ds.peer.name, member,
                             uplinknat.link_path(ds, member))
            return
        direct = tuple(t for t in p.targets if not up.relay.carries(t))
        if not direct:
            return
        # new candidates on either end (the peer's UPDATE, our own STUN
        # re-check): try at once, so that both ends' probes meet in the NATs
        key = (direct, up.nat.public_addr if up.nat is not None else None)
        if key != ds.upgrade_targets.get(member):
            ds.upgrade_targets[member] = key
            ds.upgrade_at[member] = now
        if now < ds.upgrade_at.get(member, now):
            return
        ds.upgrade_at[member] = now + uplinkrelay.UPGRADE_INTERVAL
        ds.upgrade.add(member)
        ds.sess.punch(member, now)
        self._flush_session(ds)

    def _relay_send(self, up: UplinkIO) -> None:
        if up.batch is None:
            return
        failed = up.relay.flush(up.batch)
        if failed:
            up.tx_errors += failed

    def _relay_path_dead(self, ds: DataSession, member: int, reason: str) -> None:
        """A relayed subflow went down: check its relay (the next one if it is dead)."""
        up = ds.uplink_of.get(member)
        sub = ds.sess.subflows.get(member)
        if up is None or up.relay is None or sub is None or sub.remote is None \
                or not up.relay.carries(sub.remote):
            return
        up.relay.suspect(f"subflow {member} through relay {up.relay.server} went down ({reason})",
                         self.clock())
        self._relay_send(up)

    def _deliver(self, packets, ds: DataSession | None = None) -> None:
        """Packets released by session ``ds`` (None: not from a session) go
        to the tun; on a hub with several sites, those for another site's
        session go there (mpvpn.core.hubforward), or are dropped and counted;
        from a direct session, only sources its peer may use (agent.directpeers)."""
        if ds is not None and ds.direct:
            packets = self.direct.filter(ds, packets)
        if ds is not None and self.hub is not None and len(self.sessions) > 1 and packets:
            packets, out = self.hub.split(ds, packets)
            c = self.hub.counters
            self.counters["hub_forwarded"] = c["forwarded"]
            self.counters["hub_refused"] = c["refused"]
            self.counters["hub_spoofed"] = c["spoofed"]
            if out and self._hub_via_kernel:
                packets = packets + [p for batch in out.values() for p in batch]
            elif out:
                for dst, batch in out.items():  # sent once the uplink has been read
                    self._hub_out.setdefault(dst, []).extend(batch)
                if not self._reading:
                    self._hub_flush()
            if not packets:
                return
        if self._rx_drop and self._reading and aqm.drop_one_bulk((packets,)):
            # a standing queue in the uplinks' socket buffers (bulk TCP toward
            # us outruns this agent): one bulk packet lost tells its sender
            self._rx_drop = False
            self.counters["rx_aqm_drops"] += 1
        trace = self.trace
        t0 = self.clock() if trace is not None else 0.0
        try:
            failed = self.tun.write_packets(packets)
            self._wrote_tun = True
            if trace is not None:
                trace.time("tun.write", self.clock() - t0, len(packets))
        except OSError as e:
            if e.errno != errno.EBADFD:
                raise
            self._vnic_vanished(e)
            failed = len(packets)
        if failed:
            self.counters["tun_write_errors"] += failed

    def _hub_flush(self) -> None:
        """(hub) Send what other sites sent to a site, one batch per site."""
        out, self._hub_out = self._hub_out, {}
        send.send_batches({ds: b for ds, b in out.items() if self.sessions.get(ds.session_id) is ds},
                          self.clock(), self.counters)

    def _flush_session(self, ds: DataSession) -> None:
        send.flush(ds, self.counters, self.clock())

    def _session_events(self, ds: DataSession) -> bool:
        """Act on the session's events (log, ubus); whether there were any."""
        ev = ds.sess.next_event()
        if ev is None:
            return False
        while ev is not None:
            peer = ds.peer.name
            if isinstance(ev, (SubflowUp, SubflowDown)):
                spec = ds.plan.get(ev.member)
                carrier = spec.type if spec else "?"
                up = isinstance(ev, SubflowUp)
                if up:
                    log.info("%s: subflow %d (%s) up, %s", peer, ev.member, carrier,
                             uplinknat.link_path(ds, ev.member))
                else:
                    log.warning("%s: subflow %d (%s) down: %s", peer, ev.member, carrier, ev.reason)
                    self._relay_path_dead(ds, ev.member, ev.reason)
                    uplinknat.punch_again(ds, ev.member, self.clock())  # NAT reboot?
                self._event("orayboxvpn.link", {"peer": peer, "session_id": ds.session_id,
                                                "member": ev.member, "type": carrier,
                                                "state": "up" if up else "down",
                                                "reason": "" if up else ev.reason})
            elif isinstance(ev, SessionUp):
                log.info("%s: session %#x connected", peer, ds.session_id)
                if ds.direct:
                    self.direct.session_state(ds, True, self.clock())
                self._event("orayboxvpn.session", {"peer": peer, "session_id": ds.session_id,
                                                   "state": "connected"})
            elif isinstance(ev, SessionDown):
                log.warning("%s: session %#x has no subflow up (%s)", peer, ds.session_id, ev.reason)
                if ds.direct:
                    self.direct.session_state(ds, False, self.clock())
                self._event("orayboxvpn.session", {"peer": peer, "session_id": ds.session_id,
                                                   "state": "down", "reason": ev.reason})
            elif isinstance(ev, SubflowClosed):
                log.info("%s: subflow %d removed", peer, ev.member)
            ev = ds.sess.next_event()
        return True

    # ------------------------------------------------------------------ sessions

    def _new_session(self, session_id: int, peer, plan, keys, conn, now: float,
                     cipher: str = "chacha20-poly1305", initiator: bool | None = None,
                     direct: bool = False) -> DataSession:
        if self.workers is not None and self.workers.owner(session_id) != self.index:
            ds = self.workers.open_session(session_id, peer, plan, keys, conn, now, cipher)
            self.sessions[session_id] = ds
        else:
            sealer = Sealer(keys.send, keys.recv, keys.epoch, cipher=cipher)
            sess = Session(session_id,
                           initiator=(self.role == "client") if initiator is None else initiator,
                           config=self._session_config(), sealer=sealer)
            # A fresh subflow is assumed to carry 10 Mbit/s until measured: low
            # enough for most WAN uplinks, high enough that TCP's slow start is
            # not cut by our own queue (1 Mbit/s cost a 3 s ramp-up in the lab).
            self._install_scheduler(sess, peer)
            sess.linktest.load_size = self.cfg.vnc.mtu  # a test's load: full-size packets
            ds = DataSession(sess=sess, peer=peer, conn=conn, started=now, direct=direct,
                             worker=self.index)
            self.sessions[session_id] = ds
            self._apply_plan(ds, plan, now)
        self._set_routes(ds, self._routes_for(ds))
        self._hub_dirty = self.hub is not None
        log.info("session %#x with %s: %d subflow(s) planned, peer LANs %s, cipher %s", session_id,
                 peer.name, len(plan), ", ".join(peer.lans) or "none", cipher)
        return ds

    def _new_direct_session(self, session_id: int, peer, plan, keys, cipher: str, initiator: bool,
                            now: float) -> DataSession:
        """(site) A keyed direct session with another site (agent.directpeers)."""
        return self._new_session(session_id, peer, plan, keys, None, now, cipher,
                                 initiator=initiator, direct=True)

    def _replan_direct(self, ds: DataSession, peer, plan, now: float) -> None:
        """(site) A direct session's peer uplinks, candidates or LANs, or our
        own uplinks changed."""
        ds.peer = peer
        self._apply_plan(ds, plan, now)
        self._set_routes(ds, self._routes_for(ds))

    def _install_scheduler(self, sess: Session, peer) -> None:
        """The scheduler of base.mode with our policies (at session start, and
        on a reload that changed the policies)."""
        sess.scheduler = make_scheduler(self.cfg.base.mode, initial_rate=INITIAL_LINK_RATE,
                                        target_loss=self.cfg.base.target_loss,
                                        nack=self.cfg.base.nack,  # None: the mode's default
                                        policies=self._policies())
        # every mode NACKs by default (a peer with base.nack 0 does not: we
        # over-count it then); a duplicate-mode peer sends every packet on
        # every carrier, so what is lost on all of them may be congestion
        # (Session.peer_duplicates: the ask budget)
        sess.scheduler.peer_nack = None
        sess.peer_duplicates = peer.mode == "duplicate"

    def _apply_plan(self, ds: DataSession, plan, now: float) -> None:
        """Make the session's subflows match ``plan``: new members open, gone
        members close, a member whose endpoints moved keeps its state and
        (initiator) runs its handshake again on the new path."""
        if ds.worker != self.index:  # held by a data-path worker: it applies the plan
            self.workers.plan(ds, plan)
            return
        new = {s.member: s for s in plan}
        for member in [m for m in ds.plan if m not in new]:
            ds.sess.remove_subflow(member, now)
            del ds.plan[member]
            # (its CLOSE still goes out through uplink_of until it is reaped)
        for member, spec in new.items():
            old = ds.plan.get(member)
            if old == spec:
                continue
            ds.plan[member] = spec
            ds.uplink_of[member] = self._uplink_by_wire_name(spec.local)
            meta = {"type": spec.type, "local": f"{spec.local_addr}:{spec.local_port}",
                    "remote": f"{spec.remote_addr}:{spec.remote_port}", "peer": ds.peer.name,
                    "session_id": ds.session_id}
            sub = ds.sess.subflows.get(member)
            if old is not None and sub is not None and sub.state is not State.CLOSING:
                sub.meta.update(meta)
                sub.remote = sockaddr(spec.remote_addr, spec.remote_port)
                if sub.initiator:
                    sub.open(now)
                continue
            if sub is not None:  # an old subflow of that member is still closing
                ds.sess.forget_subflow(member)
            sub = ds.sess.add_subflow(member, now, name=spec.local, meta=meta)
            sub.remote = sockaddr(spec.remote_addr, spec.remote_port)
            up = ds.uplink_of[member]
            if up is not None and up.cfg.upload_kbit:  # smpu.upload: the link's rate until measured
                sub.meter.seed(up.cfg.upload_kbit * 125.0)
        uplinknat.update_punch(ds, now)
        self._flush_session(ds)

    def _set_routes(self, ds: DataSession, cidrs: list) -> None:
        old, new = set(ds.routes), set(cidrs)
        for c in old - new:
            self._route_unref(c)
        for c in new - old:
            self._route_ref(c)
        ds.routes = sorted(new)
        self._rebuild_route_table()

    def _route_ref(self, cidr: str) -> None:
        n = self._routes.get(cidr, 0)
        if n == 0:
            try:
                self.net.add_route(cidr, self.tun.name)
            except Exception as e:  # netlink refused: keep running, say why
                self.last_error = f"cannot add route {cidr}: {e}"
                log.error(self.last_error)
        self._routes[cidr] = n + 1

    def _route_unref(self, cidr: str) -> None:
        n = self._routes.get(cidr, 0) - 1
        if n <= 0:
            self._routes.pop(cidr, None)
            self.net.del_route(cidr, self.tun.name)
        else:
            self._routes[cidr] = n

    def _routes_for(self, ds: DataSession) -> list:
        """The CIDRs routed into the tun for ``ds``: the peer's LANs and, on a
        client of a hub that forwards (its UPDATE's ``via``), the other
        sites' LANs and vNIC addresses that fit with ours (usable_via)."""
        routes = list(ds.peer.lans)
        ds.via, refused = (), []
        if self.role == "client" and ds.peer.via and ds.conn is not None:
            ds.via, refused = usable_via(ds.conn.local, ds.peer)
            for site in ds.via:
                routes += site.routes
        if refused and refused != ds.via_refused:
            self.counters["via_refused"] += len(refused)
            for name, why in refused:
                log.warning("hub %s forwards to site %s, not routed here: %s", ds.peer.name, name, why)
        ds.via_refused = refused
        return routes

    def _rebuild_route_table(self) -> None:
        # (a direct session with a subflow up comes before the hub session's
        # routes to the same site; one without is left out: agent.directpeers)
        self.route_table.rebuild(self.direct.route_order(list(self.sessions.values())))
        if self.hub is not None:
            self.hub.rebuild([(ds, ds.peer.vnc.ip, ds.peer.lans) for ds in self.sessions.values()],
                             self._hub_apart())
        if self.workers is not None:  # every process knows every session
            self.workers.table(self.sessions.values(), self._hub_apart(), self.hub.enabled)

    def _talking_pairs(self) -> set:
        """(hub) Pairs of sites forwarded between since the last call, by this
        process and by the workers (base.workers)."""
        pairs = self.hub.take_pairs() if self.hub is not None else set()
        if self.workers is not None:
            pairs |= self.workers.take_pairs()
        return pairs

    def _may_go_direct(self, ds: DataSession) -> bool:
        """(hub) May this site be offered direct paths (its `config site` ``direct``)?"""
        site = ds.site
        return site is None or all(s.direct for s in self.cfg.sites if s.name == site)

    def _hub_apart(self) -> list:
        """(hub) The sessions of sites kept out of forwarding (`config site` forward 0)."""
        names = {s.name for s in self.cfg.sites if not s.forward}
        return [ds for ds in self.sessions.values() if ds.site in names] \
            if names else []

    def _hub_sync(self, now: float) -> None:
        """(hub) The sites changed: tell each site, by UPDATE, which other
        sites it reaches through us (all of them with base.hub_forward, none
        without), where that differs from what it was last told."""
        if self._hub_syncing or now < self._hub_next_at:  # (the loop or the timer sees the flag)
            return
        self._hub_syncing = True
        try:
            while self._hub_dirty:
                self._hub_dirty = False
                told = self._hub_announce(now)
                if told:
                    self._hub_next_at = now + HUB_ANNOUNCE_INTERVAL
                for c in told:
                    self._control_pump(c, now)  # (may free a session: then once more)
        finally:
            self._hub_syncing = False

    def _hub_announce(self, now: float) -> list:
        """Queue the UPDATEs of :meth:`_hub_sync`; the ControlIOs that got one."""
        sites = [(ds, controlmsg.ViaSite(ds.peer.name, ds.peer.vnc.ip, tuple(ds.peer.lans)))
                 for ds in self.sessions.values()]
        if self.hub.enabled:
            views, cut = hubforward.views(sites, apart=frozenset(self._hub_apart()))
            if cut:
                self.counters["via_truncated"] += cut
                log.warning("hub: %d site announcement(s) left out (more sites than one UPDATE "
                            "carries)", cut)
        else:
            views = {ds: () for ds, _v in sites}
        told = []
        for c in list(self.controls):
            conn = c.conn
            ds = self._session_of(conn) if conn is not None else None
            if ds is None or ds not in views or conn.state is not controlconn.State.ESTABLISHED:
                continue
            # (a new connection's via_sent is None: a forwarding hub always tells
            # it, even "nobody"; a hub that does not forward only withdraws)
            if views[ds] == conn.via_sent or (not self.hub.enabled and not conn.via_sent):
                continue
            try:
                conn.send_update(now, via=views[ds])
            except ValueError as e:  # (cannot happen: our own info is unchanged)
                log.error("hub: cannot update %s: %s", ds.peer.name, e)
                continue
            told.append(c)
        return told

    def _drop_session(self, session_id: int, reason: str, keep_routes: bool = False) -> None:
        ds = self.sessions.pop(session_id, None)
        if ds is None:
            return
        log.info("session %#x with %s ended: %s", session_id, ds.peer.name, reason)
        if ds.worker != self.index and self.workers is not None:
            self.workers.drop(ds, reason)
        if not keep_routes:
            for c in ds.routes:
                self._route_unref(c)
        ds.routes = []
        self._rebuild_route_table()
        self._hub_dirty = self.hub is not None
        if self.hub is not None:
            self.direct.site_gone(ds.peer.name, self.clock())

    # ------------------------------------------------------------------ control edge

    def _client_connected(self) -> bool:
        return any(not c.closing for c in self.controls)

    def _connect(self, addr, now: float) -> None:
        host, port = addr
        try:
            fam, sa = self.io.resolve(host, port)
        except OSError as e:
            self.last_error = f"cannot resolve server {host}: {e}"
            log.warning(self.last_error)
            self.reconnect.failed(now, "resolve")
            return
        s, err = self.io.connect(fam, sa)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.last_error = f"cannot connect to {host}:{port}: {os.strerror(err)}"
            log.warning(self.last_error)
            self.reconnect.failed(now, "connect")
            return
        c = ControlIO(sock=s, connecting=True, addr=(host, port))
        self.controls.append(c)
        self.counters["control_connects"] += 1
        self.sel.register(s, selectors.EVENT_WRITE, lambda m, c=c: self._on_control(c, m))
        log.info("connecting to server %s:%d", host, port)

    def _on_accept(self, _mask) -> None:
        now = self.clock()
        try:
            s, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        # never refused here: a genuine client may share its address with
        # junk; the registry bounds unauthenticated connections instead
        conn = self.registry.accept(addr[0], now)
        self.io.accepted(s)
        c = ControlIO(sock=s, conn=conn, addr=addr)
        self.controls.append(c)
        self.sel.register(s, selectors.EVENT_READ, lambda m, c=c: self._on_control(c, m))
        self._on_control(c, selectors.EVENT_READ)  # a client's first message is often here already

    def _on_control(self, c: ControlIO, mask) -> None:
        now = self.clock()
        if c.connecting:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._control_gone(c, "connect", os.strerror(err), now)
                return
            c.connecting = False
            c.conn = controlconn.ClientConnection(self._control_config(), now, self.stamps)
            self.sel.modify(c.sock, selectors.EVENT_READ, lambda m, c=c: self._on_control(c, m))
        if mask & selectors.EVENT_READ and c.conn is not None:
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data is not None:
                c.conn.receive_data(data, now)
        if mask & selectors.EVENT_WRITE and c.out:
            self._control_write(c)
        self._control_pump(c, now)

    def _control_write(self, c: ControlIO) -> None:
        try:
            n = c.sock.send(c.out)
            del c.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            c.out.clear()

    def _control_flush(self, c: ControlIO) -> None:
        """Write what the machine of ``c`` queued (no events: those wait for its pump)."""
        data = c.conn.data_to_send()
        if not data:
            return
        c.out += data
        self._control_write(c)
        if c.out:
            try:
                self.sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                lambda m, c=c: self._on_control(c, m))
            except (KeyError, ValueError):
                pass

    def _control_pump(self, c: ControlIO, now: float) -> None:
        """Move the machine's output to the socket and act on its events."""
        conn = c.conn
        if conn is None:
            return
        data = conn.data_to_send()
        if data:
            c.out += data
            self._control_write(c)
        closed = None
        ev = conn.next_event()
        while ev is not None:
            closed = self._control_event(c, ev, now) or closed
            ev = conn.next_event()
        if self.registry is not None:
            self._registry_events(now)
        if closed is not None:
            data = conn.data_to_send()
            if data:
                c.out += data
                self._control_write(c)
            self._control_gone(c, closed[0], closed[1], now, closed[2])
            if self.hub is not None:
                self._hub_sync(now)
            return
        if self.hub is not None:
            self._hub_sync(now)
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        try:
            if self.sel.get_key(c.sock).events != want:
                self.sel.modify(c.sock, want, lambda m, c=c: self._on_control(c, m))
        except (KeyError, ValueError):
            pass

    def _control_event(self, c: ControlIO, ev, now: float):
        if isinstance(ev, controlevents.SessionEstablished):
            old = [sid for sid, ds in self.sessions.items()
                   if (self.role == "client" and not ds.direct) or ds.peer.name == ev.peer.name]
            peer = ev.peer
            # (client) the other sites of the session this one replaces stay routed
            # until the hub's first announcement (fail closed, no gap in the routes)
            carry = [self.sessions[sid].peer.via for sid in old if self.role == "client"
                     and self.sessions[sid].peer.name == peer.name and self.sessions[sid].peer.via]
            if carry:
                peer = dc_replace(peer, via=carry[0])
            ds = self._new_session(ev.session_id, peer, ev.plan, ev.keys, c.conn, now, ev.cipher)
            if carry:
                ds.via_until = now + VIA_GRACE
            for sid in old:
                if sid != ev.session_id:
                    self._drop_session(sid, "replaced by a new session")
            if self.role == "client":
                self.direct.hub_replaced()
            self.last_error = None
            if self.reconnect is not None:
                learned = [(u.addr, ev.peer.control_port or c.addr[1]) for u in ev.peer.uplinks]
                self.reconnect.established(now, learned)
            log.info("control: session %#x established with %s", ev.session_id, ev.peer.name)
            if list(c.conn.local.lans) != self.lans:  # the LAN changed during the handshake
                self._send_lans(c, now, pump=False)  # (we are inside _control_pump)
            ups = self._control_config().uplinks
            if tuple(c.conn.local.uplinks) != ups:  # STUN learnt candidates during the handshake
                c.conn.send_update(now, uplinks=list(ups))
        elif isinstance(ev, controlevents.PeerUpdated):
            ds = self._session_of(c.conn)
            if ds is not None:
                ds.peer, ds.via_until = ev.peer, None
                self._apply_plan(ds, ev.plan, now)
                self._set_routes(ds, self._routes_for(ds))
                if ev.origin == "peer":
                    self._hub_dirty = self.hub is not None
                    if self.role == "client":
                        self.direct.via_changed(ds, now)
                    else:
                        self.direct.site_moved(ds)
                d = ev.diff
                if ev.origin == "peer" or d.added or d.removed or d.changed:  # (not a hub's via)
                    log.info("control: %s updated: plan %d subflow(s), LANs %s", ev.peer.name,
                             len(ev.plan), ", ".join(ev.peer.lans))
        elif isinstance(ev, controlevents.KeysRotated):
            ds = self._session_of(c.conn)
            if ds is not None:
                ds.sess.sealer.rotate(ev.keys.send, ev.keys.recv, ev.epoch, defer_send=not ev.sending)
        elif isinstance(ev, controlevents.KeysActivated):
            ds = self._session_of(c.conn)
            if ds is not None:
                ds.sess.sealer.confirm_send()
        elif isinstance(ev, controlevents.KeysRetired):
            ds = self._session_of(c.conn)
            if ds is not None and ds.sess.sealer.prev_epoch == ev.epoch:
                ds.sess.sealer.drop_previous()
        elif isinstance(ev, controlevents.ProtocolError):
            who = "peer reports" if ev.by_peer else "refused peer"
            self.last_error = f"{who} {ev.code}: {ev.text}" if ev.text else f"{who} {ev.code}"
            log.error("control: %s", self.last_error)
        elif isinstance(ev, controlevents.PeerMessage):
            self.direct.on_message(c, ev.message, now)
        elif isinstance(ev, controlevents.ConnectionClosed):
            return ev.reason, ev.text, ev.retry_after
        return None

    def _session_of(self, conn) -> DataSession | None:
        if conn is None:
            return None
        for ds in self.sessions.values():
            if ds.conn is conn:
                return ds
        if conn is not None and conn.session_id in self.sessions:
            return self.sessions[conn.session_id]
        return None

    # Ends of a control connection that say nothing is wrong with the session.
    _BENIGN_ENDS = ("eof", "timeout", "connect", "closed", "shutdown", "reconnect")
    # ProtocolError already put these in last_error, in the peer's own words.
    _EXPLAINED_ENDS = ("auth", "version", "overlap", "vnic", "route", "invalid", "busy")

    def _control_gone(self, c: ControlIO, word: str, text: str, now: float,
                      retry_after: float | None = None) -> None:
        """A control connection ended (``word`` says how, ``text`` details;
        ``retry_after``: the server answered BUSY, try again that soon)."""
        if c in self.controls:
            self.controls.remove(c)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        if c.out:  # best effort: the BYE / ERROR
            try:
                c.sock.setblocking(True)
                c.sock.settimeout(0.2)
                c.sock.sendall(c.out)
            except OSError:
                pass
        c.sock.close()
        c.closing = True
        where = f"{c.addr[0]}:{c.addr[1]}" if c.addr else "?"
        detail = f"{word} ({text})" if text else word
        if self.role == "client":
            self.counters["control_failures"] += 1
            if word not in self._EXPLAINED_ENDS or not self.last_error:
                self.last_error = f"control connection to {where}: {detail}"
            delay = self.reconnect.failed(now, word, retry_after)
            if retry_after is not None:
                log.info("server %s is busy; retrying in %.2f s", where, delay)
            else:
                log.warning("control connection to %s closed: %s; retrying in %.1f s", where, detail, delay)
            # The data session lives on when only the TCP connection was lost
            # (its subflows may be fine); a session the server ended goes.
            if word not in self._BENIGN_ENDS:
                for sid in [sid for sid, ds in self.sessions.items() if ds.conn is c.conn]:
                    self._drop_session(sid, detail, keep_routes=True)
        else:
            self.control_counters[word] = self.control_counters.get(word, 0) + 1
            if c.conn is not None and c.conn.session_id:
                log.info("control connection from %s closed: %s", where, detail)
            elif word in ("bad_psk", "bad_version", "malformed", "oversized", "timeout", "replay",
                          "no_stamp"):
                # junk may come 20 times a second: one line per 10 s says it all
                self._rejects_quiet += 1
                if now >= self._reject_logged_at + 10.0:
                    more = self._rejects_quiet - 1
                    log.warning("control: rejected a connection from %s: %s%s", where, detail,
                                f" ({more} more since the last such line)" if more else "")
                    self._reject_logged_at, self._rejects_quiet = now, 0

    def _registry_events(self, now: float) -> None:
        ev = self.registry.next_event()
        while ev is not None:
            if isinstance(ev, controlevents.SessionFreed):
                self._drop_session(ev.session_id, ev.reason)
                if ev.conn is not None:
                    for c in list(self.controls):
                        if c.conn is ev.conn:
                            self._control_pump(c, now)
            ev = self.registry.next_event()

    def _uplinks_changed(self, now: float) -> None:
        """An uplink came or went: tell the peer so it re-plans."""
        info = self._control_config()
        for c in self.controls:
            if c.conn is not None and c.conn.state is controlconn.State.ESTABLISHED:
                c.conn.send_update(now, uplinks=list(info.uplinks))
                self._control_pump(c, now)
        if self.registry is not None:
            self.registry.reconfigure(info)

    # ------------------------------------------------------------------ reload / stop

    def refresh_uplinks(self, now: float) -> bool:
        """Re-read the addresses of uplinks given by OpenWrt interface (hotplug
        sends SIGHUP on ifup/ifdown/ifupdate); rebind what moved and tell the
        peer.  Returns whether anything changed."""
        changed = False
        for up in self.uplinks.values():
            if not up.cfg.interface:
                continue
            before = up.addr if up.state == "up" else None
            up.resolve()
            after = up.addr
            if after == before and (up.state == "up") == (after is not None):
                continue
            if up.sock is not None:
                try:
                    self.sel.unregister(up.sock)
                except (KeyError, ValueError):
                    pass
                if up.relay is not None:
                    up.relay.stop(now)
                    self._relay_send(up)
                up.sock.close()
                up.sock = up.batch = None
                up.nat = None
                up.relay = None
            log.info("uplink %s (interface %s): address %s -> %s", up.name, up.cfg.interface,
                     before or "none", after or "none")
            up.state = "waiting"
            self._open_uplink(up, now)
            changed = True
        if changed:
            self._uplinks_changed(now)
        return changed

    def reload(self) -> None:
        """SIGHUP: re-read the config; live options apply in place, a changed
        LAN (base.lan_subnet, network.lan) goes to the peers as an UPDATE,
        anything else restarts the sessions (documented in docs/openwrt.md).
        Uplinks given by OpenWrt interface are looked up again either way."""
        now = self.clock()
        self.refresh_uplinks(now)
        uplinknat.recheck_all(self.uplinks.values(), now)
        new, problems = cfgmod.load_config(self.uci_dir)
        errors = [p for p in problems if p.severity == cfgmod.ERROR]
        if new is None or errors:
            self.last_error = "reload refused, config has errors: " + "; ".join(str(p) for p in errors[:3])
            log.error(self.last_error)
            return
        live = ("log_level", "keepalive_idle", "keepalive_active", "dead_after", "hold_max_ms", "mss_clamp",
                "hub_forward", "nat_keepalive", "relay_after", "direct_peer_key", "direct_pinned_only")
        same_rest = (dc_replace(new.base, **{k: getattr(self.cfg.base, k) for k in live}) == self.cfg.base
                     and new.vnc == self.cfg.vnc and new.uplinks == self.cfg.uplinks
                     and new.relays == self.cfg.relays)  # (the uplinks' relay paths are made at start)
        if same_rest:
            old = self.cfg
            old_sites = old.sites
            self.cfg = new
            if self.workers is not None:
                self.workers.reconfigure(new)
            logging.getLogger().setLevel(getattr(logging, new.base.log_level.upper(), logging.INFO))
            self._mss = self._mss_limits(new)
            self.direct.set_pins(dict(new.base.direct_peer_key), new.base.direct_pinned_only, now)
            if new.sites != old_sites and self.registry is not None:  # site keys and claim rules
                self.registry.reconfigure(self._control_config())
                self._close_revoked_sites(old_sites, new.sites, now)
                self.direct.sites_changed(now)  # (`config site` direct)
            if self.hub is not None and (self.hub.enabled != new.base.hub_forward
                                         or new.sites != old_sites):
                self.hub.enabled = new.base.hub_forward  # the sites learn by UPDATE
                self.direct.set_enabled(new.base.direct and new.base.hub_forward, now)
                self._rebuild_route_table()  # (which sites are kept apart)
                self._hub_dirty = True
                self._hub_sync(now)
            sc = self._session_config()
            for ds in self.sessions.values():
                ds.sess.retune(keepalive_idle=sc.subflow.keepalive_idle,
                               keepalive_active=sc.subflow.keepalive_active,
                               dead_after=sc.subflow.dead_after, hold_max=sc.hold_max)
            if new.policies != old.policies:
                for ds in self.sessions.values():
                    self._install_scheduler(ds.sess, ds.peer)
                log.info("policies changed: %d in effect", len(new.policies))
            lan = self._announce_lans(now)
            log.info("reloaded: live options applied%s, tunnel kept", ", LAN change announced" if lan else "")
            return
        if self.instance_lock is not None and new.vnc.ifname != self.cfg.vnc.ifname:
            try:
                self.instance_lock.switch_vnic(new.vnc.ifname)
            except instance.AlreadyRunning as e:
                self.last_error = f"reload refused: {e.strerror}"
                log.error(self.last_error)
                return
        log.info("reloaded: configuration changed, restarting sessions")
        lock = self.instance_lock
        self.teardown()
        self.__init__(new, uci_dir=self.uci_dir, run_dir=self.run_dir, clock=self.clock,
                      lock_dir=self.lock_dir, io=self.io)
        self.instance_lock = lock
        self.setup()

    def _close_revoked_sites(self, old_sites, new_sites, now: float) -> None:
        """(hub) A `config site` removed, disabled, or given another key or other
        claims: its live session no longer has what it authenticated with,
        so it ends ("revoked"); the site reconnects under the new rules (or,
        without a key, is refused).  Other sites keep their sessions."""
        def proof(s):  # what a session authenticated with and may claim (not `forward`)
            return (s.psk, s.vnc_ipaddr, s.lan_subnets)

        before = {s.name: proof(s) for s in old_sites}
        after = {s.name: proof(s) for s in new_sites}
        for c in list(self.controls):
            conn = c.conn
            if conn is None or conn.site is None or before.get(conn.site) == after.get(conn.site):
                continue
            log.info("site %s: key or claims changed by reload, closing its session", conn.site)
            conn.close("revoked", f"site {conn.site}: key or claims changed on the hub")
            self._control_pump(c, now)

    def _announce_lans(self, now: float) -> bool:
        """Our LAN subnets changed (config or netifd): tell every connected peer
        with an UPDATE (docs/control.md) so that its routes follow; session,
        keys and subflows stay.  Returns whether they changed."""
        lans = self._lan_subnets()
        if lans == self.lans:
            return False
        log.info("LAN subnets %s -> %s", ", ".join(self.lans) or "none", ", ".join(lans) or "none")
        self.lans = lans
        for c in list(self.controls):
            # (a handshake in progress catches up when it is established)
            if c.conn is not None and c.conn.state is controlconn.State.ESTABLISHED:
                self._send_lans(c, now)
        if self.registry is not None:
            self.registry.reconfigure(self._control_config())  # for clients that connect later
        return True

    def _send_lans(self, c: ControlIO, now: float, pump: bool = True) -> None:
        conn = c.conn
        try:
            conn.send_update(now, lans=list(self.lans))
        except ValueError as e:  # (server) the new LANs clash with this client's
            peer = conn.peer.name if conn.peer else "?"
            self.last_error = f"LAN change clashes with {peer}: {e}"
            log.error(self.last_error)
            conn.close("overlap", str(e)[:200])
        if pump:
            self._control_pump(c, now)

    def teardown(self) -> None:
        """Close sessions (CLOSE / BYE to the peer), remove routes and the vNIC."""
        now = self.clock()
        for ds in list(self.sessions.values()):
            try:
                ds.sess.close(now)
                self._flush_session(ds)
            except Exception:
                log.exception("closing session %#x", ds.session_id)
        if self.workers is not None:  # they close their sessions (CLOSE to the peers) and exit
            self.workers.stop()
            self.workers = None
        for c in list(self.controls):
            if c.conn is not None:
                try:
                    c.conn.close("shutdown", "agent stopped")
                    c.out += c.conn.data_to_send()
                except Exception:
                    log.exception("closing control connection")
            try:
                if c.out and not c.connecting:
                    c.sock.setblocking(True)
                    c.sock.settimeout(0.2)
                    c.sock.sendall(c.out)
            except OSError:
                pass
            c.sock.close()
        self.controls = []
        for cidr in list(self._routes):
            try:
                self.net.del_route(cidr, self.tun.name)
            except Exception:
                pass
        self._routes.clear()
        self.sessions.clear()
        for up in self.uplinks.values():
            if up.relay is not None and up.relay.started:  # release the allocation (best effort)
                try:
                    up.relay.stop(now)
                    self._relay_send(up)
                except Exception:
                    log.exception("releasing the relay of uplink %s", up.name)
            if up.sock is not None:
                up.sock.close()
                up.sock = up.batch = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.rpc is not None:
            self.rpc.close()
            self.rpc = None
        if self.ubus is not None:
            self.ubus.stop()
            self.ubus = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        if self.net is not None:
            self.net.close()
            self.net = None
        if self._wake_r is not None:
            signal.set_wakeup_fd(-1)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None
        self.sel.close()
        self.sel = selectors.DefaultSelector()
        self.state = "stopped"

    # ------------------------------------------------------------------ status

    def _update_state(self, now: float) -> None:
        if any(ds.sess.connected for ds in self.sessions.values()):
            st = "connected"
        elif self.sessions:
            st = "degraded"
        else:
            st = "connecting"
        if st != self.state:
            self.state, self.state_since = st, now

    def _state_text(self) -> str:
        return statusdoc.state_text(self.state, self.role, self.sessions.values(),
                                    self.cfg.base.server_address)

    def status(self) -> dict:
        """The status document (mpvpn.agent.statusdoc, docs/status.md)."""
        now = self.clock()
        if self.role == "server":
            ctl = statusdoc.server_control(self.cfg.base.listen_address,
                                           sum(1 for c in self.controls if c.conn is not None),
                                           self.control_counters, self.registry)
        else:
            ctl = statusdoc.client_control(self.controls, self.reconnect, self.started)
        doc = statusdoc.document(
            version=__version__, now=now, started=self.started, state=self.state,
            state_since=self.state_since, role=self.role, cfg=self.cfg, name=self.name,
            last_error=self.last_error, tun=self.tun, routes=self._routes,
            sessions=[ds for ds in self.sessions.values() if ds.worker == self.index],
            agent_counters=self.counters, control=ctl,
            dataplane=self._dataplane_status(), link_test=self._link_test_status(now),
            uplink_docs=statusdoc.uplinks(self.uplinks.values(), now), hub=self.hub,
            direct=self.direct.status(now), via_path=self.direct.path_of)
        if self.workers is not None:  # the workers' sessions and counters
            self.workers.status(doc, self.hub)
        return doc

    def _dataplane_status(self) -> dict:
        """How packets are moved: the C loops (mpvpn.core.fastpath) and the tun's offloads."""
        return statusdoc.dataplane(self.tun, fastpath.LOOPS is not None, fastpath.WHY)

    def _link_test_status(self, now: float) -> dict | None:
        """The latest link test's document (mpvpn.core.linktest), with wall-clock ``started``."""
        if self._link_test is None:
            return None
        sid, last = self._link_test
        ds = self.sessions.get(sid)
        doc = ds.sess.linktest.status() if ds is not None else None
        if doc is None:  # the session ended: what was known then
            doc = dict(last)
            if doc.get("state") == "running":
                doc.update(state="failed", error="the session ended during the test", phase=None)
        else:
            doc["started"] = round(time.time() - (now - doc["started"]), 3)
            doc["peer"] = ds.peer.name
        self._link_test = (sid, doc)
        return doc

    def test_links(self, args: dict) -> dict:
        """rpc/ubus ``test_links {duration, peer}``: start a link test with a peer."""
        now = self.clock()
        duration = args.get("duration", linktest.DEFAULT_DURATION)
        if isinstance(duration, bool) or not isinstance(duration, (int, float)):
            return {"error": "duration must be a number of seconds"}
        peer = args.get("peer")
        if peer is not None and not isinstance(peer, str):
            return {"error": "peer must be a site name"}
        cands = sorted((ds for ds in self.sessions.values()  # (the hub before direct sessions)
                        if ds.sess.connected and (peer is None or ds.peer.name == peer)),
                       key=lambda ds: ds.direct)
        if not cands:
            return {"error": f"no connected session with {peer}" if peer else "no connected session"}
        if self._link_test is not None and self._link_test[1].get("state") == "running":
            cur = self._link_test_status(now)
            if cur is not None and cur.get("state") == "running":
                return {"error": "a link test is already running"}
        ds = cands[0]
        try:
            test_id = ds.sess.start_link_test(now, duration)
        except linktest.LinkTestError as e:
            return {"error": str(e)}
        self._link_test = (ds.session_id, {"state": "running"})
        doc = self._link_test_status(now)
        self._flush_session(ds)
        log.info("link test %d with %s started: %d phases of %g s", test_id, ds.peer.name,
                 doc["phases"], float(duration))
        return {"started": True, "id": test_id, "phases": doc["phases"], "peer": ds.peer.name}

    def rpc_handlers(self) -> dict:
        def reconnect(_args):
            now = self.clock()
            for c in list(self.controls):
                if c.conn is not None:
                    c.conn.close("reconnect", "requested by the administrator")
                    self._control_pump(c, now)
            if self.reconnect is not None:
                self.reconnect = ClientReconnect(
                    [(hp.host, hp.port) for hp in self.cfg.base.server_address], now)
            return {"ok": True}

        return {"status": lambda _args: self.status(), "reconnect": reconnect,
                "test_links": self.test_links}

    def latency_report(self, args: dict) -> dict:
        """rpc ``latency {reset}``: the per-stage histograms (mpvpn.agent.latency)
        while MPVPN_LATENCY_TRACE=1, else ``{"enabled": false}``; ``reset``
        starts them afresh after this report."""
        if self.trace is None:
            return {"enabled": False}
        doc = self.trace.report()
        if isinstance(args, dict) and args.get("reset"):
            self.trace.reset()
        return doc

