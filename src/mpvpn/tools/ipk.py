"""``make ipk``: build the OpenWrt packages without the SDK.

``python -m mpvpn.tools.ipk --out dist`` writes ``dist/orayboxvpn_<ver>_all.ipk``,
``dist/luci-app-mpvpn_<ver>_all.ipk``, its translations
(``dist/luci-i18n-mpvpn-zh-cn_<ver>_all.ipk``, see :func:`luci_translations`) and the
monitoring packages (``prometheus-node-exporter-lua-orayboxvpn_<ver>_all.ipk``,
``orayboxvpn-collectd_<ver>_all.ipk``, see :func:`files_package`) in the format OpenWrt's own build
produces (up to OpenWrt 24.10, the last release that uses opkg). It follows
the real tools line by line:

* ``include/package-pack.mk`` (its ipk branch): the ``CONTROL/control``
  fields and their order (Package, Version, Depends, Source, SourceName,
  License, Section, SourceDateEpoch, URL, Maintainer, Architecture,
  Installed-Size, then ``Description:`` with every description line
  re-indented by one space), ``Depends`` led by ``libc`` (package-defaults.mk
  ``PKG_DEFAULT_DEPENDS``), the ``postinst``/``prerm`` wrappers calling
  ``default_postinst``/``default_prerm`` of ``/lib/functions.sh``, a package's
  own postinst saved as ``postinst-pkg`` and ``conffiles``;
* ``scripts/ipkg-build``: ``data.tar.gz`` and ``control.tar.gz`` are
  ``tar --format=gnu --numeric-owner --sort=name --mtime=<epoch>`` piped into
  ``gzip -n``; the package itself is a gzip'd GNU tar (not an ``ar``
  archive) of ``./debian-binary`` (``2.0``), ``./data.tar.gz`` and
  ``./control.tar.gz`` in that order; ``Installed-Size`` is the size of the
  uncompressed data tar; ``conffiles`` lists the regular files the listed
  paths resolve to, sorted;
* the SDK builds under fakeroot, so every member is owned by 0:0.

The tar streams are written here byte for byte as GNU tar writes them (the
tests compare them with GNU tar's output); the gzip header is ``gzip -n``'s.
``SOURCE_DATE_EPOCH`` (or ``PKG_SOURCE_DATE_EPOCH``) fixes every time stamp;
without it the time of the last git commit is used, so two builds of one
commit give identical files.

What goes into the packages is read from the OpenWrt recipes, so the two ways
of building cannot drift apart: ``package/orayboxvpn/Makefile`` gives the
package fields, ``DEPENDS``, ``conffiles`` and the ``$(INSTALL_*)`` lines of
``Py3Package/orayboxvpn/install`` (files/ to router paths); the Python package
goes to ``$(PYTHON3_PKG_DIR)/mpvpn/`` of the target release
(``/usr/lib/python3.11/site-packages`` on 24.10, ``--release 25.12``:
python3.13) as sources (the SDK ships byte code instead; the package's
``postrm`` removes the byte code Python writes next to the sources). ``luci-app-mpvpn/`` is mapped as LuCI's ``luci.mk``
does (``htdocs/*`` to ``/www``, ``root/*`` to ``/``), with its ``Makefile``'s
``LUCI_*`` variables when there is one. The monitoring recipes
(``package/prometheus-node-exporter-lua-orayboxvpn``, ``package/orayboxvpn-collectd``)
install files of their own ``files/`` directory; their ``Package/<name>/install`` lines are
read the same way (:func:`install_files`).
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from mpvpn.tools import lmo

__all__ = [
    "Package",
    "build",
    "build_ipk",
    "control_text",
    "files_package",
    "gnu_tar",
    "gzip_n",
    "install_files",
    "luci_package",
    "luci_translations",
    "main",
    "orayboxvpn_package",
    "parse_makefile",
    "python3_pkg_dir",
    "source_date_epoch",
    "tree",
]

# The python3 of each OpenWrt release (openwrt/packages lang/python/
# python3-version.mk on its branch): the site-packages directory the agent
# goes to, $(PYTHON3_PKG_DIR) in the SDK.
RELEASE_PYTHON = {"24.10": "3.11", "25.12": "3.13"}
DEFAULT_RELEASE = "24.10"
PYTHON_VERSION = RELEASE_PYTHON[DEFAULT_RELEASE]
DEBIAN_BINARY = b"2.0\n"
RECORD_SIZE = 20 * 512  # GNU tar's default blocking factor 20

# rules.mk: INSTALL_BIN/INSTALL_DATA/INSTALL_CONF/INSTALL_DIR modes
INSTALL_MODES = {"INSTALL_BIN": 0o755, "INSTALL_DATA": 0o644, "INSTALL_CONF": 0o600}
DIR_MODE = 0o755

# package-pack.mk: the scripts every SDK-built ipk carries
POSTINST = (
    "#!/bin/sh\n"
    '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
    "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
    ". ${IPKG_INSTROOT}/lib/functions.sh\n"
    "default_postinst $0 $@\n"
)
PRERM = (
    "#!/bin/sh\n"
    "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
    ". ${IPKG_INSTROOT}/lib/functions.sh\n"
    "default_prerm $0 $@\n"
)

# luci.mk's LUCI_LANG.<code> (the languages it builds a luci-i18n package for, with the name
# the package's uci-defaults script registers) and LUCI_LC_ALIAS (the package/.lmo suffix)
LUCI_LANG = {
    "ar": "العربية (Arabic)", "bg": "български (Bulgarian)", "bn_BD": "বাংলা (Bengali)",
    "ca": "Català (Catalan)", "cs": "Čeština (Czech)", "da": "Dansk (Danish)",
    "de": "Deutsch (German)", "el": "Ελληνικά (Greek)", "es": "Español (Spanish)",
    "fa": "Farsi (Persian)", "fi": "Suomi (Finnish)", "fil": "Filipino (Philippinic)",
    "fr": "Français (French)", "he": "עִבְרִית (Hebrew)", "hi": "हिंदी (Hindi)",
    "hu": "Magyar (Hungarian)", "it": "Italiano (Italian)", "ja": "日本語 (Japanese)",
    "ko": "한국어 (Korean)", "lt": "Lietuvių (Lithuanian)", "mr": "Marāṭhī (Marathi)",
    "ms": "Bahasa Melayu (Malay)", "nb_NO": "Norsk (Norwegian)", "nl": "Nederlands (Dutch)",
    "pl": "Polski (Polish)", "pt": "Português (Portuguese)",
    "pt_BR": "Português do Brasil (Brazilian Portuguese)", "ro": "Română (Romanian)",
    "ru": "Русский (Russian)", "sk": "Slovenčina (Slovak)", "sv": "Svenska (Swedish)",
    "tr": "Türkçe (Turkish)", "uk": "Українська (Ukrainian)", "vi": "Tiếng Việt (Vietnamese)",
    "yua": "Yucateco (Yucatec Maya)", "zh_Hans": "简体中文 (Chinese Simplified)",
    "zh_Hant": "繁體中文 (Chinese Traditional)",
}
LUCI_LC_ALIAS = {"bn_BD": "bn", "nb_NO": "no", "pt_BR": "pt-br", "zh_Hans": "zh-cn", "zh_Hant": "zh-tw"}
LUCI_LIBRARYDIR = "usr/lib/lua/luci"

# package-pack.mk removes these before packing
_JUNK = re.compile(r"^(CVS|\.svn|\.#.*|.*~)$")


# --- archives ---------------------------------------------------------------------

def _tar_header(name: bytes, mode: int, size: int, mtime: int, typeflag: bytes) -> bytes:
    """One GNU-format header as ``tar --format=gnu --numeric-owner`` writes it:
    uid/gid 0, empty user and group names, no device numbers."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = b"ustar  \0"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


