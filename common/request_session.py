"""The requesting side of retrievals, without I/O: what a retriever asks, what answers count,
and when it gives up.

A :class:`RequestSession` holds the retrievals of one retriever. Each is asked with a
``request`` to the owner's service queue; the owner answers on the retriever's private reply
queue with a ``reply`` (accepted: a stream id; or refused: a code) and, on another connection,
the ``offer`` of that stream, which can overtake its reply: it is held (at most
:data:`MAX_EARLY`) until the reply says whether it is ours. Once the offer is taken, the stream
is a stream like any other (its :class:`~objstream.common.receive_session.ReceiveSession`).

Only what the owner asked sent counts: a reply, offer or abort must come with an answer's key
naming that owner and from a user that speaks for it (:mod:`.identity`); anything else on the
private queue is dead-lettered. A retrieval fails after its timeout without a reply, or without
the offer of the promised stream. After a lost connection the private queue is gone with what
was in it: an unanswered request is published again, and one whose offer had not come yet is
asked again under a new request id (at most :data:`MAX_ASKS` asks).

A list request (:meth:`RequestSession.ask_list`) is answered by one reply whose body lists
what the owner serves the requester (:mod:`.listing`); it ends the request. Its body is
validated here, and so is a reply to it that does not even parse: from the owner asked, it
fails the request at once (:class:`~objstream.common.errors.ListingFailed`) rather than
leaving it to time out, and is acked, not dead-lettered: the caller reports it. An owner
that does not know list requests (an older objstream) refuses them ``unsupported``, which
says just that.

Feed it parsed messages and clock ticks; carry out the actions it returns, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from objstream.common.admission import Asked, Kept
from objstream.common.errors import (
    FailureCode,
    ListingFailed,
    ObjstreamError,
    ProtocolError,
    Refused,
    TimedOut,
    TransferFailed,
)
from objstream.common.identity import Forged, Identities, answer_publisher
from objstream.common.listing import Listing, decode_listing
from objstream.common.protocol import (
    LIST_KIND,
    Abort,
    Envelope,
    MessageType,
    Offer,
    Reply,
    Request,
    new_stream_id,
    parse,
)

MAX_EARLY = 16
"""Offers held while waiting for the reply that names them."""
MAX_ASKS = 3
"""Requests for one retrieval, when lost connections lose its offer."""

Kind = Literal["file", "container"]


# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """A part of an object to ask for: a container's entries whose names match one of
    ``keys`` (glob patterns, checked by :func:`~objstream.common.protocol.check_keys`), or a
    file's bytes ``byte_range`` (start, end exclusive)."""

    keys: Sequence[str] | None = None
    byte_range: tuple[int, int] | None = None

    def fields(self) -> dict[str, Any]:
        """The request's fields that ask for it."""
        fields: dict[str, Any] = {}
        if self.keys is not None:
            fields["keys"] = list(self.keys)
        if self.byte_range is not None:
            fields["range_start"], fields["range_end"] = self.byte_range
        return fields


@dataclass(frozen=True)
class PublishRequest:
    """Publish ``request`` to ``owner``'s service queue; it expires after ``expiration_s``."""

    owner: str
    request: Request
    expiration_s: float


@dataclass(frozen=True)
class TakeOffer:
    """Start the stream of the offer just fed in (or held under ``stream_id``): admit it as a
    retrieval of ``asked`` that fails after ``timeout`` s without data."""

    handle: str
    stream_id: str
    asked: Asked
    name: str
    timeout: float
    held: bool


@dataclass(frozen=True)
class HoldOffer:
    """Keep the offer just fed in, unacked, under ``stream_id``: its reply has not come yet."""

    stream_id: str


@dataclass(frozen=True)
class DropHeld:
    """Dead-letter the offer held under ``stream_id``: no reply of ours names it."""

    stream_id: str
    reason: str


@dataclass(frozen=True)
class Reject:
    """Dead-letter the message just fed in."""

    reason: str


@dataclass(frozen=True)
class Ack:
    """The message just fed in is handled."""


Action = PublishRequest | TakeOffer | HoldOffer | DropHeld | Reject | Ack


# -- the retrievals -------------------------------------------------------------------------------


