"""Translations of luci-app-mpvpn the way LuCI makes and reads them (development tool, not shipped).

    python3 tests/luci_i18n.py scan     rewrite luci-app-mpvpn/po/templates/mpvpn.pot from the sources
    python3 tests/luci_i18n.py update   merge the template into every po/<lang>/mpvpn.po (msgmerge)

``scan`` is openwrt/luci ``build/i18n-scan.pl`` in Python, run on the app
directory from the repository root as LuCI runs it from its tree
(``./build/i18n-scan.pl applications/luci-app-foo > .../po/templates/foo.pot``):
xgettext per file with LuCI's keywords (``.js``: ``_:1 _:1,2c N_:2,3
N_:2,3,4c``; menu.d and acl.d JSON: the values of "title" and "description"
wrapped in ``_()`` first), each file's output post-processed as there (one
``#: path:line`` comment per location, continued msgids joined with a space,
``\\n``/``\\t`` turned into spaces and runs of spaces collapsed, xgettext's
``#,`` flags dropped, entries with an empty msgid dropped), everything
through ``msguniq -s`` behind LuCI's one-line header, and the location
comments of each entry sorted by path and line.  ``update`` is
``build/i18n-update.pl`` (``msgmerge -U -N``, then the ``Language:`` header
moved behind ``Language-Team:``).

The reading side mirrors what a router does with a .po file:
:func:`po2lmo_records` / :func:`write_lmo` (in :mod:`mpvpn.tools.lmo`, which
``make ipk``/``make apk`` use for luci-i18n-mpvpn-zh-cn) are ``modules/luci-base/src/po2lmo.c``
(its string extraction keeps every escape but ``\\"`` and ``\\\\``; its lines are
read in 4096-byte pieces; a translation that hashes like its msgid is left
out; ``write_lmo`` gives the same bytes as po2lmo), :func:`read_lmo` is
``lmo_open()`` of ``src/lib/lmo.c``,
:func:`sfh` is ``sfh_hash()`` of ``src/lib/lmo.c`` (Paul Hsieh's
SuperFastHash, seeded with the length), and :func:`window_tr` is the object
``action_translations`` of luci-base's dispatcher writes as ``window.TR``
(``"%08x"`` of the key hash -> translation), which cbi.js's ``_()`` reads by
``sfh(trimws(msgid))``.  :func:`directives` lists the ``%`` directives LuCI's
``String.prototype.format`` substitutes, in order (it has no positional
arguments, so a translation must keep them in the same order).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# po2lmo.c and lmo.c in Python live with the package builder (make ipk/apk build the .lmo)
from mpvpn.tools.lmo import (  # noqa: F401  (re-exported for the tests)
    Entry, parse_po, po2lmo_entries, po2lmo_records, po2lmo_string, read_lmo, sfh, trimws, unescape,
    write_lmo,
)

REPO = Path(__file__).resolve().parents[1]
APP_NAME = "luci-app-mpvpn"
APP = REPO / APP_NAME
PO_DIR = APP / "po"
DOMAIN = "mpvpn"  # luci.mk LUCI_BASENAME: luci-app-mpvpn -> mpvpn
TEMPLATE = PO_DIR / "templates" / f"{DOMAIN}.pot"

# i18n-scan.pl %keywords
KEYWORDS = {
    ".js": ["_:1", "_:1,2c", "N_:2,3", "N_:2,3,4c"],
    ".json": ["_:1", "_:1,2c"],
}

# po2lmo.c: fgets(line, 4096, in); longer lines are split into pieces it misreads
PO2LMO_LINE_MAX = 4096 - 1

# LuCI's String.prototype.format (luci.js / cbi.js): the directive regex
FORMAT_RE = re.compile(r"%('.|0|\x20)?(-)?(\d+)?(\.\d+)?(%|b|c|d|u|f|o|s|x|X|q|h|j|t|m)")


class ToolMissing(Exception):
    """A gettext program the LuCI build scripts use is not installed."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise ToolMissing(f"{name} is not installed (Debian package gettext)")
    return path


# --- i18n-scan.pl ------------------------------------------------------------------------

def source_files(app: Path = APP) -> list[Path]:
    """i18n-scan.pl's find: *.js, */menu.d/*.json, */acl.d/*.json (no Lua/htm here)."""
    out = []
    for p in sorted(app.rglob("*")):
        if not p.is_file():
            continue
        s = p.as_posix()
        if p.suffix == ".js" or (p.suffix == ".json" and ("/menu.d/" in s or "/acl.d/" in s
                                                        or "/statistics/plugins/" in s)):
            out.append(p)
    return out


def preprocess_json(source: str) -> str:
    """i18n-scan.pl preprocess_json: "title"/"description" values become _("...")."""
    return re.sub(r'("(?:title|description)")\s*:\s*("(?:[^"\\]|\\.)*")', r"\1: _(\2)", source, flags=re.S)


def whitespace_collapse(s: str) -> str:
    """i18n-scan.pl whitespace_collapse: \\n and \\t escapes become spaces, runs of spaces one."""
    s = re.sub(r"\\(.)", lambda m: " " if m.group(1) in "nt" else "\\" + m.group(1), s)
    s = re.sub(r" {2,}", " ", s)
    s = re.sub(r"^ ", "", s)
    return re.sub(r" $", "", s)


