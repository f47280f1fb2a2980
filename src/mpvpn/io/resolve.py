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

import ipaddress
import logging
import socket
import threading

log = logging.getLogger("mpvpn")


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


class NameList:
    """Configured entries (in their order) whose address may be a host name:
    numeric ones of the socket's ``family`` (4 or 6) are there at once,
    names are looked up through ``lookup`` (a :class:`Resolver`'s, answers
    later) or, without it, ``resolve`` (getaddrinfo, at once: tests and
    tools).  ``address(entry)`` gives the entry's HostPort (``host``,
    ``port``, ``ip``); ``make(entry, ip, port)`` the value kept for it;
    ``what`` names the entries in problems ("cannot resolve relay x:3478:
    ..."); ``on_answer()`` runs (on the loop's thread) after each late answer."""

    def __init__(self, entries, family: int, *, address, make, what: str, lookup=None,
                 resolve=socket.getaddrinfo, on_answer=None):
        self.problems: list[str] = []
        self._make = make
        self._what = what
        self._on_answer = on_answer
        self._slots: list = []  # [value or None, settled]
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        names = []
        for e in entries:
            hp = address(e)
            if hp.ip is None:
                names.append((len(self._slots), e, hp))
                self._slots.append([None, False])
            elif hp.ip.version == family:
                self._slots.append([make(e, str(hp.ip), hp.port), True])
        for i, e, hp in names:
            if lookup is not None:
                lookup(hp.host, hp.port, fam, lambda res, i=i, e=e, hp=hp: self._late(i, e, hp, res))
                continue
            try:
                res = resolve(hp.host, hp.port, fam, socket.SOCK_DGRAM)
            except (OSError, UnicodeError) as err:
                res = err
            self._settle(i, e, hp, res)

    @property
    def looking_up(self) -> bool:
        """Are names still being looked up?"""
        return any(not settled for _, settled in self._slots)

    def values(self) -> list:
        """The values of the entries known so far, in the configured order."""
        return [v for v, settled in self._slots if settled and v is not None]

    def _settle(self, i: int, entry, hp, res) -> None:
        value = None
        if isinstance(res, BaseException):
            problem = f"cannot resolve {self._what} {hp}: {res}"
            log.warning("%s", problem)
            self.problems.append(problem)
        elif res:
            a = res[0][4]
            value = self._make(entry, str(ipaddress.ip_address(a[0].split("%")[0])), a[1])
        self._slots[i] = [value, True]

    def _late(self, i: int, entry, hp, res) -> None:
        self._settle(i, entry, hp, res)
        if self._on_answer is not None:
            self._on_answer()
