"""Storing received containers: a ``.npz``'s member names are what the sender's keys say, and
never a path out of the directory it is unzipped in (zip slip)."""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from objstream.common.codec import EncodeError
from objstream.common.errors import SaveError
from objstream.consumer.output_formats import npz_member
from tests.storing import store

HOSTILE_KEYS = [
    "../../etc/x",
    "/abs",
    "a/../../b",
    "..",
    ".",
    "",
    "a/./b",
    "a//b",
    "a/",
    "..\\..\\x",  # a separator to Windows tools
    "\\abs",
    "\\\\server\\share\\x",
    "C:\\x",
    "c:x",  # drive-relative on Windows
    "a\x00/../../x",  # zipfile would cut the name at the NUL
]


def save(dest: Path, container: dict[str, Any], name: str = "m.npz") -> Path:
    """Receive ``container`` into ``dest`` as a receiver that stores containers does."""
    return store(container, name, dest).path


def _is_plain_relative(member: str) -> bool:
    parts = re.split(r"[/\\]", member)
    return (
        "\0" not in member
        and not re.match(r"[A-Za-z]:", member)
        and all(part not in {"", ".", ".."} for part in parts)
    )


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_a_key_that_is_no_plain_relative_path_is_refused_and_nothing_is_left(
    tmp_path: Path, key: str
) -> None:
    container = {"fine": np.arange(3), key: np.zeros(2)}
    with pytest.raises(SaveError, match=r"cannot be saved as \.npz: .* plain relative path"):
        save(tmp_path, container)
    assert os.listdir(tmp_path) == []  # no final file, no partial


def test_the_refusal_names_the_key_and_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(SaveError) as caught:
        npz_member("../../etc/x")
    assert str(caught.value).startswith("entry '../../etc/x' cannot be saved as .npz")
    assert ".safetensors or .json" in str(caught.value)


def test_keys_with_hierarchy_round_trip_as_the_sender_named_them(tmp_path: Path) -> None:
    container: dict[str, np.ndarray[Any, Any]] = {
        "w": np.arange(6).reshape(2, 3),
        "encoder/layer0/w": np.ones(4, np.float32),
        "dense/kernel:0": np.zeros(2),  # Keras names
        "x.npy": np.arange(2),
        "..a/b..": np.arange(1),  # dots inside a part are no '..'
    }
    path = save(tmp_path, container)
    with zipfile.ZipFile(path) as z:
        members = z.namelist()
    assert members == [f"{key}.npy" for key in container]
    assert all(_is_plain_relative(m) for m in members)
    with np.load(path, allow_pickle=False) as npz:
        assert npz.files == list(container)
        for key, value in container.items():
            assert np.array_equal(npz[key], value)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.text(max_size=30) | st.sampled_from(HOSTILE_KEYS), max_size=5, unique=True))
@example(keys=["ok", "../../etc/x"])
@example(keys=["a", "a/b", "b\\c"])
def test_any_keys_are_refused_or_stored_as_plain_relative_members(keys: list[str]) -> None:
    """Whatever keys a peer picks: the save is refused, or every member name of the written
    zip is a relative path without '.', '..' or empty parts, and np.load gives the keys back."""
    container = {key: np.arange(i + 1) for i, key in enumerate(keys)}
    with tempfile.TemporaryDirectory() as where:
        dest = Path(where)
        try:
            path = save(dest, container)
        except EncodeError:  # a lone surrogate has no UTF-8: no sender can send it
            assert any("\ud800" <= ch <= "\udfff" for k in keys for ch in k)
            return
        except SaveError:
            assert os.listdir(dest) == []
            assert not all(_is_plain_relative(k) for k in keys)
            return
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
        assert members == [f"{key}.npy" for key in keys]
        assert all(_is_plain_relative(m) for m in members)
        with np.load(path, allow_pickle=False) as npz:
            assert npz.files == keys
