"""Seed 000's three-stage scheduler for an SMPU session (sans-I/O).

``make_scheduler(mode, **options)`` builds a :class:`Scheduler`; assign it
to ``Session.scheduler`` and the session does the rest::

    sess.scheduler = make_scheduler("aggregate", target_loss=0.001)

Modes (``base.mode``):

``duplicate``  seed 001: every packet on every established subflow, sent at
               once; no queue, NACK off.  The scheduler is then only the
               ``scheduler(packet, up, now) -> subflows`` hook.
``aggregate``  seed 000: capacity.  Stage 1 queues packets per flow and
               serves the flows by deficit round robin (urgent packets
               first); stage 2 pins a flow's first ``pin_bytes`` to one
               subflow, then sends each packet on the subflow where it is
               expected to arrive first; stage 3 duplicates urgent packets
               and retransmissions (the F term).  Packets leave the queue
               only while the chosen subflow's modelled backlog is under
               ``queue_target`` seconds (pacing), so the bottleneck queue
               -- and therefore fairness and priority -- is here and not in
               the modem.  NACK on.
``adaptive``   as aggregate, but each packet goes on the smallest set of
               subflows whose combined loss (product of the subflows'
               persistent loss rates, times the chance that a NACK re-send
               does not repair it in time) is at most ``target_loss``;
               copies go where there is room first; on all of them while
               the estimates are missing or stale.  NACK on.

Queueing schedulers (aggregate, adaptive with ``pace``) are driven by the
session through ``offer(packet, up, now)`` (decide at once while nothing is
queued, else queue), ``pull(up, now)`` and ``next_release()``; re-sends for
NACKs go through ``queue_retransmit`` / ``pull_retransmit``, ahead of
everything.  Every scheduler is also callable like the plain hook (an
immediate decision, no queue).  ``weights(up, now)`` gives each
subflow's normalised utility (seed 000's u_i) for status and LuCI;
``status(up, now)`` the details.  docs/scheduler.md explains the choices.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, fields

from mpvpn.core.fastpath import LOOPS as _LOOPS
from mpvpn.core.flows import classify, reasons
from mpvpn.core.linkstats import LinkMeter
from mpvpn.core.schedbase import PacketScheduler

__all__ = ["MODES", "LinkPolicy", "SchedulerOptions", "Scheduler", "make_scheduler"]

MODES = ("duplicate", "aggregate", "adaptive")
BUSY_DELAY_MIN = 0.003  # s: LinkMeter's default busy_delay, the floor of ours
NACK_INTERVAL = 0.005  # s: SessionConfig.nack_interval's default (repair time estimate)


@dataclass(frozen=True)
class LinkPolicy:
    """Per-host link policy (seed 004).

    A flow matches if its inner source address is in ``src`` and its
    destination in ``dst`` (either may be None = any).  The first matching
    policy applies.  ``carriers``: the subflows the flow may use, by carrier
    type (``sub.meta['type']``), subflow name or member id; None = any.
    ``exclusive``: those carriers are reserved -- flows that do not match
    this policy may not use them.  ``mode``: this flow's mode (overrides the
    scheduler's).  ``priority``: its flows form a strict priority class --
    while they have packets queued, other flows wait (urgent packets still
    go first); among themselves they share by DRR.  If none of the allowed carriers is up, the flow falls
    back to the unreserved ones (never to nothing while a subflow is up).
    """

    src: str | None = None
    dst: str | None = None
    carriers: tuple | None = None
    exclusive: bool = False
    mode: str | None = None
    name: str = ""
    priority: bool = False  # a strict priority class: queued ahead of other flows (stage 1)

    def __post_init__(self):
        for attr in ("src", "dst"):
            v = getattr(self, attr)
            if v is not None:
                ipaddress.ip_network(v, strict=False)  # raises ValueError if bad
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"policy mode must be one of {MODES}")
        if self.exclusive and not self.carriers:
            raise ValueError("an exclusive policy needs carriers")
        if self.carriers is not None:
            object.__setattr__(self, "carriers", tuple(str(c) for c in self.carriers))
        nets = tuple(None if v is None else ipaddress.ip_network(v, strict=False)
                     for v in (self.src, self.dst))
        object.__setattr__(self, "_nets", nets)

    def matches(self, key: tuple) -> bool:
        """Does the flow with this key (:func:`mpvpn.core.flows.classify`) match?"""
        version = key[0]
        if not version:
            return self.src is None and self.dst is None
        for net, addr in zip(self._nets, (key[2], key[3])):
            if net is None:
                continue
            if net.version != version or (int.from_bytes(addr, "big") & int(net.netmask)
                                          != int(net.network_address)):
                return False
        return True

    def allows(self, sub) -> bool:
        if self.carriers is None:
            return True
        return _carrier_match(self.carriers, sub)


def _carrier_match(carriers: tuple, sub) -> bool:
    return (str(sub.meta.get("type", "")) in carriers or sub.name in carriers
            or str(sub.member) in carriers)


_spread_run = None if _LOOPS is None else _LOOPS.spread_run
_urgent_run = None if _LOOPS is None else _LOOPS.urgent_run


@dataclass
class SchedulerOptions:
    """Every option of :func:`make_scheduler` (docs/scheduler.md has the table)."""

    target_loss: float = 0.001  # adaptive: wanted loss per packet (product of L_i)
    nack: bool | None = None  # ask the peer to re-send missing packets; None: on (every mode)
    pace: bool = True  # aggregate/adaptive: queue + DRR + pacing (False: immediate decisions)
    pin_bytes: int = 330_000  # stage 2: a flow's first bytes stay on one subflow
    flow_idle: float = 1.0  # s: a flow silent this long starts over (pinned again)
    max_flows: int = 4096  # flow table size (least recently seen idle flows forgotten)
    quantum: int = 1514  # DRR quantum, bytes
    queue_target: float = 0.015  # s: modelled backlog a subflow may hold before we queue
    queue_limit: float = 0.100  # s of the estimated total rate our queue may hold...
    queue_min_bytes: int = 65536  # ...but at least this many bytes
    queue_max_packets: int = 8192
    max_sojourn: float = 1.0  # s: older queued packets are dropped
    urgent: bool = True  # stage 3: urgent packets jump the queue and are duplicated
    small_bytes: int = 128  # packets up to this size count as urgent
    urgent_share: float = 0.10  # urgent budget: this share of the estimated capacity...
    urgent_min_rate: float = 64_000.0  # ...but at least this many bytes/s
    urgent_value: float = 100.0  # F for urgent packets (seed 000's objective)
    retransmit_value: float = 5.0  # F for retransmissions: a 2nd copy only above about 1 % loss
    retransmit_max_wait: float = 0.05  # s: a queued re-send waiting this long past its turn is dropped
    retransmit_queue: float = 0.03  # s: modelled backlog a re-send may still join (at least
    #                                 queue_target: re-sends are few and late; one that expires here is lost)
    copy_cost: float = 0.05  # beta: cost of each extra copy (in units of the best utility)
    loss_floor: float = 0.01  # loss assumed at least this in the F objective
    alpha_bytes: int = 1400  # alpha = 1/alpha_bytes: BW in packets/s next to 1/RTT
    initial_rate: float = 125_000.0  # bytes/s (1 Mbit/s) assumed before a subflow is measured
    stale_after: float = 3.0  # s without a probe answer (beyond the probe interval): stale
    suspect_nacks: int = 4  # a subflow is suspect once this many packets sent only on
    suspect_nack_ratio: float = 0.5  # it were NACKed lately, above this share of its sends
    loss_reports: int = 9  # adaptive: L_i is the median of this many recent loss reports...
    congestion_qdelay: float = 0.03  # ...made while the probes met less queue than this (s)
    repair_max: float = 0.2  # adaptive: count on a NACK re-send if one fits in this time (s)
    jitter_busy: float = 0.0  # > 0: a probe met a queue (LinkMeter.busy_delay) above this many
    #                           rttvar, at least 3 ms and at most 0.8 queue_target (0: 3 ms)
    policies: tuple = ()  # LinkPolicy, first match wins

    def validate(self) -> None:
        if not 0 < self.target_loss < 1:
            raise ValueError("target_loss must be in (0, 1)")
        if self.pin_bytes < 0 or self.quantum < 64 or self.max_flows < 1:
            raise ValueError("need pin_bytes >= 0, quantum >= 64, max_flows >= 1")
        if self.queue_target <= 0 or self.queue_limit <= 0 or self.max_sojourn <= 0:
            raise ValueError("queue_target, queue_limit and max_sojourn must be > 0")
        if self.retransmit_queue <= 0 or self.retransmit_max_wait <= 0:
            raise ValueError("retransmit_queue and retransmit_max_wait must be > 0")
        if self.queue_min_bytes < 1 or self.queue_max_packets < 1:
            raise ValueError("queue_min_bytes and queue_max_packets must be >= 1")
        if not 0 <= self.urgent_share <= 1 or self.urgent_min_rate < 0 or self.small_bytes < 0:
            raise ValueError("bad urgent budget")
        if self.urgent_value < 0 or self.retransmit_value < 0 or self.copy_cost < 0:
            raise ValueError("F and beta must be >= 0")
        if not 0 <= self.loss_floor < 1 or self.alpha_bytes < 1 or self.initial_rate <= 0:
            raise ValueError("bad loss_floor, alpha_bytes or initial_rate")
        if self.flow_idle <= 0 or self.stale_after <= 0:
            raise ValueError("flow_idle and stale_after must be > 0")
        if self.suspect_nacks < 1 or not 0 < self.suspect_nack_ratio <= 1:
            raise ValueError("bad suspect_nacks / suspect_nack_ratio")
        if (self.loss_reports < 1 or self.repair_max < 0 or self.jitter_busy < 0
                or self.congestion_qdelay <= 0):
            raise ValueError("need loss_reports >= 1, repair_max >= 0, jitter_busy >= 0 and "
                             "congestion_qdelay > 0")
        self.policies = tuple(self.policies)
        for p in self.policies:
            if not isinstance(p, LinkPolicy):
                raise ValueError("policies must be LinkPolicy objects")


class _View:
    """What the scheduler knows about one established subflow at one instant."""

    __slots__ = ("sub", "member", "meter", "rate", "owd", "srtt", "rttvar", "loss", "lrand", "ldiv",
                 "u", "suspect", "stale")

    def __init__(self, sub, now: float, opts: SchedulerOptions, hist: dict | None = None):
        self.sub = sub
        self.member = sub.member
        meter = sub.meter
        if meter is None:  # a bare Subflow (not from a Session): give it one
            meter = sub.attach_meter(LinkMeter(bw0=opts.initial_rate))
        self.meter = meter
        self.rate = meter.rate
        rtt = sub.rtt
        srtt = rtt.srtt if rtt.srtt is not None else 0.1
        self.srtt = rtt.srtt
        self.rttvar = var = rtt.rttvar
        base = rtt.min_rtt if rtt.min_rtt is not None else srtt
        self.owd = base / 2
        if var is not None and opts.jitter_busy:
            # The meter calls a probe "busy" (it met a queue) above busy_delay
            # of queueing delay, measured against the path's minimum RTT.  On a
            # path with jitter every probe is that much above the minimum:
            # the threshold has to clear the jitter (rttvar, the mean
            # deviation of the RTT), or app-limited rate samples are taken for
            # a busy link and pull the estimate down to what we happened to
            # send (docs/scheduler.md, "Delay and jitter").
            # Off by default: the same threshold gates the meter's growth,
            # which then runs past the carrier's rate in the lab.
            bd = opts.jitter_busy * var
            cap = 0.8 * opts.queue_target
            meter.busy_delay = BUSY_DELAY_MIN if bd < BUSY_DELAY_MIN else (cap if bd > cap else bd)
        loss = sub.loss
        self.loss = loss
        # adaptive: the loss that is not congestion -- the median of the last
        # few reports (one per probe from the peer) made while the link's
        # queue was not overflowing -- so that a burst of queue-overflow
        # drops in one probe interval, or a link we overfill (its rate
        # over-estimated: the probes meet a queue far above our target),
        # buys no copies
        self.lrand = loss
        if hist is not None and loss is not None:
            key = sub.loss_in.probes
            h = hist.get(self.member)
            if h is None or h[0] is not sub:
                h = hist[self.member] = [sub, None, deque(maxlen=opts.loss_reports), loss,
                                         deque(maxlen=4)]
            if key != h[1]:
                h[1] = key
                # the queue our last few echoed probes met: a report covers
                # the interval before it, and the echo is an RTT old
                qds = h[4]
                if meter.probe_qdelay is not None:
                    qds.append(meter.probe_qdelay)
                if not qds or max(qds) < opts.congestion_qdelay or not h[2]:
                    h[2].append(loss)
                    vals = sorted(h[2])
                    h[3] = vals[len(vals) // 2]  # of an even count, the upper one
            self.lrand = h[3]
        # eta's stretch for loss (0.0: none); the same float eta always divided by
        self.ldiv = 1.0 - min(loss, 0.9) if loss else 0.0
        # seed 000: f = 1/RTT + alpha*BW (alpha = 1/alpha_bytes), u = (1-L) f
        self.u = (1.0 - (loss or 0.0)) * (1.0 / max(srtt, 1e-4) + self.rate / opts.alpha_bytes)
        # suspect (Subflow.suspect: probes unanswered too long) -- no new
        # traffic -- before it is dead
        last = sub.last_answer
        self.suspect = sub.suspect(now)
        if last is None:
            self.stale = True
        else:
            self.stale = (loss is None or rtt.srtt is None
                          or now - last > sub.config.keepalive_idle + opts.stale_after)
        # NACKs are faster evidence: most of what went out only here lately
        # was asked for again (a carrier that just died drops everything).
        if (meter.nacked_recently(now) >= opts.suspect_nacks
                and meter.nack_ratio(now) > opts.suspect_nack_ratio):
            self.suspect = True

    # The meter's backlog and rate are read live (LinkMeter.backlog inlined:
    # these run several times per packet).

    def qdelay(self, now: float) -> float:
        m = self.meter
        bw = m.bw
        rate = bw if bw is not None else m.bw0
        q = m.q - rate * (now - m.t)
        return (q if q > 0.0 else 0.0) / rate

    def score(self, now: float, alpha_bytes: int) -> float:
        """Seed 000's per-interface term u_i / (1 + buf_i), buf_i in queued packets."""
        return self.u / (1.0 + self.meter.backlog(now) / alpha_bytes)

    def eta(self, size: int, now: float) -> float:
        """When a packet of ``size`` sent now is expected to arrive (relative, s),
        stretched by the loss rate (expected delivery per attempt)."""
        m = self.meter
        bw = m.bw
        rate = bw if bw is not None else m.bw0
        q = m.q - rate * (now - m.t)
        t = self.owd + ((q if q > 0.0 else 0.0) + size) / rate
        ldiv = self.ldiv
        if ldiv:
            t /= ldiv
        return t


