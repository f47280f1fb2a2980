"""luci-app-mpvpn's translations, checked the way LuCI builds and reads them.

LuCI's convention (openwrt/luci luci.mk, build/i18n-scan.pl): every
user-visible string of a view goes through ``_()``; ``po/templates/<domain>.pot``
is what i18n-scan.pl extracts from the app (views, menu.d titles, acl.d
descriptions); ``po/<lang>/<domain>.po`` are the translations, which luci.mk
compiles with po2lmo into the package luci-i18n-<domain>-<lang>
(``/usr/lib/lua/luci/i18n/<domain>.<lang>.lmo``).  The dispatcher serves the
language's catalog as ``window.TR`` (hash of the msgid -> translation) and
cbi.js's ``_()`` looks strings up by that hash.

Checked here: the template is exactly what i18n-scan.pl makes of today's
sources (xgettext) and holds every ``_()`` string of both views and every menu
title and ACL description (an independent stdlib scan); zh_Hans translates all
of them, carries no message the sources no longer have, and keeps every format
directive of LuCI's String.prototype.format in order (it has no positional
arguments); both files pass ``msgfmt -c``; what po2lmo makes of the .po, read
the way cbi.js reads ``window.TR`` (in Python and in node with the harness's
``_()``), gives each view string its translation; the Python po2lmo/sfh port
matches known answers of lmo.c's sfh_hash and, when ``po2lmo`` is on PATH, the
real program's output; the harness's ``_()``/``N_()`` stand-in gives what
luci-base's real cbi.js gives when that is built under /opt/owrt.  A headless Chromium renders the status page with the
zh_Hans catalog loaded: every string the view asked ``_()`` for at run time
has a translation, and no format directive, ``undefined`` or ``NaN`` shows.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import luci_i18n as i18n
from mpvpn.tools import lmo
from luci_harness import server as harness_server
from luci_harness.simagent import SimAgentBackend
from test_luci import CHROMIUM_FLAGS, chromium_dumps, find_chromium, js_strings, parse_html, view_of

APP = i18n.APP
VIEWS = APP / "htdocs" / "luci-static" / "resources" / "view"
VIEW_FILES = sorted(VIEWS.rglob("*.js"))
MENU = APP / "root" / "usr" / "share" / "luci" / "menu.d" / "luci-app-mpvpn.json"
ACL = APP / "root" / "usr" / "share" / "rpcd" / "acl.d" / "luci-app-mpvpn.json"
STUB = harness_server.HERE / "luci-stub.js"
LANGS = sorted(p.name for p in i18n.PO_DIR.iterdir() if p.is_dir() and p.name != "templates") \
    if i18n.PO_DIR.is_dir() else []
# Languages that must translate every message (this product's first users are in China);
# a language added later may start partial: untranslated strings stay English in LuCI.
COMPLETE = ["zh_Hans"]
NODE = shutil.which("node") or shutil.which("nodejs")


def po_file(lang: str) -> Path:
    return i18n.PO_DIR / lang / f"{i18n.DOMAIN}.po"


def skip_without(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        reason = f"{tool} is not installed (Debian package gettext)"
        sys.stderr.write(f"\ntranslation check skipped: {reason}\n")
        pytest.skip(reason)
    return path


def gettext_calls(src: str) -> list[str]:
    """The string literal arguments of _('...') in a view (stdlib, no xgettext)."""
    return [s for pos, s in js_strings(src) if re.search(r"(?<![\w$.])_\(\s*$", src[max(0, pos - 64):pos])]


@functools.cache
def source_strings() -> frozenset[str]:
    """What LuCI looks up: every _() literal of the views, menu titles, ACL descriptions."""
    out = set()
    for path in VIEW_FILES:
        out.update(i18n.trimws(s) for s in gettext_calls(path.read_text(encoding="utf-8")))
    out.update(i18n.trimws(e["title"]) for e in json.loads(MENU.read_text()).values())
    out.update(i18n.trimws(e["description"]) for e in json.loads(ACL.read_text()).values())
    return frozenset(out)


def template() -> dict[str, i18n.Entry]:
    assert i18n.TEMPLATE.is_file(), (f"no {i18n.TEMPLATE.relative_to(i18n.REPO)}: "
                                     "run `python3 tests/luci_i18n.py scan`")
    return i18n.messages(i18n.TEMPLATE)


def test_there_is_a_complete_language():
    assert set(COMPLETE) <= set(LANGS), f"po/ has {LANGS}, needs {COMPLETE}"


def test_views_wrap_strings_in_gettext_calls():
    """The stdlib scan sees the views' strings (a view without _() would give none)."""
    for path in VIEW_FILES:
        assert len(gettext_calls(path.read_text(encoding="utf-8"))) > 50, path.name
    assert gettext_calls("E('p', [ _('Fine'), 'bare', N_(2, 'a', 'b'), x._('no') ])") == ["Fine"]


