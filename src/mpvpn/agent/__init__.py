"""The daemon: lifecycle, event loop and wiring (``agent.py``), the per-packet
data path (``send.py``, ``receive.py``), the configuration model and checks
(``config.py``, ``check.py``) and the status document (``statusdoc.py``)."""