@dataclass
class Retrieval:
    """One retrieval: what was asked, of whom, and how far it got."""

    handle: str
    """The first request's id: how the caller names it."""
    request: Request
    owner: str
    timeout: float
    deadline: float
    kept: Kept | None = None
    asks: int = 1
    stream_id: str | None = None
    """The promised stream, once a reply accepted."""
    started: bool = False
    """The offer was taken: the stream's own session goes on from here."""
    error: ObjstreamError | None = None
    listing: Listing | None = None
    """A list request's answer, once it came."""

    @property
    def asked(self) -> Asked:
        return Asked(self.owner, self.kept)


@dataclass
class RequestSession:
    """The retrievals of one retriever (``site``), in flight."""

    site: str
    identities: Identities = field(default_factory=Identities)
    new_id: Callable[[], str] = new_stream_id
    _by_handle: dict[str, Retrieval] = field(default_factory=dict)
    _by_request: dict[str, Retrieval] = field(default_factory=dict)
    _by_stream: dict[str, Retrieval] = field(default_factory=dict)
    _held: list[str] = field(default_factory=list)  # stream ids of early offers, oldest first

    # -- the caller ------------------------------------------------------------------------------

    def ask(
        self,
        kind: Kind,
        name: str,
        owner: str,
        *,
        timeout: float,
        now: float,
        kept: Kept | None = None,
        prefix_sha256: str | None = None,
        selection: Selection | None = None,
    ) -> tuple[str, list[Action]]:
        """Ask ``owner`` for object ``name``; returns the retrieval's handle and what to do.

        With ``kept`` (a prefix of the same file kept here, hashing to ``prefix_sha256``), the
        request says where to resume, and the owner sends only the rest if its file still
        starts the same way. With a ``selection``, the owner sends only that part of the object
        (never a resume).
        """
        fields = {} if selection is None else selection.fields()
        if selection is not None:
            kept = None
        if kept is not None and kind == "file" and prefix_sha256 is not None:
            fields |= {
                "resume_from": kept.stored,
                "chunk_size": kept.chunk_size,
                "prefix_sha256": prefix_sha256,
            }
        else:
            kept = None
        request = Request(
            request_id=self.new_id(), kind=kind, name=name, requester=self.site, **fields
        )
        retrieval = Retrieval(request.request_id, request, owner, timeout, now + timeout, kept)
        self._by_handle[retrieval.handle] = retrieval
        self._by_request[request.request_id] = retrieval
        return retrieval.handle, [PublishRequest(owner, request, timeout)]

    def ask_list(
        self,
        owner: str,
        *,
        of: Kind | None,
        prefix: str,
        timeout: float,
        now: float,
    ) -> tuple[str, list[Action]]:
        """Ask ``owner`` what it serves this site (of kind ``of``, None: both; names that
        begin with ``prefix``); returns the request's handle (its :class:`Retrieval` gets
        ``listing`` or ``error``) and what to do."""
        request = Request(
            request_id=self.new_id(), kind=LIST_KIND, name=prefix, of=of, requester=self.site
        )
        retrieval = Retrieval(request.request_id, request, owner, timeout, now + timeout)
        self._by_handle[retrieval.handle] = retrieval
        self._by_request[request.request_id] = retrieval
        return retrieval.handle, [PublishRequest(owner, request, timeout)]

    def state(self, handle: str) -> Retrieval:
        return self._by_handle[handle]

    def finish(self, handle: str) -> list[Action]:
        """The caller is done with ``handle`` (its stream ended, or it gave up): forget it; held
        offers no retrieval can claim any more are dead-lettered."""
        retrieval = self._by_handle.pop(handle, None)
        if retrieval is None:
            return []
        self._by_request.pop(retrieval.request.request_id, None)
        if retrieval.stream_id is not None:
            self._by_stream.pop(retrieval.stream_id, None)
        if any(
            r.stream_id is None and r.request.kind != LIST_KIND for r in self._by_handle.values()
        ):
            return []
        held, self._held = self._held, []
        reason = "offer on the private queue of a retriever for no request of its"
        return [DropHeld(sid, reason) for sid in held]

    # -- events -----------------------------------------------------------------------------------

    def receive(
        self,
        message_type: str | None,
        headers: Mapping[str, Any] | None,
        envelope: Envelope,
        now: float,
        body: bytes = b"",
    ) -> list[Action]:
        """A message from the private reply queue (``body``: what it carried, which only the
        reply to a list request may)."""
        try:
            try:
                message = parse(message_type, headers)
            except ProtocolError as e:
                return self._unparsed_listing(message_type, headers, envelope, e)
            if isinstance(message, Reply):
                return self._on_reply(message, envelope, body)
            if isinstance(message, Offer):
                return self._on_offer(message, envelope)
            if isinstance(message, Abort):
                return self._on_abort(message, envelope)
            raise ProtocolError(f"unexpected {message_type} on the private queue of a retriever")
        except ProtocolError as e:
            return [Reject(str(e))]

    def tick(self, now: float) -> None:
        """Fail the retrievals whose reply, or promised offer, did not come in time."""
        for retrieval in self._by_handle.values():
            if retrieval.error is not None or retrieval.started or now <= retrieval.deadline:
                continue
            if retrieval.listing is not None:
                continue
            request = retrieval.request
            if request.kind == LIST_KIND:
                detail = f"site {retrieval.owner!r} did not answer the list request"
                key = request.request_id
            elif retrieval.stream_id is None:
                detail = f"site {retrieval.owner!r} did not answer the request for {request.name!r}"
                key = request.request_id
            else:
                detail = "the accepted stream never started"
                key = retrieval.stream_id
            retrieval.error = TimedOut(retrieval.owner, key, retrieval.timeout, detail)

    def reconnected(self, now: float) -> list[Action]:
        """A new connection, and a new private queue: what the old one held is gone. Publish
        unanswered requests again, and ask again (new id) where the offer had not come."""
        actions: list[Action] = []
        self._held.clear()
        for retrieval in self._by_handle.values():
            if retrieval.error is not None or retrieval.started or retrieval.listing is not None:
                continue
            if retrieval.stream_id is not None:
                if retrieval.asks >= MAX_ASKS:
                    continue  # it times out
                self._by_stream.pop(retrieval.stream_id, None)
                retrieval.stream_id = None
                retrieval.asks += 1
                del self._by_request[retrieval.request.request_id]
                retrieval.request = retrieval.request.model_copy(
                    update={"request_id": self.new_id()}
                )
                self._by_request[retrieval.request.request_id] = retrieval
                retrieval.deadline = now + retrieval.timeout
            actions.append(PublishRequest(retrieval.owner, retrieval.request, retrieval.timeout))
        return actions

    def started(self, stream_id: str) -> None:
        """The offer of ``stream_id`` was taken (its stream runs): no more waiting for it."""
        retrieval = self._by_stream.get(stream_id)
        if retrieval is not None:
            retrieval.started = True

    def refused(self, stream_id: str, error: TransferFailed) -> None:
        """The offer of ``stream_id`` was refused here (too large, a resume that does not
        continue...): the retrieval fails with it."""
        retrieval = self._by_stream.get(stream_id)
        if retrieval is not None:
            retrieval.error = error

    # -- inside -----------------------------------------------------------------------------------

    def _authentic(self, what: str, retrieval: Retrieval, envelope: Envelope) -> None:
        self.identities.check_answer(
            what, retrieval.owner, envelope.routing_key, envelope.user_id, envelope.via
        )

    def _on_reply(self, reply: Reply, envelope: Envelope, body: bytes) -> list[Action]:
        retrieval = self._by_request.get(reply.request_id)
        if (
            retrieval is None
            or retrieval.stream_id is not None
            or retrieval.error is not None
            or retrieval.listing is not None
        ):
            return [Ack()]  # the answer to a request given up on, or a repeat
        self._authentic(f"reply to request {reply.request_id}", retrieval, envelope)
        if retrieval.request.kind == LIST_KIND:
            return self._on_listing(retrieval, reply, body)
        if reply.listed is not None or body:
            raise ProtocolError(f"reply to request {reply.request_id} lists, or has a body")
        if not reply.ok or reply.stream_id is None:
            code = reply.code or FailureCode.PROTOCOL
            retrieval.error = Refused(retrieval.owner, retrieval.request.name, code, reply.detail)
            return [Ack()]
        retrieval.stream_id = reply.stream_id
        self._by_stream[reply.stream_id] = retrieval
        actions: list[Action] = [Ack()]
        if reply.stream_id in self._held:  # the offer overtook its reply
            self._held.remove(reply.stream_id)
            actions.append(self._take(retrieval, held=True))
        return actions

    def _take(self, retrieval: Retrieval, *, held: bool) -> TakeOffer:
        assert retrieval.stream_id is not None
        return TakeOffer(
            retrieval.handle,
            retrieval.stream_id,
            retrieval.asked,
            retrieval.request.name,
            retrieval.timeout,
            held,
        )

    def _on_offer(self, offer: Offer, envelope: Envelope) -> list[Action]:
        retrieval = self._by_stream.get(offer.stream_id)
        if retrieval is not None:
            if retrieval.started:
                return [Ack()]  # a repeated offer of a stream under way
            self._authentic(f"offer of stream {offer.stream_id}", retrieval, envelope)
            return [self._take(retrieval, held=False)]
        waiting = {
            r.owner
            for r in self._by_handle.values()
            if r.stream_id is None and r.request.kind != LIST_KIND  # no offer answers a list
        }
        publisher = answer_publisher(envelope.routing_key)
        if publisher not in waiting:
            raise Forged(
                f"offer of stream {offer.stream_id} from {publisher!r}, asked "
                f"{', '.join(sorted(waiting)) or 'nobody'}"
            )
        if len(self._held) >= MAX_EARLY or offer.stream_id in self._held:
            raise ProtocolError(f"offer of stream {offer.stream_id} before its reply: too many")
        self._held.append(offer.stream_id)
        return [HoldOffer(offer.stream_id)]

    def _on_abort(self, abort: Abort, envelope: Envelope) -> list[Action]:
        retrieval = self._by_stream.get(abort.stream_id)
        if retrieval is None or retrieval.started or retrieval.error is not None:
            return [Ack()]  # a stream under way hears its abort on its data queue
        self._authentic(f"abort of stream {abort.stream_id}", retrieval, envelope)
        # An accepted stream that ended before it started for us (a shared upload that failed
        # before this request could join it): fail now, not after the timeout.
        detail = f"{retrieval.owner} gave up before sending it: {abort.reason}"
        retrieval.error = TransferFailed(
            retrieval.owner, abort.stream_id, FailureCode.ABORTED, detail
        )
        return [Ack()]

    def _on_listing(self, retrieval: Retrieval, reply: Reply, body: bytes) -> list[Action]:
        """The owner's answer to a list request (authentic): the listing, or why not."""
        owner = retrieval.owner
        if not reply.ok:
            code = reply.code or FailureCode.PROTOCOL
            retrieval.error = ListingFailed.refused(owner, code, reply.detail)
            return [Ack()]
        try:
            if reply.listed is None:
                raise ProtocolError("an accepting reply without listed")
            objects = decode_listing(body, reply.listed)
        except ProtocolError as e:
            # Not dead-lettered: the caller reports it, once.
            retrieval.error = ListingFailed.invalid(owner, str(e))
            return [Ack()]
        retrieval.listing = Listing(owner, objects, bool(reply.truncated))
        return [Ack()]

    def _unparsed_listing(
        self,
        message_type: str | None,
        headers: Mapping[str, Any] | None,
        envelope: Envelope,
        error: ProtocolError,
    ) -> list[Action]:
        """A message that does not parse: dead-lettered; if it is the reply to one of our list
        requests from the owner asked, that request fails now with it."""
        request_id = headers.get("request_id") if isinstance(headers, Mapping) else None
        retrieval = self._by_request.get(request_id) if isinstance(request_id, str) else None
        if (
            message_type == MessageType.REPLY
            and retrieval is not None
            and retrieval.request.kind == LIST_KIND
            and retrieval.error is None
            and retrieval.listing is None
        ):
            self._authentic(f"reply to request {request_id}", retrieval, envelope)
            retrieval.error = ListingFailed.invalid(retrieval.owner, str(error))
            return [Ack()]  # the caller reports it: not dead-lettered as well
        return [Reject(str(error))]
