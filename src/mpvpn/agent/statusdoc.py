"""The status document (``orayboxvpn status``, ubus ``orayboxvpn status``,
LuCI), built from explicit inputs: the agent's own state, its sessions and
its control side.  Every field docs/status.md lists is always present
(tests/test_statusdoc.py checks them against the doc's examples); unknown
values are null.  Pure: no I/O; wall-clock time only where the document
shows one (a link test's ``started``), passed in as ``wall``.
"""

from __future__ import annotations

from mpvpn.agent.uplinknat import link_path
from mpvpn.agent.uplinkrelay import link_relay, relay_reason
from mpvpn.core.subflow import State

# Session counters docs/status.md lists under `counters`: summed over the
# sessions, 0 while there is none (the agent's own counters are always there).
SESSION_COUNTERS = ("sent", "delivered", "duplicates", "late", "reorder_flushes", "deadline_releases",
                    "auth_failures", "replays", "tx_no_subflow")


def peer_json(p) -> dict:
    """A control.PeerInfo as the document shows it."""
    return {"name": p.name,
            "uplinks": [{"name": u.name, "type": u.type, "addr": u.addr, "port": u.port} for u in p.uplinks],
            "vnc": {"ip": p.vnc.ip, "netmask": p.vnc.netmask}, "lans": list(p.lans)}


def session_entries(sessions, now: float, duplicate: bool, hub=None,
                    via_path=None) -> tuple[list, list, dict]:
    """(``sessions``, ``links``, summed session ``counters``) of the document
    for the agent's DataSessions; ``duplicate``: base.mode is duplicate
    (every established subflow carries every packet: weight 1); ``hub``: a
    server's mpvpn.core.hubforward.HubForward (per-site ``forwarded``);
    ``via_path``: site name -> ``direct`` or ``hub`` (agent.directpeers)."""
    out, links = [], []
    totals: dict[str, int] = dict.fromkeys(SESSION_COUNTERS, 0)  # present with no session too
    for ds in sessions:
        st = ds.sess.status(now)
        quality = ds.sess.scheduler.weights(ds.sess.up, now)
        for ln in st["links"]:
            # quality: seed 000's u_i share; weight: the share of packets this
            # subflow carries (duplicate mode: every established one carries all)
            ln["quality"] = round(quality.get(ln["member"], 0.0), 4)
            up = ln["state"] == State.ESTABLISHED.value
            ln["weight"] = (1.0 if up else 0.0) if duplicate else ln["quality"]
            sub = ds.sess.subflows.get(ln["member"])
            if sub is not None and sub.remote is not None:  # where it sends now (a NAT's mapping)
                ln["remote"] = f"[{sub.remote[0]}]:{sub.remote[1]}" if ":" in sub.remote[0] \
                    else f"{sub.remote[0]}:{sub.remote[1]}"
            ln["relay"] = link_relay(ds, ln["member"])  # the TURN relay carrying it, or None
            ln["relay_reason"] = relay_reason(ds, ln["member"]) if ln["relay"] else None
            # direct / punched / relayed (docs/nat.md)
            ln["path"] = "relayed" if ln["relay"] else link_path(ds, ln["member"])
            links.append(ln)
        for k, v in st["counters"].items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
        sealer = ds.sess.sealer
        out.append({
            "session_id": ds.session_id, "name": ds.peer.name,
            "direct": ds.direct,  # a direct session with another site of our hub
            "state": st["state"], "peer": peer_json(ds.peer), "routes": list(ds.routes),
            "hold_ms": st["hold_ms"], "epoch": sealer.send_epoch if sealer else 0,
            "cipher": sealer.cipher if sealer else None,
            "site": ds.conn.site if ds.conn is not None else None,  # hub: the `config site` key it used
            "links": st["links"], "counters": st["counters"],
            "scheduler": st.get("scheduler"),
            # hub: what it passed between this site and the others (null on a client)
            "forwarded": hub.site(ds) if hub is not None else None,
            # client of a forwarding hub: the other sites reached through it
            "via": [dict(v.to_json(), path=via_path(v.name) if via_path else "hub") for v in ds.via],
            "via_refused": [{"name": n, "why": why} for n, why in ds.via_refused],
        })
    return out, links, totals


def server_control(listen, connections: int, closed_by_reason: dict, registry) -> dict:
    """``control`` of a server: its listener, live connections, why others
    closed, the registry's counters (``registry``: ServerSessions or None)."""
    return {"state": "listening", "listen": str(listen), "connections": connections,
            "closed_by_reason": dict(closed_by_reason),
            "registry": dict(registry.counters) if registry is not None else {}}