@dataclass(frozen=True)
class Member:
    """A tar member: ``name`` as stored (``./etc/``, ``./etc/config/x``)."""

    name: str
    mode: int
    data: bytes | None = None  # None: a directory

    @property
    def is_dir(self) -> bool:
        return self.data is None


def gnu_tar(members: list[Member], mtime: int) -> bytes:
    """The uncompressed archive GNU tar writes for ``members`` in this order
    (``--format=gnu --numeric-owner --mtime=@mtime``, owner 0:0)."""
    out = bytearray()
    for m in members:
        name = m.name.encode("utf-8")
        size = 0 if m.is_dir else len(m.data)
        if len(name) > 100:  # GNU long name: a ././@LongLink record first
            out += _tar_header(b"././@LongLink", 0o644, len(name) + 1, 0, b"L")
            out += _pad(name + b"\0")
            name = name[:100]
        out += _tar_header(name, m.mode, size, mtime, b"5" if m.is_dir else b"0")
        if not m.is_dir:
            out += _pad(m.data)
    out += b"\0" * 1024
    out += b"\0" * (-len(out) % RECORD_SIZE)
    return bytes(out)


def gzip_n(data: bytes) -> bytes:
    """``gzip -n``: no name, time stamp 0, OS byte 3 (Unix), level 6."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return (b"\x1f\x8b\x08\x00" + b"\0\0\0\0" + b"\x00\x03" + body
            + struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF))


def tree(files: dict[str, tuple[int, bytes]]) -> list[Member]:
    """Members of ``tar --sort=name -C DIR .`` for a directory holding
    ``files`` ({"etc/config/x": (mode, data)}): ``./`` first, each directory
    (mode 0755) followed by its entries in byte order of their names."""
    root: dict = {}
    for path, (mode, data) in files.items():
        parts = [p for p in path.strip("/").split("/") if p]
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path}: a parent is a file")
        if parts[-1] in node:
            raise ValueError(f"{path}: given twice")
        node[parts[-1]] = (mode, data)

    out = [Member("./", DIR_MODE)]

    def walk(node: dict, prefix: str) -> None:
        for name in sorted(node, key=lambda s: s.encode("utf-8")):
            child = node[name]
            if isinstance(child, dict):
                out.append(Member(f"{prefix}{name}/", DIR_MODE))
                walk(child, f"{prefix}{name}/")
            else:
                out.append(Member(f"{prefix}{name}", child[0], child[1]))

    walk(root, "./")
    return out


# --- the OpenWrt recipes -------------------------------------------------------------

@dataclass
class Makefile:
    variables: dict[str, str] = field(default_factory=dict)
    defines: dict[str, str] = field(default_factory=dict)

    def expand(self, text: str) -> str:
        """Expand ``$(VAR)`` of plain variables (enough for our recipes)."""
        def sub(m: re.Match) -> str:
            return self.expand(self.variables.get(m.group(1), ""))
        return re.sub(r"\$\(([A-Za-z0-9_]+)\)", sub, text)

    def var(self, name: str, default: str = "") -> str:
        if name not in self.variables:
            return default
        return self.expand(self.variables[name]).strip()

    def define(self, name: str) -> str | None:
        """A ``define`` body; ``$(PKG_NAME)`` in the name is expanded."""
        for k, v in self.defines.items():
            if self.expand(k) == name:
                return v
        return None

    def package_fields(self, pkg: str) -> dict[str, str]:
        """``KEY:=value`` lines of ``define Package/<pkg>`` (continuations joined)."""
        body = self.define(f"Package/{pkg}")
        if body is None:
            return {}
        fields: dict[str, str] = {}
        for line in _logical_lines(body):
            m = re.match(r"\s*([A-Z_]+)\s*(\+?:?=)\s*(.*)$", line)
            if m:
                value = self.expand(m.group(3)).strip()
                if m.group(2) == "+=" and m.group(1) in fields:
                    value = fields[m.group(1)] + " " + value
                fields[m.group(1)] = " ".join(value.split())
        return fields


def _logical_lines(text: str) -> list[str]:
    out, cur = [], ""
    for line in text.split("\n"):
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def parse_makefile(path: str | os.PathLike) -> Makefile:
    """Variables (``:=``, ``=``, ``?=``, ``+=``) and ``define`` bodies of an
    OpenWrt package Makefile. Not a make implementation: no conditionals,
    no functions; enough to read the fields of a package recipe."""
    mk = Makefile()
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^\s*define\s+(\S+)\s*$", line)
        if m:
            body = []
            i += 1
            while i < len(lines) and not re.match(r"^\s*endef\s*$", lines[i]):
                body.append(lines[i])
                i += 1
            mk.defines[m.group(1)] = "\n".join(body)
            i += 1
            continue
        logical = line
        while logical.endswith("\\") and i + 1 < len(lines):
            i += 1
            logical = logical[:-1] + " " + lines[i]
        i += 1
        if logical.startswith(("\t", "#")):
            continue
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(:=|\?=|\+=|=)\s*(.*)$", logical)
        if m:
            name, op, value = m.group(1), m.group(2), m.group(3).strip()
            if op == "?=" and name in mk.variables:
                continue
            if op == "+=" and name in mk.variables:
                value = mk.variables[name] + " " + value
            mk.variables[name] = value
    return mk


def depends_list(depends: str) -> list[str]:
    """package-pack.mk's ``filter_deps`` of ``PKG_FIXUP_DEPENDS``: ``+libc``
    first (package-defaults.mk), ``+`` stripped, ``@`` conditions dropped,
    ``COND:pkg`` entries dropped (no CONFIG_ symbol is set here). ``+`` only tells
    menuconfig to select the package; a name without it (``prometheus-node-exporter-lua``:
    needed, but the user chooses it) is a dependency of the package all the same
    (``strip_deps=$(strip $(subst +,,$(filter-out @%,$(1))))``)."""
    default = ["+libc", "+USE_EGLIBC:librt", "+USE_EGLIBC:libpthread"]
    words = default + [w for w in depends.split() if w not in default]
    out = []
    for w in words:
        if w.startswith("@"):
            continue
        w = w.replace("+", "")
        if ":" in w:
            continue
        out.append(w)
    return out


# --- packages --------------------------------------------------------------------------

@dataclass
class Package:
    name: str
    version: str
    depends: list[str]
    section: str
    description: str  # the raw text of Package/<name>/description
    files: dict[str, tuple[int, bytes]]  # router path (no leading /) -> (mode, data)
    source: str = ""
    source_name: str = ""
    license: str = ""
    license_files: str = ""
    url: str = ""
    maintainer: str = ""
    architecture: str = "all"
    conffiles: list[str] = field(default_factory=list)
    postinst_pkg: str | None = None  # Package/<name>/postinst (run by default_postinst)
    prerm_pkg: str | None = None
    postrm: str | None = None  # Package/<name>/postrm (a control file of its own)

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_{self.architecture}.ipk"


def control_text(pkg: Package, epoch: int, installed_size: int) -> str:
    """``CONTROL/control`` as package-pack.mk writes it and ipkg-build
    completes it (Installed-Size)."""
    fields = [
        ("Package", pkg.name),
        ("Version", pkg.version),
        ("Depends", ", ".join(pkg.depends)),
        ("Source", pkg.source),
        ("SourceName", pkg.source_name),
        ("License", pkg.license),
        ("LicenseFiles", pkg.license_files),
        ("Section", pkg.section),
        ("SourceDateEpoch", str(epoch)),
        ("URL", pkg.url),
        ("Maintainer", pkg.maintainer),
        ("Architecture", pkg.architecture),
        ("Installed-Size", str(installed_size)),
    ]
    text = "".join(f"{k}: {v}\n" for k, v in fields if v.strip())
    desc = "\n".join(" " + line.lstrip(" \t\v\f\r") for line in pkg.description.split("\n"))
    return text + "Description: " + desc + "\n"


def _resolve_conffiles(pkg: Package) -> str:
    """ipkg-build: the regular files each listed path resolves to, sorted."""
    found = set()
    for c in pkg.conffiles:
        c = c.strip().rstrip("/")
        if not c:
            continue
        rel = c.lstrip("/")
        for path in pkg.files:
            if path == rel or path.startswith(rel + "/"):
                found.add("/" + path)
    return "".join(f + "\n" for f in sorted(found, key=lambda s: s.encode()))


def build_ipk(pkg: Package, out_dir: str | os.PathLike, epoch: int) -> Path:
    """Write ``out_dir/<name>_<version>_<arch>.ipk``; returns its path."""
    data_tar = gnu_tar(tree(pkg.files), epoch)
    control: dict[str, tuple[int, bytes]] = {
        "control": (0o644, control_text(pkg, epoch, len(data_tar)).encode("utf-8")),
        "postinst": (0o755, POSTINST.encode()),
        "prerm": (0o755, PRERM.encode()),
    }
    conffiles = _resolve_conffiles(pkg)
    if conffiles:
        control["conffiles"] = (0o644, conffiles.encode("utf-8"))
    if pkg.postinst_pkg is not None:
        control["postinst-pkg"] = (0o755, (pkg.postinst_pkg + "\n").encode("utf-8"))
    if pkg.prerm_pkg is not None:
        control["prerm-pkg"] = (0o755, (pkg.prerm_pkg + "\n").encode("utf-8"))
    if pkg.postrm is not None:
        control["postrm"] = (0o755, (pkg.postrm + "\n").encode("utf-8"))
    control_tar = gnu_tar(tree(control), epoch)
    outer = gnu_tar([
        Member("./debian-binary", 0o644, DEBIAN_BINARY),
        Member("./data.tar.gz", 0o644, gzip_n(data_tar)),
        Member("./control.tar.gz", 0o644, gzip_n(control_tar)),
    ], epoch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / pkg.filename
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip_n(outer))
    os.replace(tmp, path)
    return path


def _file_mode(path: Path) -> int:
    """A file's mode as a git checkout has it (0755 or 0644)."""
    return 0o755 if os.stat(path).st_mode & 0o111 else 0o644


