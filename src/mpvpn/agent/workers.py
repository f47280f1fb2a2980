"""A hub's data path over several processes: a worker per core
(``base.workers``; issue 16).

The main process stays what it is with one worker: it holds the control
connections, the registry, the kernel routes, the status document and ubus,
reads the tun, and is worker 0.  Workers 1..n-1 are child processes
(``python -m mpvpn.agent.workers``), each a :class:`WorkerAgent` -- the
agent's own session, data path and hub-forwarding code -- holding the
sessions whose id modulo n is its index (:mod:`mpvpn.core.shard`):

* **UDP**: each uplink is an SO_REUSEPORT group of n sockets
  (:mod:`mpvpn.io.reuseport`) whose classic BPF program sends each SMPU
  datagram to the socket of the session's worker; STUN and junk go to the
  main process.  The main process keeps every socket of the group open (a
  group renumbers when one closes) and hands socket k to worker k.
* **sessions**: the main process learns keys and plans on the control
  connection and sends them to the session's worker (``session``,
  ``plan``, ``rotate``, ``activate``, ``retire``, ``drop``); every process
  knows every session (``table``: id, worker, peer, site), so the route
  table and :class:`mpvpn.core.hubforward.HubForward` decide as in one
  process.  A session held elsewhere is a :class:`WorkerSession`: the
  Session interface the loop calls, whose ``send_many`` hands the packets
  over to the holder (``packets``; worker to worker through the main
  process).
* **tun**: a multi-queue tun (IFF_MULTI_QUEUE), a queue per process; the
  kernel sends a flow to the queue that last wrote a packet of it (the
  holder of the session it came from), others by hash: a packet read for a
  session held elsewhere is handed over.  A tun made again under the agent
  (deleted by someone) gets new queues, sent to the workers.
* **back to the main process**: data-plane liveness (``touch``, for the
  registry's expiry), sealed counts (``sealed``, for rekeying by volume),
  subflow and session state and events (``state``, ``event``), and each
  worker's part of the status document (``status``).

A worker that dies ends the agent with the reason (procd starts it again):
its sessions' keys and replay windows died with it.  Messages travel as
pickles over a private SOCK_SEQPACKET socketpair between the agent and its
own children; packets are sent without waiting (a full channel drops them,
counted ``worker_drops``, as a full socket buffer would).
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace as dc_replace

from mpvpn.agent.agent import Agent, DataPathHandler, DataSession, UplinkIO
from mpvpn.agent import statusdoc
from mpvpn.core import linktest, shard
from mpvpn.io import reuseport, udp
from mpvpn.io.udp import BatchSocket

log = logging.getLogger("mpvpn")

CHANNEL_BUFFER = 8 << 20
MAX_MESSAGE = 192 << 10  # one SEQPACKET message (packets are chunked below it)
CONTROL_TIMEOUT = 5.0  # a control message the other end does not take in this long: it hangs
REPORT_INTERVAL = 0.5  # worker -> main: touches and sealed counts at most this often
STATUS_TIMEOUT = 2.0


class WorkerDied(OSError):
    """A worker process ended or stopped answering: the agent ends with this."""


def resolve_workers(setting, cpus: int | None = None) -> int:
    """``base.workers`` (an int, or ``"auto"``: one per CPU core) as a count."""
    if setting == "auto":
        return max(1, min(shard.MAX_WORKERS, cpus if cpus is not None else (os.cpu_count() or 1)))
    return int(setting)


# ------------------------------------------------------------------------ the channel

class Channel:
    """One end of the socketpair between the main process and a worker."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE as root
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, CHANNEL_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, CHANNEL_BUFFER)
        sock.setblocking(False)
        self.drops = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg, fds=()) -> None:
        """A control message: waits up to CONTROL_TIMEOUT for room."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while True:
            try:
                if fds:
                    socket.send_fds(self.sock, [data], list(fds))
                else:
                    self.sock.send(data)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerDied(errno.ETIMEDOUT, "a worker channel stayed full") from None
                time.sleep(min(0.001, left))
            except (BrokenPipeError, ConnectionResetError) as e:
                raise WorkerDied(e.errno, "the other end of a worker channel is gone") from None

    def send_packets(self, sid: int, packets) -> int:
        """Hand packets over without waiting; returns how many were dropped."""
        dropped = 0
        chunk, size = [], 0
        for p in packets:
            if chunk and size + len(p) > MAX_MESSAGE:
                dropped += self._try(("packets", sid, chunk), len(chunk))
                chunk, size = [], 0
            chunk.append(bytes(p))
            size += len(p) + 8
        if chunk:
            dropped += self._try(("packets", sid, chunk), len(chunk))
        self.drops += dropped
        return dropped

    def _try(self, msg, n: int) -> int:
        try:
            self.sock.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
            return 0
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            return n

    def receive(self):
        """``(messages, file descriptors, eof)`` waiting now."""
        out, fds = [], []
        while True:
            try:
                data, got, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE + 4096, 16)
            except (BlockingIOError, InterruptedError):
                return out, fds, False
            except (ConnectionResetError, BrokenPipeError):
                return out, fds, True
            if not data:
                return out, fds, True
            out.append(pickle.loads(data))
            fds += got


# ------------------------------------------------------------- a session held elsewhere

class WorkerSealer:
    """(main) The Sealer calls of the control connection, for a session a
    worker holds: passed on to it.  Mirrors the epochs the agent asks about."""

    # the holder seals and reports its count (``sealed``); what send.send_batches
    # reads here after handing packets over is "nothing sealed in this process"
    sealed = 0

    def __init__(self, send, sid: int, epoch: int):
        self._send, self._sid = send, sid
        self.epoch, self.prev_epoch = epoch, None
        self.send_epoch = epoch

    def rotate(self, new_send: bytes, new_recv: bytes, new_epoch: int, *, defer_send: bool = False):
        self._send(("rotate", self._sid, new_send, new_recv, new_epoch, defer_send))
        self.prev_epoch, self.epoch = self.epoch, new_epoch
        if not defer_send:
            self.send_epoch = new_epoch

    def confirm_send(self) -> None:
        self._send(("activate", self._sid))
        self.send_epoch = self.epoch

    def drop_previous(self) -> None:
        self._send(("retire", self._sid))
        self.prev_epoch = None


class WorkerSession:
    """The part of :class:`mpvpn.core.smpu.Session`'s interface the agent's
    loop, tun path and hub forwarding call, for a session another process
    holds: no timers or events here, packets handed over to the holder,
    state as the holder last reported it."""

    def __init__(self, session_id: int, worker: int, hand_over, sealer: WorkerSealer | None = None):
        self.session_id, self.worker = session_id, worker
        self._hand_over = hand_over  # (session id, packets) -> packets dropped
        self.sealer = sealer
        self.connected = False
        self.up: tuple = ()  # members of the established subflows (the holder's count; state_text)
        self.subflows: dict = {}  # member -> None
        self.scheduler = None
        self.peer_duplicates = False
        self.dropped = 0

    def report(self, connected: bool, up, members) -> None:
        self.connected, self.up = connected, tuple(up)
        self.subflows = dict.fromkeys(members)

    def send_many(self, packets, now: float) -> None:
        self.dropped += self._hand_over(self.session_id, packets)

    def datagrams_by_member(self) -> dict:
        return {}

    def get_timer(self):
        return None

    def handle_timer(self, now: float) -> list:
        return []

    def next_event(self):
        return None

    def retune(self, **kw) -> None:
        pass  # the holder applies the reloaded config itself (``config``)

    def close(self, now: float) -> None:
        pass  # the holder closes it when it stops

    def start_link_test(self, now: float, duration: float):
        raise linktest.LinkTestError(f"this session is held by worker {self.worker}: link tests "
                                     "run on the main process's sessions")


class ConnInfo:
    """(worker) What the data path asks of a session's control connection,
    which lives in the main process: the `config site` key it used, and the
    sealed volume (reported to the main process, which decides rekeys)."""

    def __init__(self, session_id: int, site):
        self.session_id, self.site = session_id, site
        self.sealed: tuple | None = None  # (epoch, count) not yet reported

    def note_sealed(self, epoch: int, count: int, now: float) -> bool:
        self.sealed = (epoch, count)
        return False


# -------------------------------------------------------------------- the main process

class WorkerPool:
    """(main) Starts workers 1..n-1, owns the uplinks' socket groups and the
    channels, and carries what the agent does with the workers' sessions."""

    def __init__(self, agent: Agent, n: int):
        if not 2 <= n <= shard.MAX_WORKERS:
            raise ValueError(f"a pool of 2..{shard.MAX_WORKERS} workers")
        self.agent, self.n = agent, n
        self.procs: dict[int, subprocess.Popen] = {}
        self.channels: dict[int, Channel] = {}
        self.groups: dict[str, list] = {}  # uplink name -> its sockets, in index order
        self._status: dict[int, dict] = {}
        self._last_table = None
        self.counters = {"worker_drops": 0}
        self._talking: set = set()  # (from ds, to ds) the workers forwarded between (``pairs``)

    def owner(self, session_id: int) -> int:
        return shard.owner(session_id, self.n)

    def take_pairs(self) -> set:
        """The pairs of sites the workers forwarded between since the last
        call, as HubForward.take_pairs gives them (agent.directpeers)."""
        out, self._talking = self._talking, set()
        return out

    # -- lifecycle
    def start(self, tun, log_mode: str) -> None:
        a = self.agent
        for k in range(1, self.n):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            env = dict(os.environ)
            proc = subprocess.Popen([sys.executable, "-m", "mpvpn.agent.workers", "--fd",
                                     str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL, env=env)
            theirs.close()
            ch = Channel(mine)
            self.procs[k], self.channels[k] = proc, ch
            queue = tun.take_queue()
            ch.send(("init", k, self.n, a.cfg, a.name, tun.name, tun.offload, log_mode), fds=[queue])
            os.close(queue)  # the worker's now
            a.sel.register(ch.sock, selectors.EVENT_READ, DataPathHandler(lambda _m, k=k: self.on_readable(k)))
        log.info("data path over %d processes: %s", self.n,
                 ", ".join(f"worker {k} pid {p.pid}" for k, p in self.procs.items()))

    def stop(self) -> None:
        for k, ch in self.channels.items():
            try:
                self.agent.sel.unregister(ch.sock)
            except (KeyError, ValueError):
                pass
            try:
                ch.send(("stop",))
            except OSError:
                pass
        for k, p in self.procs.items():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop; killing it", k)
                p.kill()
                p.wait(5)
        for ch in self.channels.values():
            ch.sock.close()
        for socks in self.groups.values():
            for s in socks:
                s.close()
        self.channels, self.procs, self.groups = {}, {}, {}

    def new_tun(self, tun) -> None:
        """The tun was made again: each worker its new queue."""
        for ch in self.channels.values():
            queue = tun.take_queue()
            ch.send(("tun", tun.name, tun.offload), fds=[queue])
            os.close(queue)

    def open_uplink(self, up: UplinkIO, rcvbuf: int | None = None):
        """The uplink's socket group (each with a receive buffer of ``rcvbuf``
        bytes; None: the kernel's cap): socket 0 (and its BatchSocket) for the main process, socket k
        sent to worker k."""
        for s in self.groups.pop(up.name, []):
            s.close()
        socks = reuseport.open_group(up.addr, up.cfg.port, self.n, up.device,
                                     opener=functools.partial(udp.open_uplink, rcvbuf=rcvbuf))
        self.groups[up.name] = socks
        for k, ch in self.channels.items():
            ch.send(("uplink", up.name), fds=[socks[k].fileno()])
        return socks[0], BatchSocket(socks[0])

    # -- sessions
    def open_session(self, session_id: int, peer, plan, keys, conn, now: float, cipher: str) -> DataSession:
        k = self.owner(session_id)
        site = None if conn is None else conn.site
        self.channels[k].send(("session", session_id, peer, plan, keys, cipher, site))
        sess = WorkerSession(session_id, k, self.hand_over,
                             WorkerSealer(self.channels[k].send, session_id, keys.epoch))
        return DataSession(sess=sess, peer=peer, conn=conn, started=now, worker=k)

    def plan(self, ds: DataSession, plan) -> None:
        self.channels[ds.worker].send(("plan", ds.session_id, ds.peer, plan))

    def drop(self, ds: DataSession, reason: str) -> None:
        self.channels[ds.worker].send(("drop", ds.session_id, reason))

    def table(self, sessions, apart, hub_enabled: bool) -> None:
        """Every session, who holds it, what it claims: to every worker."""
        apart_ids = frozenset(ds.session_id for ds in apart)
        rows = [(ds.session_id, ds.worker, ds.peer, ds.site, tuple(ds.routes))
                for ds in sessions]
        msg = ("table", rows, apart_ids, hub_enabled)
        if msg == self._last_table:
            return
        self._last_table = msg
        for ch in self.channels.values():
            ch.send(msg)

    def reconfigure(self, cfg) -> None:
        for ch in self.channels.values():
            ch.send(("config", cfg))

    def hand_over(self, sid: int, packets) -> int:
        k = self.owner(sid)
        ch = self.channels.get(k)
        if ch is None:
            return len(packets)
        n = ch.send_packets(sid, packets)
        self.counters["worker_drops"] += n
        return n

    # -- from the workers
    def on_readable(self, k: int) -> bool:
        """A worker's messages; whether any was more than packets (then the
        agent's loop runs its full round: a DataPathHandler)."""
        msgs, fds, eof = self.channels[k].receive()
        for fd in fds:
            os.close(fd)
        for m in msgs:
            self._on_message(k, m)
        a = self.agent
        if a._hub_out:  # what every message handed over, one batch per session
            a._touched.update(ds for ds in a._hub_out if ds.worker == a.index)
            a._hub_flush()
        if eof:
            self._died(k)
        return any(m[0] != "packets" for m in msgs)

    def _died(self, k: int) -> None:
        p = self.procs[k]
        try:
            rc = p.wait(2)
        except subprocess.TimeoutExpired:
            rc = None
        raise WorkerDied(errno.ECHILD, f"data-path worker {k} (pid {p.pid}) ended"
                                       f"{f' with status {rc}' if rc is not None else ''}; its "
                                       "sessions are gone with it, ending the agent")

    def _on_message(self, k: int, m) -> None:
        a = self.agent
        kind = m[0]
        now = a.clock()
        if kind == "packets":
            _, sid, pkts = m
            ds = a.sessions.get(sid)
            if ds is not None:  # ours, or relayed to the worker that holds it
                a._hub_out.setdefault(ds, []).extend(pkts)
        elif kind == "touch":
            if a.registry is not None:
                for sid in m[1]:
                    a.registry.touch(sid, now)
        elif kind == "sealed":
            for sid, epoch, count in m[1]:
                ds = a.sessions.get(sid)
                if ds is not None and ds.conn is not None:
                    ds.conn.note_sealed(epoch, count, now)
        elif kind == "state":
            for sid, connected, up, members in m[1]:
                ds = a.sessions.get(sid)
                if ds is not None and isinstance(ds.sess, WorkerSession):
                    ds.sess.report(connected, up, members)
        elif kind == "pairs":
            for x, y in m[1]:
                dx, dy = a.sessions.get(x), a.sessions.get(y)
                if dx is not None and dy is not None:
                    self._talking.add((dx, dy))
        elif kind == "event":
            a._event(m[1], m[2])
        elif kind == "status":
            self._status[k] = m[1]

    def status(self, doc: dict, hub) -> None:
        """Add the workers' sessions, links and counters to ``doc`` (the
        main process's status document of its own sessions)."""
        for ch in self.channels.values():
            ch.send(("status",))
        self._status = {}
        deadline = time.monotonic() + STATUS_TIMEOUT
        sel = selectors.DefaultSelector()
        for k, ch in self.channels.items():
            sel.register(ch.sock, selectors.EVENT_READ, k)
        try:
            while len(self._status) < len(self.channels):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(self.channels) - set(self._status))
                    raise WorkerDied(errno.ETIMEDOUT, f"data-path worker(s) {missing} did not "
                                                      f"answer for {STATUS_TIMEOUT:g} s")
                for key, _mask in sel.select(left):
                    self.on_readable(key.data)
        finally:
            sel.close()
        fwd: dict[int, dict] = {}
        for part in self._status.values():
            for sid, c in part["forwarded"].items():
                acc = fwd.setdefault(sid, {})
                for name, v in c.items():
                    acc[name] = acc.get(name, 0) + v
        if hub is not None:  # what the main process passed to the workers' sessions
            for ds in self.agent.sessions.values():
                if ds.worker:
                    acc = fwd.setdefault(ds.session_id, {})
                    for name, v in hub.site(ds).items():
                        acc[name] = acc.get(name, 0) + v
        for k in sorted(self._status):
            part = self._status[k]
            doc["sessions"] += part["sessions"]
            doc["links"] += part["links"]
            for name, v in part["counters"].items():
                doc["counters"][name] = doc["counters"].get(name, 0) + v
        for se in doc["sessions"]:
            if se.get("forwarded") is not None and se["session_id"] in fwd:
                for name, v in fwd[se["session_id"]].items():
                    se["forwarded"][name] = se["forwarded"].get(name, 0) + v
        for name, v in self.counters.items():
            doc["counters"][name] = doc["counters"].get(name, 0) + v
        if doc["session_id"] is None and doc["sessions"]:  # the main process holds none
            doc["session_id"], doc["peer"] = doc["sessions"][0]["session_id"], doc["sessions"][0]["peer"]
        doc["state_text"] = statusdoc.state_text(doc["state"], "server", self.agent.sessions.values(), ())
        doc["workers"] = {"count": self.n, "pids": {str(k): p.pid for k, p in self.procs.items()},
                          "sessions": {str(k): len(part["sessions"]) for k, part in self._status.items()}}


