"""Imports only run downward (STYLE 12): the pure mechanisms import nothing from the daemon side.

Of this project, ``agent/kt/*.py`` and ``agent/drift.py`` may import only ``agent.kt``: not the
daemon, learner, settings, errors, checkpoint or config modules, nor broker, mds or edge_sim.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MECHANISMS = sorted((ROOT / "agent" / "kt").glob("*.py")) + [ROOT / "agent" / "drift.py"]
# The project's own packages; of them a mechanism may import only agent.kt (and the empty package
# around it).
PROJECT = {p.parent.name for p in ROOT.glob("*/__init__.py")}
ALLOWED = ("agent", "agent.kt")


def _imports(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, at any depth (deferred ones too), relative ones resolved.

    ``from a import b`` names both ``a`` and ``a.b``: ``b`` may be a module.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _forbidden(source: str, package: str) -> list[str]:
    return sorted(
        name
        for name in _imports(source, package)
        if name.split(".")[0] in PROJECT and name not in ALLOWED and not name.startswith("agent.kt.")
    )


def test_the_checker_sees_every_form_of_import():
    source = (
        "import broker.topics\n"
        "from agent.errors import KtRejected\n"
        "from agent import learner\n"
        "from ..settings import AgentSettings\n"
        "from . import significant\n"
        "import numpy as np\n"
        "def later():\n"
        "    import mds.similarity\n"
    )
    assert _forbidden(source, "agent.kt") == [
        "agent.errors",
        "agent.errors.KtRejected",
        "agent.learner",
        "agent.settings",
        "agent.settings.AgentSettings",
        "broker.topics",
        "mds.similarity",
    ]


@pytest.mark.parametrize("path", MECHANISMS, ids=lambda p: str(p.relative_to(ROOT)))
def test_mechanisms_import_nothing_from_above(path):
    package = ".".join(path.relative_to(ROOT).parent.parts)
    assert _forbidden(path.read_text(), package) == []


def test_the_daemon_side_catches_the_type_the_mechanisms_raise():
    from agent import errors
    from agent.kt import errors as kt_errors

    assert errors.KtRejected is kt_errors.KtRejected
