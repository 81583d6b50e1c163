"""The receiving and requesting side: take objects streamed to a site, or ask for them."""

from objstream.common.streaming import ObjectAssembler
from objstream.consumer.container_assembler import ContainerAssembler, ContainerEntry
from objstream.consumer.file_sink import FileAssembler, PartialFile
from objstream.consumer.receiver import Receiver
from objstream.consumer.retriever import Retriever
from objstream.consumer.streams import Received

__all__ = [
    "ContainerAssembler",
    "ContainerEntry",
    "FileAssembler",
    "ObjectAssembler",
    "PartialFile",
    "Received",
    "Receiver",
    "Retriever",
]
