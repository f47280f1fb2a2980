"""Tests for mpvpn.io.uci against behaviour read from libuci's C source.

Expected values below were derived from openwrt/uci: file.c (parser,
uci_export_package), list.c (uci_set, uci_add_list, uci_fixup_section,
uci_lookup_ext_section), util.c (uci_validate_str) and cli.c (uci_show_*).
The function each case exercises is named in a comment.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mpvpn.io import uci

ROOT = Path(__file__).resolve().parents[1]


def opts(pkg: uci.Package, ref: str) -> list:
    return list(pkg.section(ref).options.items())


# --- tokenizer: file.c parse_str / parse_single_quote / parse_double_quote ---

@pytest.mark.parametrize(
    "line, value",
    [
        ("option x 'a b'", "a b"),  # parse_single_quote
        ('option x "a b"', "a b"),  # parse_double_quote
        ("option x plain", "plain"),  # unquoted word
        ("option x 'a'\"b\"c", "abc"),  # adjacent pieces form one word
        (r"option x a\ b", "a b"),  # parse_backslash outside quotes keeps the next char
        (r'option x "q\"r"', 'q"r'),  # \" inside double quotes
        (r'option x "\n\\\$"', "n\\$"),  # no C escapes: backslash just quotes
        (r"option x 'c:\temp\n'", r"c:\temp\n"),  # single quotes: backslash literal
        ("option x 'it'\\''s'", "it's"),  # the form uci_escape writes
        ("option x foo#bar", "foo"),  # '#' ends an unquoted word, rest is comment
        ("option x '#kept'", "#kept"),  # '#' inside quotes is data
        ('option x "#kept"  # comment', "#kept"),
        ("option x 'é ü'", "é ü"),  # bytes pass through (UTF-8)
        ("option x '\t tab'", "\t tab"),
        ("o x short", "short"),  # one-letter command words (uci_parse_line)
    ],
)
def test_value_quoting(line, value):
    pkg = uci.parse(f"config t 's'\n{line}\n", "p")
    assert pkg.get("s", "x") == value


def test_multiline_quoted_values():
    # parse_single_quote / parse_double_quote: case 0 fetches the next line,
    # the newline stays in the value
    text = "config t 's'\n\toption a 'one\ntwo'\n\toption b \"x\ny\"\n"
    pkg = uci.parse(text, "p")
    assert pkg.get("s", "a") == "one\ntwo"
    assert pkg.get("s", "b") == "x\ny"


def test_backslash_newline_continues_the_line():
    # parse_backslash: a backslash before the newline joins the next line
    pkg = uci.parse("config t 's'\noption a ab\\\ncd\noption b \"ab\\\ncd\"\n", "p")
    assert pkg.get("s", "a") == "abcd"
    assert pkg.get("s", "b") == "abcd"
    # ... but not inside single quotes, where the backslash is literal
    pkg = uci.parse("config t 's'\noption a 'ab\\\ncd'\n", "p")
    assert pkg.get("s", "a") == "ab\\\ncd"
    # a continuation line is a new word after whitespace
    with pytest.raises(uci.UciParseError) as e:
        uci.parse("config t 's'\noption x a\\\n  b\n", "p")
    assert (e.value.reason, e.value.line, e.value.byte) == ("too many arguments", 3, 15)
    # CRLF continuation (parse_backslash checks "\\\r\n")
    assert uci.parse("config t 's'\r\noption a ab\\\r\ncd\r\n", "p").get("s", "a") == "abcd"


def test_crlf_lines():
    pkg = uci.parse("config t 's'\r\n\toption x 'y'\r\n\toption z w\r\n", "p")
    assert opts(pkg, "s") == [("x", "y"), ("z", "w")]


def test_semicolon_quirks():
    # uci_parse_line splits commands at ';' -- but when an unquoted word runs
    # straight into the ';', parse_str writes its terminator over the ';' and
    # the rest of the line is lost. Quoted or space-separated it works.
    assert opts(uci.parse("config t 'b'; option x y\n", "p"), "b") == [("x", "y")]
    assert opts(uci.parse("config t b ; option x y\n", "p"), "b") == [("x", "y")]
    assert opts(uci.parse("config t b; option x y\n", "p"), "b") == []


def test_comments_blank_lines_and_indentation():
    text = (
        "# leading comment\n\n"
        "   \t\n"
        "config interface 'lan'  # trailing\n"
        "    # indented comment\n"
        "\toption proto 'static'\n"
        "        option ipaddr 192.168.1.1\n"
    )
    pkg = uci.parse(text, "network")
    assert opts(pkg, "lan") == [("proto", "static"), ("ipaddr", "192.168.1.1")]


def test_package_keyword_is_checked_and_ignored():
    # uci_load imports "single": uci_parse_package validates, then returns
    pkg = uci.parse("package other\n\nconfig t 'a'\np 'x-y'\n", "mine")
    assert pkg.name == "mine" and [s.name for s in pkg] == ["a"]
    with pytest.raises(uci.UciParseError, match="invalid character in name field"):
        uci.parse("package 'bad name'\n", "p")


# --- model semantics: list.c ---------------------------------------------

def test_option_redefinition_keeps_its_place():
    # uci_set "update option": the new option is allocated after the old one
    # (uci_alloc_option(..., &old->e.list)), which is then freed
    pkg = uci.parse("config t 's'\noption a 1\noption b 2\noption a 3\noption b 2\n", "p")
    assert opts(pkg, "s") == [("a", "3"), ("b", "2")]


def test_empty_option_is_ignored_while_parsing():
    # uci_set with an empty value and a pointer that is not LOOKUP_COMPLETE
    pkg = uci.parse("config t 's'\noption a 1\noption a ''\noption b\noption c \"\"\n", "p")
    assert opts(pkg, "s") == [("a", "1")]


def test_lists():
    # uci_add_list: string + list item converts to a list (in its place);
    # empty items are kept
    text = "config t 's'\nlist l 'x'\noption o 'first'\nlist l 'y'\nlist o 'second'\nlist e ''\n"
    pkg = uci.parse(text, "p")
    assert opts(pkg, "s") == [("l", ["x", "y"]), ("o", ["first", "second"]), ("e", [""])]
    # option after list replaces it with a string, in its place
    pkg = uci.parse("config t 's'\nlist l 'x'\noption m 1\noption l 'z'\n", "p")
    assert opts(pkg, "s") == [("l", "z"), ("m", "1")]


def test_duplicate_named_section_merges():
    # uci_parse_config: same name and type -> uci_set updates the existing one
    pkg = uci.parse("config t 'a'\noption x 1\nconfig t 'b'\nconfig t 'a'\noption y 2\n", "p")
    assert [s.name for s in pkg] == ["a", "b"]
    assert opts(pkg, "a") == [("x", "1"), ("y", "2")]
    # the parser records what it merged (for `mpvpn check`), and nothing else changes
    assert pkg.merges == [uci.Merge("t", "a", 1, 4)]
    assert [s.line for s in pkg] == [1, 3]


def test_merges_and_lines_count_physical_lines():
    # ';' separators, comments, blank lines and a multi-line quoted value: a
    # statement's line is the first physical line of its logical line
    pkg = uci.parse(MERGES, "p")
    u = pkg.sections("u")[0]
    assert [(s.name, s.line) for s in pkg] == [("a", 3), ("b", 6), (u.name, 10)]
    assert pkg.merges == [uci.Merge("t", "a", 3, 8), uci.Merge("t", "a", 3, 10)]
    assert opts(pkg, "a") == [("x", "2"), ("long", "one\ntwo")]  # merged as uci does
    # sections built in code have no line and merge nothing
    p2 = uci.Package("p")
    p2.set_section("a", "t")
    p2.set_section("a", "t")
    assert p2.merges == [] and p2.section("a").line is None
    assert uci.parse(uci.dump(pkg), "p") == pkg  # line numbers are not part of equality


MERGES = "# c\n\nconfig t 'a' ; option x 1\noption long 'one\ntwo'\nconfig t 'b'\n\nconfig t 'a'\n" \
         "option x 2\nconfig t 'a'; config u\n"
REAL_UCI = os.environ.get("MPVPN_REAL_UCI") or shutil.which("uci") or (
    "/opt/owrt/bin/uci" if os.access("/opt/owrt/bin/uci", os.X_OK) else None)


@pytest.mark.parametrize("text", [
    MERGES,
    "config t 's'\noption a 1\noption b 2\noption a 333\noption b 2\n",
    "config t 's'\nlist l 'x'\noption m 1\noption l 'z'\n",
    "config t 's'\noption a 1\noption m 1\nlist a 2\n",
    "config t 's'\nlist l 'x'\noption o 'first'\nlist l 'y'\nlist o 'second'\nlist e ''\n",
])
def test_uci_show_equals_the_real_uci(tmp_path, text):
    """Differential: OpenWrt's own uci binary (libuci) on the same file."""
    if REAL_UCI is None:
        reason = "no uci binary (PATH, /opt/owrt/bin/uci or MPVPN_REAL_UCI)"
        sys.stderr.write(f"\nreal-uci comparison skipped: {reason}\n")
        pytest.skip(reason)
    (tmp_path / "p").write_text(text)
    real = subprocess.run([REAL_UCI, "-c", str(tmp_path), "show", "p"], capture_output=True, text=True,
                          timeout=30)
    assert real.returncode == 0, real.stderr
    assert uci.show(uci.load(str(tmp_path / "p"))) == real.stdout


