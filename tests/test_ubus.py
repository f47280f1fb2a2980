"""The ubus object ``orayboxvpn``: the wire format, every documented call
(from the shell and through rpcd/uhttpd, every argument optional), events,
and re-publishing after a ubusd restart.

Against the stand-in ubusd (tests/ubusd_standin.py) everywhere, and against
OpenWrt's real ubusd and ``ubus`` CLI when they are on PATH.
"""

import concurrent.futures
import json
import logging
import os
import shutil
import subprocess
import time

import pytest
from ubusd_standin import StandinUbusd

from mpvpn.io import ubus as ubusmod
from mpvpn.io import ubusmsg as um


def inline_post(fn):
    fut = concurrent.futures.Future()
    try:
        fut.set_result(fn())
    except Exception as e:
        fut.set_exception(e)
    return fut


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# -- wire format ----------------------------------------------------------------

def test_blobmsg_bytes_are_libubox_layout():
    # blobmsg_add_u32(b, "a", 1): extended | INT32<<24 | len 12; namelen 1, "a\0", pad; be32 1
    assert um.encode_value("a", 1) == bytes.fromhex("8500000c 00016100 00000001")
    # blobmsg_add_string(b, "s", "xy"): len 11 (header 4 + name 4 + "xy\0"), padded to 12
    assert um.encode_value("s", "xy") == bytes.fromhex("8300000b 00017300 78790000")
    # bool is INT8 (len 13); a name of 2 pads the header to 8; null is UNSPEC with no data
    assert um.encode_value("ok", True) == bytes.fromhex("8700000d 00026f6b 00000000 01000000")
    assert um.encode_value("n", None) == bytes.fromhex("80000008 00016e00")
    assert um.encode_value("big", 2**40)[0] == 0x84 and um.encode_value("d", 0.5)[0] == 0x88
    # ubus_send_msg: header (version 0, type, be16 seq, be32 peer), blob id 0 holding plain attributes
    msg = um.pack(um.STATUS, 7, 0x1234, um.u32(um.ATTR_STATUS, 2))
    assert msg == bytes.fromhex("00010007 00001234 0000000c 01000008 00000002")


def test_decoding_round_trips_and_refuses_malformed_input():
    doc = {"state": "connected", "n": -5, "big": 2**40, "f": 1.25, "ok": False, "none": None,
           "list": [1, "x", {"k": []}], "t": {"a": {"b": "c"}}}
    assert um.decode_table(um.encode_table(doc)) == doc
    good = um.encode_table({"duration": 3})
    for bad in (good[:-1], good[:3], bytes.fromhex("85000002"), bytes.fromhex("0500000c00016100"),
                bytes.fromhex("850000ff") + good[4:]):
        with pytest.raises(um.BlobError):
            um.decode_table(bad)
    r = um.Reader()
    frame = um.pack(um.INVOKE, 3, 9, um.u32(um.ATTR_OBJID, 5), um.string(um.ATTR_METHOD, "status"),
                    um.blob_attr(um.ATTR_DATA, good))
    got = []
    for i in range(len(frame)):  # byte by byte: reassembled once complete
        got += r.feed(frame[i:i + 1])
    assert len(got) == 1 and (got[0].type, got[0].seq, got[0].peer) == (um.INVOKE, 3, 9)
    assert got[0].string(um.ATTR_METHOD) == "status" and um.decode_table(got[0].attrs[um.ATTR_DATA]) == {
        "duration": 3}
    with pytest.raises(um.BlobError):
        um.Reader().feed(b"\x01" + frame[1:])  # version must be 0 (ubus_validate_hdr)


def test_argument_check_makes_every_argument_optional_and_accepts_rpc_session():
    f = lambda d: um.decode_fields(um.encode_table(d))  # noqa: E731
    assert ubusmod.check_args("status", f({})) == ({}, None)
    assert ubusmod.check_args("status", f({"ubus_rpc_session": "s"})) == ({}, None)
    assert ubusmod.check_args("test_links", f({})) == ({}, None)
    assert ubusmod.check_args("test_links", f({"duration": 3})) == ({"duration": 3}, None)
    assert ubusmod.check_args("test_links", f({"duration": 2.5, "peer": "b", "ubus_rpc_session": "s"})) == (
        {"duration": 2.5, "peer": "b"}, None)
    assert "unknown argument 'x'" in ubusmod.check_args("status", f({"x": 1}))[1]
    assert "duration must be a number" in ubusmod.check_args("test_links", f({"duration": "3"}))[1]
    assert "duration must be a number" in ubusmod.check_args("test_links", f({"duration": True}))[1]
    assert "peer must be a string" in ubusmod.check_args("test_links", f({"peer": 1}))[1]


# -- against the stand-in ubusd ----------------------------------------------------

