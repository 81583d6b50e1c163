"""The sending and serving side: stream objects to other sites."""

from producer.file_streamer import FileStreamer
from producer.sender import StreamSender, TargetResult
from producer.sources import ChunkSource, FileSource

__all__ = ["ChunkSource", "FileSource", "FileStreamer", "StreamSender", "TargetResult"]
