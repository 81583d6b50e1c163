"""The sending and serving side: stream objects to other sites."""

from objstream.common.streaming import ObjectStreamer, Piece
from objstream.producer.container_source import ContainerSource
from objstream.producer.sender import StreamSender, TargetResult
from objstream.producer.serving import ContainerRetriever, FileRetriever, RetrievalServer
from objstream.producer.sources import FileSource
from objstream.producer.streamer import ContainerStreamer, FileStreamer, Streamer

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
