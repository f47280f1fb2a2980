"""The protocol, sans-I/O: bytes, events and ``now`` in; bytes, events and the
next deadline out.  Nothing here touches sockets, clocks, threads or netlink
(tests/test_layers.py checks the imports)."""