class _Flow:
    __slots__ = ("key", "q", "qbytes", "deficit", "sent", "last", "pinned", "active", "policy",
                 "mode", "packets")

    def __init__(self, key, now, policy, mode):
        self.key = key
        self.q: deque = deque()  # (packet, urgent, enqueued_at)
        self.qbytes = 0
        self.deficit = 0
        self.sent = 0  # bytes released since the flow (re)started: pinning
        self.packets = 0
        self.last = now
        self.pinned = None  # member
        self.active = False
        self.policy = policy
        self.mode = mode


class Scheduler(PacketScheduler):
    """The three stages for one session.  Build it with :func:`make_scheduler`."""

    def __init__(self, mode: str, options: SchedulerOptions | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        opts = options or SchedulerOptions()
        opts.validate()
        self.mode = mode
        self.options = opts
        # every mode asks by default; duplicate mode only for what chance
        # explains (Session._update_ask_budget): docs/performance.md "Loss repair"
        self.nack = True if opts.nack is None else bool(opts.nack)
        self.queueing = mode != "duplicate" and opts.pace
        self._policies = opts.policies
        self._reserved = tuple(p for p in opts.policies if p.exclusive)
        self._flows: OrderedDict = OrderedDict()
        self._mru = None  # the flow last seen: the last entry of _flows
        self._active: deque = deque()  # flows with queued packets, DRR order
        self._active_prio: deque = deque()  # the same for flows of priority policies, served first
        self._urgent: deque = deque()  # (packet, flow): strict priority
        self._retx: deque = deque()  # (seq, carried, size, expires_at): before everything
        self._retx_bytes = 0  # their sizes
        self._qbytes = 0
        self._qpackets = 0
        self._release_at: float | None = None
        self._views_up = None
        self._views_t = -math.inf
        self._views: list = []
        self._good: list = []  # the views that are not suspect (or all)
        self._cv_for = None  # the views list _cv describes
        self._cv: tuple = ()  # what the C runs read of those views (_c_views)
        self._fviews: dict = {}  # id(policy) -> _flow_views for the current views
        self._rate_sum = 0.0
        self._repair = None  # id(views) -> {None: repair fits, member: P(repair fails)}
        self._loss_hist: dict = {}  # member -> [sub, probes seen, recent loss reports, median]
        # Does the peer ask for missing packets (NACK)?  None: as we do (the
        # same base.mode on both sites); the agent may set it from the peer's mode.
        self.peer_nack: bool | None = None
        self._utokens = 0.0
        self._ut = None
        self._urate = None  # (views, urgent budget rate): the sum over a views list, once
        # counters
        self.c = {
            "enqueued": 0, "released": 0, "urgent": 0, "urgent_over_budget": 0,
            "urgent_copies": 0, "pinned": 0, "spread": 0, "copies": 0, "dropped_overflow": 0,
            "dropped_sojourn": 0, "blocked": 0, "retransmit_copies": 0, "flows_created": 0,
            "retransmits_queued": 0, "retransmits_expired": 0,
        }
        self.urgent_by_reason: dict[str, int] = {}

    # -- link views ------------------------------------------------------------

    VIEW_TTL = 0.001  # s: link views are rebuilt at most this often (backlogs are live)

    def _all_views(self, up, now: float) -> list:
        if up is not self._views_up or not 0.0 <= now - self._views_t < self.VIEW_TTL:
            opts = self.options
            views = [_View(s, now, opts, self._loss_hist) for s in up]
            self._views = views
            self._good = [v for v in views if not v.suspect] or views
            self._fviews = {}
            self._repair = None
            self._rate_sum = sum(v.rate for v in views)
            self._views_up = up
            self._views_t = now
        return self._views

    def _c_views(self, views: list) -> tuple:
        """What the C runs (spread_run, urgent_run) take of ``views``: a
        [subflow] list per view (what ``decided`` holds for a packet sent on
        it alone), the subflows, their meters (read there at ``now``), owd,
        ldiv and loss as floats.  The same until the views are rebuilt."""
        if self._cv_for is not views:
            self._cv = ([[v.sub] for v in views], [v.sub for v in views], [v.meter for v in views],
                        [v.owd for v in views], [float(v.ldiv or 0.0) for v in views],
                        [float(v.loss or 0.0) for v in views])
            self._cv_for = views
        return self._cv

    def _flow_views(self, fl: _Flow, up, now: float) -> list:
        """The subflows this flow may use: policy-allowed, not suspect (unless
        that leaves none)."""
        views = self._all_views(up, now)
        pol = fl.policy
        if pol is None and not self._reserved:
            return self._good
        # depends only on the views (rebuilt: cache dropped) and the policy
        cached = self._fviews.get(id(pol))
        if cached is not None:
            return cached
        if pol is not None and pol.carriers is not None:
            allowed = [v for v in views if pol.allows(v.sub)]
            if not allowed:
                allowed = [v for v in views if not self._is_reserved(v.sub, pol)]
        elif self._reserved:
            allowed = [v for v in views if not self._is_reserved(v.sub, pol)]
        else:
            allowed = views
        if not allowed:
            allowed = views
        good = [v for v in allowed if not v.suspect] or allowed
        self._fviews[id(pol)] = good
        return good

    def _is_reserved(self, sub, own) -> bool:
        for p in self._reserved:
            if p is not own and p.allows(sub):
                return True
        return False

    # -- flows -----------------------------------------------------------------

    def _flow(self, key, now: float) -> _Flow:
        flows = self._flows
        fl = flows.get(key)
        if fl is None:
            pol = None
            for p in self._policies:
                if p.matches(key):
                    pol = p
                    break
            mode = pol.mode if pol is not None and pol.mode is not None else self.mode
            fl = _Flow(key, now, pol, mode)
            flows[key] = fl
            self.c["flows_created"] += 1
            if len(flows) > self.options.max_flows:
                for k, old in flows.items():
                    if not old.q and old is not fl:
                        del flows[k]
                        break
        else:
            if now - fl.last > self.options.flow_idle and not fl.q:
                fl.sent = 0  # a new burst (say the next web object): pin again
                fl.pinned = None
            if fl is not self._mru:  # else it is the last entry already
                flows.move_to_end(key)
        fl.last = now
        self._mru = fl
        return fl

    # -- choices -----------------------------------------------------------------

    def _urgent_ok(self, n: int, views, now: float) -> bool:
        """Token bucket for queue jumping: urgent_share of the estimated capacity."""
        self._urgent_refill(views, now)
        if self._utokens >= n:
            self._utokens -= n
            return True
        return False

    def _urgent_refill(self, views, now: float) -> None:
        """The urgent budget's refill up to ``now`` (its burst when new)."""
        o = self.options
        cached = self._urate
        if cached is not None and cached[0] is views:  # the same views: the same rates
            rate = cached[1]
        else:
            rate = max(o.urgent_min_rate, o.urgent_share * sum(v.rate for v in views))
            self._urate = (views, rate)
        burst = max(16384.0, 0.05 * rate)
        if self._ut is None:
            self._utokens = burst
        else:
            self._utokens = min(burst, self._utokens + rate * max(0.0, now - self._ut))
        self._ut = now

    def _urgent_run(self, packets: list, i: int, key, fl: _Flow, views, now: float,
                    overhead: int) -> tuple:
        """Stage 3 for the urgent packets of ``fl`` from ``packets[i]`` on, in
        the C loops (``urgent_run``: _urgent_ok and _objective_set per packet,
        the same arithmetic), recorded as offer_many records them: the meters
        (``on_send_seq``), the flow, the urgent counters and the budget.
        Returns (end, decided, copies); end == i when the C loop took nothing
        (the budget does not hold packets[i]: the Python path says so)."""
        o = self.options
        self._urgent_refill(views, now)
        _, subs, meters, owd, ldiv, loss = self._c_views(views)
        j, part, sizes, nbytes, copies, self._utokens, urgs = _urgent_run(
            packets, i, key, o.small_bytes, subs, meters, now, owd, ldiv, loss, o.urgent_value,
            o.loss_floor, o.copy_cost, self._utokens, overhead)
        if j > i:
            for m, sz in zip(meters, sizes):
                if sz:
                    m.on_send_seq(sz, now)
            fl.sent += nbytes
            fl.packets += j - i
            c = self.c
            c["urgent"] += j - i
            c["urgent_copies"] += copies
            by = self.urgent_by_reason
            for urg, k in urgs.items():
                for name in reasons(urg):
                    by[name] = by.get(name, 0) + k
        return j, part, copies

    def _objective_set(self, views, F: float, now: float, size: int = 0, first=None,
                       extra=None) -> list:
        """Seed 000's objective for one packet, greedily.

        The first subflow is the one where the packet arrives first (``first``
        if given); then, among ``extra`` (default: the other ``views``), the
        subflow with the largest gain ``F * prod(L_S) * (1 - L_j) - beta`` is
        added while that gain is positive (lowest loss first, earliest arrival
        breaking ties).  Loss is floored at ``loss_floor``: estimates are
        never certain, and a lost SYN costs a second.  With F = 0 this is the
        single best subflow; a large F buys copies."""
        o = self.options
        floor = o.loss_floor
        etas = None
        if first is None:
            # min(views, key=eta): the first of the earliest.  Nothing changes
            # the meters during this call, so each eta is taken once (inlined
            # _View.eta: the same arithmetic) and reused for the copies.
            etas = []
            best_t = math.inf
            for v in views:
                m = v.meter
                bw = m.bw
                rate = bw if bw is not None else m.bw0
                q = m.q - rate * (now - m.t)
                t = v.owd + ((q if q > 0.0 else 0.0) + size) / rate
                ldiv = v.ldiv
                if ldiv:
                    t /= ldiv
                etas.append(t)
                if first is None or t < best_t:
                    first, best_t = v, t
        chosen = [first]
        p = first.loss or 0.0
        if p < floor:
            p = floor
        if not F > 0:
            return chosen
        beta = o.copy_cost
        # (floored loss, eta) of the candidates, in their order; the least
        # first (min over the tuples: the first of equals), while it pays
        rest = []
        if extra is None and etas is not None:
            for v, t in zip(views, etas):
                if v is not first:
                    lv = v.loss or 0.0
                    rest.append((lv if lv > floor else floor, t, v))
        else:
            for v in (views if extra is None else extra):
                if v is not first:
                    lv = v.loss or 0.0
                    rest.append((lv if lv > floor else floor, v.eta(size, now), v))
        while rest:
            j = 0
            bl, be, _ = rest[0]
            for i in range(1, len(rest)):
                li, ei, _ = rest[i]
                if li < bl or (li == bl and ei < be):
                    j, bl, be = i, li, ei
            if F * p * (1.0 - bl) - beta <= 0:
                break
            chosen.append(rest.pop(j)[2])
            p *= bl
        return chosen

    def repair_time(self, views) -> float | None:
        """How long a NACK repair takes (s): the loss shows once the slowest
        subflow overtook it, the NACK crosses a fast subflow and the re-send
        another one (the session's hold formula, ``Session._update_hold``)."""
        srtts = sorted(v.srtt for v in views if v.srtt is not None)
        if not srtts:
            return None
        var = max(v.rttvar for v in views if v.rttvar is not None)
        second = srtts[1] if len(srtts) > 1 else srtts[0]
        return (srtts[-1] - srtts[0]) / 2 + 1.5 * second + 4 * var + NACK_INTERVAL

    def _repair_miss(self, primary: _View, views) -> float:
        """P(a packet lost on ``primary`` is not repaired by a NACK re-send in
        time): 1 when the peer does not NACK or a repair takes longer than
        ``repair_max``; else the loss of the best other subflow the re-send
        can take (re-sends get a second copy above ~1 % loss), at least
        ``loss_floor``."""
        caches = self._repair
        if caches is None:
            caches = self._repair = {}
        cache = caches.get(id(views))  # views: all subflows or a policy's (cached) subset
        if cache is None:
            cache = caches[id(views)] = {}
            nack = self.nack if self.peer_nack is None else self.peer_nack
            t = self.repair_time(views) if nack else None
            cache[None] = t is not None and t <= self.options.repair_max
        miss = cache.get(primary.member)
        if miss is None:
            if not cache[None]:
                miss = 1.0
            else:
                others = [v.lrand for v in views
                          if v is not primary and not v.stale and not v.suspect]
                best = min(others) if others else primary.lrand
                miss = max(self.options.loss_floor, best)
            cache[primary.member] = miss
        return miss

    def _adaptive_set(self, primary: _View, views, now: float) -> list:
        """Smallest set with prod(L) * P(repair fails) <= target: the stage-2
        subflow, then copies on subflows with room (a copy costs capacity like
        any packet), earliest arrival first, then on full ones; every subflow
        if the fresh estimates cannot show the target is met.  L is the
        persistent loss (``_View.lrand``)."""
        if primary.stale:
            return views
        target = self.options.target_loss
        p = primary.lrand
        if p <= target:
            return [primary]
        p *= self._repair_miss(primary, views)
        chosen = [primary]
        if p > target:
            qt = self.options.queue_target
            rest = sorted((v for v in views if v is not primary and not v.stale),
                          key=lambda v: (v.qdelay(now) >= qt, v.eta(0, now)))
            for v in rest:
                chosen.append(v)
                p *= v.lrand
                if p <= target:
                    break
            if p > target:
                return views  # stale or too lossy: full duplication
        return chosen

    def _choose(self, fl: _Flow, size: int, views, now: float, gate: bool):
        """Stage 2 (and adaptive redundancy) for one ordinary packet.

        Returns the subflows (list of _View) or None when ``gate`` is set and
        the subflow(s) this flow may use are full (blocked)."""
        o = self.options
        target = o.queue_target
        mode = fl.mode
        if mode == "duplicate":
            if gate and not any(v.qdelay(now) < target for v in views):
                for v in views:
                    v.meter.held = True
                return None
            return views
        if fl.sent < o.pin_bytes:
            pv = None
            pinned = fl.pinned
            if pinned is not None:
                for v in views:
                    if v.member == pinned:
                        pv = v
                        break
            if pv is None:
                cands = [v for v in views if v.qdelay(now) < target] if gate else views
                if not cands:
                    for v in views:
                        v.meter.held = True
                    return None
                ab = o.alpha_bytes
                pv = max(cands, key=lambda v: v.score(now, ab))
                fl.pinned = pv.member
            elif gate and pv.qdelay(now) >= target:
                pv.meter.held = True
                return None
            self.c["pinned"] += 1
            primary = pv
        else:
            # the subflow where the packet arrives first (_View.eta), among
            # those with room (_View.qdelay) if gated -- inlined: hot path
            best = None
            best_t = math.inf
            for v in views:
                m = v.meter
                rate = m.bw
                if rate is None:
                    rate = m.bw0
                q = m.q - rate * (now - m.t)
                if not q > 0.0:
                    q = 0.0
                if gate and q / rate >= target:
                    continue
                t = v.owd + (q + size) / rate
                ldiv = v.ldiv
                if ldiv:
                    t /= ldiv
                if t < best_t:
                    best, best_t = v, t
            if best is None:
                for v in views:
                    v.meter.held = True
                return None
            self.c["spread"] += 1
            primary = best
        if mode == "adaptive":
            return self._adaptive_set(primary, views, now)
        return [primary]

    def _note_urgent(self, urg: int) -> None:
        self.c["urgent"] += 1
        by = self.urgent_by_reason
        for name in reasons(urg):
            by[name] = by.get(name, 0) + 1

    def _release(self, fl: _Flow, size: int, chosen) -> list:
        fl.sent += size
        fl.packets += 1
        self.c["released"] += 1
        if len(chosen) > 1:
            self.c["copies"] += len(chosen) - 1
        return [v.sub for v in chosen]

    # -- the plain hook: an immediate decision ------------------------------------

    @property
    def initial_rate(self) -> float:
        """Bytes/s a new subflow's meter assumes (``options.initial_rate``)."""
        return self.options.initial_rate

    @property
    def duplicates_everything(self) -> bool:
        """Every packet goes on every established subflow (duplicate mode, no
        policies): the session may then batch without asking per packet."""
        return self.mode == "duplicate" and not self._policies

    def __call__(self, packet: bytes, up, now: float):
        """``scheduler(packet, up, now) -> subflows``: decide at once (no queue)."""
        if self.mode == "duplicate" and not self._policies:
            return up
        if not up:
            return ()
        key, urg = classify(packet, self.options.small_bytes)
        fl = self._flow(key, now)
        views = self._flow_views(fl, up, now)
        n = len(packet)
        if urg and self.options.urgent and fl.mode != "duplicate":
            if self._urgent_ok(n, views, now):
                self._note_urgent(urg)
                chosen = self._objective_set(views, self.options.urgent_value, now, n)
                self.c["urgent_copies"] += len(chosen) - 1
                return self._release(fl, n, chosen)
            self.c["urgent_over_budget"] += 1
        return self._release(fl, n, self._choose(fl, n, views, now, gate=False))

    # -- the queue: stage 1 ------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """User packets the queue dropped (overflow or too old)."""
        return self.c["dropped_overflow"] + self.c["dropped_sojourn"]

    @property
    def pending(self) -> int:
        """Packets (and re-sends) waiting in the scheduler."""
        return self._qpackets + len(self._urgent) + len(self._retx)

    def offer(self, packet: bytes, up, now: float):
        """``enqueue`` + ``pull`` for the common case: while nothing is queued,
        a packet that may leave now is decided at once (the subflows to send it
        on are returned); otherwise it is queued (None)."""
        if self._qpackets or self._urgent or not up:
            return None if self.enqueue(packet, up, now) else False
        o = self.options
        key, urg = classify(packet, o.small_bytes)
        fl = self._flow(key, now)
        n = len(packet)
        c = self.c
        c["enqueued"] += 1
        if fl.policy is None and not self._reserved:  # _flow_views, short
            self._all_views(up, now)
            views = self._good
        else:
            views = self._flow_views(fl, up, now)
        if urg and o.urgent and fl.mode != "duplicate":
            if self._urgent_ok(n, views, now):
                self._note_urgent(urg)
                chosen = self._objective_set(views, o.urgent_value, now, n)
                c["urgent_copies"] += len(chosen) - 1
                return self._release(fl, n, chosen)
            c["urgent_over_budget"] += 1
        chosen = self._choose(fl, n, views, now, True)
        if chosen is not None:  # _release, inlined
            fl.sent += n
            fl.packets += 1
            c["released"] += 1
            k = len(chosen)
            if k == 1:
                return [chosen[0].sub]
            c["copies"] += k - 1
            return [v.sub for v in chosen]
        self._release_at = None
        self._push(fl, packet, 0, now, up)
        return None

    def offer_many(self, packets: list, start: int, up, now: float, overhead: int):
        """:meth:`offer` for ``packets[start:]`` in order, each packet sent at
        once recorded on its subflows' meters (``meter.on_send(len(packet) +
        overhead, now)``, what the session records for a datagram) before the
        next is decided.  The same decisions, counters and state as ``offer``
        packet by packet with the session recording each send (smpu_send's
        batch path), with less work per packet: a run of packets of one flow
        looks its flow and subflows up once (``now`` is the same for all: the
        link views stay valid), counters are added once, and stage 2 of an
        ordinary packet is inlined.

        Stops after the first packet that is not sent at once.  Returns
        ``(end, decided, last)``: ``decided[k]`` lists the subflows for
        ``packets[start + k]``; if ``end > start + len(decided)``,
        ``packets[end - 1]`` was queued (``last`` is None) or dropped
        (``last`` is False), and the session lets the queue release what it
        may (``pull``) before it offers the rest, as after ``offer``.
        """
        decided: list = []
        end = len(packets)
        i = start
        if i >= end:
            return i, decided, True
        if not up:
            return i + 1, decided, self.offer(packets[i], up, now)
        o = self.options
        c = self.c
        small = o.small_bytes
        urgent_on = o.urgent
        target = o.queue_target
        pin_bytes = o.pin_bytes
        simple = not self._reserved
        append = decided.append
        fl = key0 = views = None
        enq = rel = npinned = nspread = ncopies = 0
        last = True
        run_c = _spread_run  # the spread case in the C loops (None: not built)
        spread_c = False  # may the current flow's next packets go through run_c?
        urgent_c = False  # may its urgent packets go through _urgent_run?
        try:
            while i < end:
                if self._qpackets or self._urgent:
                    # behind what is queued: offer queues it (or drops it)
                    last = self.offer(packets[i], up, now)
                    i += 1
                    break
                if spread_c and fl.sent >= pin_bytes:
                    # the rest of this flow's run, spread case, decided in C
                    ones, _, meters, owd, ldiv, _ = self._c_views(views)
                    j, part, sizes, nbytes = run_c(
                        packets, i, key0, small, urgent_on, ones, meters, now, owd, ldiv, target,
                        overhead)
                    if j > i:
                        k = j - i
                        for v, sz in zip(views, sizes):
                            if sz:
                                v.meter.on_send_seq(sz, now)
                        fl.sent += nbytes
                        fl.packets += k
                        enq += k
                        rel += k
                        nspread += k
                        decided += part
                        i = j
                        if i >= end:
                            break
                p = packets[i]
                i += 1
                key, urg = classify(p, small)
                if fl is None or key != key0:
                    # offer's lookups; for the next packets of this flow they
                    # change nothing (same now: fl.last, the LRU order and the
                    # views stay as they are)
                    fl = self._flow(key, now)
                    key0 = key
                    if fl.policy is None and simple:
                        self._all_views(up, now)
                        views = self._good
                        spread_c = run_c is not None and fl.mode == "aggregate" and len(views) <= 64
                        urgent_c = urgent_on and _urgent_run is not None and 0 < len(views) <= 64
                    else:
                        views = self._flow_views(fl, up, now)
                        spread_c = urgent_c = False
                n = len(p)
                enq += 1
                mode = fl.mode
                chosen = primary = None
                if urg and urgent_on and mode != "duplicate":
                    if urgent_c:  # this flow's run of urgent packets, in C
                        j, part, k = self._urgent_run(packets, i - 1, key0, fl, views, now, overhead)
                        if j >= i:
                            enq += j - i
                            rel += j - i + 1
                            ncopies += k
                            decided += part
                            i = j
                            continue
                    if self._urgent_ok(n, views, now):
                        self._note_urgent(urg)
                        chosen = self._objective_set(views, o.urgent_value, now, n)
                        c["urgent_copies"] += len(chosen) - 1
                    else:
                        c["urgent_over_budget"] += 1
                        chosen = self._choose(fl, n, views, now, True)
                elif mode == "duplicate":
                    chosen = self._choose(fl, n, views, now, True)
                elif fl.sent < pin_bytes:
                    pinned = fl.pinned
                    if pinned is not None:
                        for v in views:
                            if v.member == pinned:
                                primary = v
                                break
                    if primary is None:  # not pinned yet, or its subflow is gone
                        chosen = self._choose(fl, n, views, now, True)
                    else:  # _choose's pinned case, inlined (gate: room on it)
                        m = primary.meter
                        bw = m.bw
                        rate = bw if bw is not None else m.bw0
                        q = m.q - rate * (now - m.t)
                        if (q if q > 0.0 else 0.0) / rate >= target:
                            m.held = True
                            primary = None
                        else:
                            npinned += 1
                else:
                    # _choose's spread case, inlined: the subflow with room
                    # where the packet arrives first
                    best_t = math.inf
                    for v in views:
                        m = v.meter
                        rate = m.bw
                        if rate is None:
                            rate = m.bw0
                        q = m.q - rate * (now - m.t)
                        if not q > 0.0:
                            q = 0.0
                        if q / rate >= target:
                            continue
                        t = v.owd + (q + n) / rate
                        ldiv = v.ldiv
                        if ldiv:
                            t /= ldiv
                        if t < best_t:
                            primary, best_t = v, t
                    if primary is None:
                        for v in views:
                            v.meter.held = True
                    else:
                        nspread += 1
                if primary is not None:
                    if mode == "adaptive":
                        chosen = self._adaptive_set(primary, views, now)
                    else:
                        fl.sent += n
                        fl.packets += 1
                        rel += 1
                        primary.meter.on_send(n + overhead, now)
                        append([primary.sub])
                        continue
                if chosen is None:  # blocked: queued (offer's tail)
                    self._release_at = None
                    self._push(fl, p, 0, now, up)
                    last = None
                    break
                fl.sent += n
                fl.packets += 1
                rel += 1
                dlen = n + overhead
                k = len(chosen)
                if k == 1:
                    v = chosen[0]
                    v.meter.on_send(dlen, now)
                    append([v.sub])
                else:
                    ncopies += k - 1
                    subs = []
                    for v in chosen:
                        v.meter.on_send(dlen, now)
                        subs.append(v.sub)
                    append(subs)
        finally:
            c["enqueued"] += enq
            c["released"] += rel
            c["pinned"] += npinned
            c["spread"] += nspread
            c["copies"] += ncopies
        return i, decided, last

    def enqueue(self, packet: bytes, up, now: float) -> bool:
        """Queue one user packet; False if it was dropped at once."""
        o = self.options
        key, urg = classify(packet, o.small_bytes)
        fl = self._flow(key, now)
        n = len(packet)
        self.c["enqueued"] += 1
        self._release_at = None
        if urg and o.urgent and fl.mode != "duplicate":
            views = self._flow_views(fl, up, now) if up else []
            if views and self._urgent_ok(n, views, now):
                self._note_urgent(urg)
                if not fl.q:
                    self._urgent.append((packet, fl))
                    if len(self._urgent) > 1024:
                        self._urgent.popleft()
                        self.c["dropped_overflow"] += 1
                    return True
                # behind packets of its own flow (a FIN after data): it keeps
                # its place, and is duplicated when it leaves
            else:
                self.c["urgent_over_budget"] += 1
                urg = 0
        else:
            urg = 0
        return self._push(fl, packet, urg, now, up)

    def _push(self, fl: _Flow, packet: bytes, urg: int, now: float, up) -> bool:
        o = self.options
        n = len(packet)
        fl.q.append((packet, urg, now))
        fl.qbytes += n
        self._qbytes += n
        self._qpackets += 1
        if not fl.active:
            fl.active = True
            fl.deficit = 0
            self._active_of(fl).append(fl)
        if up:
            self._all_views(up, now)
            limit = max(o.queue_min_bytes, o.queue_limit * self._rate_sum)
        else:
            limit = o.queue_min_bytes
        ok = True
        if self._qbytes <= limit and self._qpackets <= o.queue_max_packets:
            return ok
        while self._qbytes > limit or self._qpackets > o.queue_max_packets:
            victim = max(self._active or self._active_prio, key=lambda f: f.qbytes)  # the fattest flow
            pkt, _u, _t = victim.q.popleft()
            if victim is fl and not fl.q:
                ok = False
            self._dequeued(victim, len(pkt))
            self.c["dropped_overflow"] += 1
        return ok

    def _dequeued(self, fl: _Flow, n: int) -> None:
        fl.qbytes -= n
        self._qbytes -= n
        self._qpackets -= 1
        if not fl.q:
            fl.active = False
            fl.deficit = 0
            try:
                self._active_of(fl).remove(fl)
            except ValueError:  # pragma: no cover - active flows are always listed
                pass

    def _active_of(self, fl: _Flow) -> deque:
        """The DRR list a flow waits in: the priority class's or everyone else's."""
        pol = fl.policy
        return self._active_prio if pol is not None and pol.priority else self._active

    def pull(self, up, now: float):
        """The next packet to send and its subflows, or None (nothing may go now).

        Urgent packets first (strict priority), then DRR over the flows; a
        flow whose subflow(s) are full is skipped this round.
        """
        if not up:
            return None
        o = self.options
        urgent = self._urgent
        if urgent:
            packet, fl = urgent.popleft()
            views = self._flow_views(fl, up, now)
            chosen = self._objective_set(views, o.urgent_value, now, len(packet))
            self.c["urgent_copies"] += len(chosen) - 1
            return packet, self._release(fl, len(packet), chosen)
        if not self._active and not self._active_prio:
            if not self._retx:
                self._release_at = None
            return None
        target = o.queue_target
        # Nothing can leave while no subflow has room: say when one will.
        earliest = self._no_room(up, now)
        if earliest is not None:
            self._blocked_pull(now, earliest)
            return None
        release_at = math.inf
        max_sojourn = o.max_sojourn
        # Nothing changes in this loop until a packet leaves, so a flow found
        # blocked stays blocked with the same head packet: remembered (same
        # count, same release time) instead of deciding it again.
        blocked = None
        # the priority class first (strict), then everyone else, DRR in each
        active = self._active_prio
        if not active:
            active = self._active
        tries = 2 * len(active) + 1
        while True:
            if not (active and tries > 0):
                if active is self._active or not self._active:
                    break
                active = self._active  # the priority class has nothing that may go now
                tries = 2 * len(active) + 1
                continue
            tries -= 1
            fl = active[0]
            head = fl.q[0]
            packet, urg, t_in = head
            n = len(packet)
            if now - t_in > max_sojourn:
                fl.q.popleft()
                self._dequeued(fl, n)
                self.c["dropped_sojourn"] += 1
                tries += 1
                continue
            if fl.deficit < n:
                fl.deficit += o.quantum
                active.rotate(-1)
                continue
            if blocked is not None and blocked.get(fl) is head:
                self.c["blocked"] += 1
                active.rotate(-1)
                continue
            if fl.policy is None and not self._reserved:  # _flow_views, short
                views = self._good  # fresh: _all_views ran above, same now
            else:
                views = self._flow_views(fl, up, now)
            if urg and fl.mode != "duplicate":  # queued behind its own flow: no jump, copies
                chosen = self._objective_set(views, o.urgent_value, now, n)
                if not any(v.qdelay(now) < target for v in chosen):
                    chosen = None
            else:
                chosen = self._choose(fl, n, views, now, gate=True)
            if chosen is None:
                self.c["blocked"] += 1
                # when could this flow go?  (the earliest of its candidate subflows)
                if fl.pinned is not None and fl.sent < o.pin_bytes and fl.mode != "duplicate":
                    cand = [v for v in views if v.member == fl.pinned] or views
                else:
                    cand = views
                for v in cand:
                    t = now + (v.qdelay(now) - target)
                    if t < release_at:
                        release_at = t
                if blocked is None:
                    blocked = {}
                blocked[fl] = head
                active.rotate(-1)
                continue
            fl.q.popleft()
            fl.deficit -= n
            self._dequeued(fl, n)
            # _release, inlined
            fl.sent += n
            fl.packets += 1
            c = self.c
            c["released"] += 1
            k = len(chosen)
            if k == 1:
                return packet, [chosen[0].sub]
            c["copies"] += k - 1
            return packet, [v.sub for v in chosen]
        if self.pending:
            t = max(release_at, now + 1e-4) if release_at < math.inf else now + 1e-3
            if self._retx and self._release_at is not None and self._release_at > now:
                t = min(t, self._release_at)  # set by a blocked re-send meanwhile
            self._release_at = t
        else:
            self._release_at = None
        return None

    def _no_room(self, up, now: float) -> float | None:
        """None if a subflow has room now (its modelled delay below
        ``queue_target``), else the least wait until one has."""
        target = self.options.queue_target
        earliest = math.inf
        for v in self._all_views(up, now):
            m = v.meter  # wait = qdelay - target (inlined)
            rate = m.bw
            if rate is None:
                rate = m.bw0
            q = m.q - rate * (now - m.t)
            if not q > 0.0:
                q = 0.0
            wait = q / rate - target
            if wait < 0.0:
                return None
            if wait < earliest:
                earliest = wait
        return earliest

    def _blocked_pull(self, now: float, earliest: float) -> None:
        """What a ``pull`` that finds no subflow with room records."""
        for v in self._views:
            v.meter.held = True
        self.c["blocked"] += 1
        t = now + max(earliest, 1e-4)
        if self._retx and self._release_at is not None and self._release_at > now:
            t = min(t, self._release_at)
        self._release_at = t

    def offer_blocked(self, packets: list, start: int, up, now: float) -> tuple:
        """:meth:`PacketScheduler.offer_blocked`: while no subflow has room
        now (nothing is sent meanwhile, so none gets any) and no urgent
        packet or re-send waits (those ``pull`` and the pump take first),
        each packet is queued (``offer`` behind the queue: ``enqueue``) and
        the session's ``pull`` after it recorded as blocked.  An urgent
        packet put in the urgent queue ends the run (``pump``: it leaves
        without room)."""
        end = len(packets)
        i = start
        if (i >= end or not up or self._urgent or self._retx or not self._qpackets
                or not (self._active or self._active_prio)):
            return i, 0, False
        earliest = self._no_room(up, now)
        if earliest is None:
            return i, 0, False
        queued = 0
        enqueue = self.enqueue
        while i < end:
            queued += enqueue(packets[i], up, now)
            i += 1
            if self._urgent:
                return i, queued, True
            self._blocked_pull(now, earliest)
        return i, queued, False

    def next_release(self) -> float | None:
        """When ``pull`` may release something (None: the queue is empty)."""
        if not self.pending:
            return None
        return self._release_at

    # -- stage 3: retransmissions ------------------------------------------------------

    def queue_retransmit(self, seq: int, carried, size: int, now: float, up=()) -> None:
        """Queue a re-send (a NACK): it leaves before any other packet, as
        soon as a subflow other than the carrier(s) has room.  It is dropped
        once it can no longer beat the receiver's hold: ``retransmit_max_wait``
        after it could have left -- after the re-sends queued ahead of it, at
        the modelled rate of the subflows in ``up`` that may take it (not
        suspect, not a carrier).  (A failed carrier's tail is hundreds of
        re-sends; the receiver holds the line for them one after the other,
        and dropping them 50 ms after the NACK came, while they waited their
        turn, made it ask again, too late.)"""
        retx = self._retx
        rate = 0.0
        if up:
            carried_m = {getattr(s, "member", s) for s in carried or ()}
            for v in self._all_views(up, now):
                if not v.suspect and v.member not in carried_m:
                    rate += v.rate
        ahead = self._retx_bytes / rate if rate > 0.0 else 0.0
        retx.append((seq, carried, size, now + self.options.retransmit_max_wait + ahead))
        self._retx_bytes += size
        self.c["retransmits_queued"] += 1
        if len(retx) > self.options.queue_max_packets:
            self._retx_bytes -= retx.popleft()[2]
            self.c["retransmits_expired"] += 1
        self._release_at = None

    def retransmit_pending(self) -> bool:
        """Queued re-sends are waiting."""
        return bool(self._retx)

    def pull_retransmit(self, up, now: float):
        """The next queued re-send ``(seq, subflows)`` that may leave now, or None."""
        retx = self._retx
        while retx and up:
            seq, carried, size, expires = retx[0]
            if now > expires:  # too late to beat the receiver's hold
                retx.popleft()
                self._retx_bytes -= size
                self.c["retransmits_expired"] += 1
                continue
            targets = self.retransmit_targets(carried, up, now, size, gate=True)
            if targets is None:
                return None
            retx.popleft()
            self._retx_bytes -= size
            return seq, targets
        return None

    def retransmit_targets(self, carried, up, now: float, size: int = 0, gate: bool = False):
        """Subflows for a retransmission (a NACK): first the subflow, other
        than the one(s) that carried it, where it arrives first; then copies
        by the F objective (``retransmit_value``) on any live subflow.
        With ``gate``, None if no candidate has room (``retransmit_queue``: a
        re-send may join a deeper queue than a new packet -- waiting there is
        no worse than waiting here, where it expires)."""
        if not up:
            return []
        views = self._all_views(up, now)
        carried_m = {getattr(s, "member", s) for s in carried or ()}
        live = [v for v in views if not v.suspect] or list(views)
        cands = [v for v in live if v.member not in carried_m]
        if not cands:
            cands = [v for v in views if v.member not in carried_m] or live
        if gate:
            o = self.options
            target = o.retransmit_queue if o.retransmit_queue > o.queue_target else o.queue_target
            room = [v for v in cands if v.qdelay(now) < target]
            if not room:
                for v in cands:
                    v.meter.held = True
                t = now + max(1e-4, min(v.qdelay(now) for v in cands) - target)
                old = self._release_at
                if old is None or old <= now or t < old:
                    self._release_at = t
                return None
            cands = room
        first = min(cands, key=lambda v: v.eta(size, now))
        chosen = self._objective_set(views, self.options.retransmit_value, now, size,
                                     first=first, extra=live)
        self.c["retransmit_copies"] += len(chosen)
        return [v.sub for v in chosen]

    # -- status ----------------------------------------------------------------------

    def weights(self, up, now: float) -> dict:
        """Seed 000's u_i = (1 - L_i)(1/RTT_i + alpha BW_i), normalised to sum 1
        (suspect subflows 0)."""
        views = self._all_views(up, now)
        us = {v.member: (0.0 if v.suspect else v.u) for v in views}
        total = sum(us.values())
        if total <= 0:
            return {m: 1.0 / len(us) for m in us} if us else {}
        return {m: u / total for m, u in us.items()}

    def status(self, up, now: float) -> dict:
        w = self.weights(up, now)
        links = {}
        for v in self._all_views(up, now):
            m = v.meter
            links[v.member] = {
                "weight": round(w.get(v.member, 0.0), 4),
                "rate_bps": None if m.bw is None else int(m.bw * 8),
                "backlog_bytes": int(m.backlog(now)),
                "qdelay_ms": round(v.qdelay(now) * 1000, 3),
                "probe_qdelay_ms": None if m.probe_qdelay is None else round(m.probe_qdelay * 1000, 3),
                "loss": v.loss,
                "loss_persistent": v.lrand,
                "suspect": v.suspect,
                "stale": v.stale,
                "startup": m.startup,  # still doubling its estimate (LinkMeter)
                "samples": m.samples,
            }
        return {
            "mode": self.mode,
            "nack": self.nack,
            "queueing": self.queueing,
            "queued_packets": self.pending,
            "queued_bytes": self._qbytes,
            "flows": len(self._flows),
            "active_flows": len(self._active) + len(self._active_prio),
            "counters": dict(self.c),
            "urgent_by_reason": dict(self.urgent_by_reason),
            "links": links,
        }


def make_scheduler(mode: str = "duplicate", **options) -> Scheduler:
    """A scheduler for ``base.mode``; ``options`` are :class:`SchedulerOptions` fields.

    ``policies`` may be LinkPolicy objects or dicts of their fields.
    """
    known = {f.name for f in fields(SchedulerOptions)}
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"unknown scheduler option(s): {', '.join(bad)}")
    if "policies" in options:
        options["policies"] = tuple(p if isinstance(p, LinkPolicy) else LinkPolicy(**p)
                                    for p in options["policies"] or ())
    return Scheduler(mode, SchedulerOptions(**options))
