"""Feeding a container through the sending half into a :class:`ContainerSink`, as a receiver
that stores containers does, without a broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from objstream.common.protocol import Offer, new_stream_id
from objstream.consumer.container_sink import ContainerSink
from objstream.consumer.streams import Stored
from objstream.producer.container_source import ContainerSource

CHUNK = 1000  # small and odd: entries span chunks, chunks end inside arrays and items


def offer_of(source: ContainerSource, name: str, chunk: int = CHUNK) -> Offer:
    """The offer a sender makes for ``source``, prepared with ``chunk``."""
    source.prepare(chunk)
    return Offer(
        stream_id=new_stream_id(),
        kind="container",
        name=name,
        size=source.size,
        chunk_size=chunk,
        chunk_count=source.chunk_count,
        window=4,
        sender="a",
        target="b",
        info=source.info(),
    )


def store(
    container: Any,
    name: str,
    dest: Path,
    save_as: str | None = None,
    *,
    chunk: int = CHUNK,
    as_memmap: bool = False,
) -> Stored:
    """Stream ``container`` (named ``name``) into ``dest``; a failure discards what was
    written, as a receiver does, and raises."""
    source = ContainerSource(container, name)
    offer = offer_of(source, name, chunk)
    dest.mkdir(exist_ok=True)
    sink = ContainerSink(dest, offer, save_as, as_memmap=as_memmap)
    try:
        offset = 0
        for piece in source.pieces():
            sink.take(offset, piece.data, piece.meta)
            offset += len(piece.data)
        return sink.finish()
    except BaseException:
        sink.discard()
        raise
