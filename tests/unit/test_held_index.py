"""The index of what a destination holds (delta transfers), without a broker: what it finds for a
manifest, only from the same sending user, never from a copy that changed or leads outside, and
across restarts (it is a file)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from objstream.common.delta import DELTA_INFO, Manifest, ManifestBuilder
from objstream.common.protocol import Offer, new_stream_id
from objstream.consumer.held import INDEX_NAME, HeldIndex
from objstream.producer.container_source import ContainerSource

CHUNK = 4096


def _offer(kind: str, name: str, size: int, count: int, info: bool = True) -> Offer:
    return Offer(
        stream_id=new_stream_id(),
        kind=kind,
        name=name,
        size=size,
        chunk_size=CHUNK,
        chunk_count=count,
        window=8,
        sender="server",
        target="site-1",
        info={DELTA_INFO: "sha256"} if info else None,
    )


def _file_manifest(data: bytes) -> Manifest:
    builder = ManifestBuilder()
    for start in range(0, len(data), CHUNK):
        builder.add(data[start : start + CHUNK], None)
    return builder.build()


def _stored_file(dest: Path, index: HeldIndex, data: bytes, user: str = "server") -> Path:
    path = dest / "data.bin"
    path.write_bytes(data)
    offer = _offer("file", "data.bin", len(data), -(-len(data) // CHUNK))
    index.record(path, offer, user, hashlib.sha256(data).hexdigest())
    return path


def test_a_file_is_found_by_chunk_from_its_sender_alone(tmp_path: Path) -> None:
    index = HeldIndex(tmp_path)
    old = os.urandom(10 * CHUNK)
    _stored_file(tmp_path, index, old)
    new = old[: 4 * CHUNK] + os.urandom(CHUNK) + old[5 * CHUNK :] + b"tail"
    offer = _offer("file", "data.bin", len(new), 11)
    assert index.wanted(offer, "server")
    assert not index.wanted(offer, "someone-else")  # nothing of theirs here
    assert not index.wanted(_offer("file", "data.bin", len(new), 11, info=False), "server")
    held = index.find(_file_manifest(new), offer, "server")
    assert list(held.holds) == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # not 4 (new), not 10 (new tail)
    assert (
        index.read(held, held.where[6], _file_manifest(new).digest(6), CHUNK)
        == old[6 * CHUNK : 7 * CHUNK]
    )
    other = index.find(_file_manifest(new), offer, "someone-else")
    assert list(other.holds) == []  # a site cannot probe what another party sent here
    # The index is a file: a new process finds the same.
    again = HeldIndex(tmp_path).find(_file_manifest(new), offer, "server")
    assert list(again.holds) == list(held.holds)
    assert (tmp_path / INDEX_NAME).exists()


def test_a_copy_that_changed_is_dropped_and_one_that_lies_is_refused(tmp_path: Path) -> None:
    index = HeldIndex(tmp_path)
    data = os.urandom(4 * CHUNK)
    path = _stored_file(tmp_path, index, data)
    offer = _offer("file", "data.bin", len(data), 4)
    manifest = _file_manifest(data)
    held = index.find(manifest, offer, "server")
    assert len(held.holds) == 4
    # Rewritten in place, its times kept: the index cannot tell, the digest check at the copy can.
    st = path.stat()
    path.write_bytes(bytes(4 * CHUNK))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert index.read(held, held.where[1], manifest.digest(1), CHUNK) is None
    # Its size changed: it leaves the index at the next look.
    path.write_bytes(data + b"x")
    assert len(index.find(manifest, offer, "server").holds) == 0


def test_a_recorded_path_that_now_leads_outside_is_never_read(tmp_path: Path) -> None:
    dest, outside = tmp_path / "in", tmp_path / "secret"
    dest.mkdir()
    outside.mkdir()
    index = HeldIndex(dest)
    data = os.urandom(2 * CHUNK)
    path = _stored_file(dest, index, data)
    (outside / "data.bin").write_bytes(data)
    path.unlink()
    path.symlink_to(outside / "data.bin")  # someone swaps the stored file for a link
    offer = _offer("file", "data.bin", len(data), 2)
    assert len(index.find(_file_manifest(data), offer, "server").holds) == 0


def test_a_safetensors_container_is_found_by_entry(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((64, 64), np.float32) for i in range(4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    old_source = ContainerSource(dict(tensors), "model.safetensors")
    old_source.prepare(CHUNK)
    offer = _offer(
        "container", "model.safetensors", old_source.size or 0, old_source.chunk_count or 0
    )
    index = HeldIndex(tmp_path)
    index.record(tmp_path / "model.safetensors", offer, "server", "0" * 64)
    tensors["t2"] = tensors["t2"] + 1
    tensors["t9"] = tensors["t0"]  # the same bytes under another name: another entry
    new_source = ContainerSource(tensors, "model.safetensors")
    new_source.prepare(CHUNK)
    builder = ManifestBuilder()
    for seq in range(new_source.chunk_count or 0):
        piece = new_source.piece(seq)
        builder.add(piece.data, piece.meta)
    manifest = builder.build()
    new_offer = _offer("container", "model.safetensors", new_source.size or 0, manifest.chunk_count)
    held = index.find(manifest, new_offer, "server")
    entries = {i for i, e in enumerate(manifest.entries) if e.first in held.holds}
    assert entries == {0, 1, 3}  # t2 changed, t9 is new
    for seq in held.holds:
        assert index.read(held, held.where[seq], manifest.digest(seq), CHUNK) == bytes(
            new_source.piece(seq).data
        )


def test_nothing_left_of_what_was_stored_asks_for_no_manifest(tmp_path: Path) -> None:
    """A manifest costs the sender a whole read of the source before its first chunk: a
    receiver whose stored files were all deleted or changed does not ask for one."""
    index = HeldIndex(tmp_path)
    data = os.urandom(3 * CHUNK)
    path = _stored_file(tmp_path, index, data)
    offer = _offer("file", "data.bin", len(data), 3)
    assert index.wanted(offer, "server")
    path.write_bytes(data + b"changed")
    assert not index.wanted(offer, "server")
    path.unlink()
    assert not index.wanted(offer, "server")
    _stored_file(tmp_path, index, data)
    assert index.wanted(offer, "server")


@pytest.mark.parametrize("kind", ["file", "container"])
def test_a_stream_too_big_for_a_manifest_never_asks_for_one(tmp_path: Path, kind: str) -> None:
    index = HeldIndex(tmp_path)
    _stored_file(tmp_path, index, os.urandom(CHUNK))
    assert not index.wanted(_offer(kind, "x", 2**40, 2**40 // CHUNK), "server")


def _manifest_of(source: ContainerSource) -> Manifest:
    builder = ManifestBuilder()
    for seq in range(source.chunk_count or 0):
        piece = source.piece(seq)
        builder.add(piece.data, piece.meta)
    return builder.build()


def _held_entries(tmp_path: Path, stored: Path, name: str, new: dict[str, Any]) -> set[int]:
    """Which entries of ``new`` the index finds held in what was saved at ``stored``."""
    index = HeldIndex(tmp_path)
    index.record(stored, _offer("container", name, 1, 1), "server", "0" * 64)
    source = ContainerSource(new, name)
    source.prepare(CHUNK)
    manifest = _manifest_of(source)
    offer = _offer("container", name, source.size or 0, manifest.chunk_count)
    held = index.find(manifest, offer, "server")
    for seq in held.holds:  # and each copies what the sender would have sent
        assert index.read(held, held.where[seq], manifest.digest(seq), CHUNK) == bytes(
            source.piece(seq).data
        )
    return {i for i, e in enumerate(manifest.entries) if e.first in held.holds}


def test_an_npz_is_read_back_lazily_and_found_by_entry(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays: dict[str, Any] = {
        f"w{i}": rng.standard_normal((32, 64)).astype(np.float32) for i in range(3)
    }
    arrays["counts"] = np.arange(100, dtype=np.int64)
    np.savez(
        tmp_path / "model.npz", allow_pickle=False, **arrays
    )  # stored members, as a receiver writes them
    arrays["w1"] = arrays["w1"] * 2
    assert _held_entries(tmp_path, tmp_path / "model.npz", "model.npz", arrays) == {0, 2, 3}


def test_a_compressed_npz_is_not_matched(tmp_path: Path) -> None:
    arrays: dict[str, Any] = {"w": np.zeros((64, 64), np.float32)}
    np.savez_compressed(tmp_path / "model.npz", allow_pickle=False, **arrays)
    assert _held_entries(tmp_path, tmp_path / "model.npz", "model.npz", arrays) == set()


def test_a_checkpoint_directory_is_found_by_entry(tmp_path: Path) -> None:
    from objstream.producer.container_files import load_directory

    stored = tmp_path / "ckpt"
    stored.mkdir()
    rng = np.random.default_rng(2)
    shard = {f"t{i}": rng.standard_normal((64, 64), np.float32) for i in range(3)}
    save_file(shard, str(stored / "model.safetensors"))
    (stored / "config.json").write_text('{"layers": 3}')
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    shard["t0"] = shard["t0"] - 1
    save_file(shard, str(new_dir / "model.safetensors"))
    (new_dir / "config.json").write_text('{"layers": 3}')
    new = load_directory(new_dir)
    held = _held_entries(tmp_path, stored, "ckpt/", new)
    names = list(new)
    assert {names[i] for i in held} == {
        "config.json",
        "model.safetensors/t1",
        "model.safetensors/t2",
    }
