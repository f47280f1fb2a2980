"""The package layers (README "How it works"): who may import whom.

core is sans-I/O: no sockets, clocks, threads, selectors, processes or
netlink, and nothing of the layers above it; io never reaches into the
agent; nothing the router runs imports mpvpn.tools (the router package
leaves it out)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mpvpn"
# what makes code stateful in time or touch the OS (core gets `now` and bytes)
NOT_IN_CORE = {"socket", "selectors", "select", "asyncio", "threading", "time", "subprocess",
               "signal", "fcntl", "ctypes", "mpvpn.io", "mpvpn.agent", "mpvpn.tools", "mpvpn.cli"}
MAY_NOT_IMPORT = {
    "core": NOT_IN_CORE,
    "io": {"mpvpn.agent", "mpvpn.tools", "mpvpn.cli"},
    "agent": {"mpvpn.tools", "mpvpn.cli"},
}


def imports(path: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            assert n.level == 0, f"{path}: relative import (name the layer)"
            out.add(n.module)
            out.update(f"{n.module}.{a.name}" for a in n.names)
    return out


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((SRC / layer).rglob("*.py")):
        for mod in imports(path):
            for banned in MAY_NOT_IMPORT[layer]:
                if mod == banned or mod.startswith(banned + "."):
                    bad.append(f"{path.relative_to(SRC)} imports {mod}")
    return bad


@pytest.mark.parametrize("layer", sorted(MAY_NOT_IMPORT))
def test_layer_imports(layer):
    assert violations(layer) == []


def test_every_module_is_in_a_layer():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py"], top


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The walker is not blind: a core module that imports socket is caught."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "x.py").write_text("import os\nfrom socket import socket\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    assert "core/x.py imports socket" in violations("core")


def test_readme_names_every_module_where_a_newcomer_looks():
    """README's "How it works" table names each module (issue 14: a
    newcomer finds each concept in the module named for it)."""
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## How it works"):readme.index("The protocol logic is sans-I/O")]
    missing = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py")) + [SRC / "core" / "_fastpath.c"]
               if p.name not in ("__init__.py", "__main__.py") and p.parent != SRC
               and f"`{p.relative_to(SRC)}`" not in table]
    assert missing == []
