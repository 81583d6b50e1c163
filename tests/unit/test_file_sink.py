from __future__ import annotations

import os
from pathlib import Path

import pytest

from objstream.common.naming import partial_name
from objstream.consumer.file_sink import PartialFile

SID = "0" * 32


def test_written_in_place_then_committed_under_the_final_name(tmp_path: Path) -> None:
    sink = PartialFile(tmp_path, SID, 8)
    sink.write(4, b"efgh")  # offsets, not order
    sink.write(0, memoryview(b"abcd"))
    assert not (tmp_path / "out.bin").exists()
    assert (tmp_path / partial_name(SID)).exists()
    final = sink.commit("out.bin")
    assert final == (tmp_path / "out.bin").resolve()
    assert final.read_bytes() == b"abcdefgh"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "out.bin").write_bytes(b"old")
    (tmp_path / "out-1.bin").write_bytes(b"older")
    sink = PartialFile(tmp_path, SID, 3)
    sink.write(0, b"new")
    assert sink.commit("out.bin").name == "out-2.bin"
    assert (tmp_path / "out.bin").read_bytes() == b"old"
    assert (tmp_path / "out-1.bin").read_bytes() == b"older"


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    sink = PartialFile(tmp_path, SID, 100)
    sink.write(0, b"x")
    sink.discard()
    sink.discard()  # idempotent
    assert os.listdir(tmp_path) == []


def test_a_file_larger_than_the_free_space_is_refused_up_front(tmp_path: Path) -> None:
    import errno

    with pytest.raises(OSError, match="do not fit") as caught:
        PartialFile(tmp_path, SID, 2**62)
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_a_second_stream_with_the_same_id_cannot_clobber_the_partial(tmp_path: Path) -> None:
    PartialFile(tmp_path, SID, 1)
    with pytest.raises(FileExistsError):
        PartialFile(tmp_path, SID, 1)


def test_commit_refuses_to_follow_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "out.bin").symlink_to(victim)
    sink = PartialFile(dest, SID, 3)
    sink.write(0, b"new")
    assert sink.commit("out.bin").name == "out-1.bin"
    assert victim.read_bytes() == b"keep"
