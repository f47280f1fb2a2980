"""``make apk`` (mpvpn.tools.apk): apk-tools v3 packages for OpenWrt 25.12.

The packages are read back by a reader written here from the format's
specification (apk-tools ``doc/apk-v3.5.scd``, the schemas of
``src/apk_adb.c`` and the reading side of ``src/adb.c``: ``adb_m_process``,
``adb_r_*``), independent of the writer: every value is bounds-checked and
its alignment checked, every DATA block matched against its file's size and
SHA-256. What goes in is compared with the ipk of the same commit and with
what OpenWrt 25.12's ``include/package-pack.mk`` adds for apk (the
``/lib/apk/packages/<name>.*`` files recording the conffiles, the install
scripts). Where apk-tools v3 is on PATH, it installs the packages into an
offline root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from mpvpn import __version__
from mpvpn.tools import apk, ipk

ROOT = Path(__file__).resolve().parents[1]
EPOCH = 1700000000
VERSION = f"{__version__}-r1"
SITE = "usr/lib/python3.13/site-packages/mpvpn"  # OpenWrt 25.12's python3, the default for apk


# --- an independent reader of the v3 format ---------------------------------------

class Reader:
    """One ADB block's values (apk-v3(5) WIRE FORMAT)."""

    def __init__(self, adb: bytes):
        assert len(adb) >= 8, "adb_hdr"
        assert adb[0] == 0, "adb_compat_ver must be 0"
        self.adb = adb
        self.root = struct.unpack_from("<I", adb, 4)[0]
        self.blob_at: dict[int, int] = {}  # payload offset -> length (for the uid check)

    def _at(self, off: int, n: int, align: int) -> bytes:
        assert off % align == 0, f"value at {off} not aligned to {align}"
        assert 8 <= off and off + n <= len(self.adb), f"value at {off}+{n} outside the block"
        return self.adb[off:off + n]

    def value(self, v: int, kind: str):
        t, x = v & 0xF0000000, v & 0x0FFFFFFF
        if v == 0:
            return None
        if kind == "int":
            if t == 0x10000000:
                return x
            if t == 0x20000000:
                return struct.unpack("<I", self._at(x, 4, 4))[0]
            if t == 0x30000000:
                return struct.unpack("<Q", self._at(x, 8, 4))[0]
            raise AssertionError(f"not an integer: {v:#x}")
        if kind == "blob":
            size = {0x80000000: 1, 0x90000000: 2, 0xA0000000: 4}.get(t)
            assert size, f"not a blob: {v:#x}"
            n = int.from_bytes(self._at(x, size, size), "little")
            self.blob_at[x + size] = n
            return self._at(x + size, n, 1)
        assert t in (0xD0000000, 0xE0000000), f"not an object/array: {v:#x}"
        (n,) = struct.unpack("<I", self._at(x, 4, 4))
        assert n >= 1
        return list(struct.unpack(f"<{n}I", self._at(x, 4 * n, 4)))[1:]

    def obj(self, v: int, fields: dict[int, tuple[str, object]]) -> dict:
        slots = self.value(v, "obj") or []
        out = {}
        for i, s in enumerate(slots, 1):
            assert i in fields or s == 0, f"slot {i} outside the schema"
            if i in fields and s:
                name, kind = fields[i]
                out[name] = self.read(s, kind)
        return out

    def read(self, v: int, kind):
        if isinstance(kind, dict):
            return self.obj(v, kind)
        if isinstance(kind, tuple) and kind[0] == "array":
            return [self.read(s, kind[1]) for s in self.value(v, "obj") or []]
        return self.value(v, kind)


# apk_adb.c schemas (only the fields mkpkg writes need a kind here; others must be absent)
ACL = {1: ("mode", "int"), 2: ("user", "blob"), 3: ("group", "blob"), 4: ("xattrs", ("array", "blob"))}
FILE = {1: ("name", "blob"), 2: ("acl", ACL), 3: ("size", "int"), 4: ("mtime", "int"),
        5: ("hash", "blob"), 6: ("target", "blob")}
