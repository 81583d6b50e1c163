"""Exchange, queue and routing-key names of protocol v2, and their declarations.

Every name carries the namespace prefix, so two deployments (or two test runs) on one broker never
see each other's messages. Every queue a site reads carries the site's name where a RabbitMQ
permission regex can match it exactly (:func:`permissions` builds those regexes), and every
routing key a site publishes with names the site itself as the publisher (topic permissions), so
a site's broker user can be given exactly: its own inbox, service queue, data queues and reply
queues, and write access to the exchange with keys that name it.

Names (``NS`` the namespace, ``S`` a site, ``ID`` a stream id or reply-queue id: 32 hex digits):

============================  ============================  ===================================
what                          queue                         bound with key(s) on ``NS`` (topic)
============================  ============================  ===================================
inbox of S (offers)           ``NS.site.S``                 ``offer:S`` (and v1's ``site.S``)
service queue of S (requests) ``NS.serve.S``                ``serve:S`` (and v1's ``serve.S``)
data of stream ID for S       ``NS.data.S.ID``              ``data:ID:SENDER``,
                                                            ``data:ID:SENDER:S``
a reply queue of S            ``NS.reply.S.ID``             ``reply:S:ID:PEER`` per peer
============================  ============================  ===================================

Site names never contain ``:``, so keys split unambiguously; queue names are matched with
regexes anchored at both ends, whose fixed suffixes (``.site``-less forms, 32 hex digits) keep
``a`` from matching ``a.b``'s names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from objstream.common.errors import BrokerRefused
from objstream.common.settings import Settings

if TYPE_CHECKING:
    from objstream.common.amqp import Channel, Connection

# The dead-letter queue keeps the newest messages up to these bounds; it never grows unbounded.
DEAD_MAX_LENGTH = 10_000
DEAD_MAX_BYTES = 64 * 1024 * 1024
DELIVERY_LIMIT = 5
"""Deliveries of one message from a quorum inbox or service queue before the broker
dead-letters it (a message that kills its consumer every time cannot crash-loop a worker)."""

log = logging.getLogger(__name__)

HEX32 = "[0-9a-f]{32}"
SITE_IN_KEY = "[^:]+"  # a site name inside a routing key (site names never hold ":")
# What a permission regex lets stand for a site in a key: a site name's own characters
# (settings.NAME_PATTERN), never "*" or "#". Topic words are split at ".", and site names may
# hold dots, so with "[^:]+" a site could bind "data:ID:a.#" and receive the unicast keys
# "data:ID:a.b:OTHER" of sender "a.b" meant for other targets (RabbitMQ 3.10 checks the binding
# key's text against the regex, not what the pattern would route).
SITE_WORDS = "[A-Za-z0-9][A-Za-z0-9_.-]*"


DATA_TTL_MARGIN = 60.0
"""A data queue nobody consumes lives twice the timeout and this many seconds (at most the
stream TTL), as a sender's reply queue does: long enough for a successor to take a stream
over from a dead receiver while its sender still waits."""


@dataclass(frozen=True)
class Topology:
    """Names, keys and arguments of everything objstream declares under one namespace."""

    namespace: str
    stream_ttl_ms: int
    queue_type: str = "classic"
    data_ttl_ms: int | None = None
    """How long a data queue nobody consumes lives (None: ``stream_ttl_ms``)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        ttl = int(settings.stream_ttl * 1000)
        data_ttl = min(ttl, int((2 * settings.timeout + DATA_TTL_MARGIN) * 1000))
        return cls(settings.namespace, ttl, settings.queue_type, data_ttl)

    @property
    def _type_arguments(self) -> dict[str, Any]:
        # Quorum queues replicate across a RabbitMQ cluster, so streams survive a node's death.
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    def _queue_arguments(self, site: str) -> dict[str, Any]:
        """Every queue of ``site``: what its consumer rejects, the broker moves to the site's
        own dead-letter exchange (no site publishes to another's, nor to a shared one)."""
        return {"x-dead-letter-exchange": self.dead(site), **self._type_arguments}

    def _service_arguments(self, site: str) -> dict[str, Any]:
        """Inboxes and service queues: with quorum queues, a message delivered
        :data:`DELIVERY_LIMIT` times without being settled is dead-lettered by the broker, so
        nothing crash-loops a worker (classic queues have no such count)."""
        limit = {"x-delivery-limit": DELIVERY_LIMIT} if self.queue_type == "quorum" else {}
        return {**self._queue_arguments(site), **limit}

    # -- names ------------------------------------------------------------------------------------

    @property
    def exchange(self) -> str:
        """The durable topic exchange every objstream message goes through."""
        return self.namespace

    def dead(self, site: str) -> str:
        """Name of both the dead-letter exchange of ``site`` and its queue: where the broker
        puts what the site's consumers rejected (each site has its own, so that no site can
        write into what records another's)."""
        return f"{self.namespace}.dead.{site}"

    def inbox(self, site: str) -> str:
        return f"{self.namespace}.site.{site}"

    def service_queue(self, site: str) -> str:
        """Where retrieval requests to ``site`` wait for its serving workers.

        Separate from the inbox, so a site can run receivers and servers side by side, each
        consuming only what it handles.
        """
        return f"{self.namespace}.serve.{site}"

    def data_queue(self, site: str, stream_id: str) -> str:
        """The queue of stream ``stream_id`` at target ``site`` (declared by that target)."""
        return f"{self.namespace}.data.{site}.{stream_id}"

    def reply_queue(self, site: str, queue_id: str) -> str:
        """A reply queue of ``site`` (progress and verdicts; replies and offers of retrievals)."""
        return f"{self.namespace}.reply.{site}.{queue_id}"

    # -- routing keys -----------------------------------------------------------------------------

    @staticmethod
    def offer_key(target: str) -> str:
        return f"offer:{target}"

    @staticmethod
    def service_key(owner: str) -> str:
        return f"serve:{owner}"

    @staticmethod
    def data_key(stream_id: str, sender: str, target: str | None = None) -> str:
        """Chunks, end and abort of a stream: to every target (``target`` None), or to one."""
        key = f"data:{stream_id}:{sender}"
        return key if target is None else f"{key}:{target}"

    @staticmethod
    def reply_to(site: str, queue_id: str) -> str:
        """The ``reply_to`` of a message whose answers go to reply queue ``queue_id`` of ``site``:
        answers are published with :meth:`reply_key`."""
        return f"reply:{site}:{queue_id}"

    @staticmethod
    def reply_key(reply_to: str, publisher: str) -> str:
        """The key an answer to ``reply_to`` is published with, naming its publisher."""
        return f"{reply_to}:{publisher}"

    @staticmethod
    def parse_reply_to(reply_to: str) -> tuple[str, str] | None:
        """``(site, queue_id)`` of a v2 ``reply_to``, or None if it is not one."""
        match = re.fullmatch(rf"reply:({SITE_IN_KEY}):({HEX32})", reply_to)
        return None if match is None else (match.group(1), match.group(2))

    # -- declarations -----------------------------------------------------------------------------

    def declare_base(self, connection: Connection, site: str) -> None:
        """Make sure the exchange exists, and ``site``'s dead-letter exchange and queue.

        The exchange is checked first without declaring (a site's user under least privilege
        may not declare it: its administrator did) and declared if missing; a site declares its
        own dead letters.
        """
        channel = connection.channel()
        try:
            channel.declare_exchange(self.exchange, "topic", passive=True)
        except BrokerRefused as e:
            if not e.not_found:
                raise
            channel = connection.channel()  # the failed check closed the other one
            channel.declare_exchange(self.exchange, "topic")
        try:
            self.declare_dead(channel, site)
        finally:
            channel.close()

    def declare_dead(self, channel: Channel, site: str) -> None:
        """Declare ``site``'s dead-letter exchange and its queue, which keeps the newest
        :data:`DEAD_MAX_LENGTH` messages (at most :data:`DEAD_MAX_BYTES`)."""
        name = self.dead(site)
        channel.declare_exchange(name, "fanout")
        channel.declare_queue(
            name,
            durable=True,
            arguments={
                "x-max-length": DEAD_MAX_LENGTH,
                "x-max-length-bytes": DEAD_MAX_BYTES,
                "x-overflow": "drop-head",
                **self._type_arguments,  # a classic queue is gone while its node is down
            },
        )
        channel.bind_queue(name, name, "")

    def declare_inbox(self, channel: Channel, site: str) -> str:
        """Declare and bind the inbox of ``site``; returns its name.

        Also bound with protocol v1's key, so that a v1 offer reaches a v2 receiver and is
        answered (dead-lettered as ``unsupported_version``) rather than lost.
        """
        name = self.inbox(site)
        channel.declare_queue(name, durable=True, arguments=self._service_arguments(site))
        channel.bind_queue(name, self.exchange, self.offer_key(site))
        channel.bind_queue(name, self.exchange, f"site.{site}")
        return name

    def declare_service_queue(self, channel: Channel, site: str) -> str:
        """Declare and bind the service queue of ``site`` (also with v1's key, as the inbox)."""
        name = self.service_queue(site)
        channel.declare_queue(name, durable=True, arguments=self._service_arguments(site))
        channel.bind_queue(name, self.exchange, self.service_key(site))
        channel.bind_queue(name, self.exchange, f"serve.{site}")
        return name

    def declare_if_allowed(
        self, connection: Connection, declare: Callable[[Channel], object]
    ) -> bool:
        """Run ``declare`` (another site's inbox or service queue) on a channel of its own, and
        skip it if this user may not: under least privilege the administrator declared it.

        Returns whether it was declared. A refusal closes the channel it happens on, hence
        the channel of its own.
        """
        channel = connection.channel()
        try:
            declare(channel)
            return True
        except BrokerRefused as e:
            if not e.access_refused:
                raise
            log.debug("not allowed to declare (%s); its administrator does", e)
            return False
        finally:
            channel.close()

    def declare_data_queue(
        self, channel: Channel, site: str, stream_id: str, sender: str, backlog_bytes: int
    ) -> str:
        """Declare the data queue of ``stream_id`` at ``site`` (the target does this) and bind
        it to the sender's keys for the stream: every target's, and this target's own.

        It expires when unused for :attr:`data_ttl_ms`, and holds at most ``backlog_bytes`` of
        chunks ready for delivery (what is delivered and not acked does not count): the broker
        drops what is published to it beyond (``reject-publish``, not dead-lettered), so a
        target that stopped taking never parks more than that on the broker. A live target
        asks again for what it missed."""
        name = self.data_queue(site, stream_id)
        ttl = self.stream_ttl_ms if self.data_ttl_ms is None else self.data_ttl_ms
        arguments = {
            "x-expires": ttl,
            "x-max-length-bytes": backlog_bytes,
            "x-overflow": "reject-publish",
            **self._queue_arguments(site),
        }
        channel.declare_queue(name, durable=True, arguments=arguments)
        self.bind_data_queue(channel, site, stream_id, sender)
        return name

    def bind_data_queue(self, channel: Channel, site: str, stream_id: str, sender: str) -> None:
        """Bind the data queue of ``stream_id`` at ``site`` to the sender's two keys for the
        stream (idempotent)."""
        name = self.data_queue(site, stream_id)
        channel.bind_queue(name, self.exchange, self.data_key(stream_id, sender))
        channel.bind_queue(name, self.exchange, self.data_key(stream_id, sender, site))

    def unbind_data_queue(self, channel: Channel, site: str, stream_id: str, sender: str) -> None:
        """Let nothing more of ``stream_id`` into ``site``'s data queue (before deleting it)."""
        name = self.data_queue(site, stream_id)
        channel.unbind_queue(name, self.exchange, self.data_key(stream_id, sender))
        channel.unbind_queue(name, self.exchange, self.data_key(stream_id, sender, site))

    def declare_reply_queue(
        self, channel: Channel, site: str, queue_id: str, *, exclusive: bool, ttl_ms: int = 0
    ) -> str:
        """Declare reply queue ``queue_id`` of ``site``: exclusive (dies with the connection),
        or durable with an idle expiry of ``ttl_ms`` (outlives a reconnect). Peers are bound
        with :meth:`bind_reply`."""
        name = self.reply_queue(site, queue_id)
        if exclusive:
            dead = {"x-dead-letter-exchange": self.dead(site)}
            channel.declare_queue(name, exclusive=True, auto_delete=True, arguments=dead)
        else:
            # Quorum too when the others are: it must outlive the death of its node.
            ttl = {"x-expires": ttl_ms} if ttl_ms else {}
            arguments = {**ttl, **self._queue_arguments(site)}
            channel.declare_queue(name, durable=True, arguments=arguments)
        return name

    def bind_reply(self, channel: Channel, site: str, queue_id: str, peer: str) -> None:
        """Let ``peer``'s answers to ``reply_to(site, queue_id)`` into that reply queue."""
        key = self.reply_key(self.reply_to(site, queue_id), peer)
        channel.bind_queue(self.reply_queue(site, queue_id), self.exchange, key)


