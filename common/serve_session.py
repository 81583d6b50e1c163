"""The serving side of retrievals, without I/O: which requests a site answers, how, and with
which stream.

A :class:`ServeSession` takes each request from the site's service queue and decides, in this
order (the driver only looks things up and carries the actions out):

1. a message that is no v2 request, or one that cannot be answered safely (its ``reply_to``
   names another site than its ``requester``, or it names no user), is dead-lettered; one that
   can be answered but does not parse (a kind this version does not serve, another protocol
   version) is refused (``unsupported`` / ``unsupported_version``) rather than left to time out;
2. a requester whose broker user does not speak for the site it claims: ``forbidden``;
3. a list request (``kind=list``): the driver finds what is served (:class:`Catalogue`), and
   the reply lists what the requester's user may retrieve (:meth:`ServeSession.catalogued`);
   nothing else below applies to it;
4. a resume of a container, or in chunks under :data:`MIN_RESUME_CHUNK`: ``unsupported``;
5. the object, looked up by the driver (:class:`LookUp`): ``not_found`` /
   ``outside_source_dir`` as it reports; a user the object's allow list does not name:
   ``forbidden``; more than ``max_object_size``: ``too_large``;
6. a request for an object being sent (not resuming, from a site not in that stream yet) joins
   that stream: one upload for every requester (:class:`Join`);
7. otherwise a serving slot (:mod:`.slots`): a user holding its share gets ``busy``; else the
   stream starts (:class:`Start`), and its slot is released when the driver says it
   :meth:`ServeSession.ended`. The stream's own session lets go of a requester that does not
   make first contact within ``contact_timeout`` (see :class:`~.send_table.Pacing`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from objstream.common.admission import check_answerable
from objstream.common.errors import FailureCode, ProtocolError
from objstream.common.identity import Forged, Identities
from objstream.common.listing import MAX_LISTED, MAX_LISTING_BYTES, encode_item, encode_listing
from objstream.common.protocol import (
    LIST_KIND,
    PROTOCOL_VERSION,
    VERSION_HEADER,
    Envelope,
    Reply,
    Request,
    UnsupportedVersion,
    new_stream_id,
    parse,
)
from objstream.common.slots import Room, Slots

MIN_RESUME_CHUNK = 4096
"""Bytes: the smallest chunk size a resumed retrieval may ask for."""
MAX_EXAMINED = 10 * MAX_LISTED
"""Objects one list request looks at, at most, however few of them it lists."""


# -- what the driver reports of an object --------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """The object a request names exists here."""

    size: int | None
    entries: int | None = None
    allow: frozenset[str] | None = None
    """Broker users that may retrieve it (None: anyone)."""


class Absent(StrEnum):
    """Why the object a request names cannot be served, as the driver found it."""

    NOT_SERVED = "not_served"  # no such container, no such file, no files served at all
    OUTSIDE = "outside"  # a name that is absolute, or leads out of the source dir
    UNREADABLE = "unreadable"  # there, but it cannot be opened (or its name is too long)


@dataclass(frozen=True)
class Missing:
    """The object a request names is not served here (``detail`` says what was looked for)."""

    why: Absent
    detail: str

    @property
    def code(self) -> FailureCode:
        return (
            FailureCode.OUTSIDE_SOURCE_DIR if self.why is Absent.OUTSIDE else FailureCode.NOT_FOUND
        )


@dataclass(frozen=True)
class Listed:
    """One object the driver found to list (``entries``: a container's)."""

    kind: str
    name: str
    size: int
    entries: int | None = None


@dataclass(frozen=True)
class Shelf:
    """Objects served under one allow list (``None``: anyone may retrieve them); ``objects``
    may be lazy (a walk of the source dir): it is read only as far as the listing needs."""

    allow: frozenset[str] | None
    objects: Iterable[Listed]


# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reject:
    """Dead-letter the request just fed in."""

    reason: str


@dataclass(frozen=True)
class SendReply:
    """Answer the requester (``reply_to`` is its private queue), with ``body`` (a listing)."""

    reply_to: str
    reply: Reply
    body: bytes = b""


@dataclass(frozen=True)
class LookUp:
    """Find the object ``request`` names, then report it (:meth:`ServeSession.looked_up`)."""

    request: Request
    reply_to: str
    user: str


@dataclass(frozen=True)
class Catalogue:
    """Find what is served (of ``request.of``, names beginning with ``request.name``), then
    report it (:meth:`ServeSession.catalogued`)."""

    request: Request
    reply_to: str
    user: str


@dataclass(frozen=True)
class Start:
    """Stream the object (looked up already) as ``stream_id`` to the requester; ``shared``:
    others may join it."""

    stream_id: str
    request: Request
    reply_to: str
    shared: bool


@dataclass(frozen=True)
class Join:
    """Add the requester to stream ``stream_id`` of the same object, under way, and then send
    it ``reply``; if that stream is over already, tell :meth:`ServeSession.join_failed`."""

    stream_id: str
    lookup: LookUp
    found: Found
    reply: Reply


Action = Reject | SendReply | LookUp | Catalogue | Start | Join


@dataclass
class _Shared:
    stream_id: str
    sites: set[str]


@dataclass
class ServeSession:
    """The serving policy of one site.

    Args:
        site: this site.
        slots: the serving slots (``max_streams``, ``user_share``).
        max_object_size: the most bytes it serves in one object.
        identities: which user speaks for which site.
        new_id: makes stream ids.
    """

    site: str
    slots: Slots
    max_object_size: int
    identities: Identities = field(default_factory=Identities)
    new_id: Callable[[], str] = new_stream_id
    accepted: int = 0
    refused: int = 0
    joined: int = 0
    listings: int = 0
    _shared: dict[tuple[str, str], _Shared] = field(default_factory=dict)

    # -- events -----------------------------------------------------------------------------------

    def request(
        self, message_type: str | None, headers: Mapping[str, Any] | None, envelope: Envelope
    ) -> list[Action]:
        """A delivery from the service queue."""
        try:
            request = parse(message_type, headers)
            if not isinstance(request, Request):
                raise ProtocolError(f"unexpected {message_type} message on a service queue")
            reply_to = self._answerable(request.requester, envelope)
        except ProtocolError as e:
            return self._unparsed(e, headers, envelope)
        user = envelope.user_id or ""
        try:
            self.identities.check_claim(
                f"request {request.request_id}",
                request.requester,
                envelope.user_id,
                envelope.via,
            )
        except Forged as e:
            return self._refuse(request, reply_to, user, FailureCode.FORBIDDEN, str(e))
        if request.kind == LIST_KIND:
            return [Catalogue(request, reply_to, user)]
        if request.resume_from and request.kind != "file":
            detail = "only files resume; ask for the container whole"
            return self._refuse(request, reply_to, user, FailureCode.UNSUPPORTED, detail)
        if request.resume_from and (request.chunk_size or 0) < MIN_RESUME_CHUNK:
            # The requester picks the chunk size of a resumed stream; not one that costs a
            # message per few bytes.
            return self._refuse(
                request,
                reply_to,
                user,
                FailureCode.UNSUPPORTED,
                f"resuming in chunks of {request.chunk_size} bytes (at least {MIN_RESUME_CHUNK})",
            )
        return [LookUp(request, reply_to, user)]

    def looked_up(self, lookup: LookUp, found: Found | Missing) -> list[Action]:
        """What the driver found for ``lookup``: refuse, join a stream, or start one."""
        request, reply_to, user = lookup.request, lookup.reply_to, lookup.user
        if isinstance(found, Missing):
            return self._refuse(request, reply_to, user, found.code, found.detail)
        if found.allow is not None and user not in found.allow:
            return self._refuse(
                request, reply_to, user, FailureCode.FORBIDDEN, f"user {user!r} may not retrieve it"
            )
        if found.size is not None and found.size > self.max_object_size:
            return self._refuse(
                request,
                reply_to,
                user,
                FailureCode.TOO_LARGE,
                f"{found.size} bytes exceed the limit of {self.max_object_size}",
            )
        shared = self._shared.get((request.kind, request.name))
        whole = _whole(request)  # what a shared stream carries
        if whole and shared is not None and request.requester not in shared.sites:
            shared.sites.add(request.requester)
            self.accepted += 1
            self.joined += 1
            reply = self._accept(request, shared.stream_id, found)
            return [Join(shared.stream_id, lookup, found, reply)]
        return self._start(lookup, found)

    def catalogued(self, catalogue: Catalogue, shelves: Iterable[Shelf]) -> list[Action]:
        """What the driver found to list for ``catalogue``: the reply lists what its user may
        retrieve (allowed, within ``max_object_size``) of the kind and prefix asked, up to
        :data:`~objstream.common.listing.MAX_LISTED` objects in
        :data:`~objstream.common.listing.MAX_LISTING_BYTES`; ``truncated`` if more matched
        (or more than :data:`MAX_EXAMINED` had to be looked at)."""
        request, user = catalogue.request, catalogue.user
        items: list[bytes] = []
        length = 2  # the brackets
        examined = 0
        truncated = False
        for shelf in shelves:
            if truncated:
                break
            if shelf.allow is not None and user not in shelf.allow:
                continue  # not even its names: the user may not retrieve it
            for obj in shelf.objects:
                examined += 1
                if examined > MAX_EXAMINED:
                    truncated = True
                    break
                if (request.of is not None and obj.kind != request.of) or not obj.name.startswith(
                    request.name
                ):
                    continue
                if obj.size > self.max_object_size:
                    continue  # it would be refused too_large
                item = encode_item(obj.kind, obj.name, obj.size, obj.entries)
                if item is None:
                    continue  # a name no request can carry
                if len(items) >= MAX_LISTED or length + len(item) + 1 > MAX_LISTING_BYTES:
                    truncated = True
                    break
                items.append(item)
                length += len(item) + (1 if len(items) > 1 else 0)
        self.listings += 1
        reply = Reply(
            request_id=request.request_id, ok=True, listed=len(items), truncated=truncated
        )
        return [SendReply(catalogue.reply_to, reply, encode_listing(items))]

    def join_failed(self, join: Join) -> list[Action]:
        """The stream ``join`` was for took no more joiners (it was ending): serve the request
        on a stream of its own."""
        self.joined -= 1
        self.accepted -= 1
        self.closed(join.stream_id)
        return self._start(join.lookup, join.found)

    def ended(self, stream_id: str) -> None:
        """Stream ``stream_id`` ended: nobody joins it any more and its slot is free."""
        self.slots.release(stream_id)
        for key, shared in list(self._shared.items()):
            if shared.stream_id == stream_id:
                del self._shared[key]

    def closed(self, stream_id: str) -> None:
        """Stream ``stream_id`` takes no more joiners (it is ending)."""
        for key, shared in list(self._shared.items()):
            if shared.stream_id == stream_id:
                del self._shared[key]

    # -- inside -----------------------------------------------------------------------------------

    def _start(self, lookup: LookUp, found: Found) -> list[Action]:
        request, reply_to, user = lookup.request, lookup.reply_to, lookup.user
        holder = self.identities.principal(user, request.requester)
        if self.slots.room(holder) is not Room.TAKE:
            return self._refuse(
                request, reply_to, user, FailureCode.BUSY, self.slots.describe(holder)
            )
        stream_id = self.new_id()
        self.slots.take(stream_id, holder)
        self.accepted += 1
        shared = _whole(request)
        if shared:
            self._shared[request.kind, request.name] = _Shared(stream_id, {request.requester})
        reply = self._accept(request, stream_id, found)
        return [SendReply(reply_to, reply), Start(stream_id, request, reply_to, shared)]

    @staticmethod
    def _accept(request: Request, stream_id: str, found: Found) -> Reply:
        return Reply(
            request_id=request.request_id,
            ok=True,
            stream_id=stream_id,
            size=found.size,
            entries=found.entries,
        )

    def _refuse(
        self, request: Request, reply_to: str, user: str, code: FailureCode, detail: str
    ) -> list[Action]:
        self.refused += 1
        reply = Reply(request_id=request.request_id, ok=False, code=code, detail=detail[:2000])
        return [SendReply(reply_to, reply)]

    def _answerable(self, requester: str, envelope: Envelope) -> str:
        check_answerable(envelope.reply_to, envelope.user_id, requester, "request")
        assert envelope.reply_to is not None
        return envelope.reply_to

    def _unparsed(
        self, error: ProtocolError, headers: Mapping[str, Any] | None, envelope: Envelope
    ) -> list[Action]:
        """A request that does not parse: refused if it can be answered (it names a request id
        and a requester its reply_to agrees with), dead-lettered otherwise."""
        request_id = headers.get("request_id") if isinstance(headers, Mapping) else None
        requester = headers.get("requester") if isinstance(headers, Mapping) else None
        version = headers.get(VERSION_HEADER) if isinstance(headers, Mapping) else None
        try:
            if not isinstance(requester, str):
                raise ProtocolError("no requester")
            reply_to = self._answerable(requester, envelope)
            reply = Reply(
                request_id=request_id,
                ok=False,
                code=(
                    FailureCode.UNSUPPORTED_VERSION
                    if isinstance(error, UnsupportedVersion)
                    else FailureCode.UNSUPPORTED
                ),
                detail=str(error)[:2000],
            )
        except (ProtocolError, ValidationError):
            return [Reject(str(error))]
        if version != PROTOCOL_VERSION and not isinstance(error, UnsupportedVersion):
            return [Reject(str(error))]
        self.refused += 1
        return [SendReply(reply_to, reply)]


def _whole(request: Request) -> bool:
    """Whether ``request`` asks for the whole object from its start: only such requests share a
    stream (not a resume, nor some entries, nor a byte range)."""
    return not request.resume_from and request.keys is None and request.range_start is None