DIR = {1: ("name", "blob"), 2: ("acl", ACL), 3: ("files", ("array", FILE))}
DEP = {1: ("name", "blob"), 2: ("version", "blob"), 3: ("match", "int")}
PKGINFO = {1: ("name", "blob"), 2: ("version", "blob"), 3: ("hashes", "blob"), 4: ("description", "blob"),
           5: ("arch", "blob"), 6: ("license", "blob"), 7: ("origin", "blob"), 8: ("maintainer", "blob"),
           9: ("url", "blob"), 10: ("repo-commit", "blob"), 11: ("build-time", "int"),
           12: ("installed-size", "int"), 13: ("file-size", "int"), 14: ("provider-priority", "int"),
           15: ("depends", ("array", DEP)), 16: ("provides", ("array", DEP)),
           17: ("replaces", ("array", DEP)), 18: ("install-if", ("array", DEP)),
           19: ("recommends", ("array", DEP)), 20: ("layer", "int"), 21: ("tags", ("array", "blob"))}
SCRIPTS = {i: (n, "blob") for i, n in enumerate(
    ("trigger", "pre-install", "post-install", "pre-deinstall", "post-deinstall", "pre-upgrade",
     "post-upgrade"), 1)}
PACKAGE = {1: ("info", PKGINFO), 2: ("paths", ("array", DIR)), 3: ("scripts", SCRIPTS),
           4: ("triggers", ("array", "blob")), 5: ("replaces-priority", "int")}


def read_apk(raw: bytes) -> dict:
    """Parse a .apk: {"package": ..., "files": {path: (mode, data)}, "dirs": {path: mode}}."""
    assert raw[:4] == b"ADBd", "deflate-compressed ADB (mkpkg's default)"
    d = zlib.decompressobj(-15)
    data = d.decompress(raw[4:]) + d.flush()
    assert d.eof and not d.unused_data, "one complete raw deflate stream"
    assert data[:4] == b"ADB." and data[4:8] == b"pckg", "file header: magic and package schema"
    pos, blocks = 8, []
    while pos < len(data):
        (word,) = struct.unpack_from("<I", data, pos)
        btype, raw_size = word >> 30, word & 0x3FFFFFFF
        assert btype != 3, "no extended blocks for packages this small"
        assert raw_size >= 4 and pos + raw_size <= len(data)
        blocks.append((btype, data[pos + 4:pos + raw_size]))
        padded = raw_size + (-raw_size % 8)
        assert data[pos + raw_size:pos + padded] == b"\0" * (padded - raw_size), "zero padding to 8"
        pos += padded
    assert pos == len(data)
    types = [t for t, _ in blocks]
    assert types[0] == 0 and 0 not in types[1:] and 1 not in types, "one ADB block, unsigned"
    assert set(types[1:]) <= {2}, "then DATA blocks only"
    r = Reader(blocks[0][1])
    pkg = r.obj(r.root, PACKAGE)
    # the unique id: SHA-256 of the ADB block with the id zeroed, 20 bytes
    uid = pkg["info"]["hashes"]
    assert len(uid) == 20
    at = next(off for off, n in r.blob_at.items() if n == 20 and r.adb[off:off + 20] == uid)
    zeroed = r.adb[:at] + b"\0" * 20 + r.adb[at + 20:]
    assert hashlib.sha256(zeroed).digest()[:20] == uid
    files, dirs, sizes = {}, {}, {}
    for i, d_ in enumerate(pkg["paths"], 1):
        dname = (d_.get("name") or b"").decode()
        dirs[dname] = d_["acl"]["mode"]
        for j, f in enumerate(d_.get("files", []), 1):
            path = "/".join(x for x in (dname, f["name"].decode()) if x)
            files[path] = (f["acl"]["mode"], None)
            sizes[(i, j)] = (path, f)
    for btype, payload in blocks[1:]:
        i, j = struct.unpack_from("<II", payload)
        path, f = sizes.pop((i, j))
        content = payload[8:]
        assert len(content) == f["size"] and hashlib.sha256(content).digest() == f["hash"], path
        files[path] = (files[path][0], content)
    for (path, f) in sizes.values():  # no DATA block: empty files only
        assert f["size"] == 0 and f["hash"] == hashlib.sha256(b"").digest(), path
        files[path] = (files[path][0], b"")
    return {"package": pkg, "files": files, "dirs": dirs}