HANDLERS_SEEN = []


def handlers():
    HANDLERS_SEEN.clear()

    def rec(name, result):
        def fn(args):
            HANDLERS_SEEN.append((name, args))
            return result
        return fn

    return {"status": rec("status", {"state": "connecting"}), "reconnect": rec("reconnect", {"ok": True}),
            "test_links": rec("test_links", {"error": "no connected session"})}


@pytest.fixture
def ubusd(tmp_path):
    d = StandinUbusd(str(tmp_path / "ubus.sock"))
    yield d
    d.stop()


def test_every_documented_call_works_from_the_shell_and_through_rpcd(ubusd):
    t = ubusmod.UbusTransport(handlers(), inline_post, socket_path=ubusd.path)
    assert t.start()
    try:
        assert "orayboxvpn" in ubusd.objects()
        # the README/docs commands, as typed
        assert ubusd.call("orayboxvpn", "status") == (0, {"state": "connecting"})
        assert ubusd.call("orayboxvpn", "reconnect") == (0, {"ok": True})
        assert ubusd.call("orayboxvpn", "test_links", {"duration": 3})[0] == 0
        assert ubusd.call("orayboxvpn", "test_links")[0] == 0
        # LuCI through uhttpd/rpcd: ubus_rpc_session is added to every call, and not passed on
        s = {"ubus_rpc_session": "0123456789abcdef0123456789abcdef"}
        assert ubusd.call("orayboxvpn", "status", s) == (0, {"state": "connecting"})
        assert ubusd.call("orayboxvpn", "reconnect", s)[0] == 0
        assert ubusd.call("orayboxvpn", "test_links", dict(s, duration=3))[0] == 0
        assert HANDLERS_SEEN == [("status", {}), ("reconnect", {}), ("test_links", {"duration": 3}),
                                 ("test_links", {}), ("status", {}), ("reconnect", {}),
                                 ("test_links", {"duration": 3})]
        # refused before the handler runs
        assert ubusd.call("orayboxvpn", "status", {"bogus": 1}) == (um.STATUS_INVALID_ARGUMENT, None)
        assert ubusd.call("orayboxvpn", "test_links", {"duration": "3"}) == (um.STATUS_INVALID_ARGUMENT, None)
        assert ubusd.call("orayboxvpn", "nope") == (um.STATUS_METHOD_NOT_FOUND, None)
        assert ubusd.call("orayboxvpn", "status", raw_data=b"\x85\x00") == (um.STATUS_INVALID_ARGUMENT, None)
        assert len(HANDLERS_SEEN) == 7
    finally:
        t.stop()
    assert wait_for(lambda: "orayboxvpn" not in ubusd.objects())


def test_events_go_out_and_a_failing_handler_answers_with_an_error(ubusd):
    def broken(args):
        raise ValueError("nope")

    t = ubusmod.UbusTransport({"status": broken}, inline_post, socket_path=ubusd.path)
    assert t.start()
    try:
        assert ubusd.call("orayboxvpn", "status") == (0, {"error": "ValueError: nope"})
        t.send_event("orayboxvpn.link", {"member": 1, "state": "down"})
        assert wait_for(lambda: ubusd.events)
        assert ubusd.events == [("orayboxvpn.link", {"member": 1, "state": "down"})]
    finally:
        t.stop()


def test_an_answer_too_big_for_ubusd_is_an_error_not_a_lost_connection(ubusd):
    t = ubusmod.UbusTransport({"status": lambda a: {"blob": "x" * um.MAX_MSGLEN}}, inline_post,
                              socket_path=ubusd.path)
    assert t.start()
    try:
        assert ubusd.call("orayboxvpn", "status") == (um.STATUS_UNKNOWN_ERROR, None)
        assert t.publishes == 1 and t.published
    finally:
        t.stop()


def test_the_object_comes_back_after_ubusd_restarts_and_the_agent_says_so(ubusd, caplog):
    caplog.set_level(logging.INFO, logger="mpvpn.io.ubus")
    t = ubusmod.UbusTransport(handlers(), inline_post, socket_path=ubusd.path, backoff=(0.05, 0.2))
    assert t.start()
    try:
        first = ubusd.objects()["orayboxvpn"]
        ubusd.restart()
        assert wait_for(lambda: "orayboxvpn" in ubusd.objects())
        assert ubusd.objects()["orayboxvpn"] != first  # a new registration on the new ubusd
        assert ubusd.call("orayboxvpn", "status") == (0, {"state": "connecting"})
        assert t.publishes == 2 and t.published
        # ubusd away for a while (its socket gone): retried with backoff, logged once
        ubusd.stop()
        assert wait_for(lambda: not t.published)
        time.sleep(0.5)
        ubusd._listen()
        assert wait_for(lambda: "orayboxvpn" in ubusd.objects())
        assert t.publishes == 3
    finally:
        t.stop()
    text = caplog.text
    assert text.count("lost connection to ubusd") == 2
    assert text.count("re-published after") == 2
    # the loss was said once per outage; the retries while ubusd was away add no warnings
    assert "cannot publish ubus object orayboxvpn" not in [r.getMessage()[:37] for r in caplog.records if r.levelno >= logging.WARNING]


