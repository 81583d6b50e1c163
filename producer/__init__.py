"""The sending and serving side: stream objects to other sites."""

from common.streaming import ObjectStreamer, Piece
from producer.container_source import ContainerSource
from producer.sender import StreamSender, TargetResult
from producer.sources import FileSource
from producer.streamer import ContainerStreamer, FileStreamer, Streamer

__all__ = [
    "ContainerSource",
    "ContainerStreamer",
    "FileSource",
    "FileStreamer",
    "ObjectStreamer",
    "Piece",
    "StreamSender",
    "Streamer",
    "TargetResult",
]
