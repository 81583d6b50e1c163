"""A retriever's requests: what was asked, the replies, and the offers that follow them.

A :class:`~objstream.consumer.core.Part` of a :class:`~objstream.consumer.retriever.Retriever`.
Replies and offers come on a private, exclusive reply queue ``NS.reply.SITE.QID`` (a fresh QID
per connection), bound ``reply:SITE:QID:OWNER`` for each owner asked: only what those owners
publish reaches it. It dies with the connection, so after a reconnect a request still
unanswered (or an offer not yet here) is asked again. The owner
replies on one connection and streams on another, so an offer can overtake its reply: it is kept
(up to :data:`MAX_EARLY`) until the reply says whether it is ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from objstream.common.amqp import Delivery, dead_letter
from objstream.common.errors import FailureCode, ProtocolError, TransferFailed
from objstream.common.protocol import Abort, Offer, Reply, Request, envelope, new_stream_id, parse
from objstream.common.tls import broker_user
from objstream.consumer.core import ConsumerCore
from objstream.consumer.resume import Resumable

log = logging.getLogger(__name__)

MAX_EARLY = 16  # offers kept while waiting for the reply that names them


@dataclass(frozen=True)
class Asked:
    """A request in flight: its timeout, the name asked for, the prefix it may continue and
    the site asked."""

    timeout: float
    name: str
    kept: Resumable | None
    owner: str


class RequestTracker:
    """Pending requests, their replies, the streams they announce and early offers."""

    def __init__(self, core: ConsumerCore) -> None:
        self._core = core
        self._user = broker_user(core.settings)
        self._private = ""
        self._queue_id = ""
        self._owners: set[str] = set()
        self._pending: dict[str, Asked] = {}  # request id -> what was asked, awaiting the reply
        self._replies: dict[str, Reply] = {}
        self._expected: dict[str, Asked] = {}  # stream id -> what was asked, offer to come
        self._early: dict[str, Delivery] = {}  # offers that came before their reply

    def opened(self) -> None:
        core = self._core
        self._queue_id = new_stream_id()
        self._private = core.topology.declare_reply_queue(
            core.control, core.site, self._queue_id, exclusive=True
        )
        core.control.consume(self._private, self._on_private, auto_ack=True)
        self._owners = set()

    @property
    def reply_to(self) -> str:
        """The ``reply_to`` of this connection's requests (``reply:SITE:QID``)."""
        return self._core.topology.reply_to(self._core.site, self._queue_id)

    def _ask_of(self, owner: str) -> None:
        """Let ``owner``'s answers into the reply queue, and make sure its service queue is
        there so the request waits for a server that starts a little later (until it expires).

        Under least privilege a site may not declare another site's queue (its administrator
        did): the broker refuses, which closes the channel, so the try goes on a channel of its
        own and a refusal is skipped.
        """
        core = self._core
        core.topology.bind_reply(core.control, core.site, self._queue_id, owner)
        core.topology.declare_if_allowed(
            core.connection, lambda channel: core.topology.declare_service_queue(channel, owner)
        )
        self._owners.add(owner)

    def tick(self) -> None:
        """Nothing to do between batches: requests time out in the retriever's wait."""

    def publish(self, request: Request, from_site: str, asked: Asked) -> None:
        """Send ``request`` to ``from_site`` (again, after a reconnect) and expect its reply."""
        core = self._core
        if from_site not in self._owners:
            self._ask_of(from_site)
        # A request nobody answers within the timeout is void: the requester has given up.
        # RabbitMQ checks user_id against the connection's user.
        props = envelope(
            request,
            persistent=False,
            reply_to=self.reply_to,
            expiration_s=asked.timeout,
            user_id=self._user,
        )
        core.control.publish(
            core.topology.exchange, core.topology.service_key(from_site), b"", props
        )
        self._pending[request.request_id] = asked

    def reply(self, request_id: str) -> Reply | None:
        """The reply to ``request_id``, once it came (handed out once)."""
        return self._replies.pop(request_id, None)

    def give_up(self, request_id: str) -> None:
        """No more waiting for this reply; offers kept for no request are dead-lettered."""
        self._pending.pop(request_id, None)
        self._replies.pop(request_id, None)
        if not self._pending:
            self._drop_early()

    def expecting(self, stream_id: str) -> bool:
        """An accepted stream whose offer may still come."""
        return stream_id in self._expected

    def done_with(self, stream_id: str) -> None:
        self._expected.pop(stream_id, None)

    def _drop_early(self) -> None:
        """Offers kept for a reply that never came are not for us."""
        for delivery in self._early.values():
            reason = "offer on the private queue of a retriever for no request of its"
            dead_letter(self._core.control, self._core.topology, delivery, reason)
        self._early.clear()

    def _on_private(self, delivery: Delivery) -> None:
        props = delivery.props
        try:
            message = parse(props.type, props.headers)
        except ProtocolError as e:
            dead_letter(self._core.control, self._core.topology, delivery, str(e))
            return
        if isinstance(message, Reply):
            self._on_reply(message)
        elif isinstance(message, Offer) and message.stream_id in self._expected:
            self._take(message.stream_id, delivery)
        elif isinstance(message, Abort) and message.stream_id in self._expected:
            # An accepted stream that ended before it started for us (a shared upload that
            # failed before this request could join it): fail now, not after the timeout.
            asked = self._expected.pop(message.stream_id)
            detail = f"{asked.owner} gave up before sending it: {message.reason}"
            failed = TransferFailed(asked.owner, message.stream_id, FailureCode.ABORTED, detail)
            self._core.table.outcomes.append(failed)
        elif isinstance(message, Offer) and self._pending and len(self._early) < MAX_EARLY:
            self._early[message.stream_id] = delivery
        else:
            reason = f"unexpected {props.type} on the private queue of a retriever"
            dead_letter(self._core.control, self._core.topology, delivery, reason)

    def _on_reply(self, reply: Reply) -> None:
        asked = self._pending.get(reply.request_id)
        if asked is None:
            return  # the answer to a request we gave up on
        self._replies[reply.request_id] = reply
        if reply.ok and reply.stream_id:
            # Expect the offer now: it may come in the same batch of events as this reply.
            self._expected[reply.stream_id] = asked
            early = self._early.pop(reply.stream_id, None)
            if early is not None:
                self._take(reply.stream_id, early)

    def _take(self, stream_id: str, delivery: Delivery) -> None:
        asked = self._expected[stream_id]
        self._core.take_offer(
            delivery, timeout=asked.timeout, requested=asked.name, kept=asked.kept
        )
