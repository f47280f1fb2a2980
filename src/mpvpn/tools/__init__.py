"""What runs on a PC, never on the router: ``make ipk`` / ``make apk``
(``ipk.py``, ``apk.py``), ``mpvpn pair``, ``mpvpn demo`` and its simulator.
The router package leaves this directory out; nothing under core, io or agent
imports it (tests/test_layers.py)."""