# ---------------------------------------------------------------------- a worker process

class WorkerAgent(Agent):
    """A data-path worker: the agent's sessions, data path and hub
    forwarding for the sessions the main process gives it, and its queue of
    the tun.  No control connection, no routes, no status socket or ubus."""

    def __init__(self, channel: Channel, index: int, n: int, cfg, name: str, tun):
        # the main process offers direct paths (it holds the control connections); a
        # worker only reports the pairs of sites it forwarded between (``pairs``)
        cfg = dc_replace(cfg, base=dc_replace(cfg.base, direct=False))
        super().__init__(cfg, run_dir="/nonexistent", name=name)
        self.channel, self.index, self.n = channel, index, n  # (index: Agent's, 0 there)
        self._pending_tun = tun
        self._heard: set = set()
        self._apart_ids: frozenset = frozenset()  # sessions kept out of forwarding (``table``)
        self._reported: dict = {}  # session id -> last (connected, up, members) sent
        self._report_at = 0.0

    def setup(self) -> None:
        self._use_tun(self._pending_tun)
        self.sel.register(self.channel.sock, selectors.EVENT_READ, DataPathHandler(self._on_channel))

    def _use_tun(self, tun) -> None:
        """Our queue of the agent's multi-queue tun: read and written here."""
        self.tun = tun
        self._tun_gone = False
        self.sel.register(tun, selectors.EVENT_READ, DataPathHandler(self._on_tun))

    def _vnic_vanished(self, err: OSError) -> None:
        """The tun was deleted: the main process makes it again and sends our
        new queue (``tun``); until then what we would write is lost, counted."""
        if self._tun_gone:
            return
        self._tun_gone = True
        log.warning("worker %d: the vNIC vanished (%s); waiting for the main process to make it "
                    "again", self.index, err.strerror or err)
        try:
            self.sel.unregister(self.tun)
        except (KeyError, ValueError):
            pass

    def run(self) -> int:
        self.setup()
        try:
            while not self._stop:
                self.step()
                self._report(self.clock())
            return 0
        finally:
            self.teardown()

    # the main process holds routes and control connections, and tells the
    # sites about each other (Agent._hub_sync): nothing to announce here
    def _next_timer(self) -> float | None:
        self._hub_dirty = False
        return super()._next_timer()

    def _route_ref(self, cidr: str) -> None:
        self._routes[cidr] = self._routes.get(cidr, 0) + 1

    def _route_unref(self, cidr: str) -> None:
        n = self._routes.get(cidr, 0) - 1
        if n <= 0:
            self._routes.pop(cidr, None)
        else:
            self._routes[cidr] = n

    def _event(self, name: str, data: dict) -> None:
        self.channel.send(("event", name, data))

    def _on_udp(self, up: UplinkIO) -> None:
        super()._on_udp(up)
        self._heard.update(ds.session_id for ds in self._touched)

    def hand_over(self, sid: int, packets) -> int:
        return self.channel.send_packets(sid, packets)

    def _report(self, now: float) -> None:
        states = []
        for sid, ds in self.sessions.items():
            if ds.worker != self.index:
                continue
            st = (ds.sess.connected, tuple(sub.member for sub in ds.sess.up), tuple(ds.sess.subflows))
            if self._reported.get(sid) != st:
                self._reported[sid] = st
                states.append((sid, *st))
        if states:
            self.channel.send(("state", states))
        if now < self._report_at:
            return
        self._report_at = now + REPORT_INTERVAL
        if self._heard:
            self.channel.send(("touch", sorted(self._heard)))
            self._heard.clear()
        if self.hub is not None:  # sites that talk through us: the main process offers them direct paths
            pairs = sorted((a.session_id, b.session_id) for a, b in self.hub.take_pairs())
            if pairs:
                self.channel.send(("pairs", pairs))
        sealed = []
        for sid, ds in self.sessions.items():
            if isinstance(ds.conn, ConnInfo) and ds.conn.sealed is not None:
                sealed.append((sid, *ds.conn.sealed))
                ds.conn.sealed = None
        if sealed:
            self.channel.send(("sealed", sealed))

    def _on_channel(self, _mask) -> bool:
        """The main process's messages; whether any was more than packets
        (then the loop's full round: a DataPathHandler)."""
        msgs, fds, eof = self.channel.receive()
        fds = list(fds)
        for m in msgs:
            self._on_message(m, fds)
        if self._hub_out:  # what every message handed over, one batch per session
            self._touched.update(ds for ds in self._hub_out if ds.worker == self.index)
            self._hub_flush()
        if eof:
            log.error("worker %d: the main process is gone; stopping", self.index)
            self._stop = True
        return eof or any(m[0] != "packets" for m in msgs)

    def _on_message(self, m, fds: list) -> None:
        kind = m[0]
        now = self.clock()
        if kind == "packets":
            _, sid, pkts = m
            ds = self.sessions.get(sid)
            if ds is not None and ds.worker == self.index:
                self._hub_out.setdefault(ds, []).extend(pkts)
        elif kind == "uplink":
            self._adopt_uplink(m[1], fds.pop(0), now)
        elif kind == "tun":
            if not self._tun_gone:
                self.sel.unregister(self.tun)
            self.tun.close()
            self._use_tun(_adopt_tun(fds.pop(0), m[1], m[2]))
        elif kind == "session":
            _, sid, peer, plan, keys, cipher, site = m
            self._drop_session(sid, "replaced")
            self._new_session(sid, peer, plan, keys, ConnInfo(sid, site), now, cipher)
        elif kind == "plan":
            _, sid, peer, plan = m
            ds = self.sessions.get(sid)
            if ds is not None and ds.worker == self.index:
                ds.peer = peer
                self._apply_plan(ds, plan, now)
                self._set_routes(ds, self._routes_for(ds))
        elif kind in ("rotate", "activate", "retire"):
            ds = self.sessions.get(m[1])
            if ds is None or ds.worker != self.index:
                return
            sealer = ds.sess.sealer
            if kind == "rotate":
                _, _sid, send_key, recv_key, epoch, defer = m
                sealer.rotate(send_key, recv_key, epoch, defer_send=defer)
            elif kind == "activate":
                sealer.confirm_send()
            else:
                sealer.drop_previous()
        elif kind == "drop":
            ds = self.sessions.get(m[1])
            if ds is not None and ds.worker == self.index:
                self._drop_session(m[1], m[2])
        elif kind == "table":
            self._table(m[1], m[2], m[3])
        elif kind == "config":
            self._reconfigure(m[1])
        elif kind == "status":
            self.channel.send(("status", self._status_part(now)))
        elif kind == "stop":
            self._stop = True

    def _adopt_uplink(self, name: str, fd: int, now: float) -> None:
        cfg = {u.name: u for u in self.cfg.enabled_uplinks}.get(name)
        sock = socket.socket(fileno=fd)
        old = self.uplinks.get(name)
        if old is not None and old.sock is not None:
            self.sel.unregister(old.sock)
            old.sock.close()
        if cfg is None:
            sock.close()
            return
        sock.setblocking(False)
        up = UplinkIO(cfg, sock=sock, batch=BatchSocket(sock), state="up")
        up.resolved = sock.getsockname()[0]
        self.uplinks[name] = up
        self.sel.register(sock, selectors.EVENT_READ, self._udp_handler(up))
        for ds in self.sessions.values():  # plans made before the socket came
            for member, spec in ds.plan.items():
                if spec.local == up.wire_name:
                    ds.uplink_of[member] = up

    def _udp_handler(self, up):
        return DataPathHandler(lambda _m, u=up: self._on_udp(u))

    def _table(self, rows, apart_ids, hub_enabled: bool) -> None:
        """Every session of the agent: ours stay, the others are WorkerSessions."""
        seen = set()
        for sid, worker, peer, site, routes in rows:
            seen.add(sid)
            if worker == self.index:
                continue  # ours: made by ``session``
            ds = self.sessions.get(sid)
            if ds is None or ds.worker != worker:
                ds = DataSession(sess=WorkerSession(sid, worker, self.hand_over), peer=peer,
                                 conn=ConnInfo(sid, site), worker=worker)
                self.sessions[sid] = ds
            ds.peer = peer
            ds.routes = list(routes)
        for sid in [s for s, ds in self.sessions.items() if ds.worker != self.index and s not in seen]:
            del self.sessions[sid]
        self._apart_ids = apart_ids
        if self.hub is not None:
            self.hub.enabled = hub_enabled
        self._rebuild_route_table()

    def _hub_apart(self) -> list:
        return [ds for ds in self.sessions.values() if ds.session_id in self._apart_ids]

    def _reconfigure(self, cfg) -> None:
        old = self.cfg
        self.cfg = cfg
        logging.getLogger().setLevel(getattr(logging, cfg.base.log_level.upper(), logging.INFO))
        self._mss = self._mss_limits(cfg)
        sc = self._session_config()
        for ds in self.sessions.values():
            if ds.worker != self.index:
                continue
            ds.sess.retune(keepalive_idle=sc.subflow.keepalive_idle,
                           keepalive_active=sc.subflow.keepalive_active,
                           dead_after=sc.subflow.dead_after, hold_max=sc.hold_max)
            if cfg.policies != old.policies:
                self._install_scheduler(ds.sess, ds.peer)

    def _status_part(self, now: float) -> dict:
        mine = [ds for ds in self.sessions.values() if ds.worker == self.index]
        entries, links, totals = statusdoc.session_entries(mine, now, self.cfg.base.mode == "duplicate",
                                                           self.hub)
        for k, v in self.counters.items():
            totals[k] = totals.get(k, 0) + v
        totals["worker_drops"] = totals.get("worker_drops", 0) + self.channel.drops
        fwd = {}
        if self.hub is not None:
            fwd = {ds.session_id: self.hub.site(ds) for ds in self.sessions.values()
                   if ds.worker != self.index}
        return {"sessions": entries, "links": links, "counters": totals, "forwarded": fwd}


def _adopt_tun(fd: int, name: str, offload: str):
    from mpvpn.io.tun import LinuxTun
    return LinuxTun.adopt(fd, name, offload)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="orayboxvpn data-path worker (started by the agent)")
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the main process reloads; it tells us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ch = Channel(socket.socket(fileno=args.fd))
    sel = selectors.DefaultSelector()
    sel.register(ch.sock, selectors.EVENT_READ)
    msgs, fds = [], []
    while not msgs:
        if not sel.select(30):
            return 1
        msgs, fds, eof = ch.receive()
        if eof and not msgs:
            return 1
    sel.close()
    _, index, n, cfg, name, tun_name, offload, log_mode = msgs[0]
    from mpvpn.io import logsink
    logsink.setup(log_mode, getattr(logging, cfg.base.log_level.upper(), logging.INFO))
    tun = _adopt_tun(fds.pop(0), tun_name, offload)
    agent = WorkerAgent(ch, index, n, cfg, name, tun)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    for m in msgs[1:]:
        agent._on_message(m, fds)
    try:
        return agent.run()
    except WorkerDied as e:
        log.error("worker %d: %s", index, e.strerror)
        return 1


if __name__ == "__main__":
    sys.exit(main())