def _add_tree(files: dict, src: Path, dest: str, skip_top_dotfiles: bool = False) -> None:
    """``cp -pR src/* dest/``, leaving out package-pack.mk's junk names."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        top = rel == Path(".")
        dirnames[:] = sorted(d for d in dirnames if not _JUNK.match(d)
                             and not (top and skip_top_dotfiles and d.startswith("."))
                             and d != "__pycache__")
        for f in sorted(filenames):
            if _JUNK.match(f) or (top and skip_top_dotfiles and f.startswith(".")):
                continue
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file():
                raise ValueError(f"{p}: only regular files can be packaged")
            target = "/".join(x for x in (dest.strip("/"), str(rel) if not top else "", f) if x)
            files[target] = (_file_mode(p), p.read_bytes())


def _undollar(text: str) -> str:
    return text.replace("$$", "$")


def python3_pkg_dir(python_version: str) -> str:
    """python3-package.mk's PYTHON3_PKG_DIR for that python3."""
    return f"/usr/lib/python{python_version}/site-packages"


def _script(mk: Makefile, name: str) -> str | None:
    """A script define as the shell gets it: make variables expanded, $$ -> $."""
    body = mk.define(name)
    return None if body is None else _undollar(mk.expand(body))


def _expand_install_args(mk: Makefile, text: str, where: str) -> str:
    """Expand the make variables of an install line, keeping ``$(1)`` (the
    package's staging directory), ``$(PKG_BUILD_DIR)`` and the ``$(INSTALL_*)`` commands for
    :func:`install_files`. A variable the recipe does not set is an error: make would expand
    it to nothing and install a file somewhere else."""
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name in ("1", "PKG_BUILD_DIR") or name.startswith("INSTALL_"):
            return m.group(0)
        if name not in mk.variables:
            raise ValueError(f"{where}: $({name}) is not set in the recipe")
        return mk.var(name)
    return re.sub(r"\$\(([A-Za-z0-9_]+)\)", sub, text)


