"""Read and write OpenWrt UCI config files exactly as libuci does.

This is a port of the parts of libuci (git.openwrt.org/project/uci.git) that
the agent and ``mpvpn pair`` need, written from its C source:

* the parser is a line-by-line port of ``file.c`` (``uci_getln``,
  ``parse_backslash``, ``parse_double_quote``, ``parse_single_quote``,
  ``parse_str``, ``next_arg``, ``assert_eol``, ``uci_parse_line``,
  ``uci_parse_package``/``config``/``option``) running on a mutable byte
  buffer, so odd inputs (``;`` separators, ``#`` inside unquoted words,
  backslash continuations, multi-line quoted values) give the same result;
* the in-memory semantics follow ``list.c`` (``uci_set``, ``uci_add_list``,
  ``uci_add_section``/``uci_fixup_section``, ``uci_lookup_ext_section``);
* output follows ``uci_export_package`` (what ``uci commit`` writes and
  ``uci export`` prints) and ``cli.c`` (``uci show``).

The parser always runs in libuci's default *strict* mode
(``UCI_FLAG_STRICT``, set by ``uci_alloc_context``): the first parse error
aborts the load with :class:`UciParseError`. Comments are not kept: like
``uci commit``, :func:`dump` writes only sections and options.

One deliberate difference: uci counts a line only once its ``\\n`` has been
read, so an error on a last line without a trailing newline is reported one
line early; we report the real line number. The byte offset is uci's (the
position in the logical line buffer).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Union

from mpvpn.io import atomicfile

Value = Union[str, list]  # str for ``option``, list[str] for ``list``

__all__ = [
    "Merge",
    "Package",
    "Section",
    "UciError",
    "UciInvalidError",
    "UciNotFoundError",
    "UciParseError",
    "anonymous_name",
    "dump",
    "export",
    "load",
    "parse",
    "save",
    "show",
    "validate_name",
    "validate_package",
    "validate_text",
    "validate_type",
]

# Mode for new files: UCI_FILEMODE in uci.h.
UCI_FILEMODE = 0o600


class UciError(Exception):
    """Any error from this module."""


class UciParseError(UciError):
    """A syntax error, reported like uci's ``uci_get_errorstr``:
    ``Parse error (<reason>) at line <n>, byte <b>``."""

    def __init__(self, reason: str, line: int, byte: int, path: str | None = None):
        self.reason = reason
        self.line = line
        self.byte = byte
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        s = f"Parse error ({self.reason}) at line {self.line}, byte {self.byte}"
        if self.path:
            s += f" in {self.path}"
        return s


class UciNotFoundError(UciError, LookupError):
    """uci's UCI_ERR_NOTFOUND ("Entry not found")."""


class UciInvalidError(UciError, ValueError):
    """uci's UCI_ERR_INVAL ("Invalid argument"): bad name, type or value."""


# --- validation (util.c: uci_validate_str / uci_validate_text) -------------

def _isalnum(c: int) -> bool:
    return 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122


def _validate_str(s: bytes, name: bool, package: bool) -> bool:
    """util.c ``uci_validate_str``: names allow [A-Za-z0-9_] (packages also
    '-'); types allow any printable ASCII except space."""
    if not s:
        return False
    for c in s:
        if _isalnum(c) or c == 0x5F:
            continue
        if c == 0x2D and package:
            continue
        if name or c < 33 or c > 126:
            return False
    return True


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def validate_name(s: str) -> bool:
    """Section and option names: ``uci_validate_name``."""
    return _validate_str(_b(s), True, False)


def validate_type(s: str) -> bool:
    """Section types: ``uci_validate_type``."""
    return _validate_str(_b(s), False, False)


def validate_package(s: str) -> bool:
    """Package (file) names: ``uci_validate_package``."""
    return _validate_str(_b(s), True, True)


def validate_text(s: str) -> bool:
    """Values: ``uci_validate_text`` (no control characters but TAB, LF, CR)."""
    return not any(ord(c) < 32 and c not in "\t\n\r" for c in s) and "\0" not in s


# --- the model ---------------------------------------------------------------