# --- the packages ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    paths = apk.build(out, ROOT, EPOCH)
    return {p.name: read_apk(p.read_bytes()) for p in paths} | {"_paths": paths}


@pytest.fixture(scope="module")
def ipks():
    return {p.name: p for p in ipk.packages(ROOT, "3.13")}


I18N = "luci-i18n-mpvpn-zh-cn"
PROM = "prometheus-node-exporter-lua-orayboxvpn"
COLLECTD = "orayboxvpn-collectd"
ALL = ["orayboxvpn", "luci-app-mpvpn", I18N, PROM, COLLECTD]


def test_file_names(built):
    assert sorted(p.name for p in built["_paths"]) == sorted(f"{name}-{VERSION}.apk" for name in ALL)


# package/<name>/Makefile of the monitoring packages: router path -> mode, depends (apk sorts them)
MONITORING = {
    PROM: ({"usr/lib/lua/prometheus-collectors/orayboxvpn.lua": 0o644},
           [b"libc", b"libubus-lua", b"orayboxvpn", b"prometheus-node-exporter-lua"]),
    COLLECTD: ({"usr/libexec/collectd/orayboxvpn": 0o755,
                "usr/share/acl.d/orayboxvpn-collectd.json": 0o644,
                "www/luci-static/resources/statistics/rrdtool/definitions/orayboxvpn.js": 0o644},
               [b"collectd-mod-exec", b"libc", b"libubus-lua", b"lua", b"orayboxvpn"]),
}


@pytest.mark.parametrize("name", [PROM, COLLECTD])
def test_monitoring_package(built, name):
    """The monitoring recipes as the 25.12 SDK packs them: their files/ at the install lines'
    paths and modes plus the .list, noarch, the exporter a dependency though not selected (+),
    package-pack.mk's scripts only."""
    got = built[f"{name}-{VERSION}.apk"]
    info = got["package"]["info"]
    modes, depends = MONITORING[name]
    assert (info["name"], info["version"], info["arch"]) == (name.encode(), VERSION.encode(), b"noarch")
    assert [d["name"] for d in info["depends"]] == depends
    assert [d["name"] for d in info["provides"]] == [f"{name}-any".encode()]
    assert info["origin"] == f"feeds/orayboxvpn/{name}".encode() and info["license"] == b"GPL-2.0-only"
    files = ROOT / "package" / name / "files"
    want = {path: (mode, (files / path).read_bytes()) for path, mode in modes.items()}
    want[f"lib/apk/packages/{name}.list"] = (0o644, "".join(f"/{p}\n" for p in sorted(modes)).encode())
    assert got["files"] == want
    assert set(got["package"]["scripts"]) == {"post-install", "post-upgrade", "pre-deinstall"}
    assert info["installed-size"] == sum(len(data) for _, data in want.values())


def test_translation_package(built, ipks):
    """luci-i18n-mpvpn-zh-cn as the 25.12 SDK packs luci.mk's LuciTranslation: the ipk's
    files plus its .list, depends on the app, noarch, package-pack.mk's scripts only
    (default_postinst runs the uci-defaults script that registers the language)."""
    got = built[f"{I18N}-{VERSION}.apk"]
    info = got["package"]["info"]
    assert info["name"] == I18N.encode() and info["version"] == VERSION.encode()
    assert info["arch"] == b"noarch"
    assert [d["name"] for d in info["depends"]] == [b"libc", b"luci-app-mpvpn"]
    assert info["description"] == "Translation for luci-app-mpvpn - 简体中文 (Chinese Simplified)".encode()
    assert info["origin"] == b"feeds/orayboxvpn/luci-app-mpvpn"
    files = got["files"]
    assert sorted(files) == [f"etc/uci-defaults/{I18N}", f"lib/apk/packages/{I18N}.list",
                             "usr/lib/lua/luci/i18n/mpvpn.zh-cn.lmo"]
    assert files[f"etc/uci-defaults/{I18N}"] == \
        (0o644, "uci set luci.languages.zh_cn='简体中文 (Chinese Simplified)'; uci commit luci\n".encode())
    assert files["usr/lib/lua/luci/i18n/mpvpn.zh-cn.lmo"] == ipks[I18N].files["usr/lib/lua/luci/i18n/mpvpn.zh-cn.lmo"]
    scripts = got["package"]["scripts"]
    assert set(scripts) == {"post-install", "post-upgrade", "pre-deinstall"}
    assert scripts["post-install"].decode().endswith(f'export pkgname="{I18N}"\nadd_group_and_user\ndefault_postinst\n')


