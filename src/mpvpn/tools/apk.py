"""``make apk``: the OpenWrt 25.12 packages (apk-tools v3) without the SDK.

``python -m mpvpn.tools.apk --out dist`` writes ``dist/orayboxvpn-<ver>.apk``,
``dist/luci-app-mpvpn-<ver>.apk``, ``dist/luci-i18n-mpvpn-zh-cn-<ver>.apk`` and the monitoring
packages (``dist/prometheus-node-exporter-lua-orayboxvpn-<ver>.apk``,
``dist/orayboxvpn-collectd-<ver>.apk``) as the 25.12 SDK makes them: its
``include/package-pack.mk`` (the ``CONFIG_USE_APK`` branch) stages the same
files as for an ipk (read from the same recipes by :mod:`mpvpn.tools.ipk`), adds
``/lib/apk/packages/<name>.list``, ``.conffiles`` and ``.conffiles_static``
(how OpenWrt records conffiles for apk: the path, and the path with the
shipped file's SHA-256), turns the package scripts into apk's
``post-install``, ``post-upgrade``, ``pre-deinstall`` and ``post-deinstall``
and runs ``apk mkpkg --info name:... --info version:... --info arch:noarch
... --files <dir>``.

That last step is done here, following apk-tools 3.0.5 (the version the 25.12
branch pins): ``src/app_mkpkg.c`` for what is written in which order,
``src/adb.c`` (``adb_w_*``) for the encoding and ``src/apk_adb.c`` for the
package schema. The file is (``doc/apk-v3.5.scd``):

* ``ADBd`` and a raw deflate stream (mkpkg's default compression) of
* the file header: magic ``ADB.`` and the schema ``pckg``;
* one ADB block: a 4-byte little-endian block header (type in the top two
  bits: 0 ADB, 2 DATA; the length including this header in the rest), then
  an 8-byte ``adb_hdr`` (compat version 0, version 0, the root value) and the
  values, padded to 8 bytes. A value is a 32-bit word: a 4-bit type and a
  28-bit immediate or offset into the block. Integers below 2^28 are
  immediate; blobs carry a 1-, 2- or 4-byte length (aligned to it); objects
  and arrays are 4-aligned word arrays whose first word is their length.
  Equal data is written once (``adb_w_data``'s cache);
* no SIG block (unsigned: ``apk add --allow-untrusted``);
* one DATA block per non-empty file: path and file index (1-based, into the
  sorted ``paths`` array and that directory's sorted ``files`` array), then
  the file's bytes, padded to 8.

The package's info ``hashes`` field is its unique id: the first 20 bytes of
the SHA-256 of the ADB block, computed with the field zeroed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from mpvpn.tools import ipk

__all__ = [
    "AdbWriter",
    "ApkPackage",
    "apk_package",
    "build",
    "build_apk",
    "main",
    "package_bytes",
    "valid_version",
]

DEFAULT_RELEASE = "25.12"  # the first OpenWrt release with apk

# adb.h
ADB_FORMAT_MAGIC = b"ADB."
ADB_SCHEMA_PACKAGE = b"pckg"  # 0x676b6370 little-endian
TYPE_SPECIAL = 0x00000000
TYPE_INT = 0x10000000
TYPE_INT_32 = 0x20000000
TYPE_INT_64 = 0x30000000
TYPE_BLOB_8 = 0x80000000
TYPE_BLOB_16 = 0x90000000
TYPE_BLOB_32 = 0xA0000000
TYPE_ARRAY = 0xD0000000
TYPE_OBJECT = 0xE0000000
VALUE_MASK = 0x0FFFFFFF
NULL = 0
BLOCK_ADB = 0
BLOCK_DATA = 2
BLOCK_ALIGNMENT = 8

# apk_adb.h: field indexes (1-based; slot 0 of an object is its length)
PI_NAME, PI_VERSION, PI_HASHES, PI_DESCRIPTION, PI_ARCH, PI_LICENSE = 1, 2, 3, 4, 5, 6
PI_ORIGIN, PI_MAINTAINER, PI_URL, PI_REPO_COMMIT, PI_BUILD_TIME = 7, 8, 9, 10, 11
PI_INSTALLED_SIZE, PI_FILE_SIZE, PI_PROVIDER_PRIORITY, PI_DEPENDS, PI_PROVIDES = 12, 13, 14, 15, 16
PI_MAX = 22
ACL_MODE, ACL_USER, ACL_GROUP = 1, 2, 3
FI_NAME, FI_ACL, FI_SIZE, FI_MTIME, FI_HASHES, FI_TARGET = 1, 2, 3, 4, 5, 6
DI_NAME, DI_ACL, DI_FILES = 1, 2, 3
PKG_PKGINFO, PKG_PATHS, PKG_SCRIPTS = 1, 2, 3
DEP_NAME = 1
# schema_scripts field names by index
SCRIPTS = ("trigger", "pre-install", "post-install", "pre-deinstall", "post-deinstall",
           "pre-upgrade", "post-upgrade")
UID_LEN = 20  # mkpkg: apk_digest_alg_len(APK_DIGEST_SHA1) bytes of a SHA-256

# apk-package(5): number{.number}...{letter}{_suffix{number}}...{~hash}{-r#}
_VERSION = re.compile(
    r"[0-9]+(\.[0-9]+)*[a-z]?(_(alpha|beta|pre|rc|cvs|svn|git|hg|p)[0-9]*)*(~[0-9a-f]+)?(-r[0-9]+)?")
# APK_CTYPE_PACKAGE_NAME / APK_CTYPE_DEPENDENCY_NAME
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def valid_version(v: str) -> bool:
    """apk_version_validate: the version grammar of apk-package(5)."""
    return _VERSION.fullmatch(v) is not None


class AdbWriter:
    """The values of one ADB block, written as adb.c's ``adb_w_*`` write
    them: each at the next offset aligned for it, equal data written once."""

    def __init__(self) -> None:
        self.buf = bytearray(8)  # struct adb_hdr: compat 0, version 0, reserved, root
        self._cache: dict[bytes, int] = {}

    def _raw(self, data: bytes, align: int) -> int:
        self.buf += b"\0" * (-len(self.buf) % align)
        offset = len(self.buf)
        self.buf += data
        if offset > VALUE_MASK:
            raise ValueError("ADB block larger than 256 MiB")
        return offset

    def _data(self, data: bytes, align: int, cache: bool = True) -> int:
        """adb_w_data: reuse an earlier copy of ``data`` when it is aligned."""
        if not cache:
            return self._raw(data, align)
        offset = self._cache.get(data)
        if offset is None or offset % align:
            offset = self._cache[data] = self._raw(data, align)
        return offset

    def blob(self, data: bytes, cache: bool = True) -> int:
        """adb_w_blob: NULL for empty data."""
        n = len(data)
        if n == 0:
            return NULL
        if n > 0xFFFF:
            return TYPE_BLOB_32 | self._data(struct.pack("<I", n) + data, 4, cache)
        if n > 0xFF:
            return TYPE_BLOB_16 | self._data(struct.pack("<H", n) + data, 2, cache)
        return TYPE_BLOB_8 | self._data(bytes([n]) + data, 1, cache)

    def int(self, n: int) -> int:
        """adb_w_int."""
        if n < 0 or n >= 1 << 64:
            raise ValueError(f"{n} is not a 64-bit unsigned integer")
        if n >= 1 << 32:
            return TYPE_INT_64 | self._data(struct.pack("<Q", n), 4)
        if n >= 1 << 28:
            return TYPE_INT_32 | self._data(struct.pack("<I", n), 4)
        return TYPE_INT | n

    def obj(self, slots: list[int], type_: int = TYPE_OBJECT) -> int:
        """__adb_w_obj: ``slots`` are the values of fields 1.., trailing NULLs
        dropped; NULL when nothing is left. (mkpkg writes arrays through
        adb_wo_obj too, so they carry the object type.)"""
        slots = list(slots)
        while slots and slots[-1] == NULL:
            slots.pop()
        if not slots:
            return NULL
        words = [len(slots) + 1, *slots]
        return type_ | self._data(struct.pack(f"<{len(words)}I", *words), 4)

    def set_root(self, val: int) -> None:
        struct.pack_into("<I", self.buf, 4, val)


@dataclass(frozen=True)
class ApkPackage:
    """What ``apk mkpkg`` gets: the --info fields, the scripts and the staged
    files (router path without the leading / -> (mode, data))."""

    name: str
    version: str
    description: str
    arch: str
    license: str
    origin: str
    url: str
    maintainer: str
    depends: list[str]
    provides: list[str]
    scripts: dict[str, bytes]
    files: dict[str, tuple[int, bytes]]

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.apk"


def _strip(text: str) -> str:
    """make's $(strip): whitespace runs (newlines too) become one space."""
    return " ".join(text.split())


