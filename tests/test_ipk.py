"""``make ipk`` (mpvpn.tools.ipk): OpenWrt's ipk format, checked member by member.

The expected values are written out here from OpenWrt's scripts/ipkg-build and
include/package-pack.mk; where GNU tar is installed the three tar streams are
also compared byte for byte with what ``tar --format=gnu --numeric-owner
--sort=name --mtime=@EPOCH`` (ipkg-build's command) makes of the same tree.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mpvpn import __version__
from mpvpn.tools import ipk, lmo

ROOT = Path(__file__).resolve().parents[1]
EPOCH = 1700000000
SITE = "usr/lib/python3.11/site-packages/mpvpn"  # OpenWrt 24.10's python3, the default
VERSION = f"{__version__}-r1"  # PKG_VERSION-rPKG_RELEASE

POSTINST = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""
PRERM = """#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
"""
# Package/orayboxvpn/postrm with $(PYTHON3_PKG_DIR)/mpvpn expanded
POSTRM = """#!/bin/sh
dir="${{IPKG_INSTROOT}}{site}"
rm -rf "$dir/__pycache__" "$dir"/*/__pycache__
[ -d "$dir" ] && find "$dir" -depth -type d -exec rmdir {{}} \\; 2>/dev/null
exit 0
"""
DEPENDS = "libc, python3-light, python3-logging, python3-cryptography, kmod-tun"


def _gnu_tar_ok() -> bool:
    tar = shutil.which("tar")
    if not tar:
        return False
    r = subprocess.run([tar, "--version"], capture_output=True, text=True)
    return "GNU tar" in r.stdout and subprocess.run(
        [tar, "--sort=name", "--format=gnu", "-cf", "/dev/null", "--files-from=/dev/null"],
        capture_output=True).returncode == 0


GNU_TAR = _gnu_tar_ok()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    paths = ipk.build(out, ROOT, EPOCH)
    return {p.name: p for p in paths}


def open_ipk(path: Path) -> dict:
    raw = path.read_bytes()
    assert raw[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", "gzip -n header (no name, time 0, Unix)"
    outer = gzip.decompress(raw)
    assert len(outer) % 10240 == 0
    with tarfile.open(fileobj=io.BytesIO(outer), format=tarfile.GNU_FORMAT) as t:
        members = t.getmembers()
        assert [m.name for m in members] == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
        for m in members:
            assert (m.type, m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime) == \
                (tarfile.REGTYPE, 0o644, 0, 0, "", "", EPOCH), m.name
        blobs = {m.name: t.extractfile(m).read() for m in members}
    assert blobs["./debian-binary"] == b"2.0\n"
    res = {"outer": outer, "data_gz": blobs["./data.tar.gz"], "control_gz": blobs["./control.tar.gz"]}
    for key in ("data", "control"):
        gz = res[f"{key}_gz"]
        assert gz[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
        res[key] = gzip.decompress(gz)
        with tarfile.open(fileobj=io.BytesIO(res[key])) as t:
            res[f"{key}_members"] = {}
            res[f"{key}_order"] = []
            for m in t.getmembers():
                assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", EPOCH), m.name
                name = m.name + "/" if m.isdir() else m.name  # tarfile drops a directory's "/"
                res[f"{key}_order"].append(name)
                res[f"{key}_members"][name] = (
                    m.mode, None if m.isdir() else t.extractfile(m).read())
                assert m.isdir() or m.isreg(), m.name
    return res


I18N = "luci-i18n-mpvpn-zh-cn"
ZH_SCRIPT = "uci set luci.languages.zh_cn='简体中文 (Chinese Simplified)'; uci commit luci\n"
OWRT = Path(os.environ.get("MPVPN_OWRT", "/opt/owrt"))  # OpenWrt userland built from source, not in the repo


PROM = "prometheus-node-exporter-lua-orayboxvpn"
COLLECTD = "orayboxvpn-collectd"


def test_file_names(built):
    assert set(built) == {f"orayboxvpn_{VERSION}_all.ipk", f"luci-app-mpvpn_{VERSION}_all.ipk",
                          f"{I18N}_{VERSION}_all.ipk", f"{PROM}_{VERSION}_all.ipk",
                          f"{COLLECTD}_{VERSION}_all.ipk"}


def test_every_recipe_is_built_or_sdk_only(built):
    """Each package/<name> recipe is a package of `make ipk`, but orayboxvpn-fastpath (C loops
    compiled for the target's architecture: the SDK's job)."""
    recipes = {d.name for d in (ROOT / "package").iterdir() if (d / "Makefile").is_file()}
    names = {n.split("_")[0] for n in built}
    assert recipes - names == {"orayboxvpn-fastpath"}


# The monitoring recipes' packages, written out from their Makefiles: router path -> mode
# ($(INSTALL_BIN) 0755, $(INSTALL_DATA) 0644), Depends (+ and plain names alike), description.
MONITORING = {
    PROM: (
        {"usr/lib/lua/prometheus-collectors/orayboxvpn.lua": 0o644},
        "libc, prometheus-node-exporter-lua, orayboxvpn, libubus-lua",
        " Exports the orayboxvpn agent's status (per subflow: state, RTT, loss in\n"
        " both directions, rate estimate, byte and packet counters, scheduler\n"
        " weight; per session and uplink: state; agent uptime and counters) as\n"
        " orayboxvpn_* metrics of prometheus-node-exporter-lua.\n",
    ),
    COLLECTD: (
        {"usr/libexec/collectd/orayboxvpn": 0o755,
         "usr/share/acl.d/orayboxvpn-collectd.json": 0o644,
         "www/luci-static/resources/statistics/rrdtool/definitions/orayboxvpn.js": 0o644},
        "libc, orayboxvpn, collectd-mod-exec, lua, libubus-lua",
        " /usr/libexec/collectd/orayboxvpn, run by collectd's exec plugin (an\n"
        " Exec entry in luci-app-statistics), reports the orayboxvpn agent's\n"
        " status: per subflow RTT, loss in both directions, traffic, rate estimate\n"
        " and weight; session and uplink state; agent uptime and counters. With\n"
        " luci-app-statistics, its graphs are under Statistics -> Graphs.\n",
    ),
}


@pytest.mark.parametrize("name", [PROM, COLLECTD])
def test_monitoring_package(built, name):
    """package/<name>/Makefile as the SDK builds it: the files of its files/ directory at the
    paths and with the modes of its install lines (and their directories, 0755), the control
    fields of its Package define; the exporter itself is a Depends though not a +selection."""
    res = open_ipk(built[f"{name}_{VERSION}_all.ipk"])
    modes, depends, description = MONITORING[name]
    files = ROOT / "package" / name / "files"
    want = {f"./{path}": (mode, (files / path).read_bytes()) for path, mode in modes.items()}
    for path in modes:
        parts = path.split("/")[:-1]
        want.update({"./" + "/".join(parts[:i]) + "/": (0o755, None) for i in range(1, len(parts) + 1)})
    want["./"] = (0o755, None)
    assert res["data_members"] == want
    assert res["control_order"] == ["./", "./control", "./postinst", "./prerm"]
    assert res["control_members"]["./postinst"] == (0o755, POSTINST.encode())
    assert res["control_members"]["./prerm"] == (0o755, PRERM.encode())
    assert res["control_members"]["./control"] == (0o644, (
        f"Package: {name}\n"
        f"Version: {VERSION}\n"
        f"Depends: {depends}\n"
        f"Source: feeds/orayboxvpn/{name}\n"
        f"SourceName: {name}\n"
        "License: GPL-2.0-only\n"
        "Section: utils\n"
        f"SourceDateEpoch: {EPOCH}\n"
        "Architecture: all\n"
        f"Installed-Size: {len(res['data'])}\n"
        "Description: " + description).encode())


def _recipe(tmp_path: Path, install: str, depends: str = "+orayboxvpn", files=("a.lua", "sub/b")) -> Path:
    d = tmp_path / "pkg-x"
    for f in files:
        (d / "files" / f).parent.mkdir(parents=True, exist_ok=True)
        (d / "files" / f).write_text(f"{f}\n")
    (d / "Makefile").write_text(
        "include $(TOPDIR)/rules.mk\nPKG_NAME:=pkg-x\nPKG_VERSION:=1.2\nPKG_RELEASE:=3\n"
        "DIR:=usr/share/x\ninclude $(INCLUDE_DIR)/package.mk\n"
        f"define Package/pkg-x\n  TITLE:=x\n  DEPENDS:={depends}\n  PKGARCH:=all\nendef\n"
        f"define Package/pkg-x/install\n{install}endef\n"
        "$(eval $(call BuildPackage,pkg-x))\n")
    return d


def test_install_lines_as_install_runs_them(tmp_path):
    """A destination ending in / or naming a directory made before gets the file under its own
    name, several sources go into a directory, make variables of the recipe are expanded,
    a comment is the shell's; DEPENDS keeps conditions out and plain names in."""
    d = _recipe(tmp_path, "\t# the collector\n"
                "\t$(INSTALL_DIR) $(1)/$(DIR) $(1)/etc/x\n"
                "\t$(INSTALL_DATA) ./files/a.lua ./files/sub/b $(1)/$(DIR)\n"
                "\t$(INSTALL_BIN) ./files/sub/b $(1)/etc/x/\n"
                "\t$(INSTALL_CONF) ./files/a.lua $(1)/etc/x/conf\n",
                depends="needed +selected @TARGET_x86 +USE_X:cond")
    pkg = ipk.files_package(d)
    assert (pkg.name, pkg.version, pkg.architecture) == ("pkg-x", "1.2-r3", "all")
    assert pkg.depends == ["libc", "needed", "selected"]
    assert pkg.files == {"usr/share/x/a.lua": (0o644, b"a.lua\n"), "usr/share/x/b": (0o644, b"sub/b\n"),
                         "etc/x/b": (0o755, b"sub/b\n"), "etc/x/conf": (0o600, b"a.lua\n")}


@pytest.mark.parametrize("install,error", [
    ("\t$(INSTALL_DATA) ./files/a.lua $(1)/usr/a.lua\n", "directory is not created"),
    ("\t$(INSTALL_DATA) ./files/a.lua $(1)/usr/\n", "no such directory"),
    ("\t$(INSTALL_DIR) $(1)/usr\n\t$(INSTALL_DATA) ./files/a.lua ./files/sub/b $(1)/usr/x\n",
     "several sources"),
    ("\t$(INSTALL_DIR) $(1)/usr\n\t$(INSTALL_DATA) ./files/c.lua $(1)/usr/\n", "no such file"),
    ("\t$(INSTALL_DIR) $(1)/usr\n\t$(INSTALL_DATA) ./files/*.lua $(1)/usr/\n", "a glob"),
    ("\t$(INSTALL_DIR) $(1)/usr\n\t$(CP) ./files/a.lua $(1)/usr/\n", "cannot read install line"),
    ("\t$(INSTALL_DIR) $(1)/usr\n\t$(INSTALL_DATA) ./files/a.lua $(1)/$(NOWHERE)/\n", "not set"),
    ("\t$(INSTALL_DIR) $(1)/usr\n\t$(INSTALL_DATA) /etc/passwd $(1)/usr/\n", "is not under"),
    ("\t$(INSTALL_DIR) $(1)/usr\n\t$(INSTALL_DATA) ./files/../Makefile $(1)/usr/\n", ".."),
    ("\t$(INSTALL_DIR) $(1)/usr $(1)/etc/empty\n\t$(INSTALL_DATA) ./files/a.lua $(1)/usr/\n", "stays empty"),
])
def test_install_lines_fail_where_the_sdk_would(tmp_path, install, error):
    """install(1) fails on a missing directory or source, several sources for a file; a line
    not read here ($(CP), a glob) is an error, not a file left out of the package."""
    with pytest.raises(ValueError, match=re.escape(error)):
        ipk.files_package(_recipe(tmp_path, install))


# Stand-ins for the two OpenWrt make files a recipe includes, only what an install define needs:
# rules.mk's INSTALL_* commands (verbatim), and package-pack.mk's way of running the define
# ($(call Package/$(1)/install,$$(IDIR_$(1))) in a recipe, one shell per line, in the
# recipe's directory) as BuildPackage of package.mk.
RULES_MK = """INSTALL_BIN:=install -m0755
INSTALL_SUID:=install -m4755
INSTALL_DIR:=install -d -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
"""
PACKAGE_MK = """define BuildPackage
stage:
\t$$(call Package/$(1)/install,$$(STAGE))
endef
"""


def _sdk_install(recipe: Path, shim: Path, stage: Path) -> subprocess.CompletedProcess:
    """Run the recipe's install define with GNU make and coreutils install into ``stage``."""
    shim.mkdir(exist_ok=True)
    (shim / "rules.mk").write_text(RULES_MK)
    (shim / "package.mk").write_text(PACKAGE_MK)
    stage.mkdir()
    return subprocess.run(["make", "-s", "-C", str(recipe), f"TOPDIR={shim}", f"INCLUDE_DIR={shim}",
                           f"STAGE={stage}", "stage"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MAKEFLAGS": ""})


def _staged_tree(stage: Path) -> tuple[dict, set]:
    files, dirs = {}, set()
    for p in stage.rglob("*"):
        rel = str(p.relative_to(stage))
        if p.is_dir():
            dirs.add(rel)
        else:
            files[rel] = (p.stat().st_mode & 0o7777, p.read_bytes())
    return files, dirs


def _dirs_of(files: dict) -> set:
    return {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}


MAKE_OK = bool(shutil.which("make") and shutil.which("install"))


@pytest.mark.skipif(not MAKE_OK, reason="GNU make and coreutils install are not on PATH")
@pytest.mark.parametrize("recipe", [PROM, COLLECTD, "synthetic"])
def test_install_files_as_make_and_install_stage_them(tmp_path, recipe):
    """The install define run for real (GNU make, coreutils install: what the SDK runs) stages
    the same files, modes, bytes and directories as install_files reads from it."""
    if recipe == "synthetic":
        d = _recipe(tmp_path, "\t# the collector\n"
                    "\t$(INSTALL_DIR) $(1)/$(DIR) $(1)/etc/x\n"
                    "\t$(INSTALL_DATA) ./files/a.lua ./files/sub/b $(1)/$(DIR)\n"
                    "\t$(INSTALL_BIN) ./files/sub/b $(1)/etc/x/\n"
                    "\t$(INSTALL_CONF) ./files/a.lua $(1)/etc/x/conf\n")
    else:
        d = ROOT / "package" / recipe
    r = _sdk_install(d, tmp_path / "shim", tmp_path / "stage")
    assert r.returncode == 0, r.stdout + r.stderr
    files, dirs = _staged_tree(tmp_path / "stage")
    ours = ipk.files_package(d).files
    assert files == ours
    assert dirs == _dirs_of(ours)


@pytest.mark.skipif(not MAKE_OK, reason="GNU make and coreutils install are not on PATH")
@pytest.mark.parametrize("install", [
    "\t$(INSTALL_DATA) ./files/a.lua $(1)/usr/a.lua\n",
    "\t$(INSTALL_DATA) ./files/a.lua $(1)/usr/\n",
    "\t$(INSTALL_DIR) $(1)/usr\n\t$(INSTALL_DATA) ./files/a.lua ./files/sub/b $(1)/usr/x\n",
    "\t$(INSTALL_DIR) $(1)/usr\n\t$(INSTALL_DATA) ./files/c.lua $(1)/usr/\n",
])
def test_install_files_fails_where_make_and_install_fail(tmp_path, install):
    """The errors install_files raises for a missing directory or source, or several sources
    for one file, are install(1)'s own failures (the others of
    test_install_lines_fail_where_the_sdk_would are stricter than the SDK on purpose)."""
    d = _recipe(tmp_path, install)
    r = _sdk_install(d, tmp_path / "shim", tmp_path / "stage")
    assert r.returncode != 0 and "install:" in r.stderr, r.stdout + r.stderr
    with pytest.raises(ValueError):
        ipk.files_package(d)


def _expected_core_data() -> dict:
    """Every member of the orayboxvpn data.tar.gz: name -> (mode, content)."""
    files = {
        "etc/config/orayboxvpn": 0o600,  # INSTALL_CONF: it holds the psk
        "etc/init.d/orayboxvpn": 0o755,
        "etc/hotplug.d/iface/40-orayboxvpn": 0o644,
        "usr/bin/mpvpn": 0o755,
    }
    # every file shipped under files/ is installed
    shipped = {str(p.relative_to(ROOT / "files")) for p in (ROOT / "files").rglob("*") if p.is_file()}
    assert shipped == set(files), "a file under files/ is not installed by the package (or vice versa)"
    out = {f"./{k}": (v, (ROOT / "files" / k).read_bytes()) for k, v in files.items()}
    src = ROOT / "src" / "mpvpn"
    for p in sorted(src.rglob("*")):
        # compiled parts (the C loops, a locally built .so) are package orayboxvpn-fastpath
        # mpvpn/tools (package builders, demo, simulator, pair) runs on a PC
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so", ".c") \
                and p.relative_to(src).parts[0] != "tools":
            out[f"./{SITE}/{p.relative_to(src)}"] = (0o644, p.read_bytes())
    dirs = {"./"}
    for name in list(out):
        parts = name[2:].split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("./" + "/".join(parts[:i]) + "/")
    for d in dirs:
        out[d] = (0o755, None)
    return out


def test_core_data_members(built):
    res = open_ipk(built[f"orayboxvpn_{VERSION}_all.ipk"])
    members = res["data_members"]
    assert members == _expected_core_data()
    assert f"./{SITE}/agent/agent.py" in members and f"./{SITE}/core/smpu.py" in members
    assert not any(n.startswith(f"./{SITE}/tools/") for n in members)  # PC tools stay home
    assert not any("__pycache__" in n or "/tests/" in n or n.endswith((".pyc", ".so", ".c")) for n in members)
    assert f"./{SITE}/core/fastpath.py" in members  # the loader is there; it falls back to Python
    # GNU tar --sort=name order: each directory, then its entries by name
    order = res["data_order"]
    assert order[0] == "./"
    for i, name in enumerate(order[1:], 1):
        parent = name.rstrip("/").rsplit("/", 1)[0] + "/"
        assert parent in order[:i], f"{name} before its directory"


def test_core_control(built):
    res = open_ipk(built[f"orayboxvpn_{VERSION}_all.ipk"])
    c = res["control_members"]
    assert res["control_order"] == ["./", "./conffiles", "./control", "./postinst", "./postrm", "./prerm"]
    assert c["./"] == (0o755, None)
    assert c["./postrm"] == (0o755, POSTRM.format(site="/" + SITE).encode())
    assert c["./postinst"] == (0o755, POSTINST.encode())
    assert c["./prerm"] == (0o755, PRERM.encode())
    assert c["./conffiles"] == (0o644, b"/etc/config/orayboxvpn\n")
    mode, control = c["./control"]
    assert mode == 0o644
    assert control.decode() == (
        "Package: orayboxvpn\n"
        f"Version: {VERSION}\n"
        f"Depends: {DEPENDS}\n"
        "Source: feeds/orayboxvpn/orayboxvpn\n"
        "SourceName: orayboxvpn\n"
        "License: GPL-2.0-only\n"
        "Section: net\n"
        f"SourceDateEpoch: {EPOCH}\n"
        "Architecture: all\n"
        f"Installed-Size: {len(res['data'])}\n"
        "Description:  The mpvpn agent joins two router sites through a tun vNIC and sends every\n"
        " packet over every carrier-matched pair of uplinks (telecom, unicom,\n"
        " mobile, ...) as SMPU subflows, so a packet is lost only if every carrier\n"
        " loses it. Configured in /etc/config/orayboxvpn; run by procd.\n"
    )


def test_control_fields_follow_the_makefile(built):
    """Version and Depends come from package/orayboxvpn/Makefile."""
    mk = ipk.parse_makefile(ROOT / "package/orayboxvpn/Makefile")
    deps = mk.package_fields("orayboxvpn")["DEPENDS"].split()
    assert ", ".join(["libc"] + [d.lstrip("+") for d in deps]) == DEPENDS
    assert mk.var("PKG_VERSION") == __version__
    assert f"{mk.var('PKG_VERSION')}-r{mk.var('PKG_RELEASE')}" == VERSION


def test_luci_package(built):
    res = open_ipk(built[f"luci-app-mpvpn_{VERSION}_all.ipk"])
    fields = dict(line.split(": ", 1) for line in
                  res["control_members"]["./control"][1].decode().split("\n") if ": " in line)
    assert fields["Package"] == "luci-app-mpvpn"
    assert fields["Version"] == VERSION
    assert [d.strip() for d in fields["Depends"].split(",")][:1] == ["libc"]
    assert {"luci-base", "orayboxvpn"} <= {d.strip() for d in fields["Depends"].split(",")}
    assert fields["Section"] == "luci"
    assert fields["Architecture"] == "all"
    assert fields["Installed-Size"] == str(len(res["data"]))
    # htdocs/* -> /www, root/* -> /
    expect = {}
    luci = ROOT / "luci-app-mpvpn"
    for sub, dest in (("htdocs", "www"), ("root", "")):
        base = luci / sub
        if base.is_dir():
            for p in base.rglob("*"):
                if p.is_file() and not p.relative_to(base).parts[0].startswith("."):
                    name = "./" + "/".join(x for x in (dest, str(p.relative_to(base))) if x)
                    expect[name] = (0o755 if os.stat(p).st_mode & 0o111 else 0o644, p.read_bytes())
    files = {k: v for k, v in res["data_members"].items() if v[1] is not None}
    assert files == expect
    assert res["control_members"]["./postinst-pkg"][0] == 0o755
    assert "./conffiles" not in res["control_members"]


def test_translation_package(built):
    """luci.mk's LuciTranslation for po/zh_Hans: luci-i18n-mpvpn-zh-cn with the po2lmo
    catalog and the uci-defaults script naming the language, depending on the app;
    no scripts but package-pack.mk's wrappers (default_postinst runs uci-defaults)."""
    res = open_ipk(built[f"{I18N}_{VERSION}_all.ipk"])
    po = ROOT / "luci-app-mpvpn/po/zh_Hans/mpvpn.po"
    lmo_data = lmo.write_lmo(po)
    assert lmo.read_lmo(lmo_data) == lmo.po2lmo_entries(po) and len(lmo.po2lmo_entries(po)) > 100
    files = {k: v for k, v in res["data_members"].items() if v[1] is not None}
    assert files == {
        f"./etc/uci-defaults/{I18N}": (0o644, ZH_SCRIPT.encode()),
        "./usr/lib/lua/luci/i18n/mpvpn.zh-cn.lmo": (0o644, lmo_data),
    }
    assert res["control_order"] == ["./", "./control", "./postinst", "./prerm"]
    assert res["control_members"]["./postinst"] == (0o755, POSTINST.encode())
    assert res["control_members"]["./prerm"] == (0o755, PRERM.encode())
    assert res["control_members"]["./control"][1].decode() == (
        f"Package: {I18N}\n"
        f"Version: {VERSION}\n"
        "Depends: libc, luci-app-mpvpn\n"
        "Source: feeds/orayboxvpn/luci-app-mpvpn\n"
        "SourceName: luci-app-mpvpn\n"
        "License: GPL-2.0-only\n"
        "Section: luci\n"
        f"SourceDateEpoch: {EPOCH}\n"
        "URL: https://github.com/openwrt/luci\n"
        "Maintainer: OpenWrt LuCI community\n"
        "Architecture: all\n"
        f"Installed-Size: {len(res['data'])}\n"
        "Description:  Translation for luci-app-mpvpn - 简体中文 (Chinese Simplified)\n"
    )


def test_translation_packages_follow_po_dirs(tmp_path):
    """One package per po/<lang> that luci.mk's LUCI_LANG knows (alias or code as suffix),
    none for templates or an unknown directory, no .lmo for a catalog with nothing translated."""
    app_dir = tmp_path / "luci-app-mpvpn"
    po = (ROOT / "luci-app-mpvpn/po/zh_Hans/mpvpn.po").read_text(encoding="utf-8")
    for lang, text in (("templates", po), ("de", po), ("pt_BR", po), ("xx", po),
                       ("ja", 'msgid ""\nmsgstr "Language: ja\\n"\n\nmsgid "Up"\nmsgstr ""\n')):
        (app_dir / "po" / lang).mkdir(parents=True)
        (app_dir / "po" / lang / ("mpvpn.pot" if lang == "templates" else "mpvpn.po")).write_text(text)
    app = ipk.luci_package(ROOT, "2.0-r1", luci_dir=app_dir)
    got = {p.name: p for p in ipk.luci_translations(app, app_dir)}
    assert sorted(got) == ["luci-i18n-mpvpn-de", "luci-i18n-mpvpn-ja", "luci-i18n-mpvpn-pt-br"]
    assert sorted(got["luci-i18n-mpvpn-pt-br"].files) == [
        "etc/uci-defaults/luci-i18n-mpvpn-pt-br", "usr/lib/lua/luci/i18n/mpvpn.pt-br.lmo"]
    assert got["luci-i18n-mpvpn-pt-br"].files["etc/uci-defaults/luci-i18n-mpvpn-pt-br"][1].decode() == \
        "uci set luci.languages.pt_br='Português do Brasil (Brazilian Portuguese)'; uci commit luci\n"
    assert sorted(got["luci-i18n-mpvpn-ja"].files) == ["etc/uci-defaults/luci-i18n-mpvpn-ja"]
    assert all(p.version == "2.0-r1" and p.depends == ["libc", "luci-app-mpvpn"] for p in got.values())


def test_translation_uci_defaults_with_real_uci(built, tmp_path):
    """The uci-defaults script as default_postinst runs it (``. "$i"`` from /etc/uci-defaults),
    with the real uci against luci-base's /etc/config/luci: LuCI then lists the language."""
    uci = shutil.which("uci") or str(OWRT / "bin/uci")
    luci_conf = OWRT / "luci-root/etc/config/luci"
    if not os.access(uci, os.X_OK) or not luci_conf.is_file():
        reason = f"the real uci and luci-base's /etc/config/luci are not built under {OWRT} (MPVPN_OWRT)"
        sys.stderr.write(f"\nuci-defaults check skipped: {reason}\n")
        pytest.skip(reason)
    res = open_ipk(built[f"{I18N}_{VERSION}_all.ipk"])
    conf = tmp_path / "config"
    conf.mkdir()
    shutil.copy(luci_conf, conf / "luci")
    script = tmp_path / I18N
    script.write_bytes(res["data_members"][f"./etc/uci-defaults/{I18N}"][1])
    env = {**os.environ, "LD_LIBRARY_PATH": str(OWRT / "lib")}
    r = subprocess.run(["sh", "-c", f'uci() {{ "{uci}" -c "{conf}" -t "{tmp_path}/delta" "$@"; }}; . "$0"',
                        str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = subprocess.run([uci, "-c", str(conf), "get", "luci.languages.zh_cn"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.stdout == "简体中文 (Chinese Simplified)\n", r.stdout + r.stderr
    assert "option zh_cn '简体中文 (Chinese Simplified)'" in (conf / "luci").read_text()


def test_luci_mapping_and_postinst(tmp_path):
    luci = tmp_path / "luci-app-mpvpn"
    (luci / "htdocs/luci-static/resources/view/mpvpn").mkdir(parents=True)
    (luci / "htdocs/luci-static/resources/view/mpvpn/status.js").write_text("'use strict';\n")
    (luci / "root/etc/uci-defaults").mkdir(parents=True)
    (luci / "root/etc/uci-defaults/80_mpvpn").write_text("exit 0\n")
    (luci / "root/usr/share/rpcd/acl.d").mkdir(parents=True)
    (luci / "root/usr/share/rpcd/acl.d/luci-app-mpvpn.json").write_text("{}\n")
    (luci / "root/.keep").write_text("")
    (luci / "root/usr/share/rpcd/acl.d/old.json~").write_text("")
    pkg = ipk.luci_package(ROOT, "9.9", luci_dir=luci)
    assert set(pkg.files) == {
        "www/luci-static/resources/view/mpvpn/status.js",
        "etc/uci-defaults/80_mpvpn",
        "usr/share/rpcd/acl.d/luci-app-mpvpn.json",
    }
    assert pkg.version == "9.9" and pkg.depends == ["libc", "luci-base", "orayboxvpn"]
    assert pkg.description == "LuCI luci-app-mpvpn app"
    # luci.mk's default postinst, run by default_postinst as postinst-pkg
    assert pkg.postinst_pkg == (
        '[ -n "${IPKG_INSTROOT}" ] || {\n'
        "\t(. /etc/uci-defaults/80_mpvpn) && rm -f /etc/uci-defaults/80_mpvpn\n"
        "\trm -f /tmp/luci-indexcache\n"
        "\trm -rf /tmp/luci-modulecache/\n"
        "\tkillall -HUP rpcd 2>/dev/null\n"
        "\texit 0\n"
        "}"
    )
    path = ipk.build_ipk(pkg, tmp_path / "out", EPOCH)
    assert path.name == "luci-app-mpvpn_9.9_all.ipk"
    res = open_ipk(path)
    assert res["control_order"] == ["./", "./control", "./postinst", "./postinst-pkg", "./prerm"]
    assert res["control_members"]["./postinst-pkg"] == (0o755, (pkg.postinst_pkg + "\n").encode())


def test_nearly_empty_luci_dir(tmp_path):
    (tmp_path / "luci-app-mpvpn").mkdir()
    pkg = ipk.luci_package(ROOT, "1.0", luci_dir=tmp_path / "luci-app-mpvpn")
    res = open_ipk(ipk.build_ipk(pkg, tmp_path, EPOCH))
    assert res["data_members"] == {"./": (0o755, None)}


def test_reproducible_and_epoch(tmp_path, monkeypatch):
    a = ipk.build(tmp_path / "a", ROOT, EPOCH)
    b = ipk.build(tmp_path / "b", ROOT, EPOCH)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH + 60))
    monkeypatch.delenv("PKG_SOURCE_DATE_EPOCH", raising=False)
    assert ipk.main(["--out", str(tmp_path / "c"), "--root", str(ROOT)]) == 0
    c = tmp_path / "c" / a[0].name
    with tarfile.open(c) as t:
        assert {m.mtime for m in t.getmembers()} == {EPOCH + 60}
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert ipk.source_date_epoch(ROOT) > 0  # git or file times


def test_main_reports_bad_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert ipk.main(["--out", str(tmp_path), "--root", str(ROOT)]) == 1
    assert "SOURCE_DATE_EPOCH" in capsys.readouterr().err


# --- the target's Python, and what the agent leaves behind ------------------------

@pytest.mark.parametrize("release,python", [("24.10", "3.11"), ("25.12", "3.13")])
def test_release_chooses_the_python_directory(tmp_path, release, python):
    assert ipk.main(["--out", str(tmp_path), "--root", str(ROOT), "--release", release,
                     "--source-date-epoch", str(EPOCH)]) == 0
    res = open_ipk(tmp_path / f"orayboxvpn_{VERSION}_all.ipk")
    site = f"usr/lib/python{python}/site-packages/mpvpn"
    py = [n for n in res["data_members"] if "/python3" in n and res["data_members"][n][1] is not None]
    assert py and all(n.startswith(f"./{site}/") for n in py)
    assert res["control_members"]["./postrm"][1] == POSTRM.format(site="/" + site).encode()


def test_python_version_option(tmp_path, capsys):
    assert ipk.main(["--out", str(tmp_path), "--root", str(ROOT), "--python-version", "3.12",
                     "--source-date-epoch", str(EPOCH)]) == 0
    names = open_ipk(tmp_path / f"orayboxvpn_{VERSION}_all.ipk")["data_members"]
    assert "./usr/lib/python3.12/site-packages/mpvpn/cli.py" in names
    assert ipk.main(["--out", str(tmp_path), "--root", str(ROOT), "--python-version", "python3"]) == 1
    assert "--python-version" in capsys.readouterr().err


def _install(res: dict, root: Path) -> list[str]:
    """Unpack the data members into ``root``; returns them (opkg's <pkg>.list)."""
    names = []
    for name, (mode, data) in res["data_members"].items():
        path = root / name[2:]
        names.append(name[1:])
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.write_bytes(data)
            path.chmod(mode)
    return names


def _remove_like_opkg(root: Path, names: list[str]) -> None:
    """opkg-lede remove_data_files_and_list (libopkg/opkg_remove.c): the
    files of the package's .list are unlinked; that list holds no directory
    (the data.tar's directories are not recorded), so none is removed."""
    for n in names:
        if not n.endswith("/"):
            (root / n.lstrip("/")).unlink()


def test_postrm_removes_the_byte_code_the_agent_wrote(built, tmp_path):
    """Python writes __pycache__ next to the shipped sources when the agent
    (or the init script's `mpvpn check`) runs; opkg does not know those files
    and left ~0.9 MiB behind. The package's postrm removes them."""
    res = open_ipk(built[f"orayboxvpn_{VERSION}_all.ipk"])
    root = tmp_path / "root"
    names = _install(res, root)
    site = root / SITE
    # what the router does: run the agent's code from the installed files
    (tmp_path / "etc").mkdir()
    r = subprocess.run([sys.executable, "-c", "import sys; from mpvpn.cli import main; sys.exit(main())",
                        "check", "--uci-dir", str(tmp_path / "etc")],
                       env={**os.environ, "PYTHONPATH": str(site.parent), "PYTHONDONTWRITEBYTECODE": ""},
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr  # no config there: check says so
    pycache = sorted((site / "__pycache__").iterdir()) + sorted((site / "agent" / "__pycache__").iterdir())
    assert pycache and all(p.suffix == ".pyc" for p in pycache)
    _remove_like_opkg(root, names)
    assert site.is_dir() and (site / "__pycache__").is_dir(), "left behind without the postrm"
    (site / "core" / "_fastpath.so").write_bytes(b"orayboxvpn-fastpath's")  # another package's file stays
    postrm = tmp_path / "postrm"
    postrm.write_bytes(res["control_members"]["./postrm"][1])
    subprocess.run(["sh", str(postrm), "remove"], env={**os.environ, "IPKG_INSTROOT": str(root)}, check=True)
    assert [str(p.relative_to(site)) for p in site.rglob("*")] == ["core", "core/_fastpath.so"]
    (site / "core" / "_fastpath.so").unlink()
    subprocess.run(["sh", str(postrm), "remove"], env={**os.environ, "IPKG_INSTROOT": str(root)}, check=True)
    assert not site.exists()
    left = [str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()]
    assert left == []


def test_the_router_package_runs_without_the_pc_tools(built, tmp_path):
    """mpvpn/tools (package builders, demo, simulator, pair) stays on the PC:
    the installed agent imports nothing of it, and the commands that need it
    say where to run them instead of a traceback."""
    res = open_ipk(built[f"orayboxvpn_{VERSION}_all.ipk"])
    root = tmp_path / "root"
    _install(res, root)
    site = root / SITE
    assert (site / "agent" / "agent.py").is_file() and not (site / "tools").exists()
    env = {**os.environ, "PYTHONPATH": str(site.parent), "PYTHONDONTWRITEBYTECODE": "1"}

    def run(*args):
        return subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
                               "from mpvpn.cli import main; sys.exit(main())", str(site.parent), *args],
                              env=env, capture_output=True, text=True, cwd=tmp_path)
    for cmd in ("pair", "demo"):
        r = run(cmd)
        assert r.returncode == 2 and "not part of the router package" in r.stderr, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "pair" in r.stdout and "run" in r.stdout
    r = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "import mpvpn.agent.agent, mpvpn.agent.check; "
                        "print(sorted(m for m in sys.modules if m.startswith('mpvpn.tools')))", str(site.parent)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def _control(res: dict) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in
                res["control_members"]["./control"][1].decode().split("\n") if ": " in line)


def _opkg() -> str | None:
    for cand in (shutil.which("opkg-cl"), shutil.which("opkg"), "/opt/owrt/bin/opkg-cl"):
        if cand and os.access(cand, os.X_OK):
            r = subprocess.run([cand, "--version"], capture_output=True, text=True)
            if "opkg version" in r.stdout + r.stderr:
                return cand
    return None


def test_real_opkg_install_and_remove_leave_nothing(built, tmp_path):
    """opkg-lede into an offline root (-o): install every package of `make ipk` (the
    monitoring ones too: opkg resolves their Depends against the installed feed packages,
    the exporter among them), let the agent's code write its byte code, opkg remove:
    nothing of ours is left but the modified conffile, which opkg keeps on purpose."""
    opkg = _opkg()
    if opkg is None:
        pytest.skip("opkg-lede not found (opkg-cl or opkg on PATH, /opt/owrt/bin/opkg-cl): "
                    "build openwrt/opkg-lede to run this")
    root = tmp_path / "root"
    for d in ("etc", "var/lock", "usr/lib/opkg/info"):
        (root / d).mkdir(parents=True)
    conf = root / "etc/opkg.conf"
    conf.write_text("dest root /\nlists_dir ext /var/opkg-lists\narch all 1\narch noarch 1\n")
    # the feed packages ours depend on (libc, python3-light, luci-base,
    # prometheus-node-exporter-lua, collectd-mod-exec, ...), as installed
    ours = {n.split("_")[0] for n in built}
    feed = sorted({d for n in built for d in _control(open_ipk(built[n]))["Depends"].split(", ")} - ours)
    assert {"libc", "luci-base", "prometheus-node-exporter-lua", "libubus-lua", "collectd-mod-exec"} <= set(feed)
    (root / "usr/lib/opkg/status").write_text("".join(
        f"Package: {p}\nVersion: 1\nStatus: install user installed\nArchitecture: all\n\n"
        for p in feed))
    lib = os.environ.get("LD_LIBRARY_PATH", "")
    # opkg-lede runs no package script in an offline root unless told to
    # (pkg_run_script); OpenWrt's build sets IPKG_INSTROOT for them.
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(x for x in ("/opt/owrt/lib", lib) if x),
           "IPKG_INSTROOT": str(root)}

    def run(*args):
        r = subprocess.run([opkg, "-f", str(conf), "-o", str(root), "--force-postinstall", *args],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    run("install", *(str(built[n]) for n in sorted(built)))
    site = root / SITE
    assert (site / "cli.py").is_file()
    assert (root / "usr/lib/opkg/info/orayboxvpn.conffiles").read_text() == "/etc/config/orayboxvpn\n"
    assert (root / "usr/lib/lua/luci/i18n/mpvpn.zh-cn.lmo").read_bytes() == \
        lmo.write_lmo(ROOT / "luci-app-mpvpn/po/zh_Hans/mpvpn.po")
    installed = run("list-installed")
    assert all(f"{n} - {VERSION}\n" in installed for n in ours), installed
    for name in (PROM, COLLECTD):  # installed where the recipe puts them, with its modes
        for path, mode in MONITORING[name][0].items():
            f = root / path
            assert f.read_bytes() == (ROOT / "package" / name / "files" / path).read_bytes(), path
            assert f.stat().st_mode & 0o7777 == mode, path
    r = subprocess.run([sys.executable, "-c", "import sys; from mpvpn.cli import main; sys.exit(main())",
                        "check", "--uci-dir", str(root / "etc/config")],
                       env={**os.environ, "PYTHONPATH": str(site.parent), "PYTHONDONTWRITEBYTECODE": ""},
                       capture_output=True, text=True)
    assert "config NOT OK" in r.stdout  # the shipped default is to be filled in
    assert list((site / "__pycache__").iterdir())
    with open(root / "etc/config/orayboxvpn", "a") as f:
        f.write("\n")  # the admin's edit
    run("remove", PROM, COLLECTD, I18N, "luci-app-mpvpn", "orayboxvpn")
    assert not site.exists()
    assert ours.isdisjoint(run("list-installed").split())
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not str(p.relative_to(root)).startswith(("usr/lib/opkg", "etc/opkg")))
    assert left == ["etc/config/orayboxvpn"]


# --- byte for byte against GNU tar -------------------------------------------------

def _stage(files: dict, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for name, (mode, data) in files.items():
        if data is None:
            continue
        p = where / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
    for dirpath, _, _ in os.walk(where):
        os.chmod(dirpath, 0o755)


def _gnu(cwd: Path, *names: str) -> bytes:
    return subprocess.run(
        ["tar", "--format=gnu", "--numeric-owner", "--owner=0", "--group=0", "--sort=name",
         "-cf", "-", f"--mtime=@{EPOCH}", *names],
        cwd=cwd, capture_output=True, check=True).stdout


@pytest.mark.skipif(not GNU_TAR, reason="GNU tar with --sort=name not installed")
@pytest.mark.parametrize("name", [f"orayboxvpn_{VERSION}_all.ipk", f"luci-app-mpvpn_{VERSION}_all.ipk",
                                  f"luci-i18n-mpvpn-zh-cn_{VERSION}_all.ipk", f"{PROM}_{VERSION}_all.ipk",
                                  f"{COLLECTD}_{VERSION}_all.ipk"])
def test_same_bytes_as_gnu_tar(built, tmp_path, name):
    res = open_ipk(built[name])
    for key in ("data", "control"):
        files = {n[2:]: v for n, v in res[f"{key}_members"].items() if v[1] is not None}
        _stage(files, tmp_path / key)
        assert _gnu(tmp_path / key, ".") == res[key], f"{key}.tar differs from GNU tar's"
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "debian-binary").write_bytes(b"2.0\n")
    (outer / "data.tar.gz").write_bytes(res["data_gz"])
    (outer / "control.tar.gz").write_bytes(res["control_gz"])
    for f in outer.iterdir():
        os.chmod(f, 0o644)
    assert _gnu(outer, "./debian-binary", "./data.tar.gz", "./control.tar.gz") == res["outer"]


@pytest.mark.skipif(not GNU_TAR, reason="GNU tar with --sort=name not installed")
def test_long_names_as_gnu_tar(tmp_path):
    long_dir = "d" * 70
    files = {f"{long_dir}/{long_dir}/file.txt": (0o644, b"hi\n"), "a": (0o755, b"#!/bin/sh\n"),
             "B/c": (0o600, b"")}
    _stage(files, tmp_path / "t")
    assert _gnu(tmp_path / "t", ".") == ipk.gnu_tar(ipk.tree(files), EPOCH)


def test_gzip_n_roundtrip():
    data = os.urandom(1000) + b"x" * 100000
    gz = ipk.gzip_n(data)
    assert gz[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    assert gzip.decompress(gz) == data
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-dc"], input=gz, capture_output=True, check=True).stdout == data


# --- a real OpenWrt root file system -------------------------------------------------

def _docker_reason() -> str | None:
    docker = shutil.which("docker")
    if not docker:
        return "docker is not installed"
    if subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker engine is running"
    return None


OPENWRT_SCRIPT = r"""
set -e
mkdir -p /var/lock /var/run
opkg update >/dev/null
opkg install python3-light python3-logging python3-cryptography kmod-tun >/dev/null || true
opkg install --force-depends /pkgs/orayboxvpn_*_all.ipk /pkgs/luci-app-mpvpn_*_all.ipk
test "$(stat -c %a /etc/config/orayboxvpn)" = 600
uci set orayboxvpn.base.role='server'
uci set orayboxvpn.base.listen_address='0.0.0.0:7000'
uci set orayboxvpn.base.psk="$(mpvpn genpsk)"
uci set orayboxvpn.vnc.ipaddr='172.30.0.2'
uci set orayboxvpn.telecom.bind_ip='127.0.0.1'
uci set orayboxvpn.base.enabled='1'
uci commit orayboxvpn
mpvpn check || true
/etc/init.d/orayboxvpn restart
sleep 5
ubus call service list '{"name":"orayboxvpn"}'
ubus call orayboxvpn status
"""


def test_openwrt_rootfs_in_docker(built):
    """make test-openwrt: install both packages into the official OpenWrt
    rootfs image, configure, start, ask ubus for the status."""
    reason = _docker_reason()
    if reason:
        sys.stderr.write(f"\nOpenWrt rootfs test skipped: {reason}\n")
        pytest.skip(f"OpenWrt rootfs test: {reason}")
    image = os.environ.get("OPENWRT_ROOTFS_IMAGE", "openwrt/rootfs:x86-64-24.10.0")
    pkgs = next(iter(built.values())).parent
    name = f"mpvpn-openwrt-test-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--cap-add", "NET_ADMIN",
                    "--device", "/dev/net/tun", "-v", f"{pkgs}:/pkgs:ro", image, "/sbin/init"],
                   check=True, capture_output=True, timeout=600)
    try:
        r = subprocess.run(["docker", "exec", name, "/bin/sh", "-c", OPENWRT_SCRIPT],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert '"state"' in r.stdout
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
