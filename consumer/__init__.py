"""The receiving and requesting side: take objects streamed to a site, or ask for them."""

from common.streaming import ObjectAssembler
from consumer.container_assembler import ContainerAssembler, ContainerEntry
from consumer.file_sink import FileAssembler, PartialFile
from consumer.receiver import Receiver
from consumer.retriever import Retriever
from consumer.streams import Received

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