def _without_shebang(text: str) -> str:
    """sed '/^\\s*#!/d'."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#!"))


def _scripts(pkg: ipk.Package) -> dict[str, bytes]:
    """package-pack.mk's apk scripts (pkgname: no ABI version here)."""
    postinst_pkg = "" if pkg.postinst_pkg is None else _without_shebang(pkg.postinst_pkg + "\n")
    post_install = (
        "#!/bin/sh\n"
        '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
        "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
        ". ${IPKG_INSTROOT}/lib/functions.sh\n"
        'export root="${IPKG_INSTROOT}"\n'
        f'export pkgname="{pkg.name}"\n'
        "add_group_and_user\n"
        "default_postinst\n"
        + postinst_pkg
    )
    post_upgrade = "#!/bin/sh\nexport PKG_UPGRADE=1\n" + _without_shebang(post_install)
    prerm_pkg = "" if pkg.prerm_pkg is None else _without_shebang(pkg.prerm_pkg + "\n")
    pre_deinstall = (
        "#!/bin/sh\n"
        "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
        ". ${IPKG_INSTROOT}/lib/functions.sh\n"
        'export root="${IPKG_INSTROOT}"\n'
        f'export pkgname="{pkg.name}"\n'
        "default_prerm\n"
        + prerm_pkg
    )
    out = {"post-install": post_install, "post-upgrade": post_upgrade, "pre-deinstall": pre_deinstall}
    if pkg.postrm is not None:
        # echo "$postrm" > postrm; sed -zi 's/^\s*#!/#!/'
        out["post-deinstall"] = re.sub(r"\A\s*#!", "#!", pkg.postrm + "\n")
    return {k: v.encode("utf-8") for k, v in out.items()}