def test_template_holds_exactly_the_source_strings():
    have = set(template())
    want = source_strings()
    assert sorted(want - have) == [], "strings missing in the template: run `python3 tests/luci_i18n.py scan`"
    assert sorted(have - want) == [], "template messages no source asks for: run `python3 tests/luci_i18n.py scan`"


def test_template_is_what_i18n_scan_writes():
    skip_without("xgettext")
    skip_without("msguniq")
    # Line wrapping may differ between gettext versions, and the "#: file:line" comments go
    # stale with every edit above a string (LuCI refreshes them now and then); neither
    # changes what luci.mk builds.  The messages themselves must match.
    def entries(text):
        return [(e.msgctxt, e.msgid, e.msgid_plural, e.msgstr) for e in i18n.parse_po(text)]

    assert entries(i18n.TEMPLATE.read_text(encoding="utf-8")) == entries(i18n.scan()), \
        "po/templates/mpvpn.pot is stale: run `python3 tests/luci_i18n.py scan` (and `update`)"


def test_scan_follows_i18n_scan_rules():
    """i18n-scan.pl's JSON preprocessing and whitespace collapsing."""
    src = '{ "a": { "title": "Multipath \\"VPN\\"", "order": 1, "description" :"x  y" } }'
    assert i18n.preprocess_json(src) == \
        '{ "a": { "title": _("Multipath \\"VPN\\""), "order": 1, "description": _("x  y") } }'
    assert i18n.whitespace_collapse("  a\\nb\\t c  \\\"d ") == 'a b c \\"d'


@pytest.mark.parametrize("lang", COMPLETE)
def test_language_translates_every_message(lang):
    po = i18n.messages(po_file(lang))
    missing = [m for m in template() if m not in po or not po[m].msgstr]
    fuzzy = [m for m in template() if m in po and po[m].fuzzy]
    assert missing == [], f"{lang}: no translation for {missing}"
    assert fuzzy == [], f"{lang}: fuzzy (unchecked) translations: {fuzzy}"


@pytest.mark.parametrize("lang", LANGS)
def test_language_has_no_stale_messages(lang):
    """A message the sources no longer ask for (and msgmerge's #~ leftovers) is dead
    weight in every router's .lmo that no test would ever look at: remove it."""
    text = po_file(lang).read_text(encoding="utf-8")
    assert not re.search(r"^#~", text, re.M), f"{lang}: obsolete #~ entries left by msgmerge"
    stale = sorted(set(i18n.messages(po_file(lang))) - set(template()))
    assert stale == [], f"{lang}: messages not in the template: {stale}"


@pytest.mark.parametrize("lang", LANGS)
def test_translations_keep_format_directives(lang):
    """LuCI's String.prototype.format substitutes its arguments in order: a translation
    must keep the same directives in the same order (%% included)."""
    bad = []
    for msgid, e in i18n.messages(po_file(lang)).items():
        if e.msgstr and i18n.directives(msgid) != i18n.directives(i18n.unescape(e.msgstr)):
            bad.append((msgid, i18n.unescape(e.msgstr)))
    assert bad == []


