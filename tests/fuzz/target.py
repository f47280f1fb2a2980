"""The entry point every fuzz target shares: ``python tests/fuzz/fuzz_X.py
[libFuzzer flags] [corpus dirs or crash files]``."""

from __future__ import annotations

import sys


def fuzz_main(test_one_input, argv=None, setup=()) -> None:
    """Run ``test_one_input`` under atheris; ``setup``: callables that build
    the target's fixed state first (outside the measured runs)."""
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris")
    for build in setup:
        build()
    atheris.Setup(list(sys.argv if argv is None else argv), test_one_input)
    atheris.Fuzz()