def client_control(controls, reconnect, started: float) -> dict:
    """``control`` of a client: its first live connection (ControlIO with a
    ``conn``) and the reconnect record (ClientReconnect; times in seconds
    since ``started``)."""
    ctl = {"state": "connecting", "server": None, "epoch": None, "counters": {}}
    for c in controls:
        if c.conn is not None:
            ctl = {"state": c.conn.state.value, "server": f"{c.addr[0]}:{c.addr[1]}",
                   "epoch": c.conn.epoch, "counters": dict(c.conn.counters)}
            break
    if reconnect is not None:
        ctl["reconnect"] = {"attempts": reconnect.attempts, "failures": reconnect.failures,
                            "busy": reconnect.busy,
                            "history": [[round(t - started, 3), what] for t, what in reconnect.history]}
    return ctl


def dataplane(tun, c_loops: bool, c_loops_off_why) -> dict:
    """How packets are moved: the C loops (mpvpn.core.fastpath) and the tun's
    offloads (``tun``: Tun or MemoryTun, None before the vNIC exists)."""
    return {"c_loops": c_loops, "c_loops_off_why": c_loops_off_why,
            "tun_offload": tun.offload if tun is not None else "off",
            "tun_offload_error": (tun.offload_error or None) if tun is not None else None,
            "tun_split_errors": tun.split_errors if tun is not None else 0}


def state_text(state: str, role: str, sessions, server_address) -> str:
    """One line for people: what the agent is doing."""
    if state == "connected":
        parts = [f"{ds.peer.name} over {len(ds.sess.up)} of {len(ds.sess.subflows)} subflows"
                 for ds in sessions]
        return "connected to " + "; ".join(parts)
    if state == "degraded":
        return "session established but no subflow is up: check the uplinks and the peer"
    if state == "connecting":
        if role == "server":
            return "waiting for clients"
        return "connecting to " + ", ".join(str(h) for h in server_address)
    return state


def policies(cfg_policies) -> list:
    return [{"name": p.name, "src": str(p.src), "dst": None if p.dst is None else str(p.dst),
             "carriers": list(p.carriers) if p.carriers else None,
             "exclusive": p.exclusive, "mode": p.mode, "priority": p.priority}
            for p in cfg_policies]


def uplinks(ups, now: float = 0.0) -> list:
    out = []
    for up in ups:
        nat = up.nat  # uplinknat.UplinkNat (base.stun set) or None
        public = nat.public_addr if nat is not None else None
        out.append({"name": up.name, "type": up.cfg.type, "bind_ip": up.addr, "port": up.cfg.port,
                    "state": up.state, "error": up.error, "tx_errors": up.tx_errors,
                    "public": f"{public[0]}:{public[1]}" if public and ":" not in public[0]
                    else (f"[{public[0]}]:{public[1]}" if public else None),
                    "nat": nat.nat if nat is not None else None,
                    "stun": nat.status() if nat is not None else None,
                    "relay": up.relay.status(now) if up.relay is not None else None})
    return out


def document(*, version: str, now: float, started: float, state: str, state_since: float,
             role: str, cfg, name: str, last_error, tun, routes, sessions, agent_counters: dict,
             control: dict, dataplane: dict, link_test, uplink_docs: list, hub=None,
             direct=None, via_path=None) -> dict:
    """The whole document.  ``cfg``: the agent's mpvpn.agent.config.Config;
    ``sessions``: its DataSessions; ``control``: :func:`server_control` or
    :func:`client_control`; ``routes``: the CIDRs routed into the vNIC;
    ``direct``: agent.directpeers.DirectPaths.status(), ``via_path`` its path_of."""
    sessions = sorted(sessions, key=lambda ds: ds.direct)  # (the hub session first)
    entries, links, totals = session_entries(sessions, now, cfg.base.mode == "duplicate", hub,
                                             via_path)
    for k, v in agent_counters.items():
        totals[k] = totals.get(k, 0) + v
    first = entries[0] if entries else None
    v = cfg.vnc
    return {
        "version": version,
        "state": state,
        "state_text": state_text(state, role, sessions, cfg.base.server_address),
        "role": role,
        "mode": cfg.base.mode,
        "name": name,
        "uptime": round(now - started, 3),
        "since": round(now - state_since, 3),
        "last_error": last_error,
        "session_id": first["session_id"] if first else None,
        "peer": first["peer"] if first else None,
        "vnc": {"ifname": tun.name if tun else v.ifname, "address": str(v.ipaddr),
                "netmask": str(v.netmask), "mtu": v.mtu},
        "routes": sorted(routes),
        "hub_forward": hub.enabled if hub is not None else None,
        "direct": direct,
        "dataplane": dataplane,
        "control": control,
        "link_test": link_test,
        "policies": policies(cfg.policies),
        "uplinks": uplink_docs,
        "links": links,
        "counters": totals,
        "sessions": entries,
    }
