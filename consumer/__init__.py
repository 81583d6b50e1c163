"""The receiving and requesting side: take objects streamed to a site, or ask for them.

The names below are imported on first use (PEP 562), as in :mod:`objstream.producer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from objstream.common.lazy import lazy_exports

if TYPE_CHECKING:
    from objstream.common.streaming import ObjectAssembler
    from objstream.consumer.container_assembler import ContainerAssembler, ContainerEntry
    from objstream.consumer.file_sink import FileAssembler, PartialFile
    from objstream.consumer.receiver import Receiver
    from objstream.consumer.retriever import Retriever
    from objstream.consumer.streams import Received

_WHERE = {
    "ContainerAssembler": "objstream.consumer.container_assembler",
    "ContainerEntry": "objstream.consumer.container_assembler",
    "FileAssembler": "objstream.consumer.file_sink",
    "ObjectAssembler": "objstream.common.streaming",
    "PartialFile": "objstream.consumer.file_sink",
    "Received": "objstream.consumer.streams",
    "Receiver": "objstream.consumer.receiver",
    "Retriever": "objstream.consumer.retriever",
}

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


__getattr__ = lazy_exports(__name__, _WHERE)