def test_versions_are_apk_versions():
    for good in ("0.1.0-r1", "1.2.3", "1.0_rc2-r3", "2.0a", "1.0~abc1-r0"):
        assert apk.valid_version(good), good
    for bad in ("0.1.0-1", "v1.0", "1.0-rc1", "1..0", ""):
        assert not apk.valid_version(bad), bad
    pkg = ipk.orayboxvpn_package(ROOT)
    pkg.version = "0.1.0-1"
    with pytest.raises(ValueError, match="apk version"):
        apk.apk_package(pkg)


def test_core_info(built, ipks):
    info = built[f"orayboxvpn-{VERSION}.apk"]["package"]["info"]
    core = ipks["orayboxvpn"]
    assert info["name"] == b"orayboxvpn" and info["version"] == VERSION.encode()
    assert info["arch"] == b"noarch"  # PKGARCH:=all
    assert info["license"] == b"GPL-2.0-only"
    assert info["origin"] == b"feeds/orayboxvpn/orayboxvpn"
    # $(strip) of the description: one line
    assert info["description"] == " ".join(core.description.split()).encode()
    assert b"\n" not in info["description"]
    assert [d["name"] for d in info["depends"]] == sorted(d.encode() for d in core.depends)
    assert b"libc" in [d["name"] for d in info["depends"]]
    assert [d["name"] for d in info["provides"]] == [b"orayboxvpn-any"]
    files = built[f"orayboxvpn-{VERSION}.apk"]["files"]
    assert info["installed-size"] == sum(len(data) for _, data in files.values())
    assert "url" not in info and "maintainer" not in info  # empty --info values are not stored


def test_same_layout_as_the_ipk(built, ipks):
    """Every file of the ipk (for the same Python) with its mode and bytes,
    plus apk's /lib/apk/packages records; a directory entry for every
    directory (mkpkg's default --compat keeps them), mode 0755."""
    for name in ALL:
        got = built[f"{name}-{VERSION}.apk"]
        files = {k: v for k, v in got["files"].items() if not k.startswith(f"lib/apk/packages/{name}.")}
        assert files == ipks[name].files
        assert all(mode == 0o755 for mode in got["dirs"].values())
        want_dirs = {""} | {"/".join(p.split("/")[:i]) for p in got["files"] for i in range(1, p.count("/") + 1)}
        assert set(got["dirs"]) == want_dirs
    core = built[f"orayboxvpn-{VERSION}.apk"]["files"]
    assert f"{SITE}/cli.py" in core
    assert core["etc/config/orayboxvpn"][0] == 0o600


def test_conffile_recorded_as_openwrt_does_for_apk(built):
    """package-pack.mk (25.12, CONFIG_USE_APK): <name>.conffiles lists the
    conffiles, <name>.conffiles_static each with the shipped file's SHA-256,
    <name>.list every file (sorted, without these records)."""
    files = built[f"orayboxvpn-{VERSION}.apk"]["files"]
    conf = files["etc/config/orayboxvpn"][1]
    assert files["lib/apk/packages/orayboxvpn.conffiles"] == (0o644, b"/etc/config/orayboxvpn\n")
    assert files["lib/apk/packages/orayboxvpn.conffiles_static"] == (
        0o644, f"/etc/config/orayboxvpn {hashlib.sha256(conf).hexdigest()}\n".encode())
    listing = files["lib/apk/packages/orayboxvpn.list"][1].decode().splitlines()
    assert listing == sorted(listing, key=str.encode)
    assert set(listing) == {"/" + p for p in files if not p.startswith("lib/apk/packages/")}
    luci = built[f"luci-app-mpvpn-{VERSION}.apk"]["files"]
    assert "lib/apk/packages/luci-app-mpvpn.list" in luci
    assert "lib/apk/packages/luci-app-mpvpn.conffiles" not in luci


