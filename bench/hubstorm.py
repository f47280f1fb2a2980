#!/usr/bin/env python3
"""A storm of control connections at a hub (issue 16, bench/hub.py
``--handshakes``): many TCP connections at once, each one what a client site
sends, driven by the real client machine (:class:`mpvpn.core.controlconn.
ClientConnection`: Noise NNpsk0 with the site's own PSK, the first message's
freshness stamp and MAC, HELLO, WELCOME).

    python bench/hubstorm.py KIND --server HOST:PORT --keys FILE [--seconds S] [--inflight N]
                             [--source IP]

KIND:

* ``genuine``: connection i uses site ``i mod len(keys)``'s PSK, runs the
  handshake to the hub's WELCOME (the hub opens a session: a site that
  reconnects replaces its previous one), then closes.  An answer BUSY (the
  hub's handshake budget) is counted and the next connection opened at once
  (a storm that ignores retry_after).
* ``junk``: a first message of random bytes with a random stamp (what
  anyone without a key can send); the hub must close it after one keyed
  hash per key.
* ``replay``: one genuine first message and stamp, captured once, sent again
  on every connection; the hub must drop it unanswered.

``--keys``: JSON ``[[site name, PSK base64, vNIC address], ...]``.  Prints
one JSON line: connections opened, per outcome counts, seconds, rates.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import selectors
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mpvpn.core import controlconn, controlevents, controlmsg, pairing  # noqa: E402
from mpvpn.core.admission import STAMP_LEN, HandshakeStamps  # noqa: E402


class Conn:
    __slots__ = ("sock", "machine", "out", "started", "kind")

    def __init__(self, sock, kind):
        self.sock, self.kind = sock, kind
        self.machine = None
        self.out = bytearray()
        self.started = time.monotonic()


class Storm:
    def __init__(self, kind: str, server, keys, source: str | None, inflight: int):
        self.kind, self.server, self.source, self.inflight = kind, server, source, inflight
        self.keys = [(n, base64.b64decode(k), vnc) for n, k, vnc in keys]
        self.sel = selectors.DefaultSelector()
        self.stamps = HandshakeStamps()
        self.counts: dict[str, int] = {}
        self.opened = 0
        self.latencies: list[float] = []
        self.captured: bytes | None = None
        if kind == "replay":
            name, psk, vnc = self.keys[0]
            self.captured = bytes(controlconn.ClientConnection(self._config(0), 0.0,
                                                               self.stamps).data_to_send())

    def _config(self, i: int) -> controlconn.ControlConfig:
        name, psk, vnc = self.keys[i % len(self.keys)]
        up = pairing.Uplink("telecom", "telecom", self.source or "10.250.0.1", 9)
        return controlconn.ControlConfig(psk=psk, name=name, uplinks=(up,),
                                         vnc=controlmsg.Vnc(vnc, "255.255.255.0"))

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def open(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        if self.source:
            s.bind((self.source, 0))
        err = s.connect_ex(self.server)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.count(f"connect_{errno.errorcode.get(err, err)}")
            return
        c = Conn(s, self.kind)
        i = self.opened
        self.opened += 1
        if self.kind == "genuine":
            c.machine = controlconn.ClientConnection(self._config(i), time.monotonic(), self.stamps)
            c.out += c.machine.data_to_send()
        elif self.kind == "junk":
            c.out += controlmsg.encode_frame(os.urandom(96)) + controlmsg.encode_frame(os.urandom(STAMP_LEN))
        else:
            c.out += self.captured
        self.sel.register(s, selectors.EVENT_WRITE | selectors.EVENT_READ, c)

    def close(self, c: Conn, outcome: str) -> None:
        self.sel.unregister(c.sock)
        c.sock.close()
        self.count(outcome)
        if outcome == "ok":
            self.latencies.append(time.monotonic() - c.started)

    def on(self, c: Conn, mask) -> None:
        now = time.monotonic()
        if mask & selectors.EVENT_WRITE and c.out:
            try:
                n = c.sock.send(c.out)
                del c.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return self.close(c, "send_error")
            if not c.out:
                self.sel.modify(c.sock, selectors.EVENT_READ, c)
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if c.machine is None:  # junk / replay: the hub must close without a word
            return self.close(c, "closed_by_hub" if not data else "answered")
        if not data:
            return self.close(c, "eof")
        c.machine.receive_data(data, now)
        ev = c.machine.next_event()
        while ev is not None:
            if isinstance(ev, controlevents.SessionEstablished):
                return self.close(c, "ok")
            if isinstance(ev, controlevents.ConnectionClosed):
                return self.close(c, ev.reason)
            ev = c.machine.next_event()
        out = c.machine.data_to_send()
        if out:
            c.out += out
            self.sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

    def run(self, seconds: float) -> dict:
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            while len(self.sel.get_map()) < self.inflight:
                self.open()
            for key, mask in self.sel.select(0.05):
                self.on(key.data, mask)
        dt = time.monotonic() - t0
        for key in list(self.sel.get_map().values()):  # still in flight: not counted
            key.fileobj.close()
        lat = sorted(self.latencies)
        return {"kind": self.kind, "seconds": dt, "opened": self.opened, "counts": self.counts,
                "ok_per_s": self.counts.get("ok", 0) / dt,
                "ended_per_s": sum(self.counts.values()) / dt,
                "ok_latency_p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
                "ok_latency_p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("genuine", "junk", "replay"))
    ap.add_argument("--server", required=True, help="HOST:PORT of the hub's control listener")
    ap.add_argument("--keys", required=True, help="JSON file [[site, psk base64, vNIC address], ...]")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--inflight", type=int, default=32, help="connections open at once")
    ap.add_argument("--source", help="local address to connect from")
    args = ap.parse_args(argv)
    host, port = args.server.rsplit(":", 1)
    keys = json.loads(Path(args.keys).read_text())
    storm = Storm(args.kind, (host, int(port)), keys, args.source, args.inflight)
    print(json.dumps(storm.run(args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
