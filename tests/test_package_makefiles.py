"""The OpenWrt recipes: package/orayboxvpn/Makefile, feeds.conf and the top-level Makefile's ipk target.

``DEPENDS`` of orayboxvpn is checked against what src/mpvpn really imports,
so adding an import without its OpenWrt package (or keeping a dependency
nothing imports) fails here.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

from mpvpn import __version__
from mpvpn.tools import ipk

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "package" / "orayboxvpn" / "Makefile"

# Standard-library modules OpenWrt splits out of python3-light
# (openwrt/packages lang/python/python3/files/python3-package-*.mk).
STDLIB_SPLIT = {
    "asyncio": "python3-asyncio",
    "cgi": "python3-cgi",
    "cgitb": "python3-cgitb",
    "ctypes": "python3-ctypes",
    "curses": "python3-ncurses",
    "dbm": "python3-dbm",
    "decimal": "python3-decimal",
    "distutils": "python3-distutils",
    "email": "python3-email",
    "http": "python3-email",  # http.client imports email
    "lib2to3": "python3-lib2to3",
    "logging": "python3-logging",
    "lzma": "python3-lzma",
    "multiprocessing": "python3-multiprocessing",
    "pydoc": "python3-pydoc",
    "readline": "python3-readline",
    "sqlite3": "python3-sqlite3",
    "ssl": "python3-openssl",
    "unicodedata": "python3-codecs",
    "unittest": "python3-unittest",
    "urllib": "python3-urllib",
    "uuid": "python3-uuid",
    "venv": "python3-venv",
    "webbrowser": "python3-webbrowser",
    "xml": "python3-xml",
}
NOT_ON_OPENWRT = {"tkinter", "idlelib", "turtledemo", "ensurepip", "test"}
# Third-party imports and the OpenWrt package that provides them.
THIRD_PARTY = {
    "cryptography": "python3-cryptography",
    "ubus": "python3-ubus",
    "jinja2": "python3-jinja2",
}
# Imported only by tools that are not needed on the router (lazily, inside functions).
OPTIONAL = {"jinja2": "mpvpn pair (meant for a PC; `opkg install python3-jinja2` to use it on the router)"}


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for every absolute import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:
        for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            top.add(id(n))
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(a.name.split(".")[0], id(n) in top) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            out.append((n.module.split(".")[0], id(n) in top))
    return out


def required_packages() -> tuple[set[str], dict[str, list[str]]]:
    need: set[str] = set()
    where: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "mpvpn").rglob("*.py")):
        for mod, at_top in imports_of(path):
            if mod in ("mpvpn", "__future__"):
                continue
            where.setdefault(mod, []).append(path.name)
            assert mod not in NOT_ON_OPENWRT, f"{path.name} imports {mod}, which OpenWrt's python3 lacks"
            if mod in STDLIB_SPLIT:
                need.add(STDLIB_SPLIT[mod])
            elif mod in sys.stdlib_module_names:
                continue  # in python3-light
            elif mod in OPTIONAL:
                assert not at_top, f"{path.name}: import {mod} inside the function that needs it ({OPTIONAL[mod]})"
            elif mod in THIRD_PARTY:
                need.add(THIRD_PARTY[mod])
            else:
                pytest.fail(f"{path.name} imports {mod}: add it to THIRD_PARTY in this test "
                            "(with its OpenWrt package) and to DEPENDS in package/orayboxvpn/Makefile")
    return need, where


def test_depends_match_imports():
    mk = ipk.parse_makefile(CORE)
    depends = mk.package_fields("orayboxvpn")["DEPENDS"].split()
    assert all(d.startswith("+") for d in depends), depends
    names = [d[1:] for d in depends]
    assert len(names) == len(set(names))
    assert names[0] == "python3-light"
    assert "kmod-tun" in names  # the vNIC is a tun device
    need, where = required_packages()
    have = {n for n in names if n.startswith("python3-")} - {"python3-light"}
    missing, extra = need - have, have - need
    assert not missing, f"DEPENDS lacks {sorted(missing)} (imported by the agent)"
    assert not extra, f"DEPENDS has {sorted(extra)}, which nothing in src/mpvpn imports"
    assert "jinja2" not in mk.package_fields("orayboxvpn")["DEPENDS"]


def test_core_makefile_variables():
    text = CORE.read_text()
    mk = ipk.parse_makefile(CORE)
    assert mk.var("PKG_NAME") == "orayboxvpn"
    assert mk.var("PKG_VERSION") == __version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__
    assert mk.var("PKG_LICENSE") == "GPL-2.0-only" == pyproject["project"]["license"]
    includes = re.findall(r"^include (\S+)$", text, re.M)
    assert includes == ["$(TOPDIR)/rules.mk", "$(INCLUDE_DIR)/package.mk",
                        "$(TOPDIR)/feeds/packages/lang/python/python3-package.mk"]
    fields = mk.package_fields("orayboxvpn")
    for key in ("SECTION", "CATEGORY", "TITLE", "DEPENDS"):
        assert fields.get(key), key
    assert fields["PKGARCH"] == "all"
    assert mk.define("Package/orayboxvpn/description").strip()
    assert mk.define("Package/orayboxvpn/conffiles").split() == ["/etc/config/orayboxvpn"]
    assert mk.var("PYTHON3_PKG_BUILD") == "0"
    assert mk.var("PKG_RELEASE") == "1"  # version 0.1.0-r1: apk's x.y.z-rN


def test_makefiles_follow_the_target_python():
    """The SDK's python3-package.mk decides the Python directory
    ($(PYTHON3_PKG_DIR), /usr/lib/python3.11/site-packages on 24.10,
    python3.13 on 25.12): no recipe names a Python version itself."""
    for path in (CORE, FAST, ROOT / "package" / "luci-app-mpvpn" / "Makefile"):
        assert not re.search(r"python3\.\d", path.read_text()), path
    for path in (CORE, FAST):
        assert ipk.parse_makefile(path).var("PKG_RELEASE") == ipk.parse_makefile(CORE).var("PKG_RELEASE")
    # the byte code the agent writes is removed with the package, in the same directory
    postrm = ipk.parse_makefile(CORE).define("Package/orayboxvpn/postrm")
    assert postrm.startswith("#!/bin/sh\n")
    assert 'dir="$${IPKG_INSTROOT}$(PYTHON3_PKG_DIR)/mpvpn"\nrm -rf "$$dir/__pycache__"' in postrm
    assert "$(PYTHON3_PKG_DIR)" in ipk.parse_makefile(CORE).define("Build/Compile")


def test_core_makefile_ends_with_the_package_calls():
    lines = [line for line in CORE.read_text().splitlines() if line.strip()]
    assert lines[-3:] == [
        "$(eval $(call Py3Package,orayboxvpn))",
        "$(eval $(call BuildPackage,orayboxvpn))",
        "$(eval $(call BuildPackage,orayboxvpn-src))",
    ]


def test_core_makefile_install_lines():
    mk = ipk.parse_makefile(CORE)
    install = mk.define("Py3Package/orayboxvpn/install")
    installed = {}
    for line in install.splitlines():
        assert line.startswith("\t$("), f"recipe lines start with a tab: {line!r}"
        m = re.match(r"\t\$\((INSTALL_\w+)\) (\S+)(?: (\S+))?$", line)
        assert m, line
        if m.group(1) != "INSTALL_DIR":
            src = m.group(2).replace("$(PKG_BUILD_DIR)/", "")
            assert (ROOT / src).is_file(), src
            dest = m.group(3).replace("$(1)", "")
            assert dest == "/" + src.removeprefix("files/"), "files/ holds files at their router paths"
            installed[dest] = m.group(1)
    assert installed == {
        "/usr/bin/mpvpn": "INSTALL_BIN",
        "/etc/config/orayboxvpn": "INSTALL_CONF",
        "/etc/init.d/orayboxvpn": "INSTALL_BIN",
        "/etc/hotplug.d/iface/40-orayboxvpn": "INSTALL_DATA",
    }
    for name in ("Build/Prepare", "Build/Compile"):
        for line in mk.define(name).splitlines():
            assert line.startswith("\t"), f"{name}: {line!r}"


def test_wrapper_script():
    text = (ROOT / "files/usr/bin/mpvpn").read_text()
    assert text.startswith("#!/usr/bin/python3\n")
    assert "from mpvpn.cli import main" in text


def test_no_package_of_our_own_besides_the_agent_s():
    """The agent needs nothing outside OpenWrt's feeds (the tun is opened with
    an ioctl, netlink spoken directly): the feed holds only our packages (the
    agent, its C loops, its LuCI app, and its figures for collectd and
    prometheus-node-exporter-lua: tests/test_monitoring.py)."""
    assert sorted(p.name for p in (ROOT / "package").iterdir()) == \
        ["luci-app-mpvpn", "orayboxvpn", "orayboxvpn-collectd", "orayboxvpn-fastpath",
         "prometheus-node-exporter-lua-orayboxvpn"]


def test_feed_scanner_sees_packages_not_the_top_level_makefile():
    """include/scan.mk lists a Makefile as a package when it matches
    `call (Build/DefaultTargets|BuildPackage|KernelPackage)`."""
    scan = re.compile(r"call (Build/DefaultTargets|BuildPackage|KernelPackage)")
    assert scan.search(CORE.read_text())
    top = (ROOT / "Makefile").read_text()
    assert "call BuildPackage" not in top
    assert not scan.search(top)
    assert not (ROOT / "package" / "orayboxvpn" / ".keep").exists()


def test_feeds_conf():
    lines = [line for line in (ROOT / "feeds.conf").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    m = re.fullmatch(r"src-(link|git|git-full|svn|bzr|hg|darcs|cpy) (\S+) (\S+)", lines[0])
    assert m, lines[0]
    kind, name, where = m.groups()
    assert re.fullmatch(r"\w+", name) and name == "orayboxvpn"
    assert kind == "link" and where.endswith("/package")


def test_top_level_makefile_targets():
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^ipk:.*\n((?:\t.*\n)+)", text, re.M)
    assert m and "-m mpvpn.tools.ipk --out dist" in m.group(1)
    assert re.search(r"^test-openwrt:", text, re.M)
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split()
    assert {"ipk", "test-openwrt"} <= set(phony)


FAST = ROOT / "package" / "orayboxvpn-fastpath" / "Makefile"


def test_fastpath_package_builds_the_c_loops_for_the_target():
    mk = ipk.parse_makefile(FAST)
    assert mk.var("PKG_NAME") == "orayboxvpn-fastpath" == FAST.parent.name
    assert mk.var("PKG_VERSION") == ipk.parse_makefile(CORE).var("PKG_VERSION")
    fields = mk.package_fields("orayboxvpn-fastpath")
    assert fields["DEPENDS"].split() == ["+orayboxvpn", "+python3-light"]
    assert "PKGARCH" not in fields  # compiled: one package per architecture
    compile_ = mk.define("Build/Compile")
    assert "$(TARGET_CC)" in compile_ and "-I$(PYTHON3_INC_DIR)" in compile_ and "_fastpath.c" in compile_
    install = mk.define("Package/orayboxvpn-fastpath/install")
    assert "$(PYTHON3_PKG_DIR)/mpvpn/core/_fastpath.so" in install  # next to core/fastpath.py
    assert (ROOT / "src" / "mpvpn" / "core" / "_fastpath.c").exists()
    assert re.search(r"call (Build/DefaultTargets|BuildPackage|KernelPackage)", FAST.read_text())
    # the module name the agent imports (mpvpn.core.fastpath) is the one built
    import importlib.machinery

    assert ".so" in importlib.machinery.EXTENSION_SUFFIXES
    assert "from mpvpn.core import _fastpath" in (ROOT / "src" / "mpvpn" / "core" / "fastpath.py").read_text()
    # and the architecture-independent package leaves compiled parts out
    assert "-name '*.so'" in ipk.parse_makefile(CORE).define("Build/Compile")
