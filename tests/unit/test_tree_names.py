"""Relative paths of a tree (``send-file -r``): what a receiver makes of a peer's path, and what
a sender makes of a directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from objstream.common.naming import TREE_INFO_KEY, is_tree_name, stored_name, tree_parts
from objstream.common.protocol import PIPE_KIND, Offer
from objstream.producer.file_sets import STDIN, TreeFileSource, expand


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a.txt", ["a.txt"]),
        ("model/shards/part-0.bin", ["model", "shards", "part-0.bin"]),
        ("win\\style\\x.txt", ["win", "style", "x.txt"]),
        ("..hidden/x", ["hidden", "x"]),  # leading dots go, as in any received name
        ("a/b\x1b[0m/c\n.txt", ["a", "b[0m", "c.txt"]),
        ("con/x", ["con_", "x"]),
        ("   /x", ["unnamed", "x"]),
    ],
)
def test_a_plain_relative_path_is_kept_each_part_made_safe(name: str, parts: list[str]) -> None:
    assert tree_parts(name) == parts


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../../x",
        "a/./x",
        "a//x",
        "a/",
        "/etc/passwd",
        "\\\\server\\share\\x",
        "C:/x",
        "c:\\x",
        "a\0b/x",
        "/".join(["d"] * 65),
    ],
)
def test_anything_but_a_plain_relative_path_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="path"):
        tree_parts(name)


def test_the_flag_must_be_true_itself() -> None:
    assert is_tree_name({TREE_INFO_KEY: True})
    assert not is_tree_name({TREE_INFO_KEY: 1})
    assert not is_tree_name({TREE_INFO_KEY: "true"})
    assert not is_tree_name(None)
    assert not is_tree_name({})


def test_the_sender_is_told_the_path_in_the_destination() -> None:
    tree = {TREE_INFO_KEY: True}
    assert stored_name("m/s/x.bin", tree, Path("/dest/m/s/x-1.bin")) == "m/s/x-1.bin"
    assert stored_name("m/s/x.bin", None, Path("/dest/x.bin")) == "x.bin"


def test_a_pipe_offer_needs_no_size() -> None:
    offer = Offer(
        stream_id="0" * 32,
        kind=PIPE_KIND,
        name="stdin.bin",
        chunk_size=1024,
        window=4,
        sender="server",
        target="site-1",
    )
    assert offer.size is None
    assert offer.chunk_length(3) is None  # each chunk up to chunk_size; the end tells the size


def test_a_tree_is_walked_in_order_with_its_name_in_front(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "b" / "c").mkdir(parents=True)
    for name in ("z.txt", "a.txt", "b/y.txt", "b/c/x.txt"):
        (root / name).write_bytes(name.encode())
    (root / "b" / "up").symlink_to("../a.txt")
    (root / "out").symlink_to(tmp_path)
    (root / "gone").symlink_to("nowhere")
    found = expand([str(root)], recursive=True, stdin_name=None)
    names = []
    for item in found.items:
        source = item.open()
        assert isinstance(source, TreeFileSource)
        assert source.info() == {TREE_INFO_KEY: True}
        names.append(source.name)
        source.close()
    assert names == ["data/a.txt", "data/z.txt", "data/b/up", "data/b/y.txt", "data/b/c/x.txt"]
    assert sorted(found.skipped) == [
        f"{root / 'gone'}: No such file or directory",
        f"{root / 'out'}: a symlink to a directory",
    ]


def test_the_tree_of_dot_is_named_after_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "f").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "proj")
    [item] = expand(["."], recursive=True, stdin_name=None).items
    assert item.open().name == "proj/f"


def test_an_empty_tree_says_so(tmp_path: Path) -> None:
    (tmp_path / "e" / "f").mkdir(parents=True)
    found = expand([str(tmp_path / "e")], recursive=True, stdin_name=None)
    assert found.items == []
    assert found.skipped == [f"{tmp_path / 'e'}: no files to send"]


def test_standard_input_needs_a_name_and_comes_once() -> None:
    with pytest.raises(ValueError, match="needs --name"):
        expand([STDIN], recursive=False, stdin_name=None)
    with pytest.raises(ValueError, match="only once"):
        expand([STDIN, STDIN], recursive=False, stdin_name="x")
    [item] = expand([STDIN], recursive=False, stdin_name="x").items
    assert item.label == STDIN


def test_reading_a_pipe_yields_whole_chunks_then_the_rest() -> None:
    from objstream.producer.pipe_source import PipeSource

    read, write = os.pipe()
    data = os.urandom(10_000)
    with os.fdopen(write, "wb") as writer:
        writer.write(data)
    source = PipeSource("p", fd=read)
    source.prepare(4096)
    pieces = [piece.data for piece in source.pieces()]
    source.close()
    os.close(read)
    assert [len(p) for p in pieces] == [4096, 4096, 1808]
    assert b"".join(pieces) == data
