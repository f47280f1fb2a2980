"""The client's control-connection reconnect policy (sans-I/O): where and
when to connect next, backoff, BUSY, learned server addresses."""

from __future__ import annotations

import random
from collections import deque

#: Failures that retrying soon cannot fix (configuration): wait ``cap``.
CONFIG_FAILURES = frozenset({"auth", "version", "vnic", "overlap", "route", "invalid", "name", "lan"})


class ClientReconnect:
    """Where and when the client (re)connects its control connection.

    Rotates through the configured server addresses and, after the first
    success, also the server's uplink addresses learned from WELCOME
    (so losing the carrier that carried the control connection does not lose
    control).  After every failure it moves to the next address; the delay
    doubles after each full round of failures (``base``, ``base*factor``,
    ... up to ``cap``), reduced by up to ``jitter`` (a fraction) at random.
    Configuration failures (``CONFIG_FAILURES``) wait ``cap`` at once,
    except a first ``auth`` after anything else: a server closes silently on
    a wrong key, but also on a first message it never read (its connection
    pushed out by junk from our address, a copy raced ahead by someone on
    the path), so one ``auth`` is retried on the ordinary backoff and only a
    second one in a row waits ``cap``.
    A server that answered BUSY (it holds our key, but is out of handshake
    budget) is tried again at the same address after the delay it asked
    for, clamped to ``busy_min``..``busy_max`` and lengthened by up to
    ``jitter`` at random (so clients it turned away do not return in step);
    that is not counted as a failure.

    Sans-I/O: ``get_timer()`` says when to call ``handle_timer(now)``, which
    returns the address to connect to; report the outcome with
    ``failed(now, reason)`` (connect failed, or the connection ended) or
    ``established(now, learned)``.
    """

    def __init__(self, servers, now: float = 0.0, *, base: float = 1.0, factor: float = 2.0,
                 cap: float = 60.0, jitter: float = 0.3, rng: random.Random | None = None,
                 busy_min: float = 0.05, busy_max: float = 2.0):
        self.configured = [(str(h), int(p)) for h, p in servers]
        if not self.configured:
            raise ValueError("no server address configured")
        if not (0 < base <= cap and factor >= 1 and 0 <= jitter < 1):
            raise ValueError("need 0 < base <= cap, factor >= 1, 0 <= jitter < 1")
        self.base, self.factor, self.cap, self.jitter = base, factor, cap, jitter
        if not 0 < busy_min <= busy_max:
            raise ValueError("need 0 < busy_min <= busy_max")
        self.busy_min, self.busy_max = busy_min, busy_max
        self.busy = 0  # BUSY answers received
        # (now, what) of the last attempts and outcomes: "connect host:port",
        # "established", "busy", "failed <reason>" (the agent's own record)
        self.history: deque = deque(maxlen=32)
        self.rng = rng or random.Random()
        self.learned: list[tuple[str, int]] = []
        self.state = "waiting"  # waiting | connecting | connected
        self.failures = 0  # consecutive, since the last success
        self._auth = 0  # consecutive auth failures
        self.attempts = 0
        self.current: tuple[str, int] | None = None
        self._index = 0
        self._next = now

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.configured + [a for a in self.learned if a not in self.configured]

    def get_timer(self) -> float | None:
        return self._next if self.state == "waiting" else None

    def handle_timer(self, now: float) -> tuple[str, int] | None:
        if self.state != "waiting" or now < self._next:
            return None
        addrs = self.addresses
        self.current = addrs[self._index % len(addrs)]
        self.state = "connecting"
        self.attempts += 1
        self.history.append((now, f"connect {self.current[0]}:{self.current[1]}"))
        return self.current

    def established(self, now: float, learned=()) -> None:
        self.state = "connected"
        self.failures = 0
        self._auth = 0
        self.history.append((now, "established"))
        for a in learned:
            port = a[1] if a[1] is not None else (self.current[1] if self.current else None)
            if port is None:
                continue
            a = (str(a[0]), int(port))
            if a not in self.learned and a not in self.configured:
                self.learned.append(a)
        addrs = self.addresses
        if self.current in addrs:
            self._index = addrs.index(self.current)

    def failed(self, now: float, reason: str = "", retry_after: float | None = None) -> float:
        """The attempt failed or the connection ended; returns the delay.
        ``retry_after``: the server answered BUSY and asked for this delay."""
        self.state = "waiting"
        if retry_after is not None:
            self.busy += 1
            self.history.append((now, "busy"))
            delay = min(self.busy_max, max(self.busy_min, retry_after))
            delay *= 1.0 + self.jitter * self.rng.random()
            self._next = now + delay
            return delay
        self.history.append((now, f"failed {reason}"))
        n = len(self.addresses)
        self.failures += 1
        self._index = (self._index + 1) % n
        self._auth = self._auth + 1 if reason == "auth" else 0
        if reason in CONFIG_FAILURES and not (reason == "auth" and self._auth == 1):
            delay = self.cap
        else:
            rounds = (self.failures - 1) // n
            delay = min(self.cap, self.base * self.factor ** min(rounds, 64))
        delay *= 1.0 - self.jitter * self.rng.random()
        self.state = "waiting"
        self._next = now + delay
        return delay
