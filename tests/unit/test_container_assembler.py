"""Which pieces of a container built in memory are taken on the connection's thread: copies
into buffers allocated already are (so the pieces behind them do not wait in memory), user
code and big structures are not."""

from __future__ import annotations

from typing import Any

import numpy as np

from objstream.consumer.container_assembler import (
    INLINE_STRUCTURE,
    ContainerAssembler,
    ContainerEntry,
)
from objstream.producer.container_source import ContainerSource
from tests.storing import offer_of

CHUNK = 4096


def _walk(on_entry: Any = None) -> list[bool]:
    """Whether each piece of a two-entry container may be taken inline, taking them in order."""
    container = {"a": np.arange(3000, dtype=np.float32), "b": np.arange(10)}
    source = ContainerSource(container, "m")
    assembler = ContainerAssembler(offer_of(source, "m", CHUNK), on_entry)
    decisions, offset = [], 0
    for piece in source.pieces():
        decisions.append(assembler.inline(len(piece.data), piece.meta))
        assembler.take(offset, piece.data, piece.meta)
        offset += len(piece.data)
    assembler.finish()
    return decisions


def test_without_on_entry_every_piece_is_a_copy_taken_inline() -> None:
    assert _walk() == [True, True, True, True]  # 12 KiB + structure: 3 pieces, then 1


def test_with_on_entry_only_the_pieces_that_complete_an_entry_go_to_a_thread() -> None:
    seen: list[ContainerEntry] = []
    assert _walk(seen.append) == [True, True, False, False]
    assert [entry.key for entry in seen] == ["a", "b"]


def test_a_big_structure_is_parsed_on_a_thread() -> None:
    source = ContainerSource({"w": np.zeros(3)}, "m")
    assembler = ContainerAssembler(offer_of(source, "m", CHUNK))
    meta = {"entry": 0, "head": INLINE_STRUCTURE + 1, "size": INLINE_STRUCTURE + 10}
    assert not assembler.inline(CHUNK, meta)
    assert not assembler.inline(CHUNK, {"entry": 0, "head": "x", "size": 5})
