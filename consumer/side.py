"""``ConsumerSide``: what a :class:`~objstream.consumer.receiver.Receiver` and a
:class:`~objstream.consumer.retriever.Retriever` show of the
:class:`~objstream.consumer.core.ConsumerCore` they are built on."""

from __future__ import annotations

from pathlib import Path

from objstream.common.amqp import Closing
from objstream.common.settings import Settings
from objstream.common.topology import Topology
from objstream.consumer.core import ConsumerCore


class ConsumerSide(Closing):
    """What a :class:`~objstream.consumer.receiver.Receiver` and a
    :class:`~objstream.consumer.retriever.Retriever` show of their core (they add the rest)."""

    def __init__(self, core: ConsumerCore) -> None:
        self._core = core

    @property
    def settings(self) -> Settings:
        return self._core.settings

    @property
    def site(self) -> str:
        return self._core.site

    @property
    def dest(self) -> Path:
        return self._core.dest

    @property
    def topology(self) -> Topology:
        return self._core.topology

    @property
    def reconnects(self) -> int:
        """How often the connection was lost and re-established."""
        return self._core.reconnects

    @property
    def resend_requests(self) -> int:
        """How often a sender was asked to resend (a gap, a corrupt chunk)."""
        return self._core.table.actions.resend_requests

    @property
    def redelivered_chunks(self) -> int:
        """Chunks the broker delivered again (after a lost channel or connection)."""
        return self._core.table.redelivered

    def close(self, checkpoint: bool = False) -> None:
        """Stop and disconnect; with ``checkpoint``, streams kept on disk are left for the
        next consumer of this site and directory, otherwise they fail."""
        self._core.close(checkpoint)


__all__ = ["ConsumerSide"]