def _djbhash(h: int, s: str) -> int:
    """list.c ``djbhash`` (Bernstein's hash, masked to 31 bits)."""
    if h == 0xFFFFFFFF:
        h = 5381
    for c in _b(s):
        # types are printable ASCII, so C's signed/unsigned char does not matter
        h = ((h << 5) + h + c) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


def anonymous_name(n_section: int, type_: str) -> str:
    """The name uci gives an anonymous section (list.c ``uci_fixup_section``).

    ``cfg`` + the package's section counter (``%02x``, 1 for the first section
    allocated, named sections included) + the low 16 bits of the djb hash of
    the section type (``%04x``). The fixup runs when the section is created,
    before it has options, so only the type is hashed: the first section of
    /etc/config/firewall (``config defaults``) is ``cfg01e63d``, ``uci add``
    of type ``the_type`` to an empty package prints ``cfg013b47``.
    """
    return "cfg%02x%04x" % (n_section, _djbhash(0xFFFFFFFF, type_) % (1 << 16))


@dataclass(eq=False)
class Section:
    """One ``config`` section. Anonymous sections carry the generated name."""

    type: str
    name: str
    anonymous: bool = False
    options: dict = field(default_factory=dict)  # name -> str | list[str]
    # the line of the ``config`` statement that created it (parsed files only;
    # not part of equality, and not written back)
    line: int | None = field(default=None, repr=False)

    def get(self, option: str, default=None):
        return self.options.get(option, default)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Section):
            return NotImplemented
        return (
            self.type == other.type
            and self.name == other.name
            and self.anonymous == other.anonymous
            and list(self.options.items()) == list(other.options.items())
        )

    # uci_set on an option (parser and CLI); returns nothing
    def _set(self, option: str, value: str) -> None:
        if value == "":
            # parser: a no-op (ptr not COMPLETE); CLI: delete. Callers decide.
            return
        old = self.options.get(option)
        if isinstance(old, str) and old == value:
            return
        # a new option goes to the end; a changed one keeps its place (the
        # new one is allocated after the old, which is then freed:
        # uci_alloc_option(..., &old->e.list))
        self.options[option] = value

    # uci_add_list
    def _add_list(self, option: str, value: str) -> None:
        old = self.options.get(option)
        if isinstance(old, list):
            old.append(value)
            return
        if isinstance(old, str):
            # string converted to a list in its place (uci_alloc_list(..., &old->e.list))
            self.options[option] = [old, value]
        else:
            self.options[option] = [value]


_EXT_RE = re.compile(r"@([^\[]*)\[([^\]]*)\]")
_STRTOL_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


@dataclass(frozen=True)
class Merge:
    """A ``config`` statement that named an existing section of its type: uci
    merges its options into that section (later values win) instead of making
    a second one.  ``first_line`` created the section, ``line`` merged into it."""

    type: str
    name: str
    first_line: int
    line: int


