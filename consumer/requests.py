"""A retriever's requests, carried out: the thin driver of a
:class:`~objstream.common.request_session.RequestSession`.

A :class:`~objstream.consumer.core.Part` of a :class:`~objstream.consumer.retriever.Retriever`.
Replies and offers come on a private, exclusive reply queue ``NS.reply.SITE.QID`` (a fresh QID
per connection), bound ``reply:SITE:QID:OWNER`` for each owner asked: only what those owners
publish reaches it (and the session checks each message's key and user). It dies with the
connection; the session says what to ask again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from objstream.common.amqp import Delivery
from objstream.common.identity import Identities
from objstream.common.protocol import Envelope, Offer, envelope, new_stream_id, parse
from objstream.common.request_session import (
    Ack,
    Action,
    DropHeld,
    HoldOffer,
    Kind,
    PublishRequest,
    Reject,
    RequestSession,
    Selection,
    TakeOffer,
)
from objstream.common.tls import broker_user
from objstream.consumer.core import ConsumerCore
from objstream.consumer.resume import Resumable

log = logging.getLogger(__name__)


@dataclass
class _Held:
    delivery: Delivery
    offer: Offer
    envelope: Envelope


class RequestTracker:
    """Pending requests, their replies, the streams they announce and early offers."""

    def __init__(self, core: ConsumerCore) -> None:
        self._core = core
        self._user = broker_user(core.settings)
        self.session = RequestSession(core.site, Identities.from_settings(core.settings))
        self._private = ""
        self._queue_id = ""
        self._owners: set[str] = set()
        self._opened = False
        self._held: dict[str, _Held] = {}
        self._kept: dict[str, Resumable] = {}  # handle -> the prefix its stream may continue

    def opened(self) -> None:
        core = self._core
        self._queue_id = new_stream_id()
        self._private = core.topology.declare_reply_queue(
            core.control, core.site, self._queue_id, exclusive=True
        )
        core.control.consume(self._private, self._on_private)
        self._owners = set()
        self._held.clear()  # gone with the old queue
        if self._opened:  # a new connection: what the old queue held is lost
            self._run(self.session.reconnected(time.monotonic()), None)
        self._opened = True

    @property
    def reply_to(self) -> str:
        """The ``reply_to`` of this connection's requests (``reply:SITE:QID``)."""
        return self._core.topology.reply_to(self._core.site, self._queue_id)

    def tick(self) -> None:
        """Between event batches: retrievals that waited too long fail."""
        self.session.tick(time.monotonic())

    # -- the retriever's calls (on the connection's thread) ---------------------------------------

    def ask(
        self,
        kind: Kind,
        name: str,
        owner: str,
        *,
        timeout: float,
        kept: Resumable | None,
        selection: Selection | None = None,
    ) -> str:
        """Ask ``owner`` for ``name`` (only ``selection`` of it, if given); returns the handle of
        the retrieval."""
        handle, actions = self.session.ask(
            kind,
            name,
            owner,
            timeout=timeout,
            now=time.monotonic(),
            kept=None if kept is None else kept.facts(),
            prefix_sha256=None if kept is None else kept.prefix_sha256().copy().hexdigest(),
            selection=selection,
        )
        if kept is not None:
            self._kept[handle] = kept
        self._run(actions, None)
        return handle

    def ask_list(self, owner: str, *, of: Kind | None, prefix: str, timeout: float) -> str:
        """Ask ``owner`` what it serves this site; returns the request's handle."""
        handle, actions = self.session.ask_list(
            owner, of=of, prefix=prefix, timeout=timeout, now=time.monotonic()
        )
        self._run(actions, None)
        return handle

    def finish(self, handle: str) -> None:
        """Done with ``handle``: forget it (held offers nobody can claim are dead-lettered)."""
        self._kept.pop(handle, None)
        self._run(self.session.finish(handle), None)

    # -- messages ---------------------------------------------------------------------------------

    def _on_private(self, delivery: Delivery) -> None:
        props = delivery.props
        env = delivery.envelope
        actions = self.session.receive(
            props.type, props.headers, env, time.monotonic(), delivery.body
        )
        self._run(actions, delivery)

    def _run(self, actions: list[Action], delivery: Delivery | None) -> None:
        for action in actions:
            if isinstance(action, PublishRequest):
                self._publish(action)
            elif isinstance(action, TakeOffer):
                self._take(action, delivery)
            elif isinstance(action, HoldOffer):
                assert delivery is not None
                self._held[action.stream_id] = _held(delivery)
            elif isinstance(action, DropHeld):
                held = self._held.pop(action.stream_id, None)
                if held is not None:
                    held.delivery.reject(action.reason)
            elif isinstance(action, Reject):
                assert delivery is not None
                delivery.reject(action.reason)
            elif isinstance(action, Ack) and delivery is not None:
                delivery.ack()

    def _publish(self, action: PublishRequest) -> None:
        core, owner = self._core, action.owner
        if owner not in self._owners:
            # Let the owner's answers into the reply queue, and make sure its service queue is
            # there so the request waits for a server that starts a little later (until it
            # expires). Under least privilege a site may not declare another site's queue (its
            # administrator did): the refusal closes a channel of its own, and is skipped.
            # Not with declare_peers false (regions: the owner's queue is on its own broker).
            core.topology.bind_reply(core.control, core.site, self._queue_id, owner)
            if core.settings.declare_peers:
                core.topology.declare_if_allowed(
                    core.connection,
                    lambda channel: core.topology.declare_service_queue(channel, owner),
                )
            self._owners.add(owner)
        # A request nobody answers within the timeout is void: the requester has given up.
        # RabbitMQ checks user_id against the connection's user.
        props = envelope(
            action.request,
            persistent=False,
            reply_to=self.reply_to,
            expiration_s=action.expiration_s,
            user_id=self._user,
        )
        core.control.publish(core.topology.exchange, core.topology.service_key(owner), b"", props)

    def _take(self, action: TakeOffer, delivery: Delivery | None) -> None:
        if action.held:
            held = self._held.pop(action.stream_id)
        else:
            assert delivery is not None
            held = _held(delivery)
        delivery, offer, env = held.delivery, held.offer, held.envelope
        core = self._core
        kept = self._kept.get(action.handle)
        decision = core.admission.retrieval(offer, env, action.asked, known=core.table.known)
        started = core.carry_out(
            decision, delivery, timeout=action.timeout, requested=action.name, kept=kept
        )
        if started:
            self.session.started(action.stream_id)


def _held(delivery: Delivery) -> _Held:
    """An offer delivery the session judged already (it parses): with its envelope."""
    props = delivery.props
    offer = parse(props.type, props.headers)
    assert isinstance(offer, Offer)
    env = delivery.envelope
    return _Held(delivery, offer, env)
