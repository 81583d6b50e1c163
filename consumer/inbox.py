"""The site's inbox: where offers for a site arrive, taken one at a time up to ``max_streams``."""

from __future__ import annotations

import logging

from objstream.common.amqp import Channel, Delivery
from objstream.consumer.core import ConsumerCore

log = logging.getLogger(__name__)


class Inbox:
    """A :class:`~objstream.consumer.core.Part` of a receiver: consumes the site's inbox while
    there is room for another stream, and hands each offer to the core."""

    def __init__(self, core: ConsumerCore) -> None:
        self._core = core
        self._tag: str | None = None
        self._queue = ""
        self._channel: Channel | None = None
        self._started = False

    def opened(self) -> None:
        core = self._core
        self._tag = None
        self._queue = core.topology.declare_inbox(core.control, core.site)
        self._channel = core.connection.channel()
        if not self._started:  # at start only: after a reconnect, the count includes our own
            self._started = True
            self._warn_of_others()
        # One offer at a time, acked once accepted: the limit on streams is exact.
        self._channel.qos(1)

    def _warn_of_others(self) -> None:
        """Several receivers of one site share its offers (competing workers, by design); a
        forgotten one in another shell silently takes half of them, so say it once."""
        assert self._channel is not None
        others = self._channel.consumer_count(self._queue)
        if others:
            log.warning(
                "the inbox of site %s (%s) already has %d consumer(s): other receivers of "
                "this site take a share of what is sent to it",
                self._core.site,
                self._queue,
                others,
            )

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