def test_anonymous_section_names():
    # uci_fixup_section: "cfg%02x%04x" % (package section counter, djbhash(type) & 0xffff)
    text = (
        "config defaults\n\toption input 'ACCEPT'\n"
        "config zone\n\toption name 'lan'\n"
        "config zone\n\toption name 'wan'\n"
        "config forwarding\n"
        "config rule 'named'\n"
        "config rule\n"
    )
    pkg = uci.parse(text, "firewall")
    names = [s.name for s in pkg]
    # the well-known names of a stock OpenWrt /etc/config/firewall
    assert names == ["cfg01e63d", "cfg02dc81", "cfg03dc81", "cfg04ad58", "named", "cfg0692bd"]
    assert [s.anonymous for s in pkg] == [True, True, True, True, False, True]
    assert uci.anonymous_name(1, "the_type") == "cfg013b47"  # `uci add` on an empty package
    assert uci.anonymous_name(0x1AB, "x").startswith("cfg1ab")  # %02x widens


def test_add_section_uses_the_package_counter():
    pkg = uci.parse("config system\nconfig timeserver 'ntp'\n", "system")
    assert pkg.sections()[0].name == "cfg01e48a"
    s = pkg.add("smpu")
    assert s.anonymous and s.name.startswith("cfg03")
    assert pkg.ref(s) == "@smpu[0]"


