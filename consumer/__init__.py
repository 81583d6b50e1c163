"""The receiving and requesting side: take objects streamed to a site."""

from consumer.file_sink import PartialFile
from consumer.receiver import Received, Receiver

__all__ = ["PartialFile", "Received", "Receiver"]
