"""Name lookups off the agent's loop.

``socket.getaddrinfo`` blocks: on a router at boot, or with a dead DNS
server, one call can take the resolver's whole timeout (5 s per try, several
tries), and the agent's single loop carries every subflow.  A
:class:`Resolver` runs each lookup in a daemon thread and hands the result
back on the agent's thread through ``post`` (:meth:`mpvpn.agent.agent.Agent.post`:
a queue plus a byte on the loop's wake socket), so the callback runs
between two turns of the loop like any other event and needs no lock.

Why a thread rather than resolving at config load and on SIGHUP: the load
runs on the same loop (a reload would block it just the same), and at boot
the WAN and its DNS are often not up yet when the agent starts, so a name
would stay unresolved until the next reload; a thread per lookup also lets
an uplink that comes up later (hotplug) look its names up without a stall.
The standard library's threads are all it takes (no asyncio, no c-ares).
"""

from __future__ import annotations

import socket
import threading


class Resolver:
    """``lookup(host, port, family, done)``: ``done(result)`` later, on the
    thread ``post`` runs functions on, with ``getaddrinfo``'s list of
    (family, type, proto, canonname, sockaddr) or the OSError/UnicodeError
    it raised."""

    def __init__(self, post, getaddrinfo=socket.getaddrinfo):
        self._post = post
        self._gai = getaddrinfo
        self.started = 0  # lookups started
        self.finished = 0  # results handed back

    def lookup(self, host: str, port: int, family: int, done) -> None:
        self.started += 1

        def run():
            try:
                res = self._gai(host, port, family, socket.SOCK_DGRAM)
            except (OSError, UnicodeError) as e:
                res = e
            self._post(lambda: self._finish(done, res))

        threading.Thread(target=run, name=f"resolve {host}", daemon=True).start()

    def _finish(self, done, res) -> None:
        self.finished += 1
        done(res)
