"""Imports only run downward (ARCHITECTURE §2): the bus and the MdS import nothing from the agent,
and the shared service plumbing imports none of the daemons.

Checked on the source (AST), so an import inside a function or under ``TYPE_CHECKING`` counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> top-level packages it must not import.
FORBIDDEN = {
    "broker": {"agent", "mds", "edge_sim"},
    "mds": {"agent", "edge_sim"},
    "service": {"agent", "broker", "mds", "edge_sim"},
}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path``.

    Relative imports are left out: they cannot leave their own top-level package.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_every_form_of_import_is_seen(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import agent\n"
        "import agent.kt.codec as codec\n"
        "from agent.notify import Notifier\n"
        "def f():\n"
        "    from agent import daemon\n"
        "from . import sibling\n"
        "import agentless\n"
    )
    assert imported_modules(source) == {"agent", "agent.kt.codec", "agent.notify", "agentless"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_run_downward(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    crossing = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if name.partition(".")[0] in FORBIDDEN[package]
    ]
    assert crossing == []