def install_files(mk: Makefile, define: str, sources: dict[str, Path],
                  where: str) -> dict[str, tuple[int, bytes]]:
    """What the ``define`` (``Package/<name>/install``) puts into ``$(1)``, as make and
    coreutils ``install`` (rules.mk: ``INSTALL_DIR:=install -d -m0755``,
    ``INSTALL_BIN:=install -m0755``, ``INSTALL_DATA:=install -m0644``,
    ``INSTALL_CONF:=install -m0600``) would: ``$(INSTALL_DIR) $(1)/d ...`` creates
    directories; ``$(INSTALL_X) SRC... $(1)/DEST`` copies each source with X's mode to DEST,
    or into it when DEST ends with ``/`` or is a directory created before (several sources:
    it must be one). A source starts with one of ``sources``' prefixes (``./`` the
    recipe's directory, ``$(PKG_BUILD_DIR)/``) and is a regular file. As strict as the
    tools: a destination whose directory was not created, a missing source, a line this
    cannot read (``$(CP)``, a shell glob, a loop) is a ``ValueError``, never a package with
    a file left out. Returns {router path without the leading /: (mode, data)}."""
    body = mk.define(define)
    if body is None:
        raise ValueError(f"{where}: no define {define}")
    dirs = {""}
    files: dict[str, tuple[int, bytes]] = {}

    def staged(word: str) -> str:
        if not (word == "$(1)" or word.startswith("$(1)/")):
            raise ValueError(f"{where}: {word!r} is not under $(1)")
        path = word[len("$(1)"):]
        parts = [x for x in path.split("/") if x]
        if any(x in (".", "..") for x in parts):
            raise ValueError(f"{where}: {word!r}: . or .. in a staged path")
        return "/".join(parts)

    for line in _logical_lines(body):
        words = line.split()
        if not words or words[0].startswith("#"):  # the shell's comment
            continue
        m = re.fullmatch(r"\$\((INSTALL_[A-Z]+)\)", words[0])
        if m is None or (m.group(1) != "INSTALL_DIR" and m.group(1) not in INSTALL_MODES):
            raise ValueError(f"{where}: cannot read install line {line.strip()!r}")
        words = [words[0], *_expand_install_args(mk, " ".join(words[1:]), where).split()]
        if m.group(1) == "INSTALL_DIR":  # install -d: every parent too
            for word in words[1:]:
                parts = staged(word).split("/")
                dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
                if staged(word) in files:
                    raise ValueError(f"{where}: {word}: a file of that name was installed")
            continue
        if len(words) < 3:
            raise ValueError(f"{where}: {line.strip()!r}: a source and a destination needed")
        dest_word = words[-1]
        dest = staged(dest_word)
        into = dest_word.endswith("/") or dest in dirs
        if into and dest not in dirs:
            raise ValueError(f"{where}: {dest_word}: no such directory (no $(INSTALL_DIR) before)")
        if not into and len(words) > 3:
            raise ValueError(f"{where}: {dest_word}: several sources need a directory")
        if not into and dest.rpartition("/")[0] not in dirs:
            raise ValueError(f"{where}: {dest_word}: its directory is not created (no $(INSTALL_DIR) before)")
        for src_word in words[1:-1]:
            pre = next((p for p in sources if src_word.startswith(p)), None)
            if pre is None:
                raise ValueError(f"{where}: source {src_word!r} is not under "
                                 + " or ".join(sorted(sources)))
            rel = src_word[len(pre):]
            if any(c in rel for c in "*?[$`{\\") or ".." in rel.split("/"):
                raise ValueError(f"{where}: cannot read source {src_word!r} (a glob, shell expansion or ..)")
            src = sources[pre] / rel
            if not src.is_file():
                raise ValueError(f"{where}: {src_word}: no such file ({src})")
            target = f"{dest}/{src.name}".lstrip("/") if into else dest
            files[target] = (INSTALL_MODES[m.group(1)], src.read_bytes())
    for d in sorted(dirs - {""}):
        if d in files:
            raise ValueError(f"{where}: $(1)/{d}: installed as a file and created as a directory")
        if not any(f.startswith(d + "/") for f in files):  # Package.files holds no directory
            raise ValueError(f"{where}: $(1)/{d} stays empty: an empty directory is not packaged here")
    return files


