"""A spooled container: chunks on disk, taken over after a crash, decoded once complete."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest

from objstream.common.protocol import Offer, new_stream_id
from objstream.common.streaming import Piece
from objstream.consumer.container_assembler import ContainerEntry
from objstream.consumer.container_spool import ContainerSpool, meta_path
from objstream.producer.container_source import ContainerSource

CHUNK = 4096


def _stream(container: dict[Any, Any] | list[Any] | set[Any]) -> tuple[Offer, list[Piece]]:
    source = ContainerSource(container, "m")
    source.prepare(CHUNK)
    offer = Offer(stream_id=new_stream_id(), kind="container", name="m", size=source.size,
                  chunk_size=CHUNK, chunk_count=source.chunk_count, window=4, sender="a",
                  target="b", info=source.info())  # fmt: skip
    return offer, list(source.pieces())


def _feed(spool: ContainerSpool, pieces: Iterable[Piece], offset: int = 0) -> int:
    for piece in pieces:
        spool.take(offset, piece.data, piece.meta)
        offset += len(piece.data)
    return offset


MODEL = {"w": np.arange(5000, dtype=np.float32).reshape(50, 100), "name": "x", "n": [1, 2]}


def _equal(got: Any, want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    assert np.array_equal(got["w"], want["w"])
    assert (got["name"], got["n"]) == (want["name"], want["n"])


def test_a_spooled_container_is_decoded_at_the_end_and_leaves_nothing(tmp_path: Path) -> None:
    offer, pieces = _stream(MODEL)
    spool = ContainerSpool(tmp_path, offer)
    _feed(spool, pieces)
    _equal(spool.finish(), MODEL)
    assert list(tmp_path.iterdir()) == []


def test_a_successor_takes_the_spool_over_from_the_recorded_count(tmp_path: Path) -> None:
    offer, pieces = _stream(MODEL)
    entries: list[ContainerEntry] = []
    first = ContainerSpool(tmp_path, offer)
    stored_bytes = _feed(first, pieces[:3])
    _feed(first, pieces[3:5], stored_bytes)  # written, but never recorded before the "crash"
    first.suspend()
    second = ContainerSpool(tmp_path, offer, entries.append, reopen=True, stored=3,
                            stored_bytes=stored_bytes)  # fmt: skip
    _feed(second, pieces[3:], stored_bytes)
    assert second.finish() is None  # entries went to the callback
    _equal({e.key: e.value for e in entries}, MODEL)
    assert list(tmp_path.iterdir()) == []


def test_metas_that_do_not_add_up_are_refused(tmp_path: Path) -> None:
    offer, pieces = _stream(MODEL)
    first = ContainerSpool(tmp_path, offer)
    stored_bytes = _feed(first, pieces[:3])
    first.suspend()
    with pytest.raises(ValueError, match="does not match"):
        ContainerSpool(tmp_path, offer, reopen=True, stored=3, stored_bytes=stored_bytes + 1)
    meta_path(tmp_path, offer.stream_id).write_bytes(b"garbage\n" * 3)
    with pytest.raises(ValueError, match="does not match"):
        ContainerSpool(tmp_path, offer, reopen=True, stored=3, stored_bytes=stored_bytes)
    assert len(list(tmp_path.iterdir())) == 2  # the spool is left for the caller to judge


def test_a_failing_entry_callback_fails_the_stream_cleanly(tmp_path: Path) -> None:
    from objstream.common.errors import ObjstreamError

    offer, pieces = _stream(MODEL)

    def boom(entry: ContainerEntry) -> NoReturn:
        raise RuntimeError("disk on fire")

    spool = ContainerSpool(tmp_path, offer, boom)
    _feed(spool, pieces)
    with pytest.raises(ObjstreamError, match="disk on fire"):
        spool.finish()
    assert list(tmp_path.iterdir()) == []