class Package:
    """A parsed config file: ordered sections of ordered options."""

    def __init__(self, name: str):
        self.name = name
        self._sections: list[Section] = []
        self._n_section = 0  # uci_package.n_section: sections ever allocated
        # what the parser merged, in file order (uci does it silently: a
        # checker can warn; see Merge)
        self.merges: list[Merge] = []

    # -- lookups ---------------------------------------------------------
    def __iter__(self) -> Iterator[Section]:
        return iter(list(self._sections))

    def __len__(self) -> int:
        return len(self._sections)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Package):
            return NotImplemented
        return self.name == other.name and self._sections == other._sections

    def __repr__(self) -> str:
        return f"<uci.Package {self.name!r}: {len(self._sections)} sections>"

    def sections(self, type: str | None = None) -> list[Section]:
        """Sections in file order, optionally only those of one type."""
        return [s for s in self._sections if type is None or s.type == type]

    def section(self, ref: str) -> Section | None:
        """Look up ``name`` or uci's extended ``@type[n]`` / ``@type[-1]`` /
        ``@[n]`` (list.c ``uci_lookup_ext_section``). None when not found;
        :class:`UciInvalidError` for a malformed reference."""
        if validate_name(ref):
            for s in self._sections:
                if s.name == ref:
                    return s
            return None
        m = _EXT_RE.fullmatch(ref)
        if not m:
            raise UciInvalidError(f"invalid section reference {ref!r}")
        type_, idxstr = m.group(1), m.group(2)
        # strtol(): "" gives 0 with the end pointer on the (zeroed) ']'
        if idxstr == "":
            idx = 0
        elif _STRTOL_RE.fullmatch(idxstr):
            idx = int(idxstr)
        else:
            raise UciInvalidError(f"invalid section reference {ref!r}")
        if type_ and not validate_type(type_):
            raise UciInvalidError(f"invalid section reference {ref!r}")
        candidates = [s for s in self._sections if not type_ or s.type == type_]
        if idx < 0:
            idx += len(candidates)
        if 0 <= idx < len(candidates):
            return candidates[idx]
        return None

    def ref(self, section: Section) -> str:
        """How ``uci show`` names a section: its name, or ``@type[n]`` for an
        anonymous one, n counting all sections of that type (cli.c
        ``uci_lookup_section_ref``)."""
        if not section.anonymous:
            return section.name
        idx = 0
        for s in self._sections:
            if s is section:
                return f"@{s.type}[{idx}]"
            if s.type == section.type:
                idx += 1
        raise UciNotFoundError("section is not in this package")

    def get(self, ref: str, option: str | None = None, default=None):
        """The section's type (``option`` None) or the option's value:
        str for ``option``, list[str] for ``list``; ``default`` if absent."""
        s = self.section(ref)
        if s is None:
            return default
        if option is None:
            return s.type
        v = s.options.get(option)
        if v is None:
            return default
        return list(v) if isinstance(v, list) else v

    def _need(self, ref: str) -> Section:
        s = self.section(ref)
        if s is None:
            raise UciNotFoundError(f"Entry not found: {self.name}.{ref}")
        return s

    # -- changes (list.c semantics, as `uci set` + `uci commit`) ----------
    def _alloc(self, type_: str, name: str | None) -> Section:
        self._n_section += 1  # uci_alloc_section
        if name is None:
            s = Section(type_, anonymous_name(self._n_section, type_), anonymous=True)
        else:
            s = Section(type_, name)
        self._sections.append(s)
        return s

    def add(self, type: str) -> Section:
        """``uci add <package> <type>``: append an anonymous section."""
        if not validate_type(type):
            raise UciInvalidError(f"invalid section type {type!r}")
        return self._alloc(type, None)

    def set_section(self, name: str, type: str) -> Section:
        """``uci set <package>.<name>=<type>``: create a named section, or
        change the type of an existing one (it keeps its place)."""
        if not validate_name(name):
            raise UciInvalidError(f"invalid section name {name!r}")
        if not validate_type(type):
            raise UciInvalidError(f"invalid section type {type!r}")
        s = self.section(name)
        if s is not None:
            s.type = type
            return s
        return self._alloc(type, name)

    def set(self, ref: str, option: str, value) -> None:
        """``uci set <package>.<ref>.<option>=<value>``.

        An empty string deletes the option. A changed option keeps its place
        in the section, as in uci (libuci list.c ``uci_set``); a new one is
        appended. A list value replaces the option by a ``list`` with those
        items (in its place)."""
        s = self._need(ref)
        if not validate_name(option):
            raise UciInvalidError(f"invalid option name {option!r}")
        if isinstance(value, (list, tuple)):
            items = [str(v) for v in value]
            for v in items:
                if not validate_text(v):
                    raise UciInvalidError(f"invalid value {v!r}")
            if items:
                s.options[option] = items
            else:
                s.options.pop(option, None)
            return
        value = str(value)
        if not validate_text(value):
            raise UciInvalidError(f"invalid value {value!r}")
        if value == "":
            s.options.pop(option, None)
            return
        s._set(option, value)

    def add_list(self, ref: str, option: str, value: str) -> None:
        """``uci add_list <package>.<ref>.<option>=<value>``."""
        s = self._need(ref)
        if not validate_name(option):
            raise UciInvalidError(f"invalid option name {option!r}")
        if not validate_text(value):
            raise UciInvalidError(f"invalid value {value!r}")
        s._add_list(option, value)

    def del_list(self, ref: str, option: str, value: str) -> None:
        """``uci del_list``: remove every list item equal to ``value``. A
        list left empty stays (uci writes nothing for it)."""
        s = self._need(ref)
        v = s.options.get(option)
        if isinstance(v, list):
            v[:] = [i for i in v if i != value]

    def delete(self, ref: str, option: str | None = None) -> None:
        """``uci delete``: a whole section or one option."""
        s = self._need(ref)
        if option is None:
            self._sections = [x for x in self._sections if x is not s]
            return
        if option not in s.options:
            raise UciNotFoundError(f"Entry not found: {self.name}.{ref}.{option}")
        del s.options[option]

    def rename(self, ref: str, new_name: str, option: str | None = None) -> None:
        """``uci rename``: rename a section (it stops being anonymous) or an
        option (it keeps its place)."""
        s = self._need(ref)
        if not validate_name(new_name):
            raise UciInvalidError(f"invalid name {new_name!r}")
        if option is None:
            s.name = new_name
            s.anonymous = False
            return
        if option not in s.options:
            raise UciNotFoundError(f"Entry not found: {self.name}.{ref}.{option}")
        s.options = {(new_name if k == option else k): v for k, v in s.options.items()}

    # -- output ------------------------------------------------------------
    def dump(self) -> str:
        return dump(self)

    def show(self) -> list[str]:
        """``uci show <package>`` lines (without newlines)."""
        out = []
        for s in self._sections:
            ref = self.ref(s)
            out.append(f"{self.name}.{ref}={s.type}")
            for k, v in s.options.items():
                if isinstance(v, str):
                    shown = _print_value(v)
                else:
                    shown = " ".join(_print_value(i) for i in v)
                out.append(f"{self.name}.{ref}.{k}={shown}")
        return out

    def save(self, path: str) -> None:
        save(self, path)