def _recipe_package(mk: Makefile, name: str, files: dict[str, tuple[int, bytes]]) -> Package:
    """The fields of ``define Package/<name>`` and the recipe's variables, as
    package-pack.mk writes them into the control file."""
    fields = mk.package_fields(name)
    version = mk.var("PKG_VERSION")
    release = mk.var("PKG_RELEASE")
    if release:
        version += f"-r{release}"
    return Package(
        name=name,
        version=version,
        depends=depends_list(fields.get("DEPENDS", "")),
        section=fields.get("SECTION", "opt"),
        description=mk.define(f"Package/{name}/description") or fields.get("TITLE", ""),
        files=files,
        source=f"feeds/orayboxvpn/{name}",
        source_name=name,
        license=mk.var("PKG_LICENSE"),
        license_files=mk.var("PKG_LICENSE_FILES"),
        url=fields.get("URL", ""),
        maintainer=mk.var("PKG_MAINTAINER"),
        architecture=fields.get("PKGARCH", "all"),
        conffiles=(mk.define(f"Package/{name}/conffiles") or "").split(),
        postinst_pkg=_script(mk, f"Package/{name}/postinst"),
        prerm_pkg=_script(mk, f"Package/{name}/prerm"),
        postrm=_script(mk, f"Package/{name}/postrm"),
    )