def test_extended_section_references():
    # uci_lookup_ext_section
    pkg = uci.parse("config a\nconfig b 'named_b'\nconfig a 'named_a'\nconfig a\n", "p")
    a = pkg.sections("a")
    assert pkg.section("@a[0]") is a[0]
    assert pkg.section("@a[1]") is a[1]  # named sections count too
    assert pkg.section("@a[-1]") is a[2]
    assert pkg.section("@a[-3]") is a[0]
    assert pkg.section("@a[]") is a[0]  # strtol("") == 0
    assert pkg.section("@[1]").name == "named_b"  # any type
    assert pkg.section("@a[3]") is None
    assert pkg.section("@a[-4]") is None
    assert pkg.section("@zz[0]") is None
    assert pkg.section("named_a") is a[1]
    assert pkg.section("nope") is None
    for bad in ("@a[x]", "@a[0]x", "@a", "a[0]", "@a[1", "@a b[0]"):
        with pytest.raises(uci.UciInvalidError):
            pkg.section(bad)


# --- errors: uci_parse_error reasons, line and byte ------------------------

@pytest.mark.parametrize(
    "text, reason, line, byte",
    [
        ("option a b\n", "option/list command found before the first section", 1, 0),
        ("config\n", "invalid command", 1, 0),  # strtok keeps "config\n" as the word
        ("foo bar\n", "invalid command", 1, 0),
        ("\n\n  configx a\n", "invalid command", 3, 2),
        ("config t 'a'\n\toption\n", "invalid command", 2, 1),
        ("config t 'a'\n\toption \n", "insufficient arguments", 2, 9),
        ("config  \n", "insufficient arguments", 1, 9),
        ("config x y z\n", "too many arguments", 1, 13),
        ("config t 'a'\noption x y z\n", "too many arguments", 2, 13),
        ("config x 'a b'\n", "invalid character in name field", 1, 15),
        ("config x a-b\n", "invalid character in name field", 1, 13),
        ("config t 'a'\noption a.b c\n", "invalid character in name field", 2, 11),
        ("config 'a b' n\n", "invalid character in type field", 1, 13),
        ("config t 'a'\noption x 'abc\n", "EOF with unterminated '", 2, 14),
        ('config t \'a\'\noption x "abc\n\n', 'EOF with unterminated "', 3, 15),
        ("config a 'n'\nconfig b 'n'\n", "section of different type overwrites prior section with same name", 2, 13),
        ("package\n", "invalid command", 1, 0),
        ("config", "config without name", 1, 0),  # uci_increase_pos; uci says line 0
    ],
)
def test_parse_errors(text, reason, line, byte):
    with pytest.raises(uci.UciParseError) as e:
        uci.parse(text, "p")
    assert (e.value.reason, e.value.line, e.value.byte) == (reason, line, byte)
    assert str(e.value) == f"Parse error ({reason}) at line {line}, byte {byte}"


