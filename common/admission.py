"""Whether a receiver takes an offer, without I/O: an offer and what the receiver knows in, a
decision out.

Every refusal a receiving site can give an offer is decided here, in one order, and nowhere
else (the drivers carry the decision out):

1. the message must be an objstream v2 offer (else it is dead-lettered with the reason);
2. it came where an offer for this site comes: key ``offer:SITE`` into the inbox, or, for a
   retrieval, an answer's key naming the owner asked (``reply:R:QID:OWNER``);
3. it is for this site, its ``reply_to`` names its sender (``reply:SENDER:QID``), it carries the
   publishing user, and only an inline offer has a body: otherwise it cannot be answered
   safely, and is dead-lettered;
4. its broker user speaks for the site it claims as ``sender`` (:mod:`.identity`): otherwise it
   is refused ``forbidden``, so no log or record ever says "from server" for what another site
   sent;
5. an offer of a stream in progress here, or ended lately, is a duplicate: acked, ignored;
6. a push from a user ``accept_from`` does not name: ``forbidden``;
7. more bytes than ``max_object_size``: ``too_large``;
8. a kind this receiver does not take: ``refused``;
9. a resumed offer that does not continue exactly the prefix kept here: ``protocol`` (an offer
   that comes whole while a prefix is kept drops the prefix);
10. pushes only: a stream slot (:mod:`.slots`): take one, wait for one, or ``busy``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from objstream.common.errors import FailureCode, ProtocolError, SaveError
from objstream.common.identity import Forged, Identities
from objstream.common.protocol import (
    FILE_KIND,
    Abort,
    Done,
    Envelope,
    Offer,
    UnsupportedVersion,
    parse,
)
from objstream.common.slots import Room, Slots
from objstream.common.topology import HEX32, Topology


@dataclass(frozen=True)
class Kept:
    """A verified prefix this receiver kept of an earlier stream of the same file."""

    sender: str
    chunk_size: int
    stored: int
    stored_bytes: int


@dataclass(frozen=True)
class Asked:
    """What a retriever asked for: the offer must come from ``owner`` (and may continue
    ``kept``)."""

    owner: str
    kept: Kept | None = None


# -- decisions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accept:
    """Start the stream (``drop_kept``: the kept prefix is no use: the object comes whole)."""

    offer: Offer
    reply_to: str
    user: str
    drop_kept: bool = False
    holder: str = ""
    """Whom its stream slot is counted for (see :meth:`Identities.principal`)."""


@dataclass(frozen=True)
class Refuse:
    """Answer the sender at once with a failed verdict on stream ``stream_id``."""

    stream_id: str
    sender: str
    reply_to: str
    user: str | None
    code: FailureCode
    detail: str

    @classmethod
    def of(
        cls, offer: Offer, reply_to: str, user: str | None, code: FailureCode, detail: str
    ) -> Refuse:
        return cls(offer.stream_id, offer.sender, reply_to, user, code, detail)

    def verdict(self, site: str) -> Done:
        return Done(
            stream_id=self.stream_id,
            site=site,
            ok=False,
            code=self.code,
            detail=self.detail[:2000],
        )


@dataclass(frozen=True)
class Reject:
    """Dead-letter it: it cannot be answered (or is no offer at all)."""

    reason: str


@dataclass(frozen=True)
class Ignore:
    """Ack it and do nothing (a duplicate)."""

    reason: str


@dataclass(frozen=True)
class Hold:
    """Keep it unacked until a slot is free (``holder`` holds its share now)."""

    offer: Offer
    holder: str


@dataclass(frozen=True)
class Withdraw:
    """The sender of stream ``stream_id`` gave up before it heard from this receiver, and
    says so in the inbox where its offer went: end the stream (or drop its held offer) as
    ``aborted``, if broker user ``user`` is the one its offer came from; else nothing."""

    stream_id: str
    user: str
    reason: str


Decision = Accept | Refuse | Reject | Ignore | Hold


def continues(kept: Kept, offer: Offer) -> bool:
    """Does ``offer`` pick up exactly where the kept prefix ends?"""
    return (
        offer.kind == FILE_KIND
        and offer.sender == kept.sender
        and offer.resume_from == kept.stored
        and offer.size is not None
        and offer.chunk_size == kept.chunk_size
        and kept.stored_bytes == min(kept.stored * offer.chunk_size, offer.size)
    )


@dataclass(frozen=True)
class Admission:
    """The offer policy of one receiving site.

    Args:
        site: this site.
        kinds: the kinds it takes (``file``, ``container``, custom ones).
        max_object_size: the most bytes it takes in one object.
        accept_from: broker users whose pushes it takes (empty: anyone's).
        identities: which user speaks for which site.
    """

    site: str
    kinds: frozenset[str]
    max_object_size: int
    accept_from: tuple[str, ...] = ()
    identities: Identities = field(default_factory=Identities)

    def push(
        self,
        message_type: str | None,
        headers: Mapping[str, Any] | None,
        envelope: Envelope,
        *,
        known: Callable[[str], bool],
        slots: Slots | None = None,
        waiting: bool = False,
    ) -> Decision | Withdraw:
        """An offer from this site's inbox (``known``: is a stream in progress here or ended
        lately; ``waiting``: the offer was held for a slot already), or the ``abort`` of a
        sender that gave up before this receiver answered its offer."""
        try:
            if envelope.routing_key not in (Topology.offer_key(self.site), f"site.{self.site}"):
                raise ProtocolError(f"offer with key {envelope.routing_key!r} in an inbox")
            message = parse(message_type, headers)
            if isinstance(message, Abort):
                return Withdraw(message.stream_id, envelope.user_id or "", message.reason)
            offer = _offer(message, message_type)
            reply_to = self._answerable(offer, envelope)
        except UnsupportedVersion as e:
            return self._other_version(e, headers, envelope)
        except ProtocolError as e:
            return Reject(str(e))
        user = envelope.user_id or ""
        refusal = self._claims(offer, envelope) or self._who(offer, user)
        if refusal is not None:
            return Refuse.of(offer, reply_to, user, FailureCode.FORBIDDEN, refusal)
        if known(offer.stream_id):
            return Ignore(f"duplicate offer for stream {offer.stream_id}")
        decision = self._content(offer, reply_to, user, None)
        if not isinstance(decision, Accept) or slots is None:
            return decision
        holder = self.identities.principal(user, offer.sender)
        room = slots.room(holder, waiting=waiting)
        if room is Room.HOLD:
            return Hold(offer, holder)
        if room is Room.BUSY:
            return Refuse.of(offer, reply_to, user, FailureCode.BUSY, slots.describe(holder))
        return Accept(offer, reply_to, user, holder=holder)

    def retrieval(
        self,
        message: Offer,
        envelope: Envelope,
        asked: Asked,
        *,
        known: Callable[[str], bool],
    ) -> Decision:
        """The offer of a stream a retriever was promised (it came on its private queue)."""
        offer = message
        try:
            self.identities.check_answer(
                f"offer of stream {offer.stream_id}",
                asked.owner,
                envelope.routing_key,
                envelope.user_id,
                envelope.via,
            )
            if offer.sender != asked.owner:
                raise Forged(f"offer from site {offer.sender!r}, asked {asked.owner!r}")
            reply_to = self._answerable(offer, envelope)
        except ProtocolError as e:
            return Reject(str(e))
        if known(offer.stream_id):
            return Ignore(f"duplicate offer for stream {offer.stream_id}")
        return self._content(offer, reply_to, envelope.user_id or "", asked.kept)

    def _other_version(
        self, error: UnsupportedVersion, headers: Mapping[str, Any] | None, envelope: Envelope
    ) -> Decision:
        """An offer of another protocol version: answered ``unsupported_version`` when it can
        be (it names a stream id and a sender its v2 ``reply_to`` agrees with, and a user),
        so its sender learns why at once; dead-lettered otherwise."""
        fields = headers if isinstance(headers, Mapping) else {}
        sid, sender = fields.get("stream_id"), fields.get("sender")
        try:
            if not isinstance(sid, str) or not re.fullmatch(HEX32, sid):
                raise ProtocolError("no stream id")
            if not isinstance(sender, str):
                raise ProtocolError("no sender")
            check_answerable(envelope.reply_to, envelope.user_id, sender, "offer")
        except ProtocolError:
            return Reject(str(error))
        assert envelope.reply_to is not None
        return Refuse(
            sid,
            sender,
            envelope.reply_to,
            envelope.user_id,
            FailureCode.UNSUPPORTED_VERSION,
            str(error),
        )

    @staticmethod
    def withdraws(withdraw: Withdraw, offered_by: str | None) -> bool:
        """Whether an ``abort`` in the inbox ends the stream (or the held offer) whose offer
        came from broker user ``offered_by``: only that user may end it this way (another
        site that learned a stream id must not)."""
        return offered_by is not None and withdraw.user == offered_by

    def take_over(self, offer: Offer, user: str | None, *, pushed: bool) -> str | None:
        """May a stream a dead receiver of this directory left go on here? The reason not."""
        if pushed:
            return self._who(offer, user or "")
        return None

    # -- the checks, in order ---------------------------------------------------------------------

    def _answerable(self, offer: Offer, envelope: Envelope) -> str:
        """The offer's ``reply_to``, if the offer can be answered as protocol v2 says.

        Raises:
            ProtocolError: it cannot (the reason).
        """
        if offer.target != self.site:
            raise ProtocolError(f"offer for site {offer.target!r} reached site {self.site!r}")
        check_answerable(envelope.reply_to, envelope.user_id, offer.sender, "offer")
        if envelope.body_length and offer.inline is None:
            raise ProtocolError(f"offer with a {envelope.body_length}-byte body (must be empty)")
        assert envelope.reply_to is not None
        return envelope.reply_to

    def _claims(self, offer: Offer, envelope: Envelope) -> str | None:
        try:
            self.identities.check_claim(
                f"offer of stream {offer.stream_id}", offer.sender, envelope.user_id, envelope.via
            )
        except Forged as e:
            return str(e)
        return None

    def _who(self, offer: Offer, user: str) -> str | None:
        if self.accept_from and user not in self.accept_from:
            return (
                f"site {self.site} takes pushes only from broker users "
                f"{', '.join(self.accept_from)}, not from {user!r}"
            )
        return None

    def _content(self, offer: Offer, reply_to: str, user: str, kept: Kept | None) -> Decision:
        def refuse(code: FailureCode, detail: str) -> Refuse:
            return Refuse.of(offer, reply_to, user, code, detail)

        if offer.size is not None and offer.size > self.max_object_size:
            return refuse(
                FailureCode.TOO_LARGE,
                f"{offer.size} bytes exceed site {self.site}'s limit of {self.max_object_size} "
                "bytes",
            )
        if offer.kind not in self.kinds:
            return refuse(
                FailureCode.REFUSED,
                f"site {self.site} does not receive objects of kind {offer.kind!r}",
            )
        drop = kept is not None and not offer.resume_from
        if offer.resume_from and (kept is None or not continues(kept, offer)):
            return refuse(
                FailureCode.PROTOCOL,
                f"the offer resumes from chunk {offer.resume_from}, but no partial file to match "
                "is kept here",
            )
        return Accept(offer, reply_to, user, drop_kept=drop)

    def storage_failed(self, offer: Offer, reply_to: str, user: str, error: Exception) -> Refuse:
        """The offer was accepted, but its stream cannot be set up here (the partial file, the
        state file, or the assembler): ``io`` for the file system, ``protocol`` for an offer
        the assembler cannot follow, ``refused`` for a container that cannot be stored as asked
        and for a data queue the broker refused."""
        if isinstance(error, OSError):
            code = FailureCode.IO
            detail = f"cannot store {offer.size} bytes: {error.strerror or error}"
        elif isinstance(error, ProtocolError):
            code, detail = FailureCode.PROTOCOL, str(error)
        elif isinstance(error, SaveError):
            code, detail = FailureCode.REFUSED, str(error)
        else:
            code, detail = FailureCode.REFUSED, f"cannot set the stream up: {error}"
        return Refuse.of(offer, reply_to, user, code, detail)


def _offer(message: object, message_type: str | None) -> Offer:
    if not isinstance(message, Offer):
        raise ProtocolError(f"unexpected {message_type} message where offers arrive")
    return message


def check_answerable(reply_to: str | None, user_id: str | None, peer: str, what: str) -> None:
    """Check the envelope of an offer (or a request) from site ``peer``: a v2 ``reply_to``
    (``reply:SITE:QID``) naming ``peer`` itself, and the publishing broker user.

    Raises:
        ProtocolError: the message cannot be answered as protocol v2 says, or names no user.
    """
    if not reply_to:
        raise ProtocolError(f"{what} without reply_to")
    parsed = Topology.parse_reply_to(reply_to)
    if parsed is None:
        raise ProtocolError(f"{what} with reply_to {reply_to!r}, not reply:SITE:QID")
    if parsed[0] != peer:
        raise ProtocolError(
            f"{what} from site {peer!r} with reply_to {reply_to!r} of site {parsed[0]!r}"
        )
    if not user_id:
        raise ProtocolError(f"{what} without user_id")