def orayboxvpn_package(root: str | os.PathLike, python_version: str = PYTHON_VERSION) -> Package:
    """The orayboxvpn package as ``package/orayboxvpn/Makefile`` describes it."""
    root = Path(root)
    mk = parse_makefile(root / "package" / "orayboxvpn" / "Makefile")
    mk.variables["PYTHON3_PKG_DIR"] = python3_pkg_dir(python_version)
    name = mk.var("PKG_NAME")
    # Build/Prepare copies src/ and files/ of the repository into $(PKG_BUILD_DIR)
    files = install_files(mk, f"Py3Package/{name}/install", {"$(PKG_BUILD_DIR)/": root},
                          "package/orayboxvpn/Makefile")
    site = python3_pkg_dir(python_version).lstrip("/") + "/mpvpn"
    pyfiles: dict = {}
    _add_tree(pyfiles, root / "src" / "mpvpn", site)
    for path, (mode, data) in pyfiles.items():
        if path.endswith((".pyc", ".pyo", ".so", ".c")):  # compiled parts: orayboxvpn-fastpath
            continue
        if path.startswith(f"{site}/tools/"):  # runs on a PC (Build/Compile drops it too)
            continue
        files[path] = (0o644, data)
    return _recipe_package(mk, name, files)


# The recipes under package/ that install files of their own directory (``./files/...``) and
# build nothing (``Build/Compile=``, PKGARCH all): `make ipk`/`make apk` build them too.
# Not here: orayboxvpn (above), luci-app-mpvpn (luci.mk), orayboxvpn-fastpath (compiles C for
# the target: the SDK only).
FILES_RECIPES = ("prometheus-node-exporter-lua-orayboxvpn", "orayboxvpn-collectd")


def files_package(recipe_dir: str | os.PathLike) -> Package:
    """A package whose ``Package/<name>/install`` copies files of the recipe's own
    directory (``./files/...``; make runs the recipe in its directory), e.g.
    ``package/orayboxvpn-collectd``: fields, DEPENDS (with and without ``+``: both go into
    Depends, see :func:`depends_list`) and scripts from the Makefile."""
    d = Path(recipe_dir)
    mk = parse_makefile(d / "Makefile")
    name = mk.var("PKG_NAME") or d.name
    if mk.define(f"Package/{name}") is None:
        raise ValueError(f"{d / 'Makefile'}: no define Package/{name}")
    where = f"package/{d.name}/Makefile"
    return _recipe_package(mk, name, install_files(mk, f"Package/{name}/install", {"./": d}, where))


def luci_postinst(defaults: list[str]) -> str:
    """luci.mk's default ``Package/$(PKG_NAME)/postinst`` (make's foreach
    joins the per-script lines with a space)."""
    items = " ".join(
        f"\n\t(. /etc/uci-defaults/{s}) && rm -f /etc/uci-defaults/{s}" for s in defaults
    )
    return (
        '[ -n "${IPKG_INSTROOT}" ] || {' + items + "\n"
        "\trm -f /tmp/luci-indexcache\n"
        "\trm -rf /tmp/luci-modulecache/\n"
        "\tkillall -HUP rpcd 2>/dev/null\n"
        "\texit 0\n"
        "}"
    )


