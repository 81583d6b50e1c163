"""The sending and serving side: stream objects to other sites."""

from common.streaming import ObjectStreamer, Piece
from producer.container_source import ContainerSource
from producer.sender import StreamSender, TargetResult
from producer.serving import ContainerRetriever, FileRetriever, RetrievalServer
from producer.sources import FileSource
from producer.streamer import ContainerStreamer, FileStreamer, Streamer

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