def test_find_socket_is_none_on_a_plain_host(tmp_path):
    assert ubusmod.find_socket([str(tmp_path / "nope")]) is None
    (tmp_path / "s").write_text("")
    assert ubusmod.find_socket([str(tmp_path / "nope"), str(tmp_path / "s")]) == str(tmp_path / "s")


def test_every_handler_needs_an_argument_list():
    with pytest.raises(ValueError, match="frobnicate"):
        ubusmod.UbusTransport({"frobnicate": lambda a: {}}, inline_post, socket_path="/x")


# -- against OpenWrt's real ubusd and ubus CLI -------------------------------------

REAL = shutil.which("ubusd") and shutil.which("ubus")


@pytest.mark.skipif(not REAL, reason="OpenWrt's ubusd and ubus CLI are not on PATH")
def test_against_real_ubusd_and_ubus_cli(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mpvpn.io.ubus")
    sock = str(tmp_path / "ubus.sock")

    def start_ubusd():
        p = subprocess.Popen([shutil.which("ubusd"), "-s", sock])
        assert wait_for(lambda: os.path.exists(sock))
        return p

    def ubus(*args):
        r = subprocess.run([shutil.which("ubus"), "-s", sock, *args], capture_output=True, text=True, timeout=30)
        return r.returncode, json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else r.stderr

    d = start_ubusd()
    t = ubusmod.UbusTransport(handlers(), inline_post, socket_path=sock, backoff=(0.05, 0.2))
    try:
        assert t.start()
        assert ubus("call", "orayboxvpn", "status") == (0, {"state": "connecting"})
        assert ubus("call", "orayboxvpn", "reconnect") == (0, {"ok": True})
        assert ubus("call", "orayboxvpn", "test_links", '{"duration": 3}')[0] == 0
        assert ubus("call", "orayboxvpn", "test_links")[0] == 0
        assert ubus("call", "orayboxvpn", "status", '{"ubus_rpc_session": "abc"}')[0] == 0
        assert ubus("call", "orayboxvpn", "test_links", '{"duration": 2, "ubus_rpc_session": "abc"}')[0] == 0
        rc, err = ubus("call", "orayboxvpn", "status", '{"x": 1}')
        assert rc != 0 and "Invalid argument" in err
        # ubusd restarts: the object is back within seconds
        d.terminate()
        d.wait(5)
        os.unlink(sock) if os.path.exists(sock) else None
        d = start_ubusd()
        assert wait_for(lambda: ubus("call", "orayboxvpn", "status")[0] == 0, timeout=10)
    finally:
        t.stop()
        d.terminate()
        d.wait(5)
    assert "lost connection to ubusd" in caplog.text and "re-published after" in caplog.text


# -- a real agent on ubus ------------------------------------------------------------

@pytest.mark.usefixtures("netlab_ready")
def test_a_running_agent_answers_on_ubus_sends_events_and_survives_a_ubusd_restart(make_lab, tmp_path):
    from agentlab import TwoSites

    d = StandinUbusd(str(tmp_path / "ubus.sock"))
    lab = make_lab(carriers=2)
    try:
        with TwoSites(lab, carriers=2) as ts:
            ts.b.start()
            ts.b.wait(lambda s: True, 10, "server up")
            ts.a.start(args_extra=("--ubus-socket", d.path))
            ts.a.wait_connected(2)
            assert wait_for(lambda: "orayboxvpn" in d.objects())
            status, doc = d.call("orayboxvpn", "status")
            assert status == 0 and doc["state"] == "connected" and doc["role"] == "client"
            assert wait_for(lambda: any(e == "orayboxvpn.session" and v.get("state") == "connected"
                                        for e, v in d.events))
            assert any(e == "orayboxvpn.link" for e, _v in d.events)
            # LuCI's Test links: {duration} plus the session id uhttpd adds
            status, doc = d.call("orayboxvpn", "test_links", {"duration": 0.5, "ubus_rpc_session": "s" * 32})
            assert status == 0 and doc["started"] is True, doc
            d.restart()
            assert wait_for(lambda: "orayboxvpn" in d.objects(), 15)
            assert d.call("orayboxvpn", "status")[1]["role"] == "client"
            log = ts.a.log()
            assert "lost connection to ubusd" in log and "re-published after" in log
            assert "Traceback" not in log
    finally:
        d.stop()