def luci_package(root: str | os.PathLike, version: str, luci_dir: str | os.PathLike | None = None) -> Package:
    """luci-app-mpvpn as ``luci.mk`` builds it: ``htdocs/*`` to ``/www``,
    ``root/*`` to ``/``, fields from ``LUCI_*`` of its Makefile if any."""
    root = Path(root)
    d = Path(luci_dir) if luci_dir is not None else root / "luci-app-mpvpn"
    mk = parse_makefile(d / "Makefile") if (d / "Makefile").is_file() else Makefile()
    name = mk.var("PKG_NAME") or mk.var("LUCI_NAME") or d.name
    if mk.var("PKG_VERSION"):
        version = mk.var("PKG_VERSION")
        if mk.var("PKG_RELEASE"):
            version += f"-r{mk.var('PKG_RELEASE')}"
    files: dict[str, tuple[int, bytes]] = {}
    if (d / "luasrc").is_dir():
        _add_tree(files, d / "luasrc", "usr/lib/lua/luci", skip_top_dotfiles=True)
    if (d / "htdocs").is_dir():
        _add_tree(files, d / "htdocs", "www", skip_top_dotfiles=True)
    if (d / "root").is_dir():
        _add_tree(files, d / "root", "", skip_top_dotfiles=True)
    luci_type = name.split("-")[1] if name.count("-") >= 2 else "app"
    title = mk.var("LUCI_TITLE") or f"LuCI {name} {luci_type}"
    description = mk.define(f"Package/{name}/description")
    if description is None:
        description = mk.var("LUCI_DESCRIPTION") or title
    defaults = sorted(p.name for p in (d / "root" / "etc" / "uci-defaults").glob("*")) \
        if (d / "root" / "etc" / "uci-defaults").is_dir() else []
    post = _script(mk, f"Package/{name}/postinst")
    return Package(
        name=name,
        version=version,
        depends=depends_list(mk.var("LUCI_DEPENDS", "+luci-base +orayboxvpn")),
        section=mk.var("LUCI_SECTION", "luci"),
        description=description,
        files=files,
        source=f"feeds/orayboxvpn/{name}",
        source_name=name,
        license=mk.var("PKG_LICENSE", "GPL-2.0-only"),
        license_files=mk.var("PKG_LICENSE_FILES"),
        url=mk.var("LUCI_URL", "https://github.com/openwrt/luci"),
        maintainer=mk.var("LUCI_MAINTAINER", "OpenWrt LuCI community"),
        architecture=mk.var("LUCI_PKGARCH", "all"),
        conffiles=(mk.define(f"Package/{name}/conffiles") or "").split(),
        postinst_pkg=post if post is not None else luci_postinst(defaults),
        prerm_pkg=_script(mk, f"Package/{name}/prerm"),
        postrm=_script(mk, f"Package/{name}/postrm"),
    )


def luci_basename(luci_dir: Path, mk: Makefile) -> str:
    """luci.mk: LUCI_NAME (the directory's name), LUCI_TYPE (its second word), LUCI_BASENAME
    (what follows ``luci-<type>-``): luci-app-mpvpn -> mpvpn."""
    name = mk.var("LUCI_NAME") or luci_dir.name
    words = name.split("-")
    luci_type = mk.var("LUCI_TYPE") or (words[1] if len(words) > 1 else "")
    return mk.var("LUCI_BASENAME") or (name[len(f"luci-{luci_type}-"):]
                                         if name.startswith(f"luci-{luci_type}-") else name)


def luci_translations(app: Package, luci_dir: str | os.PathLike) -> list[Package]:
    """luci.mk's ``LuciTranslation`` for each ``po/<lang>`` of the app that LUCI_LANG knows:
    ``luci-i18n-<basename>-<lc>`` (lc: LUCI_LC_ALIAS, e.g. zh_Hans -> zh-cn) holding
    ``/usr/lib/lua/luci/i18n/<po name>.<lc>.lmo`` (po2lmo of each ``po/<lang>/*.po``, see
    :mod:`mpvpn.tools.lmo`) and ``/etc/uci-defaults/luci-i18n-<basename>-<lc>``, which
    registers the language with LuCI (run by ``default_postinst``); DEPENDS on the app,
    PKGARCH all, section luci, no scripts of its own.  One deviation: luci.mk versions it
    by the last commit of po/ (PKG_PO_VERSION); here it takes the app's version, so the
    two always upgrade together."""
    d = Path(luci_dir)
    mk = parse_makefile(d / "Makefile") if (d / "Makefile").is_file() else Makefile()
    base = luci_basename(d, mk)
    po_root = d / "po"
    langs = sorted(p.name for p in po_root.iterdir() if p.is_dir() and p.name != "templates") \
        if po_root.is_dir() else []
    out = []
    for lang in langs:
        if lang not in LUCI_LANG:
            continue  # $(if $(LUCI_LANG.$(lang)),...): luci.mk builds nothing for it
        lc = LUCI_LC_ALIAS.get(lang, lang)
        name = f"luci-i18n-{base}-{lc}"
        script = f"uci set luci.languages.{lc.replace('-', '_')}='{LUCI_LANG[lang]}'; uci commit luci\n"
        files: dict[str, tuple[int, bytes]] = {f"etc/uci-defaults/{name}": (0o644, script.encode("utf-8"))}
        for po in sorted((po_root / lang).glob("*.po")):
            data = lmo.write_lmo(po)
            if data:  # po2lmo writes no file for a catalog without a translation
                files[f"{LUCI_LIBRARYDIR}/i18n/{po.stem}.{lc}.lmo"] = (0o644, data)
        out.append(Package(
            name=name,
            version=app.version,
            depends=depends_list(app.name),
            section="luci",
            description=f"Translation for {app.name} - {LUCI_LANG[lang]}",
            files=files,
            source=app.source,
            source_name=app.name,  # package-pack.mk: SourceName is $(PKG_NAME)
            license=app.license,
            license_files=app.license_files,
            url=app.url,
            maintainer=app.maintainer,
            architecture="all",
        ))
    return out


