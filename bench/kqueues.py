"""Kernel queues of a tunnel's ends, sampled while a bench runs
(bench/latency.py ``--diag``): where a packet under load actually waits
outside the agent.

Per namespace, every ``period`` seconds:

* each UDP socket's receive and send memory (``ss -uamn``: ``skmem`` r / rb
  / t / tb, bytes of skb truesize in the buffer and the buffer's limit) and
  its drops (``d``);
* the vNIC's qdisc backlog and drops (``tc -s qdisc show dev DEV``) and its
  link counters (``ip -s link``: tx dropped = the tun ring was full);
* the namespace's UDP ``RcvbufErrors`` / ``SndbufErrors`` (/proc/net/snmp).

``summary()`` gives per socket the median and max of the bytes waiting, and
the deltas of the drop counters over the sampling.
"""

from __future__ import annotations

import re
import threading

_SKMEM = re.compile(r"skmem:\(r(\d+),rb(\d+),t(\d+),tb(\d+),.*?d(\d+)\)")


def parse_ss(text: str) -> dict:
    """``ss -uamn`` -> {local address: (r, rb, t, tb, d)}."""
    out, local = {}, None
    for line in text.splitlines():
        m = _SKMEM.search(line)
        if m and local is not None:
            out[local] = tuple(int(x) for x in m.groups())
            local = None
            continue
        f = line.split()
        if len(f) >= 5 and f[0] in ("UNCONN", "ESTAB"):
            local = f[3]
    return out


