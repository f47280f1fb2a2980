"""``make fastpath``: compile the optional C loops (``mpvpn/core/_fastpath.c``)
in place, next to their loader ``mpvpn.core.fastpath``."""

from __future__ import annotations


def build() -> int:
    """Compile ``_fastpath.c`` in place with the compiler and flags this
    Python was built with (``make fastpath``).  Returns 0, or 1 with the
    reason printed (no compiler, no Python headers)."""
    import shlex
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "core" / "_fastpath.c"
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
        sys.exit("usage: python -m mpvpn.tools.fastpath_build --build")
    sys.exit(build())