# --- output -------------------------------------------------------------------

def _escape(s: str) -> str:
    """file.c ``uci_escape``: ' becomes '\\'' (close, escaped quote, reopen)."""
    return s.replace("'", "'\\''")


def _print_value(s: str) -> str:
    """cli.c ``uci_print_value``."""
    return "'" + _escape(s) + "'"


def dump(package: Package, header: bool = False) -> str:
    """The file ``uci commit`` writes (file.c ``uci_export_package`` with
    header false and without UCI_FLAG_EXPORT_NAME): a blank line before each
    ``config``, tab-indented ``option``/``list`` lines, every value in single
    quotes, anonymous sections without a name, and a final blank line."""
    out = []
    if header:
        out.append(f"package {_escape(package.name)}\n")
    for s in package._sections:
        out.append(f"\nconfig {_escape(s.type)}")
        if not s.anonymous:
            out.append(f" '{_escape(s.name)}'")
        out.append("\n")
        for k, v in s.options.items():
            if isinstance(v, str):
                out.append(f"\toption {_escape(k)} '{_escape(v)}'\n")
            else:
                for item in v:
                    out.append(f"\tlist {_escape(k)} '{_escape(item)}'\n")
    out.append("\n")
    return "".join(out)


def export(package: Package) -> str:
    """What ``uci export <package>`` prints (with the ``package`` line)."""
    return dump(package, header=True)


def show(package: Package) -> str:
    """What ``uci show <package>`` prints."""
    lines = package.show()
    return "".join(line + "\n" for line in lines)


# --- the parser (a port of file.c) -------------------------------------------

_SPACE = frozenset(b" \t\n\v\f\r")  # isspace() in the C locale
_SQ, _DQ, _BS, _HASH, _SEMI, _NL, _CR = (ord(c) for c in "'\"\\#;\n\r")


