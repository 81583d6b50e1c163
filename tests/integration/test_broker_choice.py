"""How the integration tests choose their broker (tests/integration/conftest.py)."""

from __future__ import annotations

import pytest

from tests.integration import conftest
from tests.rabbitmq_node import LocalRabbitNode, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def nothing_but_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OBJSTREAM_TEST_URL", raising=False)
    monkeypatch.delenv("OBJSTREAM_TEST_BROKER", raising=False)
    monkeypatch.delenv("OBJSTREAM_REQUIRE_BROKER", raising=False)
    monkeypatch.setattr(conftest, "_docker_answers", lambda: False)
    monkeypatch.setattr(LocalRabbitNode, "available", staticmethod(lambda: False))


@pytest.mark.usefixtures("nothing_but_the_fallback")
def test_without_docker_or_rabbitmq_server_a_broker_at_localhost_is_used(
    monkeypatch: pytest.MonkeyPatch, broker_url: str
) -> None:
    # FALLBACK_URL is amqp://guest:guest@localhost:5672/; here the session's broker stands in.
    monkeypatch.setattr(conftest, "FALLBACK_URL", broker_url)
    assert list(conftest.choose_broker()) == [broker_url]


@pytest.mark.usefixtures("nothing_but_the_fallback")
def test_nothing_at_localhost_either_skips_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    monkeypatch.setattr(conftest, "FALLBACK_URL", nowhere)
    with pytest.raises(pytest.skip.Exception, match=f"nothing answers at {nowhere}"):
        list(conftest.choose_broker())
    monkeypatch.setenv("OBJSTREAM_REQUIRE_BROKER", "1")
    with pytest.raises(pytest.fail.Exception, match="OBJSTREAM_REQUIRE_BROKER=1"):
        list(conftest.choose_broker())


@pytest.mark.usefixtures("nothing_but_the_fallback")
def test_insisting_on_a_container_without_docker_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OBJSTREAM_TEST_BROKER", "container")
    with pytest.raises(pytest.fail.Exception, match="no Docker engine answers"):
        list(conftest.choose_broker())