def parse_snmp_udp(text: str) -> dict:
    """/proc/net/snmp -> the Udp: counters by name."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    return dict(zip(rows[0], (int(x) for x in rows[1]))) if len(rows) >= 2 else {}


def parse_links(text: str) -> dict:
    """``ip -s link`` -> {device: {qlen, rx_packets, tx_packets, tx_dropped}}."""
    out: dict = {}
    dev = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\d+: ([^:@]+)[@:]", line)
        if m:
            dev = m.group(1)
            q = re.search(r"qlen (\d+)", line)
            out[dev] = {"qlen": int(q.group(1)) if q else None}
            continue
        head = line.strip()
        if dev is not None and head.startswith(("RX:", "TX:")) and i + 1 < len(lines):
            f = lines[i + 1].split()
            if len(f) >= 4 and f[1].isdigit():
                side = "rx" if head.startswith("RX:") else "tx"
                out[dev][f"{side}_packets"] = int(f[1])
                out[dev][f"{side}_dropped"] = int(f[3])
    return out


def ring_depth(links: dict, dev: str, lan: str = "lan") -> int | None:
    """Frames that entered the router from its LAN (``lan`` RX) and were not
    yet read from the vNIC by the agent nor dropped at its ring (``dev`` TX
    counts what the agent read, tun.c ``tun_put_user``): under a bulk
    transfer LAN -> tunnel, the tun's ring plus the forwarding in between,
    up to a constant the caller measures idle (other frames from the LAN)."""
    a, t = links.get(lan), links.get(dev)
    if not a or not t or "rx_packets" not in a or "tx_packets" not in t:
        return None
    return a["rx_packets"] - t["tx_packets"] - t.get("tx_dropped", 0)


def parse_qdisc(text: str) -> dict:
    """``tc -s qdisc show dev DEV`` -> kind, backlog bytes and drops of the first qdisc."""
    out = {}
    m = re.search(r"qdisc (\S+)", text)
    if m:
        out["kind"] = m.group(1)
    m = re.search(r"dropped (\d+)", text)
    if m:
        out["dropped"] = int(m.group(1))
    m = re.search(r"backlog (\d+)b (\d+)p", text)
    if m:
        out["backlog_b"], out["backlog_p"] = int(m.group(1)), int(m.group(2))
    return out


_TCP_FIELDS = {"rtt": re.compile(r" rtt:([\d.]+)/"), "minrtt": re.compile(r"minrtt:([\d.]+)"),
               "cwnd": re.compile(r"cwnd:(\d+)"), "unacked": re.compile(r"unacked:(\d+)"),
               "retrans": re.compile(r"retrans:\d+/(\d+)"), "mss": re.compile(r" mss:(\d+)")}


def parse_tcp(text: str) -> dict:
    """``ss -tin`` -> the busiest connection's rtt / minrtt (ms), cwnd / unacked
    (segments), retransmissions and mss: what the bulk sender's congestion
    control sees."""
    best: dict = {}
    for block in re.split(r"\n(?=ESTAB)", text):
        d = {}
        for k, rx in _TCP_FIELDS.items():
            m = rx.search(block)
            if m:
                d[k] = float(m.group(1))
        if d.get("cwnd", 0) > best.get("cwnd", -1):
            best = d
    return best


class Sampler:
    """Samples ``namespaces`` (lab role -> vNIC name) in a thread until stop();
    ``tcp_ns``: also the bulk sender's TCP state there (``ss -tin``)."""

    def __init__(self, lab, namespaces: dict, period: float = 0.25, tcp_ns: str | None = None):
        self.lab = lab
        self.tcp_ns = tcp_ns
        self.tcp: list = []
        self.namespaces = namespaces
        self.period = period
        self.samples: dict = {ns: [] for ns in namespaces}
        self.ring0: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def calibrate(self) -> "Sampler":
        """Idle, before the bulk: the ring estimate's constant (frames from
        the LAN that never go into the vNIC)."""
        self.ring0 = {}
        for ns, dev in self.namespaces.items():
            self.ring0[ns] = ring_depth(parse_links(self.lab.run(ns, ["ip", "-s", "link"], check=False).stdout), dev)
        return self

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def _one(self, ns: str, dev: str) -> dict:
        run = self.lab.run
        links = parse_links(run(ns, ["ip", "-s", "link"], check=False).stdout)
        return {"ss": parse_ss(run(ns, ["ss", "-uamn"], check=False).stdout),
                "udp": parse_snmp_udp(run(ns, ["cat", "/proc/net/snmp"], check=False).stdout),
                "link": links.get(dev, {}), "ring": ring_depth(links, dev),
                "qdisc": parse_qdisc(run(ns, ["tc", "-s", "qdisc", "show", "dev", dev], check=False).stdout)}

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.tcp_ns is not None:
                try:
                    t = parse_tcp(self.lab.run(self.tcp_ns, ["ss", "-tin"], check=False).stdout)
                    if t:
                        self.tcp.append(t)
                except Exception:
                    pass
            for ns, dev in self.namespaces.items():
                try:
                    self.samples[ns].append(self._one(ns, dev))
                except Exception:
                    pass
            self._stop.wait(self.period)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(30)
        return self.summary()

    def summary(self) -> dict:
        out = {}
        if self.tcp:
            out["bulk_tcp"] = {k: sorted(t[k] for t in self.tcp if k in t)[len(self.tcp) // 2]
                               for k in _TCP_FIELDS if all(k in t for t in self.tcp)}
            if all("retrans" in t for t in self.tcp):
                out["bulk_tcp"]["retrans"] = self.tcp[-1]["retrans"] - self.tcp[0]["retrans"]
        for ns, ss in self.samples.items():
            if len(ss) < 2:
                continue
            first, last = ss[0], ss[-1]
            socks = {}
            for addr in last["ss"]:
                rs = sorted(s["ss"][addr][0] for s in ss if addr in s["ss"])
                ts = sorted(s["ss"][addr][2] for s in ss if addr in s["ss"])
                d0 = first["ss"].get(addr, (0,) * 5)[4]
                socks[addr] = {"rmem_p50": rs[len(rs) // 2], "rmem_max": rs[-1], "rcvbuf": last["ss"][addr][1],
                               "tmem_max": ts[-1], "sndbuf": last["ss"][addr][3],
                               "drops": last["ss"][addr][4] - d0}
            qd = [s["qdisc"].get("backlog_p", 0) for s in ss]
            r0 = self.ring0.get(ns)
            ring = sorted(s["ring"] - r0 for s in ss if s.get("ring") is not None and r0 is not None)
            out[ns] = {"samples": len(ss), "sockets": socks,
                       "udp_rcvbuf_errors": last["udp"].get("RcvbufErrors", 0) - first["udp"].get("RcvbufErrors", 0),
                       "udp_sndbuf_errors": last["udp"].get("SndbufErrors", 0) - first["udp"].get("SndbufErrors", 0),
                       "tun_qlen": last["link"].get("qlen"),
                       "tun_tx_dropped": last["link"].get("tx_dropped", 0) - first["link"].get("tx_dropped", 0),
                       "qdisc": last["qdisc"].get("kind"),
                       "qdisc_backlog_p_max": max(qd),
                       "qdisc_dropped": last["qdisc"].get("dropped", 0) - first["qdisc"].get("dropped", 0),
                       "ring_p50": ring[len(ring) // 2] if ring else None, "ring_max": ring[-1] if ring else None}
        return out


def format_summary(doc: dict) -> str:
    lines = []
    t = doc.get("bulk_tcp")
    if t:
        lines.append("  bulk sender (medians): " + ", ".join(f"{k} {v:g}" for k, v in t.items()))
    for site, deltas in (doc.get("agent_counters") or {}).items():
        lines.append(f"  agent {site} counters under load: " + ", ".join(f"{k} +{v}" for k, v in sorted(deltas.items())))
    for ns, d in doc.items():
        if ns in ("bulk_tcp", "agent_counters"):
            continue
        lines.append(f"  {ns}: {d['samples']} samples; tun qlen {d['tun_qlen']} tx_dropped +{d['tun_tx_dropped']}; "
                     f"ring ~{d['ring_p50']} frames p50, max {d['ring_max']}; "
                     f"qdisc {d['qdisc']} backlog max {d['qdisc_backlog_p_max']}p dropped +{d['qdisc_dropped']}; "
                     f"UDP RcvbufErrors +{d['udp_rcvbuf_errors']} SndbufErrors +{d['udp_sndbuf_errors']}")
        for addr, s in sorted(d["sockets"].items()):
            lines.append(f"    {addr:<24} rmem p50 {s['rmem_p50'] >> 10:>6} KiB max {s['rmem_max'] >> 10:>6} KiB"
                         f" (rcvbuf {s['rcvbuf'] >> 10} KiB)  tmem max {s['tmem_max'] >> 10} KiB"
                         f" (sndbuf {s['sndbuf'] >> 10} KiB)  drops +{s['drops']}")
    return "\n".join(lines)