def test_parse_error_last_line_without_newline_reports_real_line():
    with pytest.raises(uci.UciParseError) as e:
        uci.parse("config t 'a'\nbogus", "p")
    assert e.value.line == 2


def test_nul_byte_rejected():
    with pytest.raises(uci.UciParseError, match="NUL byte"):
        uci.parse(b"config t 'a'\noption x 'a\0b'\n", "p")


def test_load_error_names_the_file(tmp_path):
    f = tmp_path / "broken"
    f.write_text("config t 'a'\n\tlist\n")
    with pytest.raises(uci.UciParseError) as e:
        uci.load(str(f))
    assert str(f) in str(e.value) and e.value.line == 2


# --- output: uci_export_package (commit/export) and cli.c (show) -------------

SAMPLE = """# comment dropped by uci commit
config interface 'loopback'
	option device lo
	option proto "static"
	option ipaddr '127.0.0.1'
config interface 'lan'
	list ipaddr '192.168.1.1/24'
	list ipaddr 10.0.0.1/8
	option note "it's"
config route
	option target '0.0.0.0/0'
"""

SAMPLE_COMMITTED = """
config interface 'loopback'
	option device 'lo'
	option proto 'static'
	option ipaddr '127.0.0.1'

config interface 'lan'
	list ipaddr '192.168.1.1/24'
	list ipaddr '10.0.0.1/8'
	option note 'it'\\''s'

config route
	option target '0.0.0.0/0'

"""

SAMPLE_SHOW = """network.loopback=interface
network.loopback.device='lo'
network.loopback.proto='static'
network.loopback.ipaddr='127.0.0.1'
network.lan=interface
network.lan.ipaddr='192.168.1.1/24' '10.0.0.1/8'
network.lan.note='it'\\''s'
network.@route[0]=route
network.@route[0].target='0.0.0.0/0'
"""