def test_scripts(built, ipks):
    scripts = built[f"orayboxvpn-{VERSION}.apk"]["package"]["scripts"]
    assert set(scripts) == {"post-install", "post-upgrade", "pre-deinstall", "post-deinstall"}
    post = scripts["post-install"].decode()
    assert post == (
        "#!/bin/sh\n"
        '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
        "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
        ". ${IPKG_INSTROOT}/lib/functions.sh\n"
        'export root="${IPKG_INSTROOT}"\n'
        'export pkgname="orayboxvpn"\n'
        "add_group_and_user\n"
        "default_postinst\n"
    )
    assert scripts["post-upgrade"].decode() == "#!/bin/sh\nexport PKG_UPGRADE=1\n" + post.split("\n", 1)[1]
    assert scripts["pre-deinstall"].decode().endswith('export pkgname="orayboxvpn"\ndefault_prerm\n')
    # the byte code the agent writes goes with the package, from 3.13's directory
    assert scripts["post-deinstall"].decode() == (ipks["orayboxvpn"].postrm + "\n")
    assert f"/{SITE}\"\nrm -rf \"$dir/__pycache__\" \"$dir\"/*/__pycache__\n" in scripts["post-deinstall"].decode()
    luci = built[f"luci-app-mpvpn-{VERSION}.apk"]["package"]["scripts"]["post-install"].decode()
    assert luci.endswith(ipks["luci-app-mpvpn"].postinst_pkg + "\n")  # luci.mk's postinst after default_postinst
    assert luci.count("#!") == 1


def test_adb_writer_encoding():
    """Values as adb.c encodes them: immediates, aligned blobs/ints/objects,
    equal data written once."""
    w = apk.AdbWriter()
    assert w.int(5) == 0x10000005 and w.int(0) == 0x10000000
    a = w.blob(b"x")
    assert a == 0x80000008 and w.buf[8:10] == b"\x01x"
    assert w.blob(b"x") == a  # cached
    assert w.blob(b"x", cache=False) != a
    big = w.int(1 << 30)
    assert big & 0xF0000000 == 0x20000000 and (big & 0x0FFFFFFF) % 4 == 0
    assert w.int(1 << 33) & 0xF0000000 == 0x30000000
    b16 = w.blob(b"y" * 300)
    assert b16 & 0xF0000000 == 0x90000000 and (b16 & 0x0FFFFFFF) % 2 == 0
    b32 = w.blob(b"z" * 70000)
    assert b32 & 0xF0000000 == 0xA0000000 and (b32 & 0x0FFFFFFF) % 4 == 0
    assert w.blob(b"") == 0
    o = w.obj([a, 0, 0])
    off = o & 0x0FFFFFFF
    assert o & 0xF0000000 == 0xE0000000 and off % 4 == 0
    assert struct.unpack_from("<2I", w.buf, off) == (2, a)  # trailing NULLs dropped
    assert w.obj([0, 0]) == 0
    r = Reader(bytes(w.buf))
    assert r.value(a, "blob") == b"x" and r.value(big, "int") == 1 << 30
    assert r.value(b32, "blob") == b"z" * 70000 and r.value(w.int(1 << 33), "int") == 1 << 33


def test_reader_rejects_damage(built):
    """The reader is strict: a flipped byte in a file's data, a truncated
    stream or a signature-less DATA block out of place fail."""
    raw = built["_paths"][0].read_bytes()
    data = zlib.decompress(raw[4:], -15)
    damaged = data[:-40] + bytes([data[-40] ^ 1]) + data[-39:]
    with pytest.raises(AssertionError):
        read_apk(apk.compress(damaged))
    with pytest.raises(Exception):
        read_apk(raw[:-100])


def test_reproducible_and_main(tmp_path, capsys):
    a = apk.build(tmp_path / "a", ROOT, EPOCH)
    b = apk.build(tmp_path / "b", ROOT, EPOCH)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert apk.main(["--out", str(tmp_path / "c"), "--root", str(ROOT), "--release", "24.10",
                     "--source-date-epoch", str(EPOCH)]) == 0
    files = read_apk((tmp_path / "c" / f"orayboxvpn-{VERSION}.apk").read_bytes())["files"]
    assert "usr/lib/python3.11/site-packages/mpvpn/cli.py" in files
    assert apk.main(["--out", str(tmp_path), "--root", str(ROOT), "--python-version", "x"]) == 1
    assert "--python-version" in capsys.readouterr().err