def _staged_files(pkg: ipk.Package) -> dict[str, tuple[int, bytes]]:
    """The package's files plus /lib/apk/packages/<name>.{list,conffiles,conffiles_static}."""
    files = dict(pkg.files)
    meta = f"lib/apk/packages/{pkg.name}"
    # find . -type f,l -printf "/%P\n" | sort (LC_ALL=C), before the conffiles are added
    listing = sorted("/" + p for p in files)
    conffiles = "".join(c + "\n" for c in pkg.conffiles)
    static = ""
    for c in pkg.conffiles:
        if c.lstrip("/") in files:  # [ -f $(IDIR)/$file ] || continue
            static += f"{c} {hashlib.sha256(files[c.lstrip('/')][1]).hexdigest()}\n"
    files[f"{meta}.list"] = (0o644, "".join(p + "\n" for p in sorted(listing, key=str.encode)).encode())
    if pkg.conffiles:
        files[f"{meta}.conffiles"] = (0o644, conffiles.encode())
        if static:
            files[f"{meta}.conffiles_static"] = (0o644, static.encode())
    return files


def apk_package(pkg: ipk.Package) -> ApkPackage:
    """An ipk recipe as the 25.12 SDK packs it with apk."""
    if not valid_version(pkg.version):
        raise ValueError(f"{pkg.name}: version {pkg.version!r} is not an apk version (x.y.z-rN)")
    for dep in pkg.depends:
        if not _NAME.fullmatch(dep):
            raise ValueError(f"{pkg.name}: dependency {dep!r} is not a package name")
    return ApkPackage(
        name=pkg.name,
        version=pkg.version,
        description=_strip(pkg.description),
        arch="noarch" if "all" in pkg.architecture else pkg.architecture,
        license=pkg.license,
        origin=pkg.source,
        url=pkg.url,
        maintainer=pkg.maintainer,
        depends=list(pkg.depends),
        provides=[f"{pkg.name}-any"],  # package.mk: PROVIDES:=@$(1)-any, made a virtual provide
        scripts=_scripts(pkg),
        files=_staged_files(pkg),
    )


