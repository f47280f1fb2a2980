"""TEST FIXTURE: an ``orayboxvpn status`` source built on the real in-memory engine.

:func:`status_document` wraps what the engine reports (``Session.status``:
the links and counters) into the shape of docs/status.md, adding the fields
the agent itself owns (state, role, vNIC, routes, control, uplinks, ...).
:class:`SimAgentBackend` drives an :class:`mpvpn.simnet.SimPair` with three
carriers, some loss and traffic both ways, and advances it on every
``status`` call, so a polling page sees counters and rates move.  It stands
in for a live agent until the agent can run in the test lab
(``server.SocketAgentBackend``).
"""

from __future__ import annotations

import threading

from mpvpn.simnet import SimPair

CARRIERS = (  # member -> carrier: (type, local, remote)
    ("telecom", "10.1.0.1:7000", "10.1.0.2:7000"),
    ("unicom", "10.2.0.1:7000", "10.2.0.2:7000"),
    ("mobile", "10.3.0.1:7000", "10.3.0.2:7000"),
)


def status_document(pair: SimPair, *, name: str = "site-a", peer: str = "site-b",
                    role: str = "client", mode: str = "duplicate", started: float = 0.0,
                    since: float | None = None) -> dict:
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
        "control": {"state": "established", "server": "10.1.0.2:7000", "epoch": 1, "rekeys": 0},
        "uplinks": [{"name": t, "type": t, "bind_ip": l.split(":")[0], "port": int(l.split(":")[1]),
                     "state": "up", "error": None} for t, l, _r in CARRIERS],
        "links": links,
        "counters": counters,
        "sessions": [{"session_id": s["session_id"], "name": peer, "state": state, "peer": peer_info,
                      "routes": routes, "hold_ms": s["hold_ms"], "links": links, "counters": counters}],
    }


class SimAgentBackend:
    """``orayboxvpn`` on ubus, answered from the real engine over SimPair.

    Three carriers with some loss; ``mobile`` loses its carrier after the
    start, so the document has a subflow that is not established.  Each
    ``status`` call first runs ``step`` simulated seconds of traffic both ways."""

    def __init__(self, *, step: float = 3.0, pps: float = 40.0, size: int = 1000, seed: int = 7,
                 mobile_down: bool = True):
        self.step = step
        self.pps = pps
        self.size = size
        self.lock = threading.Lock()
        self.docs: list[dict] = []  # every document served, in order
        self.reconnects = 0
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
        return status_document(self.pair, started=self.started)

    def call(self, obj: str, method: str, args: dict) -> dict:
        from luci_harness.server import ObjectNotFound, UbusStatus

        if obj != "orayboxvpn":
            raise ObjectNotFound(obj)
        with self.lock:
            if method == "status":
                self._traffic(self.step)
                doc = self.document()
                self.docs.append(doc)
                return doc
            if method == "reconnect":
                self.reconnects += 1
                return {}
        raise UbusStatus(3)
