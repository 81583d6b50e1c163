"""One send, carried out: the thin driver of a :class:`SendSession` for one object.

A :class:`Transfer` is one call of :meth:`~objstream.producer.sender.StreamSender.send`: it reads
the pieces its session asks for (:class:`~objstream.producer.pieces.PieceReader`), publishes them
through its sender (the connection, with the keys of
:class:`~objstream.common.topology.Topology` and the broker user as ``user_id``), feeds the
session the replies and the clock, and says how each target ended (:class:`TargetResult`).
Nothing about one send lives on the sender.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from objstream.common import checksum
from objstream.common.compression import ChunkEncoder
from objstream.common.delta import offers_delta
from objstream.common.errors import (
    ConfigError,
    ConnectionLost,
    ObjstreamError,
    ProtocolError,
    SendFailed,
    TransferFailed,
)
from objstream.common.federation import arrival_link
from objstream.common.pacing import TokenBucket, pacer
from objstream.common.protocol import Abort, Chunk, End, Inline, Offer, envelope
from objstream.common.protocol import Manifest as ManifestMessage
from objstream.common.send_session import SendSession
from objstream.common.send_table import (
    Action,
    NewChannel,
    Pacing,
    Plan,
    PublishAbort,
    PublishChunk,
    PublishEnd,
    PublishManifest,
    PublishOffer,
    ReleaseBefore,
    ReportProgress,
    SourceFacts,
    TargetFinished,
    facts_of,
    fits_inline,
)
from objstream.common.streaming import Piece
from objstream.producer.answering import Joiners
from objstream.producer.manifests import SourceManifest
from objstream.producer.pieces import PieceReader
from objstream.producer.sources import SourceChanged
from objstream.producer.terms import Quorum as Quorum
from objstream.producer.terms import TargetResult as TargetResult
from objstream.producer.terms import Wire as Wire

if TYPE_CHECKING:
    from objstream.producer.sender import StreamSender

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05  # seconds between looks at the reply queue while publishing


class Transfer:
    """One call of :meth:`StreamSender.send`: a session, the pieces, and what came of them."""

    def __init__(
        self,
        sender: StreamSender,
        reader: PieceReader,
        stream_id: str,
        targets: Sequence[str],
        *,
        start: int,
        pacing: Pacing,
        wire: Wire | None = None,
    ) -> None:
        self.sender = sender
        self.reader = reader
        self.stream_id = stream_id
        self.timeout = pacing.timeout
        self.routes: dict[str, str] = {}  # site -> the reply_to its offer goes to (retrievals)
        facts = facts_of(reader.streamer)
        self.inline_body = b""
        inline = self._inline(facts, start)
        wire = wire or Wire()
        self.encoder = ChunkEncoder(wire.compress)
        self.session = SendSession.create(
            facts,
            targets,
            stream_id=stream_id,
            sender=sender.site,
            pacing=pacing,
            plan=Plan(
                start, inline, self.encoder.active, self._delta(facts, wire.delta, start, inline)
            ),
            identities=sender.identities,
            now=time.monotonic(),
        )
        self.keys: dict[str | None, str] = {None: sender.topology.data_key(stream_id, sender.site)}
        # Bytes a second this transfer publishes at most (None or 0: no limit, nothing asked).
        self.rate_limit = wire.rate_limit
        self.pacer: TokenBucket | None = None  # from when the data starts (see _paced)
        # For counting resends: how far each route (None: the broadcast) was published, and
        # how far the broadcast was when each late joiner joined (it missed what came before).
        self._upto: dict[str | None, int] = {}
        self._joined_at: dict[str, int] = {}
        self.quorum: Quorum | None = None
        self.stragglers: list[str] = []  # targets still going when a k-of-N send returned
        self._published_before = sender.bytes_published  # one transfer at a time per sender
        self.manifest = SourceManifest(reader, lambda: sender.process_events(0))

    @staticmethod
    def _delta(facts: SourceFacts, wanted: bool, start: int, inline: Inline | None) -> bool:
        """May this send go as a delta (only to targets that ask)? Not a resumed one, not one
        in its offer, and only a source that reads any chunk again."""
        shape = offers_delta(
            random_access=facts.random_access,
            chunk_size=facts.chunk_size,
            chunk_count=facts.chunk_count,
        )
        return wanted and shape and start == 0 and inline is None

    def _inline(self, facts: SourceFacts, start: int) -> Inline | None:
        """The object itself, if it rides inside the offer (one message, no data queue)."""
        if not fits_inline(facts, start):
            return None
        piece = self.reader.get(0) if facts.chunk_count else Piece(b"")
        assert piece is not None
        self.inline_body = piece.data
        return Inline(
            crc32=checksum.crc32(piece.data),
            sha256=self.reader.digest.hexdigest(),
            meta=dict(piece.meta) if piece.meta else None,
        )

    def _key(self, to: str | None) -> str:
        key = self.keys.get(to)
        if key is None:
            key = self.keys[to] = self.sender.topology.data_key(
                self.stream_id, self.sender.site, to
            )
        return key

    def run(
        self, joiners: Joiners | None = None, quorum: Quorum | None = None
    ) -> list[TargetResult]:
        """Drive the send until every target ended, or with a ``quorum`` until enough
        verified (then :attr:`stragglers` names the others, and :meth:`finish` goes on)."""
        sender, session, source = self.sender, self.session, self.reader.streamer
        if quorum is not None and not 1 <= quorum.min_targets <= len(session.targets):
            raise ConfigError(
                f"min_targets must be between 1 and the number of targets "
                f"({len(session.targets)}), not {quorum.min_targets}"
            )
        self.quorum = quorum
        sender.replies.clear()  # replies to earlier sends, if any, are stale
        self._do(session.start_actions())
        log.info(
            "streaming %s %r (%s bytes, %s chunks) to %s as stream %s",
            source.kind,
            source.name,
            source.size,
            source.chunk_count,
            ", ".join(t.site for t in session.targets),
            self.stream_id,
        )
        self._drive(joiners)
        return self._results()

    def finish(self) -> list[TargetResult]:
        """After a k-of-N send returned: drive the stragglers to their end; their results."""
        self._drive(None)
        return [r for r in self._results(raising=False) if r.site in self.stragglers]

    def _drive(self, joiners: Joiners | None) -> None:
        sender, session, source = self.sender, self.session, self.reader.streamer
        while True:
            try:
                if joiners is not None:
                    self._take_joiners(joiners)
                if session.finished and (joiners is None or joiners.close_if_idle()):
                    break
                if self._enough():
                    break
                self._turn()
            except ConnectionLost as e:
                sender.recover(e, self.timeout)
                active = [t for t in session.targets if t.active]
                self._do(session.reconnected(time.monotonic()))
                log.info(
                    "reconnected to %s; %d target(s) go on", sender.connection.url, len(active)
                )
            except KeyboardInterrupt:  # tell every target now, not after its timeout
                with contextlib.suppress(ObjstreamError):  # an unusable connection: it times out
                    self._do(session.cancel(f"site {sender.site} was interrupted"))
                raise
            except (SourceChanged, OSError) as e:
                # What was read is not what is there now (or no longer reads): every target is
                # told at once, none verifies a mix of old and new bytes.
                log.info("%s %r: %s", source.kind, source.name, e)  # in every target's result
                changed = isinstance(e, SourceChanged)
                self._do(session.source_failed(str(e), changed=changed))
                break

    def _enough(self) -> bool:
        """A k-of-N send: True when it returns now, the stragglers going on (or told to stop,
        then it returns when they ended); if too many failed, the rest are told to stop."""
        quorum = self.quorum
        if quorum is None or self.stragglers:
            return False
        reached = self.session.quorum(quorum.min_targets)
        if reached is False:
            self._do(self.session.quorum_lost(quorum.min_targets))
        elif reached and quorum.cancel_stragglers:
            self._do(self.session.stragglers_cancelled(quorum.min_targets))
        elif reached:
            self.stragglers = [t.site for t in self.session.targets if t.active]
            return True
        return False

    def _take_joiners(self, joiners: Joiners) -> None:
        for site, reply_to in joiners.take():
            try:
                actions = self.session.add_target(site, time.monotonic())
            except ValueError as e:
                # It joined as the stream ended (or an iterator moved on): it was told ok,
                # so tell it now, not after its timeout.
                log.info("%s could not join stream %s: %s", site, self.stream_id, e)
                abort = Abort(stream_id=self.stream_id, reason=f"the stream ended: {e}")
                key = self.sender.topology.reply_key(reply_to, self.sender.site)
                self.sender.publish(key, b"", envelope(abort))
                continue
            self.routes[site] = reply_to
            self._joined_at[site] = self._upto.get(None, 0)
            self._do(actions)

    def _results(self, *, raising: bool = True) -> list[TargetResult]:
        """Every ended target's result (all of them but the stragglers of a k-of-N send).

        Raises:
            SendFailed: a target failed (of a k-of-N send: fewer than k verified).
        """
        session = self.session
        sha256 = self._sha256()  # once, not per target
        results = [
            self._result(t.site, t.error, t.stored_as, sha256)
            for t in session.targets
            if not t.active
        ]
        failures = [r.error for r in results if r.error is not None]
        quorum = self.quorum
        failed = failures if quorum is None else session.verified < quorum.min_targets
        if raising and failed:
            raise SendFailed(failures, list(results))
        return results

    def _sha256(self) -> str:
        """The source's digest, once it was read through ("" if it was not)."""
        reader = self.reader
        complete = reader.count is not None and reader.digest.hashed == reader.count
        return reader.digest.hexdigest() if complete else ""

    def _result(
        self, site: str, error: TransferFailed | None, stored_as: str | None, sha256: str
    ) -> TargetResult:
        ok = error is None
        size, published = self.reader.size, self.sender.bytes_published - self._published_before
        target = next(t for t in self.session.targets if t.site == site)
        reused = self.manifest.reused(target)
        return TargetResult(
            site, self.stream_id, ok, size, sha256, stored_as, error, published, reused
        )

    def _turn(self) -> None:
        """One round: take replies, check silences, publish what the windows allow."""
        sender, session = self.sender, self.session
        # Replies first: a verdict that came in before the signal counts (a target that
        # stored the object is not told it was aborted, nor reported so).
        self._take_replies()
        if sender.cancel is not None and sender.cancel.is_set():
            self._do(session.cancel(f"site {sender.site} {sender.cancel_reason}"))
            return
        self._do(session.tick(time.monotonic()))
        began = time.monotonic()
        more = False
        wait = POLL_INTERVAL
        while not session.finished:
            if self.rate_limit and (paced := self._paced()) > 0:
                wait = min(wait, paced)  # the connection works (heartbeats, replies) meanwhile
                break
            if self.encoder.holds(time.monotonic()):  # --compress auto: is the link slow?
                break
            actions = session.next_publications()
            if not actions:
                break
            self._do(actions)
            # Slow reads must not keep replies waiting: a receiver that gave up (or asked for a
            # resend) is heard within POLL_INTERVAL, not one window.
            if time.monotonic() - began > POLL_INTERVAL:
                more = True
                break
        if session.finished:
            return  # every verdict is in: waiting for more events would only add latency
        sender.process_events(0 if more else wait)

    def _paced(self) -> float:
        """Seconds the rate limit holds the next publication back (0: it may go now).

        The bucket starts empty when the broadcast starts, not at the offers: the time a
        receiver takes to answer is no credit for a burst at the start."""
        now = time.monotonic()
        if self.pacer is None:
            if not self.session.started:
                return 0.0
            self.pacer = pacer(self.rate_limit, self.reader.streamer.chunk_size, now)
        return self.pacer.wait(now) if self.pacer is not None else 0.0

    def _take_replies(self) -> None:
        replies = self.sender.replies
        while replies:
            message, delivery = replies.popleft()
            user = delivery.props.user_id
            try:
                now = time.monotonic()
                actions = self.session.receive(
                    message,
                    now,
                    key=delivery.routing_key,
                    user=user,
                    via=arrival_link(delivery.props.headers),
                )
            except ProtocolError as e:  # forged, or no reply at all
                delivery.reject(str(e))
                continue
            delivery.ack()
            self._do(actions)

    # -- actions ----------------------------------------------------------------------------------

    def _do(self, actions: list[Action]) -> None:
        sender = self.sender
        for action in actions:
            match action:
                case PublishChunk(seq=seq, to=to, encoded=encoded):
                    self._publish_chunk(seq, to, encoded=encoded)
                case PublishOffer():
                    self._publish_offer(action.offer, action.expiration_ms)
                case PublishEnd(to=to):
                    self._publish_end(to)
                case PublishManifest(to=to):
                    self._publish_manifest(to)
                case PublishAbort():
                    self._publish_abort(action)
                case ReleaseBefore(seq=seq):
                    self.reader.release_before(seq)
                case ReportProgress():
                    self._report(action)
                case TargetFinished(site=site, error=error, stored_as=stored_as):
                    # The session's table holds the outcome (logged there); a straggler of a
                    # k-of-N send that returned is reported as it ends.
                    report = self.quorum.on_straggler if self.quorum else None
                    if report is not None and site in self.stragglers:
                        report(self._result(site, error, stored_as, self._sha256()))
                case NewChannel(site=site):
                    sender.new_channel(f"nothing from {site} through two resends")

    def _publish_offer(self, offer: Offer, expiration_ms: int) -> None:
        sender = self.sender
        body = self.inline_body if offer.inline is not None else b""
        # An offer nobody took within the timeout is void: the sender has given up by then.
        props = envelope(offer, reply_to=sender.reply_to, expiration_s=expiration_ms / 1000)
        sender.expect_replies_from(offer.target)
        requester = self.routes.get(offer.target)
        if requester is not None:  # a retrieval: to the requester's reply queue
            sender.publish(sender.topology.reply_key(requester, sender.site), body, props)
        else:
            sender.declare_inbox(offer.target)
            sender.publish(sender.topology.offer_key(offer.target), body, props)

    def _publish_abort(self, action: PublishAbort) -> None:
        abort = Abort(stream_id=self.stream_id, reason=action.reason[:2000])
        self.sender.publish(self._key(action.to), b"", envelope(abort))
        if action.where_offered:
            self._publish_where_offered(action.to, abort, action.expiration_ms)

    def _publish_where_offered(self, to: str, abort: Abort, expiration_ms: int) -> None:
        """``abort`` to where the offer to ``to`` went: a receiver that has not answered yet
        finds it behind the offer (its inbox is one queue, in order)."""
        sender = self.sender
        props = envelope(abort, expiration_s=expiration_ms / 1000 if expiration_ms else None)
        requester = self.routes.get(to)
        if requester is not None:
            sender.publish(sender.topology.reply_key(requester, sender.site), b"", props)
        else:
            sender.publish(sender.topology.offer_key(to), b"", props)

    def _publish_chunk(self, seq: int, to: str | None, *, encoded: bool) -> None:
        piece = self.reader.get(seq)
        if piece is None:  # an iterator ran out: now the number of pieces is known
            assert self.reader.count is not None
            self.session.source_ended(self.reader.count)
            return
        body, encoding = self.encoder.encode(piece.data) if encoded else (piece.data, None)
        header = Chunk(
            stream_id=self.stream_id,
            seq=seq,
            crc32=checksum.crc32(body),
            meta=dict(piece.meta) if piece.meta else None,
            encoding=encoding,
        )
        persistent = self.sender.settings.persistent_chunks
        props = envelope(header, persistent=persistent, message_id=f"{self.stream_id}:{seq}")
        self.sender.publish(self._key(to), body, props)
        if self.pacer is not None or self.encoder.active:
            now = time.monotonic()
            if self.pacer is not None:  # what travels counts
                self.pacer.spend(len(body), now)
            self.encoder.published(len(body), now)
        self.sender.chunks_resent += self._again(seq, to)

    def _again(self, seq: int, to: str | None) -> bool:
        """Was chunk ``seq`` published to ``to`` (None: every target) before? By the broadcast
        (for a late joiner: since it joined) or on its own route. Counts what the silence rule,
        resend requests and reconnects cost; a late joiner's catching up is not a resend."""
        upto = self._upto.get(to, 0)
        self._upto[to] = max(upto, seq + 1)
        if seq < upto:
            return True
        return to is not None and self._joined_at.get(to, 0) <= seq < self._upto.get(None, 0)

    def _publish_manifest(self, to: str) -> None:
        """The manifest, to the one target that asked (another could not parse it)."""
        manifest = self.manifest.get()
        header = ManifestMessage(
            stream_id=self.stream_id,
            chunk_count=manifest.chunk_count,
            entries=len(manifest.entries),
        )
        self.sender.publish(self._key(to), manifest.body(), envelope(header))

    def _publish_end(self, to: str | None) -> None:
        reader = self.reader
        reader.streamer.check_unchanged()  # the digest must be of what is there
        assert reader.count is not None
        assert reader.digest.hashed == reader.count
        end = End(
            stream_id=self.stream_id,
            chunk_count=reader.count,
            size=reader.size,
            sha256=reader.digest.hexdigest(),
        )
        self.sender.publish(self._key(to), b"", envelope(end))

    def _report(self, report: ReportProgress) -> None:
        self.encoder.stored(time.monotonic())
        hook = self.sender.progress
        if hook is None:
            return
        streamer = self.reader.streamer
        total = streamer.size
        stored = report.stored * streamer.chunk_size
        if report.complete or (total is not None and stored > total):
            stored = self.reader.size if total is None else total
        hook(report.site, report.stream_id, stored, total)