@dataclass(frozen=True)
class Permissions:
    """What one site's broker user may do, as RabbitMQ permission regexes.

    ``configure``, ``write`` and ``read`` are the vhost permissions (``set_permissions``);
    ``topic_write`` and ``topic_read`` the topic permissions on the exchange
    (``set_topic_permissions``): the routing keys the user may publish with, and bind its
    queues with.
    """

    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str


def permissions(namespace: str, site: str) -> Permissions:
    """The least privilege of ``site`` under ``namespace`` (see the module's table).

    A site may: declare, bind and read its own inbox, service queue, data queues, reply queues
    and dead-letter exchange and queue; publish to the exchange with keys that name it as the
    publisher (offers and requests to anyone; chunks of its own streams; answers signed with
    its name); bind its queues with keys addressed to it. It cannot declare, delete, read or
    write any other site's queue or dead letters, nor declare the exchange (an administrator
    does: ``objstream admin permissions --apply``).
    """
    ns, s = re.escape(namespace), re.escape(site)
    own = rf"^{ns}\.(site|serve|dead)\.{s}$|^{ns}\.(data|reply)\.{s}\.{HEX32}$"
    return Permissions(
        configure=own,
        write=rf"^{ns}$|{own}",
        read=rf"^{ns}$|{own}",
        topic_write=(
            rf"^(offer|serve):{SITE_WORDS}$|^data:{HEX32}:{s}(:{SITE_WORDS})?$"
            rf"|^reply:{SITE_WORDS}:{HEX32}:{s}$"
        ),
        topic_read=(
            rf"^(offer|serve):{s}$|^(site|serve)\.{s}$|^data:{HEX32}:{SITE_WORDS}(:{s})?$"
            rf"|^reply:{s}:{HEX32}:{SITE_WORDS}$"
        ),
    )
