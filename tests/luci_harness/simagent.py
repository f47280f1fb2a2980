"""TEST FIXTURE: an ``orayboxvpn status`` source built on the real in-memory engine.

:func:`status_document` wraps what the engine reports (``Session.status``:
the links and counters) into the shape of docs/status.md, adding the fields
the agent itself owns (state, role, vNIC, routes, control, uplinks, ...).
:class:`SimAgentBackend` drives an :class:`mpvpn.tools.simnet.SimPair` with three
carriers, some loss and traffic both ways, and advances it on every
``status`` call, so a polling page sees counters and rates move.  Its
``test_links`` starts a scripted link test (:class:`SimLinkTest`, the
contract of the agent's ``test_links`` method and the document's
``link_test``) whose phases finish as the status calls advance the engine.  Its
methods are published on the harness's ubus with the agent's own ubus code
(``mpvpn.io.ubus``), so calls are checked against the agent's real argument rules.
"""

from __future__ import annotations

import copy
import math
import threading
import time

from mpvpn.tools.simnet import SimPair

CARRIERS = (  # member -> carrier: (type, local, remote)
    ("telecom", "10.1.0.1:7000", "10.1.0.2:7000"),
    ("unicom", "10.2.0.1:7000", "10.2.0.2:7000"),
    ("mobile", "10.3.0.1:7000", "10.3.0.2:7000"),
)

# what the agent reports for two `config policy` sections (agent.py: Agent.status)
POLICIES = (
    {"name": "camera", "src": "192.168.10.50/32", "dst": None, "carriers": ["telecom"],
     "exclusive": True, "mode": None},
    {"name": "office", "src": "192.168.10.0/25", "dst": "192.168.20.0/24",
     "carriers": ["telecom", "unicom"], "exclusive": False, "mode": "aggregate", "priority": True},
)

LINK_TEST_RATES = {"telecom": 48.0, "unicom": 29.5, "mobile": 19.0}  # Mbit/s of a clean carrier


class SimLinkTest:
    """The agent's link test as the ubus contract describes it: each carrier
    alone, then all together, each up (this router -> peer) then down; one
    result per finished phase, measured values taken from the engine's links."""

    def __init__(self, test_id: int, duration: int, links: list[dict], started: float):
        self.id = test_id
        self.duration = duration
        self.started = started
        members = [(lk["name"], [lk["member"]]) for lk in links]
        members.append(("+".join(lk["name"] for lk in links), [lk["member"] for lk in links]))
        self.plan = [(name, mem, d) for name, mem in members for d in ("up", "down")]
        self.results: list[dict] = []

    @property
    def running(self) -> bool:
        return len(self.results) < len(self.plan)

    def advance(self, phases: int, links: list[dict]) -> None:
        by_member = {lk["member"]: lk for lk in links}
        for _ in range(phases):
            if not self.running:
                return
            name, members, direction = self.plan[len(self.results)]
            up = [by_member[m] for m in members if by_member.get(m, {}).get("state") == "established"]
            if not up:  # the carrier is down: nothing gets through
                self.results.append({"name": name, "direction": direction, "members": members,
                                     "mbps": None, "rtt_ms": None, "loss": 1.0, "packets": 0, "bytes": 0})
                continue
            loss_key = "loss" if direction == "up" else "loss_in"
            loss = round(math.prod(lk.get(loss_key) or 0.0 for lk in up), 6)  # lost on every carrier
            mbps = round(sum(LINK_TEST_RATES.get(lk["name"], 10.0) for lk in up) * (1 - loss), 2)
            rtt = min((lk["rtt_ms"] for lk in up if lk.get("rtt_ms") is not None), default=None)
            packets = int(mbps * 1e6 * self.duration / 8 / 1400)
            self.results.append({"name": name, "direction": direction, "members": members,
                                 "mbps": mbps, "rtt_ms": rtt, "loss": loss,
                                 "packets": packets, "bytes": packets * 1400})

    def document(self) -> dict:
        running = self.running
        return {"id": self.id, "state": "running" if running else "done", "error": None,
                "started": self.started, "phase": len(self.results) if running else None,
                "phases": len(self.plan), "results": copy.deepcopy(self.results)}