def test_makefile_target():
    text = (ROOT / "Makefile").read_text()
    assert "\n\t$(PY) -m mpvpn.tools.apk --out dist --release $(or $(OPENWRT),25.12)\n" in text
    assert "\n\t$(PY) -m mpvpn.tools.ipk --out dist --release $(or $(OPENWRT),24.10)\n" in text


# --- real apk-tools v3 ----------------------------------------------------------------------

def _apk_tool() -> str | None:
    for cand in (shutil.which("apk"), "/opt/owrt/bin/apk", "/opt/owrt/sbin/apk"):
        if cand and os.access(cand, os.X_OK):
            r = subprocess.run([cand, "--version"], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.startswith("apk-tools 3."):
                return cand
    return None


def _stub_provider(out: Path, names: list[str]) -> Path:
    """A package providing the OpenWrt packages ours depend on (libc,
    python3-light, luci-base, ...): the offline root has no feed."""
    pkg = apk.ApkPackage(
        name="test-feed-stub", version="1.0-r0", description="provides the dependencies",
        arch="noarch", license="", origin="", url="", maintainer="", depends=[],
        provides=names, scripts={}, files={"usr/share/test-feed-stub": (0o644, b"stub\n")})
    path = out / pkg.filename
    path.write_bytes(apk.compress(apk.package_bytes(pkg, EPOCH)))
    return path


def test_real_apk_installs_both_packages(built, tmp_path):
    tool = _apk_tool()
    if tool is None:
        pytest.skip("apk-tools v3 not found (apk on PATH or /opt/owrt/bin/apk): build it from "
                    "alpinelinux/apk-tools at the openwrt-25.12 pin to run this")
    paths = built["_paths"]
    ours = {read_apk(p.read_bytes())["package"]["info"]["name"].decode() for p in paths}
    deps = sorted({d["name"].decode() for p in paths for d in read_apk(p.read_bytes())["package"]["info"]
                   ["depends"]} - ours)
    stub = _stub_provider(tmp_path, deps)
    root = tmp_path / "root"
    root.mkdir()
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
    r = subprocess.run([tool, "add", "--root", str(root), "--initdb", "--allow-untrusted", "--no-network",
                        "--no-scripts", "--no-cache", str(stub), *map(str, paths)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for p in paths:
        pkg = read_apk(p.read_bytes())
        for path, (mode, data) in pkg["files"].items():
            f = root / path
            assert f.read_bytes() == data, path
            assert f.stat().st_mode & 0o7777 == mode, path
    # the installed database knows the packages and their files
    r = subprocess.run([tool, "info", "--root", str(root), "-L", "orayboxvpn"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "etc/config/orayboxvpn" in r.stdout, r.stdout + r.stderr
    assert (root / "lib/apk/packages/orayboxvpn.conffiles").read_text() == "/etc/config/orayboxvpn\n"
    assert (root / "usr/lib/lua/luci/i18n/mpvpn.zh-cn.lmo").is_file()
    assert {"prometheus-node-exporter-lua", "collectd-mod-exec", "libubus-lua", "lua"} <= set(deps)
    for name in (PROM, COLLECTD):
        r = subprocess.run([tool, "info", "--root", str(root), "-L", name], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and all(p in r.stdout for p in MONITORING[name][0]), r.stdout + r.stderr
    # an upgrade keeps the admin's config (the new one beside it, as apk does under /etc)
    conf = root / "etc/config/orayboxvpn"
    conf.write_text(conf.read_text() + "# the admin's edit\n")
    newer = []
    for p in ipk.packages(ROOT, "3.13"):
        p.version = f"{__version__}-r2"
        newer.append(str(apk.build_apk(p, tmp_path / "r2", EPOCH)))
    r = subprocess.run([tool, "add", "--root", str(root), "--allow-untrusted", "--no-network",
                        "--no-scripts", "--no-cache", *newer], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert conf.read_text().endswith("# the admin's edit\n")
    assert (root / "etc/config/orayboxvpn.apk-new").is_file()
    r = subprocess.run([tool, "del", "--root", str(root), "--no-scripts", "--no-network", *ALL],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (root / SITE / "cli.py").exists()
    assert not (root / "usr/lib/lua/luci/i18n/mpvpn.zh-cn.lmo").exists()
    assert not any((root / p).exists() for name in (PROM, COLLECTD) for p in MONITORING[name][0])
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and not str(p.relative_to(root)).startswith(("lib/apk/db/", "etc/apk/", "var/log/apk.log",
                                                               "usr/share/test-feed-stub")))
    assert left == ["etc/config/orayboxvpn"], left  # the admin's edit stays, as with opkg


@pytest.mark.parametrize("which", ALL)
def test_same_bytes_as_real_apk_mkpkg(tmp_path, which):
    """The staged tree given to the real `apk mkpkg` with the --info and
    --script arguments package-pack.mk passes gives the same package, byte
    for byte (the deflate stream too, with the same zlib)."""
    tool = _apk_tool()
    if tool is None:
        pytest.skip("apk-tools v3 not found (apk on PATH or /opt/owrt/bin/apk)")
    if os.geteuid() != 0:
        pytest.skip("apk mkpkg records the files' owner names: run as root (the SDK uses fakeroot)")
    pkg = apk.apk_package({p.name: p for p in ipk.packages(ROOT, "3.13")}[which])
    stage = tmp_path / "stage"
    for path, (mode, data) in pkg.files.items():
        f = stage / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        f.chmod(mode)
    for dirpath, _, _ in os.walk(stage):
        os.chmod(dirpath, 0o755)
    args = [tool, "mkpkg", "--info", f"name:{pkg.name}", "--info", f"version:{pkg.version}",
            "--info", f"description:{pkg.description}", "--info", f"arch:{pkg.arch}",
            "--info", f"license:{pkg.license}", "--info", f"origin:{pkg.origin}",
            "--info", f"url:{pkg.url}", "--info", f"maintainer:{pkg.maintainer}",
            "--info", "provides:" + " ".join(pkg.provides)]
    for name, text in pkg.scripts.items():
        (tmp_path / name).write_bytes(text)
        args += ["--script", f"{name}:{tmp_path / name}"]
    out = tmp_path / "real.apk"
    args += ["--info", "depends:" + " ".join(pkg.depends), "--files", str(stage), "--output", str(out)]
    r = subprocess.run(args, env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    real = out.read_bytes()
    ours = apk.package_bytes(pkg, EPOCH)
    assert zlib.decompress(real[4:], -15) == ours
    assert read_apk(real)["files"] == read_apk(apk.compress(ours))["files"]


def test_real_apk_scripts_remove_the_byte_code(built, tmp_path):
    """apk runs the package scripts chrooted into the root: with a shell
    there (busybox), apk del runs post-deinstall, which removes the byte
    code Python wrote next to the agent's sources."""
    tool = _apk_tool()
    busybox = shutil.which("busybox")
    if tool is None or busybox is None or os.geteuid() != 0:
        pytest.skip("needs apk-tools v3, busybox and root (apk chroots into the root for the scripts)")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "rm", "rmdir", "find"):
        (root / "bin" / applet).symlink_to("busybox")
    ldd = subprocess.run(["ldd", busybox], capture_output=True, text=True).stdout
    for lib in (w for w in ldd.split() if w.startswith("/")):  # a dynamic busybox's libraries
        (root / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, root / lib.lstrip("/"))
    paths = built["_paths"]
    ours = {read_apk(p.read_bytes())["package"]["info"]["name"].decode() for p in paths}
    deps = sorted({d["name"].decode() for p in paths for d in read_apk(p.read_bytes())["package"]["info"]
                   ["depends"]} - ours)
    r = subprocess.run([tool, "add", "--root", str(root), "--initdb", "--allow-untrusted", "--no-network",
                        "--no-cache", str(_stub_provider(tmp_path, deps)), *map(str, paths)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Executing orayboxvpn-" in r.stdout, r.stdout + r.stderr
    site = root / SITE
    for d in (site / "__pycache__", site / "core" / "__pycache__"):
        d.mkdir()
        (d / "x.cpython-313.pyc").write_bytes(b"byte code")
    r = subprocess.run([tool, "del", "--root", str(root), "--no-network", *ALL],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"orayboxvpn-{VERSION}.post-deinstall" in r.stdout, r.stdout + r.stderr
    assert not site.exists()
