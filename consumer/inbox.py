"""The site's inbox: where offers for a site arrive, taken one at a time up to ``max_streams``."""

from __future__ import annotations

from objstream.common.amqp import Channel, Delivery
from objstream.consumer.core import ConsumerCore


class Inbox:
    """A :class:`~objstream.consumer.core.Part` of a receiver: consumes the site's inbox while
    there is room for another stream, and hands each offer to the core."""

    def __init__(self, core: ConsumerCore) -> None:
        self._core = core
        self._tag: str | None = None
        self._queue = ""
        self._channel: Channel | None = None

    def opened(self) -> None:
        core = self._core
        self._tag = None
        self._queue = core.topology.declare_inbox(core.control, core.site)
        self._channel = core.connection.channel()
        # One offer at a time, acked once accepted: the limit on streams is exact.
        self._channel.qos(1)

    def tick(self) -> None:
        """Take offers again once a stream slot is free."""
        if self._tag is None and self._room and self._channel is not None:
            self._tag = self._channel.consume(self._queue, self._on_offer)

    @property
    def _room(self) -> bool:
        return len(self._core.table) < self._core.settings.max_streams

    def _pause(self) -> None:
        if self._tag is not None and self._channel is not None:
            self._channel.cancel(self._tag)
            self._tag = None

    def _on_offer(self, delivery: Delivery) -> None:
        if not self._room:
            delivery.channel.nack(delivery.tag, requeue=True)  # wait for a free slot
            self._pause()
            return
        try:
            self._core.take_offer(delivery)
        finally:
            delivery.channel.ack(delivery.tag)
        if not self._room:
            self._pause()
