"""What a test that needs a broker of its own does without one: skip, or fail under
``OBJSTREAM_REQUIRE_BROKER=1`` (CI), decided in one place (tests/rabbitmq_node.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.rabbitmq_node import require_local_nodes

TESTS = Path(__file__).resolve().parents[1]
NODE_CLASSES = ("LocalRabbitNode(", "TlsRabbitNode(", "LocalRabbitCluster(")


def _on_path(monkeypatch: pytest.MonkeyPatch, *found: str) -> None:
    """Only the commands ``found`` are on PATH."""
    monkeypatch.setattr(shutil, "which", lambda cmd: f"/usr/sbin/{cmd}" if cmd in found else None)


@pytest.mark.parametrize("found", [(), ("rabbitmqctl",), ("rabbitmq-server",)])
def test_without_the_binaries_a_test_skips(
    monkeypatch: pytest.MonkeyPatch, found: tuple[str, ...]
) -> None:
    monkeypatch.delenv("OBJSTREAM_REQUIRE_BROKER", raising=False)
    _on_path(monkeypatch, *found)
    with pytest.raises(pytest.skip.Exception, match="needs the rabbitmq-server and rabbitmqctl"):
        require_local_nodes()
    monkeypatch.setenv("OBJSTREAM_REQUIRE_BROKER", "0")
    with pytest.raises(pytest.skip.Exception):
        require_local_nodes()


@pytest.mark.parametrize("found", [(), ("rabbitmqctl",), ("rabbitmq-server",)])
def test_without_the_binaries_a_required_broker_fails_the_test(
    monkeypatch: pytest.MonkeyPatch, found: tuple[str, ...]
) -> None:
    monkeypatch.setenv("OBJSTREAM_REQUIRE_BROKER", "1")
    _on_path(monkeypatch, *found)
    with pytest.raises(pytest.fail.Exception, match=r"REQUIRE_BROKER=1 but .*rabbitmq-server"):
        require_local_nodes()


@pytest.mark.parametrize("required", ["", "1"])
def test_with_the_binaries_the_test_runs(monkeypatch: pytest.MonkeyPatch, required: str) -> None:
    monkeypatch.setenv("OBJSTREAM_REQUIRE_BROKER", required)
    _on_path(monkeypatch, "rabbitmq-server", "rabbitmqctl")
    require_local_nodes()  # neither skips nor fails


def _test_modules() -> dict[str, str]:
    return {
        path.relative_to(TESTS).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(TESTS.rglob("test_*.py"))
        if path != Path(__file__).resolve()
    }


def test_every_module_that_starts_nodes_goes_through_the_policy() -> None:
    """A module of its own ``skipif(not ...available())`` would skip in CI, unnoticed."""
    modules = _test_modules()
    starting = {name for name, text in modules.items() if any(c in text for c in NODE_CLASSES)}
    assert "integration/test_tls.py" in starting  # the check looks in the right place
    assert not {name for name in starting if "local_nodes" not in modules[name]}
    assert not {name for name, text in modules.items() if ".available()" in text}