def _tree(files: dict[str, tuple[int, bytes]]) -> dict[str, dict[str, tuple[int, bytes]]]:
    """directory ('' for the root) -> {file name: (mode, data)}, every parent directory listed."""
    dirs: dict[str, dict[str, tuple[int, bytes]]] = {"": {}}
    for path, (mode, data) in files.items():
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            dirs.setdefault("/".join(parts[:i]), {})
        dirs["/".join(parts[:-1])][parts[-1]] = (mode, data)
    for d in dirs:
        if d and d.rsplit("/", 1)[-1] in dirs.get(d.rpartition("/")[0], {}):
            raise ValueError(f"{d}: both a file and a directory")
    return dirs


def _dependencies(w: AdbWriter, names: list[str]) -> int:
    """dependencies_fromstring + adb_wa_sort_unique, written by adb_w_fromstring."""
    deps = []
    for name in names:
        deps.append(w.obj([w.blob(name.encode())]))
    # sort by the dependency objects (name first); equal values are equal deps
    unique = sorted(set(deps), key=lambda v: names[deps.index(v)].encode())
    return w.obj(unique)


def package_bytes(pkg: ApkPackage, epoch: int) -> bytes:
    """The uncompressed package: file header, ADB block, DATA blocks."""
    w = AdbWriter()
    enc = str.encode
    # assign_fields(info): in field order
    info: dict[int, int] = {
        PI_NAME: w.blob(enc(pkg.name)),
        PI_VERSION: w.blob(enc(pkg.version)),
        PI_DESCRIPTION: w.blob(enc(pkg.description)),
        PI_ARCH: w.blob(enc(pkg.arch)),
        PI_LICENSE: w.blob(enc(pkg.license)),
        PI_ORIGIN: w.blob(enc(pkg.origin)),
        PI_MAINTAINER: w.blob(enc(pkg.maintainer)),
        PI_URL: w.blob(enc(pkg.url)),
    }
    info[PI_DEPENDS] = _dependencies(w, pkg.depends)
    info[PI_PROVIDES] = _dependencies(w, pkg.provides)

    # mkpkg_process_directory: the root, then every directory by name
    # (strcmp); in each the files by name, then the directory itself.
    tree = _tree(pkg.files)
    user = group = b"root"  # the SDK packs under fakeroot
    paths: list[tuple[bytes, int, list[tuple[bytes, bytes]]]] = []
    installed_size = 0
    for d in sorted(tree, key=enc):
        entries = []
        for fname in sorted(tree[d], key=enc):
            mode, data = tree[d][fname]
            name_v = w.blob(enc(fname))
            hash_v = w.blob(hashlib.sha256(data).digest())
            mtime_v = w.int(epoch)  # apk_get_build_time: SOURCE_DATE_EPOCH
            size_v = w.int(len(data))
            acl_v = w.obj([w.int(mode & 0o7777), w.blob(user), w.blob(group)])
            fio = w.obj([name_v, acl_v, size_v, mtime_v, hash_v])
            entries.append((enc(fname), fio, data))
            installed_size += len(data)
        name_v = w.blob(enc(d))
        acl_v = w.obj([w.int(0o755), w.blob(user), w.blob(group)])
        entries.sort(key=lambda e: e[0])  # schema_file_array pre_commit: adb_wa_sort
        files_v = w.obj([fio for _, fio, _ in entries])
        paths.append((enc(d), w.obj([name_v, acl_v, files_v]), [(n, data) for n, _, data in entries]))
    info[PI_INSTALLED_SIZE] = w.int(installed_size or 1)
    uid_v = w.blob(b"\0" * UID_LEN, cache=False)  # adb_wo_blob_raw, filled in below
    info[PI_HASHES] = uid_v
    info_v = w.obj([info.get(i, NULL) for i in range(1, PI_MAX)])
    paths.sort(key=lambda p: p[0])  # schema_dir_array pre_commit: adb_wa_sort
    paths_v = w.obj([v for _, v, _ in paths])
    script_vals = [w.blob(pkg.scripts.get(name, b"")) for name in SCRIPTS]
    unknown = set(pkg.scripts) - set(SCRIPTS)
    if unknown:
        raise ValueError(f"unknown script type(s) {sorted(unknown)}")
    scripts_v = w.obj(script_vals) if pkg.scripts else NULL
    w.set_root(w.obj([info_v, paths_v, scripts_v]))
    # the unique id: SHA-256 of the block with the id zeroed, first 20 bytes
    uid_at = (uid_v & VALUE_MASK) + 1
    w.buf[uid_at:uid_at + UID_LEN] = hashlib.sha256(bytes(w.buf)).digest()[:UID_LEN]

    out = bytearray(ADB_FORMAT_MAGIC + ADB_SCHEMA_PACKAGE)
    out += _block(BLOCK_ADB, bytes(w.buf))
    for i, (_, _, files) in enumerate(paths, 1):
        for j, (_, data) in enumerate(files, 1):
            if data:
                out += _block(BLOCK_DATA, struct.pack("<II", i, j) + data)
    return bytes(out)


