#!/usr/bin/env python3
"""Yardstick: the simplest possible Python tun <-> UDP forwarder (one carrier,
no encryption, no duplication, no reordering).  bench/agent.py runs it in the
same lab as the real agent, so the agent's figures can be quoted as a ratio.

    yardstick_fwd.py TUN_ADDR/PREFIX PEER_LAN LOCAL_IP PEER_IP PORT
"""
import fcntl
import os
import selectors
import socket
import struct
import subprocess
import sys

addr, peer_lan, local_ip, peer_ip, port = sys.argv[1:6]
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"yard0", 0x0001 | 0x1000))  # TUNSETIFF: IFF_TUN | IFF_NO_PI
for cmd in (["ip", "addr", "add", addr, "dev", "yard0"], ["ip", "link", "set", "yard0", "mtu", "1400", "up"],
            ["ip", "route", "add", peer_lan, "dev", "yard0"]):
    subprocess.run(cmd, check=True)
os.set_blocking(fd, False)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((local_ip, int(port)))
sock.setblocking(False)
dst = (peer_ip, int(port))
sel = selectors.DefaultSelector()
sel.register(fd, selectors.EVENT_READ, "tun")
sel.register(sock, selectors.EVENT_READ, "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        for _ in range(256):
            try:
                if key.data == "tun":
                    sock.sendto(os.read(fd, 65535), dst)
                else:
                    os.write(fd, sock.recv(65535))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                pass
