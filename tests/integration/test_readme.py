"""Every README code block marked ``<!-- runnable -->`` runs as written against the test broker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from objstream.common.settings import Settings
from tests.integration.conftest import Declared

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"<!-- runnable -->\s*```python\n(.*?)```", re.DOTALL)


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_blocks() -> None:
    assert len(_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_block_runs(
    index: int,
    tmp_path: Path,
    settings: Settings,
    declared: Declared,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    declared.sites.update({"server", "site-1"})
    monkeypatch.setenv("OBJSTREAM_URL", settings.url)
    monkeypatch.setenv("OBJSTREAM_NAMESPACE", settings.namespace)
    monkeypatch.setenv("OBJSTREAM_STREAM_TTL", "120")
    monkeypatch.chdir(tmp_path)
    code = compile(_blocks()[index], f"README.md block {index}", "exec")
    exec(code, {"__name__": f"readme_block_{index}"})
    assert capsys.readouterr().out  # each block reports what it did