def test_directives_are_luci_format_ones():
    assert i18n.directives("Last %d samples, %.1f %% and %s; %t, 0.1 %).") == ["%d", "%.1f", "%%", "%s", "%t"]
    assert i18n.directives("100 % sure") == ["% s"]  # LuCI's regex takes a space as padding


@pytest.mark.parametrize("lang", LANGS)
def test_po_file_survives_po2lmo(lang):
    """po2lmo.c reads lines with fgets(4096) and only un-escapes \\" and \\\\, and hashes the
    msgid as written while cbi.js trims and collapses whitespace before hashing: any of
    these would silently lose a translation on the router."""
    path = po_file(lang)
    for n, line in enumerate(path.read_bytes().split(b"\n"), 1):
        assert len(line) < i18n.PO2LMO_LINE_MAX, f"{lang}: line {n} is {len(line)} bytes"
    for e in i18n.parse_po(path.read_text(encoding="utf-8")):
        if e.msgid == "":
            continue
        for s in (e.msgid, e.msgstr):
            assert not re.search(r'\\[^"\\]', s), f"{lang}: an escape po2lmo keeps verbatim in {s!r}"
        msgid = i18n.unescape(e.msgid)
        assert i18n.trimws(msgid) == msgid, f"{lang}: whitespace cbi.js would collapse in {msgid!r}"
    keys = [m for m in i18n.messages(path)]
    assert len({i18n.sfh(k.encode()) for k in keys}) == len(keys), "two msgids share a hash"


@pytest.mark.parametrize("lang", LANGS)
def test_catalog_gives_each_source_string_its_translation(lang):
    """po2lmo + window.TR + cbi.js _() in Python: every string the views, the menu and the
    ACL ask for comes back translated (or unchanged where the translation is the same)."""
    tr = i18n.window_tr(po_file(lang))
    po = i18n.messages(po_file(lang))
    plural = i18n.po2lmo_entries(po_file(lang)).get(0)
    assert plural == "nplurals=1; plural=0;" or lang not in ("zh_Hans", "zh_Hant")
    for s in source_strings():
        if s not in po or not po[s].msgstr:
            continue  # a partial language (only COMPLETE ones must have all)
        got = tr.get(f"{i18n.sfh(i18n.trimws(s).encode()):08x}", s)
        assert got == i18n.unescape(po[s].msgstr), s


def test_sfh_known_answers():
    """lmo.c sfh_hash(s, len, len), printed by the real function (luci-base src/lib/lmo.c
    built from openwrt/luci): all four tail lengths and UTF-8 (signed-char tail bytes)."""
    known = {"Multipath VPN": "33fc545e", "Up": "3860e577", "RTT": "973a4fb5", "a": "115ea782",
             "abc": "d2be198a", "± %.1f ms": "14e43621", "Local ⇄ remote": "789bdcf3",
             "中": "b073298a", "xé": "e9df37d1"}
    assert {s: f"{lmo.sfh(s.encode()):08x}" for s in known} == known


@pytest.mark.parametrize("lang", LANGS)
def test_lmo_file_reads_back(lang):
    """write_lmo (po2lmo.c's layout) read as lmo.c lmo_open() reads it gives the catalog."""
    data = lmo.write_lmo(po_file(lang))
    if not data:  # po2lmo writes no file for a catalog without any translation
        assert lmo.po2lmo_entries(po_file(lang)) == {}
        return
    assert len(data) % 4 == 0
    assert lmo.read_lmo(data) == lmo.po2lmo_entries(po_file(lang))
    keys = [int.from_bytes(data[p:p + 4], "big")
            for p in range(int.from_bytes(data[-4:], "big"), len(data) - 4, 16)]
    assert keys == sorted(keys)  # lmo_find_entry() bisects the index


@pytest.mark.parametrize("lang", LANGS)
def test_po2lmo_port_matches_po2lmo(lang, tmp_path):
    po2lmo = shutil.which("po2lmo")
    if not po2lmo:
        reason = "po2lmo (openwrt/luci modules/luci-base/src) is not on PATH"
        sys.stderr.write(f"\npo2lmo comparison skipped: {reason}\n")
        pytest.skip(reason)
    out = tmp_path / f"{i18n.DOMAIN}.{lang}.lmo"
    subprocess.run([po2lmo, str(po_file(lang)), str(out)], check=True)
    assert out.read_bytes() == lmo.write_lmo(po_file(lang))


