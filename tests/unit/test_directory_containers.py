"""Directory containers (issue 22, item 1) without a broker: a tree with subdirectories comes
out the same, whatever name it is offered under; a peer's paths stay inside the directory; and
``retrieve-container --out`` is checked before anything moves (item 3)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from objstream.common.errors import ConfigError, ObjstreamError, SaveError
from objstream.common.safetensors_format import split_directory_key
from objstream.consumer.cli import output_place
from objstream.consumer.container_sink import ContainerSink
from objstream.consumer.output_formats import final_name
from objstream.producer.container_files import DirectoryContainer, load_container
from objstream.producer.container_source import ContainerSource
from tests.storing import offer_of, store


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _checkpoint(root: Path) -> Path:
    (root / "tokenizer" / "deep").mkdir(parents=True)
    (root / ".cache").mkdir()
    save_file({"x": np.arange(100, dtype=np.float32)}, str(root / "model-00001.safetensors"))
    save_file({"y": np.arange(7, dtype=np.int16)}, str(root / "tokenizer" / "enc.safetensors"))
    (root / "config.json").write_text('{"hidden": 8}')
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (root / "tokenizer" / "deep" / "merges.txt").write_bytes(b"\x00\x01" * 500)
    (root / ".hidden").write_text("not sent")
    (root / ".cache" / "x").write_text("not sent")
    return root


@pytest.mark.parametrize(
    ("key", "split"),
    [
        ("config.json", ("config.json", None)),
        ("m.safetensors/w", ("m.safetensors", "w")),
        ("m.safetensors/layers/0/w", ("m.safetensors", "layers/0/w")),
        ("text/enc.SAFETENSORS/w", ("text/enc.SAFETENSORS", "w")),
        ("tokenizer/vocab.txt", ("tokenizer/vocab.txt", None)),
        ("m.safetensors", ("m.safetensors", None)),
    ],
)
def test_an_entry_name_splits_at_its_safetensors_file(key: str, split: tuple[str, Any]) -> None:
    assert split_directory_key(key) == split


@pytest.mark.parametrize("name", ["ckpt/", "ckpt"])
def test_a_tree_with_subdirectories_arrives_the_same_under_any_name(
    tmp_path: Path, name: str
) -> None:
    src = _checkpoint(tmp_path / "ckpt")
    container = load_container(src)
    assert isinstance(container, DirectoryContainer)
    assert "tokenizer/deep/merges.txt" in container
    assert not [k for k in container if "hidden" in k or ".cache" in k]
    stored = store(container, name, tmp_path / "out")  # served as "ckpt": no "/" in its name
    assert stored.path == (tmp_path / "out" / "ckpt").resolve()
    expected = {k: v for k, v in _tree(src).items() if not k.startswith(".")}
    assert _tree(stored.path) == expected  # safetensors files byte for byte too


def test_a_directory_named_like_a_safetensors_file_is_refused_at_the_sender(
    tmp_path: Path,
) -> None:
    (tmp_path / "d" / "odd.safetensors").mkdir(parents=True)
    (tmp_path / "d" / "odd.safetensors" / "notes.txt").write_text("x")
    with pytest.raises(ObjstreamError, match=r"named like a \.safetensors file"):
        load_container(tmp_path / "d")


def test_a_directory_container_is_not_squeezed_into_one_file(tmp_path: Path) -> None:
    container = load_container(_checkpoint(tmp_path / "ckpt"))
    for save_as in ("ck.npz", "ck.safetensors", "ck.json"):
        offer = offer_of(ContainerSource(container, "ckpt"), "ckpt")
        with pytest.raises(SaveError, match="it is a directory of files; save it as a directory"):
            ContainerSink(tmp_path / "out", offer, save_as)


@pytest.mark.parametrize(
    "key",
    [
        "../escape.txt",
        "a/../../escape.txt",
        "/etc/passwd",
        "a//b.txt",
        ".hidden/x.txt",
        "a\\..\\b.txt",
        "C:/x.txt",
        "sub/./x.txt",
        "/".join(["d"] * 17) + "/deep.txt",
        "../m.safetensors/w",
    ],
)
def test_a_peers_path_never_leaves_the_directory(tmp_path: Path, key: str) -> None:
    hostile = DirectoryContainer({"ok.txt": b"fine", key: b"evil"})
    dest = tmp_path / "out"
    with pytest.raises(SaveError, match="is not a plain relative file path"):
        store(hostile, "ckpt/", dest)
    assert os.listdir(dest) == []  # nothing left, nothing outside
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize(
    "entries",
    [
        {"a": b"file", "a/b.txt": b"under a file"},
        {"a/b.txt": b"x", "a": b"a folder already"},
        {"m.safetensors/w": np.zeros(2), "m.safetensors": b"x"},
        {"m.safetensors": b"x", "m.safetensors/w": np.zeros(2)},
    ],
)
def test_a_file_and_a_folder_of_one_name_are_refused(
    tmp_path: Path, entries: dict[str, Any]
) -> None:
    with pytest.raises(SaveError, match=r"in the way of|not a new file|is a \.safetensors file"):
        store(DirectoryContainer(entries), "ckpt/", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_a_directory_container_keeps_the_name_the_receiver_gives(tmp_path: Path) -> None:
    assert final_name("ck", directory=True) == "ck/"
    assert final_name("ck") == "ck.npz"
    assert final_name("ck.safetensors", directory=True) == "ck.safetensors"


def test_out_is_checked_before_anything_moves(tmp_path: Path) -> None:
    (tmp_path / "rc").mkdir()
    assert output_place(str(tmp_path / "m.npz")) == (tmp_path, "m.npz")
    assert output_place(str(tmp_path / "ck")) == (tmp_path, "ck")
    assert output_place(str(tmp_path / "ck") + "/") == (tmp_path, "ck/")
    assert output_place(str(tmp_path / "rc")) == (tmp_path / "rc", None)  # into it
    assert output_place(str(tmp_path / "rc") + "/") == (tmp_path / "rc", None)  # the same
    with pytest.raises(ConfigError, match=r"\.txt is not a container format"):
        output_place(str(tmp_path / "x.txt"))
    with pytest.raises(ConfigError, match="never writes pickles"):
        output_place(str(tmp_path / "x.pt"))
