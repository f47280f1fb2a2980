"""Run the real coturn (`turnserver`, Debian package ``coturn``) for tests,
and a thin UDP edge that drives the sans-I/O STUN/TURN clients.

:class:`Coturn` writes a config file, starts ``turnserver -c <file>`` (in the
host's loopback, or in a namespace through a ``prefix`` argv such as
``["ip", "netns", "exec", ns]``), waits until a STUN Binding request is
answered, and stops it (SIGTERM, then SIGKILL).  Nothing is installed or
built here: without ``turnserver`` on PATH the tests skip with the reason.

:func:`drive` is the I/O edge the agent will have after issue 14, reduced to
one socket: send what the client wants to send, wait for a datagram or the
client's deadline, feed the datagram in, call ``on_timer``.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from mpvpn.core import stun

TURNSERVER = shutil.which("turnserver") or (
    "/usr/bin/turnserver" if os.access("/usr/bin/turnserver", os.X_OK) else None)


def unavailable_reason() -> str | None:
    if TURNSERVER is None:
        return "coturn's `turnserver` is not installed (Debian package coturn)"
    return None


def free_udp_port(host: str = "127.0.0.1", span: int = 1) -> int:
    """A port p such that p..p+span-1 are free for UDP on ``host`` right now
    (random in 20000..59000, so parallel test runs rarely even try the same)."""
    for _ in range(200):
        p = random.randint(20000, 59000 - span)
        socks = []
        try:
            for q in range(p, p + span):
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((host, q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port range found")


class Coturn:
    """One turnserver process with a config file written from arguments.

    ``listen``: listening IPs (two IPs enable RFC 5780 OTHER-ADDRESS);
    ``port``: the listening port (``alt_port`` = port + 1 is coturn's
    default alternative port); ``relay_ip`` and ``relay_ports`` (min, max);
    ``users``: {name: password}; ``extra``: more config lines (e.g.
    ``"user-quota=1"``, ``"stale-nonce=5"``)."""

    def __init__(self, listen: Sequence[str] = ("127.0.0.1",), port: int | None = None, *,
                 relay_ip: str | None = None, relay_ports: tuple[int, int] | None = None,
                 users: dict | None = None, realm: str = "mpvpn.test",
                 loopback_peers: bool = True, extra: Sequence[str] = (),
                 prefix: Sequence[str] = (), workdir: str | None = None,
                 probe_family: int = socket.AF_INET):
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.listen = list(listen)
        self.port = port or free_udp_port(self.listen[0], 2)
        self.relay_ip = relay_ip or self.listen[0]
        if relay_ports is None:
            lo = free_udp_port(self.relay_ip, 20)
            relay_ports = (lo, lo + 19)
        self.relay_ports = relay_ports
        self.users = dict(users or {"alice": "secret"})
        self.realm = realm
        self.prefix = list(prefix)
        self.probe_family = probe_family
        self._tmp = tempfile.TemporaryDirectory(prefix="mpvpn-coturn-", dir=workdir)
        d = Path(self._tmp.name)
        self.conf = d / "turnserver.conf"
        self.log = d / "turnserver.log"
        lines = [f"listening-ip={ip}" for ip in self.listen]
        lines += [f"listening-port={self.port}", f"alt-listening-port={self.port + 1}",
                  f"relay-ip={self.relay_ip}",
                  f"min-port={relay_ports[0]}", f"max-port={relay_ports[1]}",
                  "lt-cred-mech", f"realm={realm}",
                  *(f"user={u}:{p}" for u, p in self.users.items()),
                  "no-tls", "no-dtls", "no-cli", "no-tcp", "no-tcp-relay",
                  "fingerprint", f"pidfile={d / 'turnserver.pid'}",
                  f"userdb={d / 'turndb'}", f"log-file={self.log}", "simple-log",
                  "no-stdout-log"]
        if loopback_peers:
            lines.append("allow-loopback-peers")
        lines += list(extra)
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen[0], self.port)

    def start(self, timeout: float = 10.0, probe: Callable[[], bool] | None = None) -> "Coturn":
        self.proc = subprocess.Popen([*self.prefix, TURNSERVER, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        probe = probe or self._answers_binding
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"turnserver exited ({self.proc.returncode}): "
                                   f"{self.proc.stderr.read().decode(errors='replace')}\n"
                                   f"{self.log_text()}")
            if probe():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"turnserver did not answer within {timeout}s\n{self.log_text()}")

    def _answers_binding(self) -> bool:
        with socket.socket(self.probe_family, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            txid = os.urandom(12)
            s.sendto(stun.encode(stun.BINDING, stun.REQUEST, txid), self.address)
            try:
                data, _ = s.recvfrom(2048)
            except OSError:
                return False
            return stun.decode(data).txid == txid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if p is not None and p.stderr:
            p.stderr.close()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "Coturn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def drive(client, sock: socket.socket, until: Callable[[], bool], timeout: float,
          on_other: Callable[[bytes, tuple], None] | None = None,
          clock: Callable[[], float] = time.monotonic) -> bool:
    """Run ``client`` over ``sock`` until ``until()`` or ``timeout`` seconds.
    Datagrams that are neither STUN nor ChannelData go to ``on_other``."""
    from mpvpn.core import turn

    end = clock() + timeout
    while True:
        for data, dest in client.take_outgoing():
            sock.sendto(data, dest)
        if until():
            return True
        now = clock()
        if now >= end:
            return False
        dl = client.next_deadline()
        wait = min(end, dl if dl is not None else end) - now
        r, _, _ = select.select([sock], [], [], max(0.0, wait))
        now = clock()
        if r:
            data, src = sock.recvfrom(65535)
            if stun.looks_like_stun(data) or turn.is_channel_data(data):
                client.on_datagram(data, src, now)
            elif on_other is not None:
                on_other(data, src)
        dl = client.next_deadline()
        if dl is not None and now >= dl:
            client.on_timer(now)
