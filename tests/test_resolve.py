"""mpvpn.io.resolve: getaddrinfo off the agent's loop, results handed back
through ``post`` (the agent's queue + wake byte)."""

import queue
import socket
import threading

from mpvpn.io.resolve import Resolver


def test_a_hanging_lookup_does_not_block_the_caller_and_answers_through_post():
    release = threading.Event()
    calls = []

    def slow_gai(host, port, family, type_):
        calls.append((host, port, family, type_))
        assert release.wait(30)  # a dead DNS server: the resolver's timeout
        return [(family, type_, 17, "", ("203.0.113.9", port))]

    posted = queue.SimpleQueue()
    r = Resolver(posted.put, getaddrinfo=slow_gai)
    got = []
    r.lookup("turn.example.test", 3478, socket.AF_INET, got.append)  # returns at once
    assert got == [] and r.started == 1 and r.finished == 0
    release.set()
    fn = posted.get(timeout=30)  # the thread hands the result to the loop's thread ...
    assert got == []
    fn()  # ... where it runs
    assert got[0][0][4] == ("203.0.113.9", 3478) and r.finished == 1
    assert calls == [("turn.example.test", 3478, socket.AF_INET, socket.SOCK_DGRAM)]


def test_a_failed_lookup_answers_with_its_error():
    def no_name(host, port, family, type_):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    posted = queue.SimpleQueue()
    got = []
    Resolver(posted.put, getaddrinfo=no_name).lookup("nope.invalid", 3478, socket.AF_INET, got.append)
    posted.get(timeout=30)()
    assert isinstance(got[0], socket.gaierror) and "not known" in str(got[0])