def test_dump_is_what_uci_commit_writes():
    pkg = uci.parse(SAMPLE, "network")
    assert uci.dump(pkg) == SAMPLE_COMMITTED
    assert uci.export(pkg) == "package network\n" + SAMPLE_COMMITTED


def test_show():
    pkg = uci.parse(SAMPLE, "network")
    assert uci.show(pkg) == SAMPLE_SHOW
    assert pkg.show() == SAMPLE_SHOW.splitlines()


def test_dump_empty_package_and_empty_list():
    pkg = uci.Package("p")
    assert uci.dump(pkg) == "\n"
    s = pkg.set_section("s", "t")
    pkg.add_list("s", "l", "a")
    pkg.del_list("s", "l", "a")  # an emptied list stays and writes nothing
    assert s.options == {"l": []}
    assert uci.dump(pkg) == "\nconfig t 's'\n\n"
    assert pkg.show() == ["p.s=t", "p.s.l="]


VALUES = [
    "",  # only as a list item
    "plain",
    "with space",
    "it's",
    "''",
    "'\\''",
    'double "quotes"',
    "back\\slash\\",
    "trailing backslash \\",
    "semi;colon",
    "#hash",
    "multi\nline\n",
    "\ttab and \r carriage",
    "unicode é ✓",
    " leading and trailing ",
]


@pytest.mark.parametrize("value", VALUES)
def test_round_trip_every_quoting_case(value):
    pkg = uci.Package("p")
    pkg.set_section("s", "t")
    if value:
        pkg.set("s", "opt", value)
    pkg.add_list("s", "lst", value)
    pkg.add_list("s", "lst", value + "x")
    text = uci.dump(pkg)
    again = uci.parse(text, "p")
    assert again == pkg
    assert uci.dump(again) == text


def test_round_trip_of_a_parsed_file_is_stable():
    pkg = uci.parse(SAMPLE, "network")
    again = uci.parse(uci.dump(pkg), "network")
    assert again == pkg
    # anonymous sections get the same generated names after a re-read
    assert [s.name for s in again] == [s.name for s in pkg]


# --- changes (uci set / add / add_list / del_list / delete / rename) ---------

def test_set_semantics():
    pkg = uci.parse("config t 's'\n\toption a '1'\n\toption b '2'\n", "p")
    pkg.set("s", "a", "1")  # same value: nothing moves
    assert opts(pkg, "s") == [("a", "1"), ("b", "2")]
    pkg.set("s", "a", "9")  # changed: keeps its place, as uci commit shows
    assert opts(pkg, "s") == [("a", "9"), ("b", "2")]
    pkg.set("s", "a", "100")  # (another length: libuci re-allocates it, still in place)
    assert opts(pkg, "s") == [("a", "100"), ("b", "2")]
    pkg.set("s", "a", "9")
    pkg.set("s", "b", "")  # empty value deletes
    assert opts(pkg, "s") == [("a", "9")]
    pkg.set("s", "c", ["x", "y"])
    assert pkg.get("s", "c") == ["x", "y"]
    assert pkg.get("s") == "t" and pkg.get("s", "zz", "dflt") == "dflt"
    assert pkg.get("nosuch", "a") is None
    with pytest.raises(uci.UciNotFoundError):
        pkg.set("nosuch", "a", "1")
    with pytest.raises(uci.UciInvalidError):
        pkg.set("s", "bad-name", "1")
    with pytest.raises(uci.UciInvalidError):
        pkg.set("s", "a", "ctl\x01char")