def postprocess_pot(path: str, source: str) -> str:
    """i18n-scan.pl postprocess_pot for one file's xgettext output."""
    source = re.sub(r"^#: (.+?)\n",
                    lambda m: "\n".join(f"#: {path}:{n}" for n in re.findall(r":(\d+)", m.group(1))) + "\n",
                    source, flags=re.M)
    lines = source.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # perl's split drops trailing empty fields
    while lines and not lines[0].startswith("#: "):
        lines.pop(0)
    res: list[str] = []
    while lines:
        line = lines.pop(0)
        m = re.match(r'^(msg\w+) "(.*)"$', line)
        if m:
            kw, kv = m.group(1), m.group(2)
            while lines and re.match(r'^"(.*)"$', lines[0]):
                kv += " " + re.match(r'^"(.*)"$', lines.pop(0)).group(1)
            kv = whitespace_collapse(kv)
            if kw != "msgstr" and kv == "":
                while res and res[-1] != "":
                    res.pop()
                while lines and re.match(r'^(?:msg\w+ )?"(.*)"$', lines[0]):
                    lines.pop(0)
                continue
            res.append(f'{kw} "{kv}"')
        elif line.startswith("#, "):
            continue
        else:
            res.append(line)
    return "\n".join(["", *res, ""]) if res else ""


def xgettext(path: Path, source: str) -> str:
    cmd = [_tool("xgettext"), "--from-code=UTF-8", "--no-wrap", "--language=JavaScript",
           *(f"--keyword={k}" for k in KEYWORDS[path.suffix]), "-o", "-", "-"]
    return subprocess.run(cmd, input=source, capture_output=True, text=True, check=True).stdout


def scan(app: Path = APP, root: Path = REPO) -> str:
    """The template i18n-scan.pl writes for ``app`` (paths relative to ``root``)."""
    msguniq_in = 'msgid ""\nmsgstr "Content-Type: text/plain; charset=UTF-8"\n'
    for path in source_files(app):
        source = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            source = preprocess_json(source)
        msguniq_in += postprocess_pot(path.relative_to(root).as_posix(), xgettext(path, source))
    pot = subprocess.run([_tool("msguniq"), "-s"], input=msguniq_in, capture_output=True,
                         text=True, check=True, env=dict(os.environ, LC_ALL="C")).stdout
    out, lines = [], pot.splitlines(keepends=True)
    while lines:
        line = lines.pop(0)
        if line.startswith("#: "):
            locs = [line]
            while lines and lines[0].startswith("#: "):
                locs.append(lines.pop(0))
            pairs = [re.match(r"^(.+):(\d+)$", loc.rstrip("\n")).groups() for loc in locs]
            out += [f"{p}:{n}\n" for p, n in sorted(pairs, key=lambda t: (t[0], int(t[1])))]
            continue
        out.append(line)
    return "".join(out)


def update(po_dir: Path = PO_DIR) -> list[Path]:
    """i18n-update.pl: msgmerge -U -N each po/<lang>/<domain>.po with its template."""
    done = []
    for po in sorted(po_dir.glob("*/*.po")):
        pot = po_dir / "templates" / (po.stem + ".pot")
        if not pot.is_file():
            continue
        subprocess.run([_tool("msgmerge"), "-q", "-U", "-N", "--backup=none", str(po), str(pot)], check=True)
        data = po.read_text(encoding="utf-8")
        data = re.sub(r'("Language-Team: .*?\\n"\n)(.+?)("Language: .*?\\n"\n)', r"\1\3\2", data, count=1, flags=re.S)
        po.write_text(data, encoding="utf-8")
        done.append(po)
    return done


# --- reading .po files -------------------------------------------------------------------

def messages(path: Path) -> dict[str, Entry]:
    """msgid text (unescaped) -> entry, header and obsolete entries left out."""
    out = {}
    for e in parse_po(path.read_text(encoding="utf-8")):
        if e.msgid == "" or e.obsolete:
            continue
        out[unescape(e.msgid)] = e
    return out


# --- what the router makes of it: po2lmo, lmo hashes, window.TR ---------------------------

def window_tr(path: Path) -> dict[str, str]:
    """The object luci-base's action_translations writes as ``window.TR`` for this catalog."""
    return {f"{k:08x}": v for k, v in po2lmo_entries(path).items()}



# --- format directives -------------------------------------------------------------------

def directives(s: str) -> list[str]:
    """The directives LuCI's String.prototype.format substitutes in ``s``, in order
    (``%%`` included: it consumes no argument but must survive translation)."""
    return [m.group(0) for m in FORMAT_RE.finditer(s)]


# --- CLI ---------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    if argv[:1] == ["scan"]:
        TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
        TEMPLATE.write_text(scan(), encoding="utf-8")
        print(f"wrote {TEMPLATE.relative_to(REPO)}: {len(messages(TEMPLATE))} messages")
        return 0
    if argv[:1] == ["update"]:
        for po in update():
            print(f"updated {po.relative_to(REPO)}")
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
