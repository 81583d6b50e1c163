"""Exchange and queue names, and their declarations (DESIGN.md section 2).

Every name carries the namespace prefix, so two deployments (or two test runs) on one broker never
see each other's messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from objstream.common.settings import Settings

if TYPE_CHECKING:
    from objstream.common.amqp import Channel

# The dead-letter queue keeps the newest messages up to these bounds; it never grows unbounded.
DEAD_MAX_LENGTH = 10_000
DEAD_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Topology:
    """Names and arguments of everything objstream declares under one namespace."""

    namespace: str
    stream_ttl_ms: int
    queue_type: str = "classic"

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(settings.namespace, int(settings.stream_ttl * 1000), settings.queue_type)

    @property
    def _type_arguments(self) -> dict[str, Any]:
        # Quorum queues replicate across a RabbitMQ cluster, so streams survive a node's death.
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    @property
    def exchange(self) -> str:
        """The durable direct exchange every objstream message goes through."""
        return self.namespace

    @property
    def dead(self) -> str:
        """Name of both the dead-letter exchange and its queue."""
        return f"{self.namespace}.dead"

    def inbox(self, site: str) -> str:
        return f"{self.namespace}.site.{site}"

    @staticmethod
    def inbox_key(site: str) -> str:
        return f"site.{site}"

    def service_queue(self, site: str) -> str:
        """Where retrieval requests to ``site`` wait for its serving workers.

        Separate from the inbox, so a site can run receivers and servers side by side, each
        consuming only what it handles.
        """
        return f"{self.namespace}.serve.{site}"

    @staticmethod
    def service_key(site: str) -> str:
        return f"serve.{site}"

    def declare_service_queue(self, channel: Channel, site: str) -> str:
        name = self.service_queue(site)
        channel.declare_queue(name, durable=True, arguments=self._type_arguments or None)
        channel.bind_queue(name, self.exchange, self.service_key(site))
        return name

    def data_queue(self, stream_id: str) -> str:
        return f"{self.namespace}.stream.{stream_id}"

    @staticmethod
    def data_key(stream_id: str) -> str:
        return f"stream.{stream_id}"

    def declare_base(self, channel: Channel) -> None:
        """Declare the exchange and the dead-letter exchange and queue."""
        channel.declare_exchange(self.exchange, "direct")
        channel.declare_exchange(self.dead, "fanout")
        channel.declare_queue(
            self.dead,
            durable=True,
            arguments={
                "x-max-length": DEAD_MAX_LENGTH,
                "x-max-length-bytes": DEAD_MAX_BYTES,
                "x-overflow": "drop-head",
            },
        )
        channel.bind_queue(self.dead, self.dead, "")

    def declare_inbox(self, channel: Channel, site: str) -> str:
        """Declare and bind the inbox of ``site``; returns its name."""
        name = self.inbox(site)
        channel.declare_queue(name, durable=True, arguments=self._type_arguments or None)
        channel.bind_queue(name, self.exchange, self.inbox_key(site))
        return name

    def declare_data_queue(self, channel: Channel, stream_id: str) -> str:
        """Declare and bind the data queue of a stream; it expires when unused for the TTL."""
        name = self.data_queue(stream_id)
        arguments = {"x-expires": self.stream_ttl_ms, **self._type_arguments}
        channel.declare_queue(name, durable=True, arguments=arguments)
        channel.bind_queue(name, self.exchange, self.data_key(stream_id))
        return name

    @staticmethod
    def declare_reply_queue(channel: Channel) -> str:
        """Declare this process's private reply queue (exclusive, server-named)."""
        return channel.declare_queue("", exclusive=True, auto_delete=True)
