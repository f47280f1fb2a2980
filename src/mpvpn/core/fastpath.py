"""The optional C loops of the duplicate-mode data path (``_fastpath.c``).

``LOOPS`` is the compiled module, or ``None`` when it is not built (a
router without the package's compiled part, a checkout before ``make
fastpath``) or when the environment says ``MPVPN_FASTPATH=0``.  Every caller
falls back to the pure-Python path, which stays the reference: the C loops
produce the same datagrams and the same state changes (tests compare them).
"""

from __future__ import annotations

import os

LOOPS = None
WHY = "disabled by MPVPN_FASTPATH=0"
if os.environ.get("MPVPN_FASTPATH", "1") != "0":
    try:
        from mpvpn.core import _fastpath as LOOPS  # noqa: N812
        WHY = None
    except ImportError as e:
        WHY = f"not built ({e})"