class _Parser:
    def __init__(self, data: bytes, package: Package):
        self.data = data
        self.rpos = 0  # read position in data (the FILE*)
        self.buf = bytearray()
        self.pos = 0
        self.buf_filled = 0
        self.line = 0  # physical lines read (see module docstring)
        self.stmt_line = 0  # the first physical line of the logical line being parsed
        self.pkg = package
        self.section: Section | None = None

    # buffer helpers: reading past the end sees the C string terminator
    def ch(self, i: int) -> int:
        return self.buf[i] if i < len(self.buf) else 0

    def setch(self, i: int, v: int) -> None:
        if i >= len(self.buf):
            self.buf.extend(bytes(i + 1 - len(self.buf)))
        self.buf[i] = v

    def cstr(self, i: int) -> bytes:
        j = self.buf.find(0, i)
        return bytes(self.buf[i:] if j < 0 else self.buf[i:j])

    def error(self, reason: str):
        raise UciParseError(reason, self.line, self.pos)

    # uci_getln: read one more line into the buffer at ``offset``
    def getln(self, offset: int) -> None:
        del self.buf[offset:]
        if self.rpos >= len(self.data):
            return  # fgets() == NULL: buf[offset] = 0, buf_filled unchanged
        nl = self.data.find(b"\n", self.rpos)
        end = len(self.data) if nl < 0 else nl + 1
        self.buf += self.data[self.rpos:end]
        self.rpos = end
        self.buf_filled = len(self.buf)
        self.line += 1

    def parse_backslash(self) -> bool:
        self.pos += 1
        c = self.ch(self.pos)
        if c == 0 or c == _NL or (
            c == _CR and self.ch(self.pos + 1) == _NL and self.ch(self.pos + 2) == 0
        ):
            self.getln(self.pos)  # line continuation
            return False
        return True

    def skip_whitespace(self) -> None:
        while self.ch(self.pos) and self.ch(self.pos) in _SPACE:
            self.pos += 1

    def addc(self, target: int) -> int:
        self.setch(target, self.ch(self.pos))
        self.pos += 1
        return target + 1

    def parse_double_quote(self, target: int) -> int:
        self.pos += 1
        while True:
            c = self.ch(self.pos)
            if c == _DQ:
                self.pos += 1
                return target
            if c == 0:
                self.getln(self.pos)  # multi-line value
                if not self.ch(self.pos):
                    self.error('EOF with unterminated "')
                continue
            if c == _BS and not self.parse_backslash():
                continue
            target = self.addc(target)

    def parse_single_quote(self, target: int) -> int:
        self.pos += 1
        while True:
            c = self.ch(self.pos)
            if c == _SQ:
                self.pos += 1
                return target
            if c == 0:
                self.getln(self.pos)
                if not self.ch(self.pos):
                    self.error("EOF with unterminated '")
                continue
            target = self.addc(target)

    def parse_str(self, target: int) -> int:
        nxt = True
        while True:
            c = self.ch(self.pos)
            if c == _SQ:
                target = self.parse_single_quote(target)
            elif c == _DQ:
                target = self.parse_double_quote(target)
            elif c == _HASH:
                self.setch(self.pos, 0)  # rest of the line is a comment
                break
            elif c == 0:
                break
            elif c == _SEMI:
                nxt = False
                break
            elif c == _BS:
                if self.parse_backslash():
                    target = self.addc(target)
                # else: `continue` in C jumps to the do-while condition
            else:
                target = self.addc(target)
            c = self.ch(self.pos)
            if not (c and c not in _SPACE):
                break
        if self.ch(self.pos) and nxt:
            self.pos += 1
        self.setch(target, 0)
        return target

    def next_arg(self, required: bool, name: bool, package: bool) -> int:
        self.skip_whitespace()
        val = self.pos
        if self.ch(self.pos) == _SEMI:
            self.setch(self.pos, 0)
            self.pos += 1
        else:
            self.parse_str(val)
        if not self.ch(val):
            if required:
                self.error("insufficient arguments")
            return val
        if name and not _validate_str(self.cstr(val), name, package):
            self.error("invalid character in name field")
        return val

    def assert_eol(self) -> None:
        self.skip_whitespace()
        tmp = self.next_arg(False, False, False)
        if self.ch(tmp):  # always UCI_FLAG_STRICT
            self.error("too many arguments")

    def strtok(self, start: int) -> int | None:
        i = start
        while self.ch(i) in (0x20, 0x09):
            i += 1
        if not self.ch(i):
            return None
        j = i
        while self.ch(j) not in (0, 0x20, 0x09):
            j += 1
        if self.ch(j):
            self.setch(j, 0)
        return i

    def increase_pos(self, add: int) -> bool:
        if self.pos + add > self.buf_filled:
            return False
        self.pos += add
        return True

    def skip_command_word(self, what: str) -> None:
        # "command string null-terminated by strtok"
        if not self.increase_pos(len(self.cstr(self.pos)) + 1):
            self.error(f"{what} without name")

    def parse_package(self) -> None:
        self.skip_command_word("package")
        n = self.next_arg(True, True, True)
        self.assert_eol()
        self.on_package(self.cstr(n).decode("ascii"))

    def on_package(self, name: str) -> None:
        # uci_load() imports in "single" mode: the name is checked, then ignored
        pass

    def parse_config(self) -> None:
        self.skip_command_word("config")
        t = self.next_arg(True, False, False)
        if not _validate_str(self.cstr(t), False, False):
            self.error("invalid character in type field")
        n = self.next_arg(False, True, False)
        self.assert_eol()
        self.on_config(self.cstr(t).decode("ascii"), self.cstr(n).decode("ascii"))

    def on_config(self, type_: str, name: str) -> None:
        if not name:
            self.section = self.pkg._alloc(type_, None)
            self.section.line = self.stmt_line
            return
        existing = None
        for s in self.pkg._sections:
            if s.name == name:
                existing = s
                break
        if existing is None:
            self.section = self.pkg._alloc(type_, name)
            self.section.line = self.stmt_line
            return
        if existing.type != type_:
            self.error("section of different type overwrites prior section with same name")
        self.section = existing  # same name and type: options merge into it
        if existing.line is not None:
            self.pkg.merges.append(Merge(type_, name, existing.line, self.stmt_line))

    def parse_option(self, is_list: bool) -> None:
        if self.section is None:
            self.error("option/list command found before the first section")
        self.skip_command_word("option")
        n = self.next_arg(True, True, False)
        v = self.next_arg(False, False, False)
        self.assert_eol()
        self.on_option(
            is_list, self.cstr(n).decode("ascii"), self.cstr(v).decode("utf-8", "surrogateescape")
        )

    def on_option(self, is_list: bool, name: str, value: str) -> None:
        if is_list:
            self.section._add_list(name, value)
        else:
            self.section._set(name, value)  # '' is a no-op while parsing

    def parse_line(self) -> None:
        self.skip_whitespace()
        while True:
            w = self.strtok(self.pos)
            if w is None:
                return
            word = self.cstr(w)
            c, rest = word[0], word[1:]
            if c == _HASH:
                return
            if c == ord("p") and rest in (b"", b"ackage"):
                self.parse_package()
            elif c == ord("c") and rest in (b"", b"onfig"):
                self.parse_config()
            elif c == ord("o") and rest in (b"", b"ption"):
                self.parse_option(False)
            elif c == ord("l") and rest in (b"", b"ist"):
                self.parse_option(True)
            else:
                self.error("invalid command")

    def run(self) -> None:
        # uci_import
        while self.rpos < len(self.data):
            self.pos = 0
            self.stmt_line = self.line + 1
            self.getln(0)
            if self.ch(0):
                self.parse_line()


