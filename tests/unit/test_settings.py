from __future__ import annotations

import pytest

from objstream.common.errors import ConfigError
from objstream.common.settings import MiB, Settings, load_settings, parse_size
from objstream.common.urls import mask_url


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256KiB", 256 * 1024),
        ("4MiB", 4 * MiB),
        ("1048576", MiB),
        (4096, 4096),
        ("1 MiB", MiB),
        ("1M", MiB),  # one letter: powers of 1024, as head -c and dd read it
        ("256k", 256 * 1024),
        ("2 G", 2 * 1024 * MiB),
        ("1MB", 1_000_000),  # MB: powers of 1000
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "4 parsecs", ""])
def test_parse_size_refuses_non_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@localhost:5672/%2F", "amqp://guest:***@localhost:5672/%2F"),
        ("amqps://u:p%40ss@h/vh?heartbeat=5", "amqps://u:***@h/vh?heartbeat=5"),
        ("amqp://localhost/", "amqp://localhost/"),
        ("amqp://u:pw@[::1]:5672/", "amqp://u:***@[::1]:5672/"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_environment_is_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBJSTREAM_URL", "amqp://a:secret@b:1/%2F")
    monkeypatch.setenv("OBJSTREAM_NAMESPACE", "prod")
    monkeypatch.setenv("OBJSTREAM_CHUNK_SIZE", "256KiB")
    monkeypatch.setenv("OBJSTREAM_WINDOW", "8")
    s = Settings()
    assert (s.url, s.namespace, s.chunk_size, s.window) == (
        "amqp://a:secret@b:1/%2F",
        "prod",
        256 * 1024,
        8,
    )
    assert "secret" not in repr(s)
    assert "secret" not in s.masked_url


def test_cli_overrides_win_and_none_means_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBJSTREAM_NAMESPACE", "from-env")
    assert load_settings(namespace=None).namespace == "from-env"
    assert load_settings(namespace="from-cli").namespace == "from-cli"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("chunk_size", "64MiB", "chunk size"),
        ("chunk_size", 0, "chunk size"),
        ("namespace", "a b", "namespace"),
        ("window", 0, "window"),
        ("log_level", "loud", "log level"),
    ],
)
def test_invalid_settings_name_the_setting(field: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(**{field: value})


def test_defaults() -> None:
    s = Settings(_env_file=None)
    assert s.chunk_size == MiB
    assert s.namespace == "objstream"
    assert s.url == "amqp://guest:guest@localhost:5672/%2F"
