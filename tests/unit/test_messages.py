"""Messages a user reads (issue 22, item 12): in our words, naming what to change, with
plurals right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from objstream.common.console import plural, printable
from objstream.common.errors import AuthenticationRefused, ConfigError, ObjstreamError
from objstream.common.settings import Settings
from objstream.producer.container_files import compressed_size, load_container


def test_settings_built_directly_raise_our_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(url="http://user:s3cret@host:15672/")
    assert "use amqp:// or amqps://" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert caught.value.__cause__ is None  # pydantic's error, which repeats values, not chained


def test_a_file_that_is_not_a_npz_is_said_so_without_numpy_s_advice(tmp_path: Path) -> None:
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip")
    pickled = tmp_path / "p.npz"
    np.savez(pickled, a=np.array([{"x": 1}], dtype=object))
    for path, words in [(garbage, "not a zip archive"), (pickled, "holds pickled objects")]:
        with pytest.raises(ObjstreamError) as caught:
            load_container(path)
        assert words in str(caught.value)
        assert "allow_pickle" not in str(caught.value)


def test_a_compressed_npz_is_told_apart(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "c.npz", z=np.zeros(10_000))
    np.savez(tmp_path / "s.npz", z=np.zeros(10_000))
    packed = compressed_size(tmp_path / "c.npz")
    assert packed is not None
    assert packed[0] < 2_000 < 80_000 < packed[1]
    assert compressed_size(tmp_path / "s.npz") is None


def test_refused_credentials_name_their_source() -> None:
    assert "--url, OBJSTREAM_URL or Settings.url" in str(AuthenticationRefused("amqp://h/"))
    separate = str(AuthenticationRefused("amqp://h/", separate=True))
    assert "OBJSTREAM_USER / OBJSTREAM_PASSWORD (Settings.user, Settings.password)" in separate


def test_plurals_and_printable_names() -> None:
    assert [plural(1, "byte"), plural(2, "byte"), plural(0, "chunk")] == [
        "1 byte",
        "2 bytes",
        "0 chunks",
    ]
    assert plural(1, "entry", "entries") == "1 entry"
    assert plural(3, "entry", "entries") == "3 entries"
    assert printable("a\nb\x1b[0m\u202e.bin") == "a\\nb\\x1b[0m\\u202e.bin"
    assert printable("modèle.bin") == "modèle.bin"


def test_hints_name_the_setting_for_the_library_too() -> None:
    from objstream.common.errors import UNREACHABLE_HINT, setting

    assert setting("tls_ca") == "--tls-ca, OBJSTREAM_TLS_CA or Settings.tls_ca"
    assert setting("timeout") == "OBJSTREAM_TIMEOUT or Settings.timeout"
    assert UNREACHABLE_HINT == (
        "check that RabbitMQ runs there (--url, OBJSTREAM_URL or Settings.url)"
    )


def test_a_missing_container_file_is_said_missing(tmp_path: Path) -> None:
    for name in ("nosuch.npz", "nosuch.safetensors", "nosuchdir"):
        with pytest.raises(FileNotFoundError) as caught:
            load_container(tmp_path / name)  # was: "not a zip archive", "unknown format"
        assert caught.value.filename == str(tmp_path / name)
