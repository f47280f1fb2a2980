"""Only the optional C loops (src/mpvpn/_fastpath.c) need setup.py; the rest
is in pyproject.toml.  ``optional=True``: without a compiler the package
installs anyway and runs the pure-Python path (mpvpn.fastpath)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mpvpn._fastpath", ["src/mpvpn/_fastpath.c"], optional=True,
                             extra_compile_args=["-O2"])])