def test_set_section_add_delete_rename():
    pkg = uci.Package("orayboxvpn")
    pkg.set_section("base", "base")
    pkg.set("base", "role", "client")
    anon = pkg.add("smpu")
    pkg.set(pkg.ref(anon), "type", "telecom")
    pkg.set_section("base", "base2")  # existing: type changes in place
    assert pkg.get("base") == "base2"
    assert pkg.get("@smpu[0]", "type") == "telecom"
    pkg.rename("@smpu[0]", "telecom")
    assert pkg.section("telecom") is anon and not anon.anonymous
    pkg.rename("telecom", "carrier", option="type")
    assert pkg.get("telecom", "carrier") == "telecom"
    pkg.delete("telecom", "carrier")
    assert pkg.get("telecom", "carrier") is None
    pkg.delete("telecom")
    assert [s.name for s in pkg] == ["base"]
    with pytest.raises(uci.UciNotFoundError):
        pkg.delete("telecom")
    with pytest.raises(uci.UciInvalidError):
        pkg.set_section("bad name", "t")
    with pytest.raises(uci.UciInvalidError):
        pkg.add("bad type")


def test_delete_keeps_equal_sections_apart():
    pkg = uci.parse("config t\nconfig t\n", "p")
    second = pkg.sections()[1]
    pkg.delete("@t[0]")
    assert pkg.sections() == [second] and pkg.sections()[0] is second


def test_validation_helpers():
    # util.c uci_validate_str
    assert uci.validate_name("lan_2") and not uci.validate_name("lan-2")
    assert uci.validate_package("luci-app") and not uci.validate_package("a.b")
    assert uci.validate_type("wifi-iface") and uci.validate_type("a@b")
    assert not uci.validate_type("a b") and not uci.validate_type("")


# --- files -------------------------------------------------------------------

def test_save_is_atomic_and_keeps_mode(tmp_path):
    f = tmp_path / "orayboxvpn"
    pkg = uci.Package("orayboxvpn")
    pkg.set_section("base", "base")
    pkg.set("base", "psk", "secret")
    pkg.save(str(f))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600  # UCI_FILEMODE for new files
    os.chmod(f, 0o644)
    pkg.set("base", "psk", "other")
    uci.save(pkg, str(f))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["orayboxvpn"]  # no temp file left
    assert uci.load(str(f)) == pkg


def test_save_through_symlink_replaces_target(tmp_path):
    real = tmp_path / "real"
    real.write_text("\nconfig t 'a'\n\n")
    link = tmp_path / "orayboxvpn"
    link.symlink_to(real)
    pkg = uci.load(str(link))
    pkg.set("a", "x", "1")
    uci.save(pkg, str(link))
    assert link.is_symlink() and "option x '1'" in real.read_text()


def test_load_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        uci.load(str(tmp_path / "nope"))


def test_shipped_default_config_parses():
    pkg = uci.load(str(ROOT / "files/etc/config/orayboxvpn"))
    assert pkg.name == "orayboxvpn"
    assert pkg.get("base", "enabled") == "0"
    # it is already in the form uci commit would write, comments aside
    assert uci.parse(uci.dump(pkg), "orayboxvpn") == pkg


# --- property: whatever the API builds, uci commit's format reads back the same ---

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.from_regex(r"n_[A-Za-z0-9_]{0,6}", fullmatch=True)
_types = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
).filter(uci.validate_text)


@st.composite
def _packages(draw):
    pkg = uci.Package("p")
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            s = pkg.add(draw(_types))
        else:
            s = pkg.set_section(draw(_names), draw(_types))
        ref = pkg.ref(s)
        for opt in draw(st.lists(_names, max_size=4)):
            if draw(st.booleans()):
                v = draw(_values)
                if v:
                    pkg.set(ref, opt, v)
            else:
                for item in draw(st.lists(_values, min_size=1, max_size=3)):
                    pkg.add_list(ref, opt, item)
    return pkg


@settings(max_examples=150, deadline=None)
@given(_packages())
def test_property_dump_parse_round_trip(pkg):
    text = uci.dump(pkg)
    again = uci.parse(text, "p")
    assert again == pkg
    assert uci.dump(again) == text
    assert again.show() == pkg.show()
