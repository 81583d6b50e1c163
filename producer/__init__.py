"""The sending and serving side: stream objects to other sites.

The names below are imported on first use (PEP 562), so that ``objstream producer send-file``
never imports numpy and the containers' codec: only containers need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from objstream.common.lazy import lazy_exports

if TYPE_CHECKING:
    from objstream.common.streaming import ObjectStreamer, Piece
    from objstream.producer.container_source import ContainerSource
    from objstream.producer.sender import StreamSender, TargetResult
    from objstream.producer.serving import ContainerRetriever, FileRetriever, RetrievalServer
    from objstream.producer.sources import FileSource
    from objstream.producer.streamer import ContainerStreamer, FileStreamer, Streamer

_WHERE = {
    "ContainerRetriever": "objstream.producer.serving",
    "ContainerSource": "objstream.producer.container_source",
    "ContainerStreamer": "objstream.producer.streamer",
    "FileRetriever": "objstream.producer.serving",
    "FileSource": "objstream.producer.sources",
    "FileStreamer": "objstream.producer.streamer",
    "ObjectStreamer": "objstream.common.streaming",
    "Piece": "objstream.common.streaming",
    "RetrievalServer": "objstream.producer.serving",
    "StreamSender": "objstream.producer.sender",
    "Streamer": "objstream.producer.streamer",
    "TargetResult": "objstream.producer.sender",
}

__all__ = [
    "ContainerRetriever",
    "ContainerSource",
    "ContainerStreamer",
    "FileRetriever",
    "FileSource",
    "FileStreamer",
    "ObjectStreamer",
    "Piece",
    "RetrievalServer",
    "StreamSender",
    "Streamer",
    "TargetResult",
]


__getattr__ = lazy_exports(__name__, _WHERE)