# luci.mk (openwrt/luci 24.10): the LUCI_LANG.<code> it knows; LuciTranslation is only
# called for a po/<code> directory with a title there, so any other directory builds nothing.
LUCI_MK_LANGS = set("ar bg bn_BD ca cs da de el es fa fi fil fr he hi hu it ja ko lt mr ms nb_NO nl "
                    "pl pt pt_BR ro ru sk sv tr uk vi yua zh_Hans zh_Hant".split())


def test_luci_mk_builds_a_translation_package():
    """luci.mk derives the translation packages from the directory name and po/ alone:
    luci-app-mpvpn -> LUCI_BASENAME mpvpn; po/zh_Hans/*.po -> luci-i18n-mpvpn-zh-cn with
    /usr/lib/lua/luci/i18n/mpvpn.zh-cn.lmo (po2lmo).  So the Makefile must not override
    those names, and every language directory must be one luci.mk knows."""
    mk = (APP / "Makefile").read_text()
    assert re.search(r"^include \$\(TOPDIR\)/feeds/luci/luci\.mk$", mk, re.M)
    for var in ("LUCI_NAME", "LUCI_TYPE", "LUCI_BASENAME", "LUCI_LANGUAGES", "PKG_NAME"):
        assert not re.search(rf"^\s*{var}\s*[:?+]?=", mk, re.M), f"{var} set in the Makefile"
    feed = i18n.REPO / "package" / "luci-app-mpvpn"
    assert feed.resolve() == APP.resolve() and (feed / "po").is_dir()  # CURDIR/po as luci.mk sees it
    assert re.fullmatch(r"luci-app-(.+)", APP.name).group(1) == i18n.DOMAIN
    assert i18n.TEMPLATE.name == f"{i18n.DOMAIN}.pot"
    for lang in LANGS:
        assert lang in LUCI_MK_LANGS, f"po/{lang}: luci.mk has no LUCI_LANG.{lang}, nothing would be built"
        assert [p.name for p in (i18n.PO_DIR / lang).iterdir()] == [f"{i18n.DOMAIN}.po"]