def _block(type_: int, payload: bytes) -> bytes:
    """adb_c_block: header word (type << 30 | 4 + length), payload, padding to 8."""
    raw = 4 + len(payload)
    if raw > 0x3FFFFFFF:
        raise ValueError("block larger than 1 GiB")
    return struct.pack("<I", (type_ << 30) | raw) + payload + b"\0" * (-raw % BLOCK_ALIGNMENT)


def compress(data: bytes) -> bytes:
    """adb_compress with the default spec: "ADBd" and raw deflate, level 9."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    return b"ADBd" + c.compress(data) + c.flush()


def build_apk(pkg: ipk.Package, out_dir: str | os.PathLike, epoch: int) -> Path:
    """Write ``out_dir/<name>-<version>.apk``; returns its path."""
    apk = apk_package(pkg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / apk.filename
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(compress(package_bytes(apk, epoch)))
    os.replace(tmp, path)
    return path


def build(out_dir: str | os.PathLike, root: str | os.PathLike | None = None,
          epoch: int | None = None, python_version: str | None = None) -> list[Path]:
    """Build orayboxvpn, luci-app-mpvpn, its translations and the monitoring packages as apk
    packages (every package of :func:`mpvpn.tools.ipk.packages`)."""
    root = Path(root) if root is not None else ipk.default_root()
    if epoch is None:
        epoch = ipk.source_date_epoch(root)
    if python_version is None:
        python_version = ipk.RELEASE_PYTHON[DEFAULT_RELEASE]
    return [build_apk(p, out_dir, epoch) for p in ipk.packages(root, python_version)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mpvpn.tools.apk",
        description="Build dist/orayboxvpn-<ver>.apk, dist/luci-app-mpvpn-<ver>.apk, "
        "dist/luci-i18n-mpvpn-zh-cn-<ver>.apk and the monitoring packages "
        "(prometheus-node-exporter-lua-orayboxvpn, orayboxvpn-collectd) in "
        "apk-tools v3 format, as OpenWrt 25.12's SDK makes them, without the SDK. "
        "Unsigned: install with apk add --allow-untrusted.",
    )
    ipk.add_build_arguments(p, DEFAULT_RELEASE)
    return ipk.run_build(p, argv, build, DEFAULT_RELEASE)


if __name__ == "__main__":
    sys.exit(main())
