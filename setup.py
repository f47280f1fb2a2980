"""Only the optional C loops (src/mpvpn/core/_fastpath.c) need setup.py; the rest
is in pyproject.toml.  ``optional=True``: without a compiler the package
installs anyway and runs the pure-Python path (mpvpn.core.fastpath)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mpvpn.core._fastpath", ["src/mpvpn/core/_fastpath.c"], optional=True,
                             extra_compile_args=["-O2"])])