def test_msgfmt_check_template():
    msgfmt = skip_without("msgfmt")
    p = subprocess.run([msgfmt, "-c", "-o", "/dev/null", str(i18n.TEMPLATE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    # LuCI's templates carry only a Content-Type header (i18n-scan.pl): msgfmt warns about the rest
    other = [ln for ln in p.stderr.splitlines() if not re.search(r"warning: header field '[\w-]+' missing", ln)]
    assert other == []


@pytest.mark.parametrize("lang", LANGS)
def test_msgfmt_check_po(lang):
    msgfmt = skip_without("msgfmt")
    p = subprocess.run([msgfmt, "-c", "--statistics", "-o", "/dev/null", str(po_file(lang))],
                       capture_output=True, text=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    # as LuCI's own .po files: msgfmt may miss header fields po2lmo never reads, but
    # Language and Plural-Forms (po2lmo stores it for N_()) must be there; nothing else
    missing = [m.group(1) for ln in lines for m in [re.search(r"warning: header field '([\w-]+)' missing", ln)] if m]
    assert not {"Language", "Plural-Forms"} & set(missing), lines
    rest = [ln for ln in lines if "header field" not in ln]
    assert len(rest) == 1, lines  # only the statistics line
    if lang in COMPLETE:
        assert lines == rest and re.fullmatch(r"\d+ translated messages\.", rest[0]), lines


def node_eval(script: str) -> object:
    if not NODE:
        reason = "node (Debian package nodejs) is not installed"
        sys.stderr.write(f"\nnode check skipped: {reason}\n")
        pytest.skip(reason)
    p = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.parametrize("lang", COMPLETE)
def test_harness_gettext_reads_the_catalog(lang):
    """The harness's _()/N_() (a stand-in for cbi.js's) with the catalog LuCI would serve:
    its hash agrees with lmo.c's on every message, and each view string comes back translated."""
    strings = sorted(source_strings())
    tr = i18n.window_tr(po_file(lang))
    script = (f"require({json.dumps(str(STUB))});"
              f"const strings = {json.dumps(strings)};"
              "const hashes = strings.map(s => harness.sfh(s));"
              "const en = strings.map(s => _(s));"
              f"globalThis.TR = {json.dumps(tr)};"
              "const tr = strings.map(s => _('  ' + s.replace(/ /g, ' \\n ') + '\\t'));"
              "const forms = [N_(1, 'one', 'many'), N_(5, 'one', 'many')];"
              "TR[harness.sfh('one\\u00020')] = 'ONE';"
              "const forms2 = N_(5, 'one', 'many');"
              "process.stdout.write(JSON.stringify({hashes, en, tr, forms, forms2}));")
    out = node_eval(script)
    assert out["hashes"] == [f"{i18n.sfh(s.encode()):08x}" for s in strings]
    assert out["en"] == strings  # no catalog: LuCI shows the msgid
    po = i18n.messages(po_file(lang))
    assert out["tr"] == [i18n.unescape(po[s].msgstr) if s != i18n.unescape(po[s].msgstr) else
                         "  " + s.replace(" ", " \n ") + "\t" for s in strings]
    # nplurals=1; plural=0: every count takes form 0; untranslated falls back to singular/plural
    assert out["forms"] == ["one", "one"] and out["forms2"] == "ONE"


OWRT = Path(os.environ.get("MPVPN_OWRT", "/opt/owrt"))  # OpenWrt userland built from source, never in the repo
CBI_JS = OWRT / "luci-root" / "www" / "luci-static" / "resources" / "cbi.js"


def test_harness_gettext_matches_luci_cbi_js():
    """The stand-in's _(), N_() and sfh() against luci-base's real cbi.js (as staged under
    /opt/owrt when LuCI is built there), each in its own node context with the same
    window.TR: the zh_Hans catalog plus plural entries under a two-form Plural-Forms."""
    if not CBI_JS.is_file():
        reason = f"luci-base's cbi.js is not built under {OWRT} (MPVPN_OWRT)"
        sys.stderr.write(f"\ncbi.js comparison skipped: {reason}\n")
        pytest.skip(reason)
    strings = sorted(source_strings())
    tr = dict(i18n.window_tr(po_file("zh_Hans")))
    tr["00000000"] = "nplurals=2; plural=(n != 1);"
    for i, form in enumerate(["%d Paket", "%d Pakete"]):
        tr[f"{i18n.sfh(f'%d packet{chr(2)}{i}'.encode()):08x}"] = form
        tr[f"{i18n.sfh(f'ctx{chr(1)}%d packet{chr(2)}{i}'.encode()):08x}"] = form.upper()
    odd = ["", " ", "a", "ab", "abc", "abcd", "\u00e9\u00e9\u00e9", "\u4e2d\u6587\u5b57", "x\u20ac", "\u2014\t\n x"]
    script = f"""
const fs = require('fs'), vm = require('vm');
const TR = {json.dumps(tr)}, strings = {json.dumps(strings)}, odd = {json.dumps(odd)};
function run(file) {{
  const ctx = vm.createContext({{ console }});
  ctx.window = ctx;
  ctx.document = {{ addEventListener() {{}}, querySelectorAll() {{ return []; }} }};
  ctx.TR = TR;
  vm.runInContext(fs.readFileSync(file, 'utf8'), ctx, {{ filename: file }});
  const sfh = ctx.sfh || ctx.harness.sfh;
  return {{
    tr: strings.map(s => ctx._(' ' + s + '\\n')),
    ctx: strings.slice(0, 20).map(s => ctx._(s, 'ctx')),
    hash: strings.concat(odd).map(s => sfh(s)),
    plural: [0, 1, 2, 7].map(n => ctx.N_(n, '%d packet', '%d packets'))
      .concat([1, 3].map(n => ctx.N_(n, '%d packet', '%d packets', ' ctx ')))
      .concat([1, 3].map(n => ctx.N_(n, 'one', 'many')))
  }};
}}
process.stdout.write(JSON.stringify([run({json.dumps(str(CBI_JS))}), run({json.dumps(str(STUB))})]));
"""
    real, stub = node_eval(script)
    assert stub == real
    assert real["plural"][:4] == ["%d Pakete", "%d Paket", "%d Pakete", "%d Pakete"]


# --- the status page rendered in Chinese -------------------------------------------------------

@pytest.fixture(scope="module")
def zh_page(tmp_path_factory):
    chromium = find_chromium()
    if not chromium:
        reason = "chromium is not installed (Debian: apt-get install chromium)"
        sys.stderr.write(f"\nbrowser translation check skipped: {reason}\n")
        pytest.skip(reason)
    out_dir = tmp_path_factory.mktemp("luci-zh")
    shot = out_dir / "luci-status-zh_Hans.png"
    runs = {"dom": ["--dump-dom"], "shot": ["--window-size=1280,1700", f"--screenshot={shot}"]}
    servers = {k: harness_server.HarnessServer(SimAgentBackend(), lang="zh_Hans").__enter__() for k in runs}
    procs, results, t0 = {}, {}, time.monotonic()
    try:
        for name, flags in runs.items():
            url = servers[name].page("mpvpn/status", "root", "click=test-links@1500")
            cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={out_dir / ('profile-' + name)}",
                   "--virtual-time-budget=9000", *flags, url]
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True, cwd=out_dir)
        for name, stdout in chromium_dumps(procs, t0):
            results[name] = stdout
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for s in servers.values():
            s.close()
    (out_dir / "status-zh_Hans.html").write_text(results["dom"])
    if shot.is_file():
        shutil.copyfile(shot, "/tmp/luci-status-zh_Hans.png")
    sys.stderr.write(f"\nzh_Hans status page: {out_dir / 'status-zh_Hans.html'}, screenshot {shot} "
                     "(copy: /tmp/luci-status-zh_Hans.png)\n")
    return parse_html(results["dom"])


def test_zh_page_rendered_without_errors(zh_page):
    errors = zh_page.find("pre", id="harness-errors")
    assert errors is None or errors.text.strip() == ""
    view = view_of(zh_page)
    assert view.find("h2").words == "多路径 VPN"
    assert [h.words for h in view.find_all("h3")][:3] == ["会话", "子流", "链路测试"]
    assert [th.words for th in view.find("table", id="mpvpn-links").find_all(cls="th")][:5] == \
        ["运营商", "本端 ⇄ 对端", "状态", "往返时延", "丢包率"]


def test_zh_page_asked_only_for_translated_strings(zh_page):
    """Every string the view passed to _() at run time (harness.asked), literal or not,
    is in the zh_Hans catalog: nothing on the page falls back to English."""
    asked = json.loads(zh_page.find("body").attrs.get("data-gettext") or "[]")
    assert len(asked) > 40
    po = i18n.messages(po_file("zh_Hans"))
    assert sorted(s for s in asked if i18n.trimws(s) not in po) == []


def test_zh_page_shows_no_broken_formats(zh_page):
    view = view_of(zh_page)
    texts = [n.words for n in view.iter() if not isinstance(n, str)]
    attrs = [v for n in view.iter() if not isinstance(n, str)
             for k, v in n.attrs.items() if k in ("title", "aria-label") and v]
    page = view.words + " " + " ".join(attrs)
    assert re.findall(r".{0,20}%[-.\d]*[sdftqh].{0,20}", page) == []  # a directive format() left alone
    for word in ("undefined", "NaN", "[object", "null"):
        assert word not in page, f"{word!r} on the page"
    assert texts
    # English sentences of the template do not show (agent data such as state_text may)
    english = [m for m, e in template().items()
               if not i18n.directives(m) and len(m.split()) >= 3 and i18n.unescape(
                   i18n.messages(po_file("zh_Hans"))[m].msgstr) != m]
    assert [m for m in english if m in page] == []
