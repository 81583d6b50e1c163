"""The layout issue 11 asks to keep: modules under ~500 lines, and pika behind one adapter.

A module that grows past the limit, or a new ``import pika`` outside the adapter (``common/amqp/``),
fails
here naming the files.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MAX_LINES = 500
SIZED = ("common", "producer", "consumer")
"""Folders whose modules must stay under :data:`MAX_LINES`."""
PIKA_FREE = ("common", "producer", "consumer", "jobs")
"""Folders where only :data:`PIKA_ADAPTER` may import pika."""
PIKA_ADAPTER = "common/amqp/"


def _modules(folders: tuple[str, ...]) -> dict[str, Path]:
    """The Python modules under ``folders``, by path relative to the repository."""
    return {
        path.relative_to(ROOT).as_posix(): path
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _pika_imports(path: Path) -> list[int]:
    """The lines of ``path`` that import pika or one of its modules (function-level too)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == "pika" or name.startswith("pika.") for name in names):
            lines.append(node.lineno)
    return lines


def test_the_folders_exist() -> None:
    """Guards the checks below against passing because they looked in the wrong place."""
    assert set(_modules(PIKA_FREE)) >= {"common/codec.py", "producer/cli.py", "jobs/cli.py"}


def test_no_module_is_over_500_lines() -> None:
    counts = {name: _line_count(path) for name, path in _modules(SIZED).items()}
    over = {name: n for name, n in counts.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines, split them: " + ", ".join(
        f"{name} ({n} lines)" for name, n in sorted(over.items())
    )


def test_only_the_amqp_adapter_imports_pika() -> None:
    found = {name: _pika_imports(path) for name, path in _modules(PIKA_FREE).items()}
    importers = {
        name: lines for name, lines in found.items() if lines and not name.startswith(PIKA_ADAPTER)
    }
    where = [f"{name} (line {', '.join(map(str, lines))})" for name, lines in importers.items()]
    assert not importers, f"only {PIKA_ADAPTER} may import pika; go through it: " + ", ".join(where)