def parse(text: str | bytes, package_name: str) -> Package:
    """Parse a config file's content, as ``uci_load`` would."""
    if not validate_package(package_name):
        raise UciInvalidError(f"invalid package name {package_name!r}")
    data = _b(text) if isinstance(text, str) else bytes(text)
    pkg = Package(package_name)
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise UciParseError("NUL byte", line, nul - (data.rfind(b"\n", 0, nul) + 1))
    _Parser(data, pkg).run()
    return pkg


def load(path: str, name: str | None = None) -> Package:
    """Read and parse a config file; the package name is the file's name.

    Raises OSError (e.g. FileNotFoundError) and :class:`UciParseError` (its
    ``path`` set)."""
    if name is None:
        name = os.path.basename(os.path.normpath(path))
    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse(data, name)
    except UciParseError as e:
        e.path = path
        raise


def save(package: Package, path: str) -> None:
    """Write ``dump(package)`` atomically, as ``uci commit`` does: a temporary
    ``.<name>.uci-XXXXXX`` in the same directory, fsync, the old file's mode
    (0600 for a new file, UCI_FILEMODE), rename over the real path."""
    try:
        mode = os.stat(os.path.realpath(path)).st_mode & 0o7777
    except FileNotFoundError:
        mode = UCI_FILEMODE
    atomicfile.replace(path, _b(dump(package)), mode, prefix=f".{package.name}.uci-")