def source_date_epoch(root: str | os.PathLike) -> int:
    """PKG_SOURCE_DATE_EPOCH or SOURCE_DATE_EPOCH, else the last commit's
    time, else the newest file under src/ and files/."""
    for var in ("PKG_SOURCE_DATE_EPOCH", "SOURCE_DATE_EPOCH"):
        v = os.environ.get(var, "").strip()
        if v:
            if not v.isdigit():
                raise ValueError(f"{var}={v!r} is not a number of seconds")
            return int(v)
    try:
        r = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%ct"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip().isdigit():
            return int(r.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    newest = 0
    for sub in ("src", "files", "package"):
        for dirpath, _, filenames in os.walk(Path(root) / sub):
            for f in filenames:
                newest = max(newest, int(os.stat(Path(dirpath) / f).st_mtime))
    return newest


def default_root() -> Path:
    here = Path(__file__).resolve().parents[3]
    if (here / "package" / "orayboxvpn" / "Makefile").is_file() and (here / "files").is_dir():
        return here
    return Path.cwd()


def packages(root: str | os.PathLike | None = None,
             python_version: str = PYTHON_VERSION) -> list[Package]:
    """orayboxvpn, luci-app-mpvpn and its translations (luci-i18n-mpvpn-<lang>), for a target
    whose python3 is ``python_version``, and the monitoring packages (:data:`FILES_RECIPES`)."""
    root = Path(root) if root is not None else default_root()
    core = orayboxvpn_package(root, python_version)
    app = luci_package(root, core.version)
    return [core, app, *luci_translations(app, root / "luci-app-mpvpn"),
            *(files_package(root / "package" / name) for name in FILES_RECIPES)]


def build(out_dir: str | os.PathLike, root: str | os.PathLike | None = None,
          epoch: int | None = None, python_version: str = PYTHON_VERSION) -> list[Path]:
    """Build every package of :func:`packages`; returns the written paths."""
    root = Path(root) if root is not None else default_root()
    if epoch is None:
        epoch = source_date_epoch(root)
    return [build_ipk(pkg, out_dir, epoch) for pkg in packages(root, python_version)]


def add_build_arguments(p: argparse.ArgumentParser, default_release: str) -> None:
    """The arguments `make ipk` and `make apk` share: where to write, what to build from, the
    files' time stamp, and the target's python3 (:func:`add_target_arguments`)."""
    p.add_argument("--out", default="dist", metavar="DIR", help="output directory (default dist)")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="repository root (default: the checkout this module is in)")
    p.add_argument("--source-date-epoch", type=int, default=None, metavar="SECONDS",
                   help="time stamp of every file (default: $SOURCE_DATE_EPOCH, else the last commit)")
    add_target_arguments(p, default_release)


def add_target_arguments(p: argparse.ArgumentParser, default_release: str) -> None:
    """--release / --python-version: which OpenWrt's python3 the agent is installed for."""
    p.add_argument("--release", default=None, choices=sorted(RELEASE_PYTHON), metavar="X.Y",
                   help="target OpenWrt release: its python3 decides the site-packages directory "
                   + ", ".join(f"{r}: python{v}" for r, v in RELEASE_PYTHON.items())
                   + f" (default {default_release})")
    p.add_argument("--python-version", default=None, metavar="X.Y",
                   help="the target's python3 version, instead of the release's")


def target_python(args: argparse.Namespace, default_release: str) -> str:
    if args.python_version:
        if not re.fullmatch(r"3\.\d+", args.python_version):
            raise ValueError(f"--python-version {args.python_version!r}: expected 3.N")
        return args.python_version
    return RELEASE_PYTHON[args.release or default_release]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mpvpn.tools.ipk",
        description="Build dist/orayboxvpn_<ver>_all.ipk, dist/luci-app-mpvpn_<ver>_all.ipk, "
        "its translations (luci-i18n-mpvpn-zh-cn_<ver>_all.ipk) and the monitoring packages "
        "(prometheus-node-exporter-lua-orayboxvpn, orayboxvpn-collectd) "
        "in OpenWrt's ipk format, without the SDK (for OpenWrt 24.10 and older; "
        "25.12 and later use apk: python -m mpvpn.tools.apk).",
    )
    add_build_arguments(p, DEFAULT_RELEASE)
    return run_build(p, argv, build, DEFAULT_RELEASE)


def run_build(p: argparse.ArgumentParser, argv: list[str] | None, build_fn, default_release: str) -> int:
    """`python -m mpvpn.tools.ipk` / `mpvpn.tools.apk`: parse the build arguments, build, print
    each package with its size; a bad argument or I/O error is one line and exit 1."""
    args = p.parse_args(argv)
    try:
        paths = build_fn(args.out, args.root, args.source_date_epoch, target_python(args, default_release))
    except (OSError, ValueError) as e:
        print(f"{p.prog.split()[-1]}: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path} ({os.path.getsize(path)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