def status_document(pair: SimPair, *, name: str = "site-a", peer: str = "site-b",
                    role: str = "client", mode: str = "duplicate", started: float = 0.0,
                    since: float | None = None, policies=(), link_test: dict | None = None) -> dict:
    """Side ``a`` of ``pair`` as the agent's status document (docs/status.md)."""
    now = pair.now
    s = pair.a.status(now)
    links = []
    for link in s["links"]:
        row = dict(link)
        row.setdefault("session_id", s["session_id"])
        row.setdefault("peer", peer)
        # docs/status.md: duplicate mode gives every established subflow weight 1
        row.setdefault("weight", 1.0 if row.get("state") == "established" else 0.0)
        links.append(row)
    up = sum(1 for lk in links if lk["state"] == "established")
    state = "connected" if up else "degraded"
    counters = dict(s["counters"])
    counters.setdefault("unknown_session", 0)
    counters.setdefault("tun_write_errors", 0)
    routes = ["192.168.20.0/24"]
    peer_info = {
        "name": peer,
        "uplinks": [{"name": t, "type": t, "addr": r.split(":")[0], "port": int(r.split(":")[1])}
                    for t, _l, r in CARRIERS],
        "vnc": {"ip": "172.30.0.2", "netmask": "255.255.255.252"},
        "lans": routes,
    }
    return {
        "version": "0.1.0",
        "state": state,
        "state_text": f"connected to {peer} over {up} of {len(links)} subflows" if up
        else f"session with {peer} but no subflow is up",
        "role": role,
        "mode": mode,
        "name": name,
        "uptime": round(now - started, 3),
        "since": round(now - (started if since is None else since), 3),
        "last_error": None,
        "session_id": s["session_id"],
        "peer": peer_info,
        "vnc": {"ifname": "mpvpn0", "address": "172.30.0.1", "netmask": "255.255.255.252", "mtu": 1400},
        "routes": routes,
        "dataplane": {"c_loops": False, "tun_offload": "gro",
                      # mpvpn.core.fastpath.WHY on a router without orayboxvpn-fastpath
                      "c_loops_off_why": "not built (cannot import name '_fastpath' from 'mpvpn' "
                                         "(/usr/lib/python3.11/site-packages/mpvpn/__init__.py))",
                      "tun_offload_error": None, "tun_split_errors": 0},
        "control": {"state": "established", "server": "10.1.0.2:7000", "epoch": 1, "rekeys": 0},
        "policies": [dict(p) for p in policies],
        "uplinks": [{"name": t, "type": t, "bind_ip": l.split(":")[0], "port": int(l.split(":")[1]),
                     "state": "up", "error": None} for t, l, _r in CARRIERS],
        "links": links,
        "counters": counters,
        "sessions": [{"session_id": s["session_id"], "name": peer, "state": state, "peer": peer_info,
                      "routes": routes, "hold_ms": s["hold_ms"], "links": links, "counters": counters}],
        "link_test": link_test,
    }


class SimAgentBackend:
    """``orayboxvpn`` on ubus, answered from the real engine over SimPair.

    Three carriers with some loss; ``mobile`` loses its carrier after the
    start, so the document has a subflow that is not established.  Each
    ``status`` call first runs ``step`` simulated seconds of traffic both ways
    and finishes ``test_phases_per_status`` phases of a running link test."""

    def __init__(self, *, step: float = 3.0, pps: float = 40.0, size: int = 1000, seed: int = 7,
                 mobile_down: bool = True, policies=POLICIES, test_phases_per_status: int = 3):
        self.step = step
        self.pps = pps
        self.size = size
        self.policies = policies
        self.test_phases_per_status = test_phases_per_status
        self.lock = threading.Lock()
        self.docs: list[dict] = []  # every document served, in order
        self.reconnects = 0
        self.test_calls: list[dict] = []  # the arguments of every test_links call
        self.link_test: SimLinkTest | None = None
        pair = SimPair(len(CARRIERS), loss=0.02, delay=0.012, jitter=0.004, seed=seed)
        pair.set(2, loss=0.06, delay=0.030)
        pair.set(3, delay=0.045)
        for member, (ctype, local, remote) in enumerate(CARRIERS, 1):
            sub = pair.a.subflows[member]
            sub.name = ctype
            sub.meta.update({"type": ctype, "local": local, "remote": remote})
        self.started = pair.now
        if not pair.handshake():
            raise RuntimeError("SimPair handshake failed")
        self.pair = pair
        self._traffic(2.0)
        if mobile_down:
            pair.set(3, up=False)  # the mobile carrier fails: its subflow goes down
        self._traffic(3.0)

    def _traffic(self, seconds: float) -> None:
        gap = 1.0 / self.pps
        for _ in range(max(1, int(seconds * self.pps))):
            pkt = bytes(self.size)
            self.pair.send("a", pkt)
            self.pair.send("b", pkt)
            self.pair.run(gap)

    def document(self) -> dict:
        return status_document(self.pair, started=self.started, policies=self.policies,
                               link_test=self.link_test.document() if self.link_test else None)

    def _test_links(self, args: dict) -> dict:
        """The agent's ``test_links`` contract: {"started": true, "id"} or {"error"}."""
        duration = args.get("duration", 3)
        if isinstance(duration, bool) or not isinstance(duration, int) or not 1 <= duration <= 10:
            return {"error": "duration must be an integer from 1 to 10 seconds"}
        if self.link_test is not None and self.link_test.running:
            return {"error": "a link test is already running"}
        links = status_document(self.pair, started=self.started)["links"]
        self.link_test = SimLinkTest((self.link_test.id + 1) if self.link_test else 1, duration,
                                     links, time.time())
        return {"started": True, "id": self.link_test.id}

    def handlers(self) -> dict:
        """The agent's methods (published on the harness's ubus by the agent's transport)."""

        def status(_args):
            with self.lock:
                self._traffic(self.step)
                if self.link_test is not None and self.link_test.running:
                    self.link_test.advance(self.test_phases_per_status,
                                           status_document(self.pair, started=self.started)["links"])
                doc = self.document()
                self.docs.append(doc)
                return doc

        def reconnect(_args):
            with self.lock:
                self.reconnects += 1
                return {"ok": True}

        def test_links(args):
            with self.lock:
                self.test_calls.append(dict(args))
                return self._test_links(args)

        return {"status": status, "reconnect": reconnect, "test_links": test_links}
