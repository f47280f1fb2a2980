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


def build() -> int:
    """Compile ``_fastpath.c`` in place with the compiler and flags this
    Python was built with (``make fastpath``).  Returns 0, or 1 with the
    reason printed (no compiler, no Python headers)."""
    import shlex
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    src = Path(__file__).with_name("_fastpath.c")
    out = src.with_name("_fastpath" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        print(f"no Python headers in {include} (apt-get install python3-dev)", file=sys.stderr)
        return 1
    ldshared = shlex.split(sysconfig.get_config_var("LDSHARED") or "cc -shared")
    cmd = ldshared + ["-O2", "-fPIC", "-Wall", f"-I{include}", str(src), "-o", str(out)]
    try:
        r = subprocess.run(cmd)
    except FileNotFoundError:
        print(f"no C compiler ({ldshared[0]})", file=sys.stderr)
        return 1
    if r.returncode == 0:
        print(f"built {out}")
    return 1 if r.returncode else 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--build"]:
        sys.exit("usage: python -m mpvpn.core.fastpath --build")
    sys.exit(build())
