"""The local status transport (unix socket) with a real selector loop."""

import json
import selectors
import socket
import threading

import pytest

from mpvpn.io import rpc


@pytest.fixture
def server(tmp_path):
    sel = selectors.DefaultSelector()
    calls = []

    def status(args):
        calls.append(args)
        return {"state": "connected", "n": len(calls)}

    def boom(args):
        raise RuntimeError("handler bug")

    srv = rpc.RpcServer(rpc.socket_path(str(tmp_path)), {"status": status, "boom": boom}, sel)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            for key, mask in sel.select(0.05):
                key.data(mask)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv, calls
    stop.set()
    t.join(2)
    srv.close()


def test_call_returns_the_handlers_result(server, tmp_path):
    srv, calls = server
    path = rpc.socket_path(str(tmp_path))
    assert rpc.call(path, "status") == {"state": "connected", "n": 1}
    assert rpc.call(path, "status", {"ubus_rpc_session": "x"})["n"] == 2
    assert calls[1] == {"ubus_rpc_session": "x"}  # extra arguments (as rpcd adds) are accepted


def test_errors_are_replies_not_crashes(server, tmp_path):
    path = rpc.socket_path(str(tmp_path))
    with pytest.raises(rpc.RpcError, match="unknown method 'nope'"):
        rpc.call(path, "nope")
    with pytest.raises(rpc.RpcError, match="RuntimeError: handler bug"):
        rpc.call(path, "boom")
    for raw in (b"not json\n", b'{"method": 5}\n', b'{"method": "status", "args": [1]}\n'):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(raw)
        reply = json.loads(s.makefile().readline())
        s.close()
        assert reply["ok"] is False and reply["error"]
    assert rpc.call(path, "status")["state"] == "connected"  # still serving


def test_oversized_request_is_refused(server, tmp_path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(rpc.socket_path(str(tmp_path)))
    s.sendall(b"x" * (rpc.MAX_REQUEST + 10))
    reply = json.loads(s.makefile().readline())
    assert reply == {"ok": False, "error": "request too large"}


def test_no_agent_is_a_clear_error(tmp_path):
    with pytest.raises(rpc.RpcError, match="not running"):
        rpc.call(rpc.socket_path(str(tmp_path)), "status")


def test_stale_socket_file_is_replaced_and_removed_on_close(tmp_path):
    path = rpc.socket_path(str(tmp_path))
    open(path, "w").close()  # left by a crashed agent
    sel = selectors.DefaultSelector()
    srv = rpc.RpcServer(path, {}, sel)
    srv.close()
    import os

    assert not os.path.exists(path)


def test_an_agent_that_resets_the_call_is_a_clear_error(tmp_path):
    """An agent that closes its socket mid-call (it is restarting) gives RpcError, not a traceback."""
    import time
    path = str(tmp_path / "reset.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)

    def reset_once():
        conn, _ = lst.accept()
        time.sleep(0.2)  # let the request arrive: closed unread, it resets the caller's socket
        conn.close()

    t = threading.Thread(target=reset_once, daemon=True)
    t.start()
    try:
        with pytest.raises(rpc.RpcError):
            rpc.call(path, "status", timeout=10)
    finally:
        t.join(5)
        lst.close()
