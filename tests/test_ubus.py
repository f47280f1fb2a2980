"""The ubus transport, against a stand-in with python-ubus's API and its
strict argument check (no ubusd here: no OpenWrt binaries on this machine)."""

import concurrent.futures
import threading
import time

from mpvpn import ubus as ubusmod


class FakeUbus:
    """python-ubus's module-level API; ``call`` plays a client (ubus call / rpcd)."""

    BLOBMSG_TYPE_STRING = 3
    BLOBMSG_TYPE_INT32 = 5

    def __init__(self):
        self.objects = {}
        self.sent = []
        self.pending = []
        self.connected_to = None
        self.lock = threading.Lock()

    def connect(self, path):
        self.connected_to = path

    def disconnect(self):
        self.connected_to = None

    def add(self, name, methods):
        for m in methods.values():  # what python-ubus's test_methods_argument insists on
            assert set(m) == {"method", "signature"} and callable(m["method"])
            assert all(isinstance(k, str) and isinstance(v, int) for k, v in m["signature"].items())
        self.objects[name] = methods

    def loop(self, timeout_ms):
        with self.lock:
            todo, self.pending = self.pending, []
        for obj, method, args, box in todo:
            spec = self.objects[obj][method]
            # libubus policy check as python-ubus does it: unknown arguments refused
            if any(k not in spec["signature"] for k in args):
                box["status"] = "UBUS_STATUS_INVALID_ARGUMENT"
                box["done"].set()
                continue

            class Req:
                def reply(self_, data):
                    box["reply"] = data

            spec["method"](Req(), args)
            box["status"] = "UBUS_STATUS_OK"
            box["done"].set()
        time.sleep(timeout_ms / 1000 / 10)

    def send(self, event, data):
        self.sent.append((event, data))

    def call(self, obj, method, args, timeout=3):
        box = {"done": threading.Event()}
        with self.lock:
            self.pending.append((obj, method, args, box))
        assert box["done"].wait(timeout), "no answer"
        return box


def inline_post(fn):
    fut = concurrent.futures.Future()
    try:
        fut.set_result(fn())
    except Exception as e:
        fut.set_exception(e)
    return fut


def test_methods_answer_plain_and_rpcd_calls_and_events_go_out(tmp_path):
    fake = FakeUbus()
    seen = []

    def status(args):
        seen.append(args)
        return {"state": "connected"}

    t = ubusmod.UbusTransport(fake, "/var/run/ubus/ubus.sock", {"status": status,
                                                                "reconnect": lambda a: {"ok": True}},
                              inline_post)
    assert t.start()
    try:
        assert fake.connected_to == "/var/run/ubus/ubus.sock" and set(fake.objects["orayboxvpn"]) == {
            "status", "reconnect"}
        assert fake.call("orayboxvpn", "status", {})["reply"] == {"state": "connected"}
        # through rpcd (LuCI): the extra session argument is accepted and not passed on
        box = fake.call("orayboxvpn", "status", {"ubus_rpc_session": "0123abcd"})
        assert box["status"] == "UBUS_STATUS_OK" and box["reply"] == {"state": "connected"}
        assert seen == [{}, {}]
        assert fake.call("orayboxvpn", "status", {"bogus": 1})["status"] == "UBUS_STATUS_INVALID_ARGUMENT"
        t.send_event("orayboxvpn.link", {"member": 1, "state": "down"})
        end = time.monotonic() + 2
        while not fake.sent and time.monotonic() < end:
            time.sleep(0.01)
        assert fake.sent == [("orayboxvpn.link", {"member": 1, "state": "down"})]
    finally:
        t.stop()
    assert fake.connected_to is None


def test_a_failing_handler_answers_with_an_error():
    fake = FakeUbus()

    def broken(args):
        raise ValueError("nope")

    t = ubusmod.UbusTransport(fake, "/x", {"status": broken}, inline_post)
    assert t.start()
    try:
        assert fake.call("orayboxvpn", "status", {})["reply"] == {"error": "ValueError: nope"}
    finally:
        t.stop()


def test_available_reports_why_not():
    import os

    has_socket = any(os.path.exists(p) for p in ubusmod.SOCKET_PATHS)
    fake = FakeUbus()
    mod, where = ubusmod.available(fake)
    if has_socket:
        assert mod is fake and where in ubusmod.SOCKET_PATHS
    else:
        assert (mod, where) == (None, "no ubusd socket")


def test_test_links_declares_its_arguments_with_blobmsg_types():
    fake = FakeUbus()
    seen = []

    def test_links(args):
        seen.append(args)
        return {"started": True, "id": 1}

    t = ubusmod.UbusTransport(fake, "/x", {"test_links": test_links, "status": lambda a: {}}, inline_post)
    assert t.start()
    try:
        sig = fake.objects["orayboxvpn"]["test_links"]["signature"]
        assert sig == {"ubus_rpc_session": 3, "duration": 5, "peer": 3}  # STRING, INT32, STRING
        box = fake.call("orayboxvpn", "test_links", {"duration": 2, "ubus_rpc_session": "s"})
        assert box["reply"] == {"started": True, "id": 1} and seen == [{"duration": 2}]
        # status takes no arguments of its own
        assert fake.call("orayboxvpn", "status", {"duration": 2})["status"] == "UBUS_STATUS_INVALID_ARGUMENT"
    finally:
        t.stop()
