"""The sending half of a stream: offer, windowed chunks, end, and the receiver's verdict.

One :class:`StreamSender` drives one source to one or more target sites on one connection (its
thread's). For each target it keeps a cursor; it never has more than ``window`` chunks published
beyond what that target reported stored, so a slow target costs nothing but its window, and the
source is read (not buffered) again for each target. If a target goes silent it resends from the
last stored chunk; if it stays silent for ``timeout`` seconds, that target fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pydantic import ValidationError

from objstream.common import checksum
from objstream.common.broker import connection_lost, dead_letter, reestablish
from objstream.common.errors import (
    BrokerUnreachable,
    ErrorCode,
    ObjectTooLarge,
    ObjstreamError,
    ProtocolError,
    SendFailed,
    TimedOut,
    TransferFailed,
)
from objstream.common.protocol import (
    INLINE_MAX,
    Abort,
    Chunk,
    Done,
    End,
    Inline,
    Offer,
    Progress,
    new_stream_id,
    parse,
    properties,
)
from objstream.common.settings import Settings
from objstream.common.streaming import ObjectStreamer, Piece, ProgressHook
from objstream.common.topology import Topology
from objstream.producer.pieces import PieceReader, SharedDigest

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05  # seconds between looks at the reply queue while publishing


@dataclass(frozen=True)
class TargetResult:
    """How the stream to one target ended."""

    site: str
    stream_id: str
    ok: bool
    size: int
    sha256: str
    stored_as: str | None = None
    error: TransferFailed | None = None


@dataclass
class _Cursor:
    """Sending state toward one target."""

    site: str
    stream_id: str
    next_seq: int = 0
    stored: int = 0
    end_sent: bool = False
    contacted: bool = False
    last_progress: float = field(default_factory=time.monotonic)
    last_resend: float = 0.0
    finished: bool = False
    stored_as: str | None = None
    error: TransferFailed | None = None
    inline: bool = False  # the object went inside the offer


class StreamSender:
    """Sends sources to target sites over one connection."""

    def __init__(
        self,
        connection: Any,
        settings: Settings,
        site: str,
        cancel: threading.Event | None = None,
        progress: ProgressHook | None = None,
        reconnect: Callable[[], Any] | None = None,
    ) -> None:
        self.settings = settings
        self._reconnect = reconnect  # set: survive a lost connection (broker restart...)
        self._progress = progress
        self._reader: PieceReader | None = None
        self._cancel = cancel  # set: stop every stream (receivers are told to drop them)
        self.site = site
        self.topology = Topology.from_settings(settings)
        self._connection = connection
        self._cursors: dict[str, _Cursor] = {}
        self._offer_to: str | None = None
        self._declared_inboxes: set[str] = set()
        self._stream_id: str | None = None
        self._start = 0  # first chunk sent (a resumed retrieval skips what the requester has)
        # With reconnection, replies must outlive the connection: a named queue that expires
        # when unused, instead of an exclusive one that dies with it.
        self._reply_queue = (
            f"{self.topology.namespace}.reply.{new_stream_id()}" if reconnect else ""
        )
        self._open_channel()

    def _open_channel(self) -> None:
        self._channel = self._connection.channel()
        self.topology.declare_base(self._channel)
        if self._reconnect is None:
            self._reply_queue = self.topology.declare_reply_queue(self._channel)
        else:
            ttl_ms = int((2 * self.settings.timeout + 60) * 1000)
            self._channel.queue_declare(self._reply_queue, durable=True,
                                        arguments={"x-expires": ttl_ms})  # fmt: skip
        self._declared_inboxes.clear()
        self._channel.basic_consume(self._reply_queue, self._on_reply, auto_ack=True)

    @property
    def connection(self) -> Any:
        """The connection in use (a new one after a reconnect)."""
        return self._connection

    def close(self) -> None:
        """Remove a named reply queue and close the connection."""
        try:
            if self._reconnect is not None and self._connection.is_open:
                self._channel.queue_delete(self._reply_queue)
        except pika.exceptions.AMQPError:
            log.debug("reply queue already gone", exc_info=True)
        finally:
            if self._connection.is_open:
                self._connection.close()

    def _recover(self, error: BaseException, active: list[_Cursor], timeout: float) -> None:
        """Reconnect after a lost connection and pick every stream up where it was."""
        if self._reconnect is None:
            raise error
        log.warning("connection to the broker lost (%s); reconnecting", error)
        reconnect = self._reconnect

        def setup() -> None:
            self._connection = reconnect()
            self._open_channel()

        reestablish(self.settings, timeout, setup)
        now = time.monotonic()
        for cursor in active:
            cursor.last_progress = now  # the outage is not the receiver's silence
            if cursor.inline:
                continue
            self.topology.declare_data_queue(self._channel, cursor.stream_id)
            # Transient chunks in flight may be gone with the broker: go again from what the
            # receiver reported stored (duplicates are dropped there).
            self._rewind(cursor, cursor.stored)
        log.info("reconnected to %s; %d stream(s) go on", self.settings.masked_url, len(active))

    def send(
        self,
        source: ObjectStreamer,
        targets: Sequence[str],
        *,
        timeout: float | None = None,
        window: int | None = None,
        chunk_size: int | None = None,
        stream_id: str | None = None,
        offer_to: str | None = None,
        resume_from: int = 0,
        prefix_sha256: str | None = None,
    ) -> list[TargetResult]:
        """Stream ``source`` to every target; return when each has a verdict.

        ``stream_id`` and ``offer_to`` serve retrievals (one target): the stream id promised in
        the reply, and the requester's private queue, where the offer goes instead of the
        target site's inbox. ``resume_from`` and ``prefix_sha256`` resume a retrieval: if the
        source's first ``resume_from`` chunks still hash to ``prefix_sha256``, only the rest is
        sent; otherwise (the source changed) the whole.

        Raises:
            SendFailed: at least one target failed (every outcome is in ``results``).
            ObjectTooLarge: the source exceeds ``max_object_size``.
            BrokerUnreachable: the broker connection was lost.
        """
        if not targets:
            raise ValueError("no target sites given")
        if len(set(targets)) != len(targets):
            raise ValueError(f"target sites repeat: {list(targets)}")
        if (stream_id or offer_to) and len(targets) != 1:
            raise ValueError("stream_id and offer_to go with exactly one target")
        self._offer_to = offer_to
        self._stream_id = stream_id
        source.prepare(int(self.settings.chunk_size) if chunk_size is None else chunk_size)
        if source.size is not None and source.size > self.settings.max_object_size:
            raise ObjectTooLarge(source.name, source.size, int(self.settings.max_object_size))
        self._reader = PieceReader(source)
        self._start = self._resume_point(self._reader, resume_from, prefix_sha256)
        try:
            return self._send(
                self._reader,
                list(targets),
                timeout or self.settings.timeout,
                window or self.settings.window,
            )
        except pika.exceptions.AMQPError as e:
            raise BrokerUnreachable(self.settings.masked_url, f"connection lost: {e!r}") from e
        finally:
            self._cursors.clear()

    def _resume_point(self, reader: PieceReader, resume_from: int, expected: str | None) -> int:
        """Where a resumed retrieval starts: ``resume_from`` if the requester's prefix is still
        the source's (hashed here, as the end's SHA-256 covers the whole), else 0."""
        if not resume_from or expected is None:
            return 0
        source = reader.streamer
        if not source.random_access or reader.count is None or resume_from > reader.count:
            log.info("%s %r cannot resume from chunk %d; sending it whole", source.kind,
                     source.name, resume_from)  # fmt: skip
            return 0
        try:
            for seq in range(resume_from):
                reader.get(seq)  # feeds the digest, one chunk at a time
        except (OSError, ObjstreamError) as e:
            log.info("%s %r: cannot read the kept prefix (%s); sending it whole", source.kind,
                     source.name, e)  # fmt: skip
            reader.digest = SharedDigest()
            return 0
        if not reader.digest.prefix_matches(expected):
            log.info("%s %r changed since the requester's first %d chunks; sending it whole",
                     source.kind, source.name, resume_from)  # fmt: skip
            reader.digest = SharedDigest()
            return 0
        log.info("%s %r resumes from chunk %d of %d", source.kind, source.name, resume_from,
                 reader.count)  # fmt: skip
        return resume_from

    def _send(
        self, reader: PieceReader, targets: list[str], timeout: float, window: int
    ) -> list[TargetResult]:
        source = reader.streamer
        cursors = []
        for target in targets:
            cursor = _Cursor(target, self._stream_id or new_stream_id(), self._start, self._start)
            self._cursors[cursor.stream_id] = cursor
            cursors.append(cursor)
            self._offer(reader, cursor, timeout, window)
        log.info(
            "streaming %s %r (%s bytes, %s chunks) to %s",
            source.kind,
            source.name,
            source.size,
            source.chunk_count,
            ", ".join(targets),
        )
        while True:
            active = [c for c in cursors if not c.finished]
            if not active:
                break
            try:
                self._turn(reader, active, timeout, window)
            except pika.exceptions.AMQPError as e:
                if not connection_lost(e, self._connection):
                    raise
                self._recover(e, active, timeout)

        complete = reader.count is not None and reader.digest.hashed == reader.count
        sha256 = reader.digest.hexdigest() if complete else ""
        results = [
            TargetResult(
                c.site, c.stream_id, c.error is None, reader.size, sha256, c.stored_as, c.error
            )
            for c in cursors
        ]
        failures = [r.error for r in results if r.error is not None]
        if failures:
            raise SendFailed(failures, list(results))
        return results

    def _turn(
        self, reader: PieceReader, active: list[_Cursor], timeout: float, window: int
    ) -> None:
        """One round: publish what the windows allow, check silences, take replies."""
        if self._cancel is not None and self._cancel.is_set():
            for cursor in active:
                self._finish_failed(
                    cursor,
                    TransferFailed(cursor.site, cursor.stream_id, ErrorCode.ABORTED,
                                   f"site {self.site} is shutting down"),
                )  # fmt: skip
            return
        floor = min(c.stored for c in active)
        reader.release_before(floor)
        now = time.monotonic()
        can_send = False
        for cursor in active:
            limit = cursor.stored + window
            if reader.lockstep:
                limit = min(limit, floor + window)
            self._pump(reader, cursor, limit)
            self._check_silence(cursor, now, timeout)
            can_send |= (
                not cursor.finished
                and cursor.next_seq < limit
                and (reader.count is None or cursor.next_seq < reader.count)
            )
        self._connection.process_data_events(time_limit=0 if can_send else 0.05)

    # -- per target -----------------------------------------------------------------------------

    def _offer(self, reader: PieceReader, cursor: _Cursor, timeout: float, window: int) -> None:
        source = reader.streamer
        if not self._offer_to and cursor.site not in self._declared_inboxes:
            self.topology.declare_inbox(self._channel, cursor.site)
            self._declared_inboxes.add(cursor.site)
        body = b""
        inline = None
        count = reader.count
        if (
            reader.lockstep is False
            and not self._start
            and count is not None
            and count <= 1
            and (source.size is not None and source.size <= INLINE_MAX)
        ):
            # Small enough to ride in the offer: no data queue, one message each way.
            piece = reader.get(0) if count else Piece(b"")
            assert piece is not None
            body = piece.data
            inline = Inline(
                crc32=checksum.crc32(body),
                sha256=reader.digest.hexdigest(),
                meta=dict(piece.meta) if piece.meta else None,
            )
            cursor.inline = True
            cursor.next_seq = count
            cursor.end_sent = True
        else:
            self.topology.declare_data_queue(self._channel, cursor.stream_id)
        try:
            offer = Offer(
                stream_id=cursor.stream_id,
                kind=source.kind,
                name=source.name,
                size=source.size,
                chunk_size=source.chunk_size,
                chunk_count=source.chunk_count,
                window=window,
                sender=self.site,
                target=cursor.site,
                info=source.info() or None,
                inline=inline,
                resume_from=self._start,
            )
        except ValidationError as e:
            raise ObjstreamError(f"cannot offer {source.kind} {source.name!r}: {e}") from None
        props = properties(offer, reply_to=self._reply_queue)
        # An offer nobody took within the timeout is void: the sender has given up by then.
        props.expiration = str(int(timeout * 1000))
        if self._offer_to:
            self._channel.basic_publish("", self._offer_to, body, props)
        else:
            self._channel.basic_publish(
                self.topology.exchange, self.topology.inbox_key(cursor.site), body, props
            )

    def _pump(self, reader: PieceReader, cursor: _Cursor, limit: int) -> None:
        """Publish what the window allows, then the end once every chunk went out."""
        key = self.topology.data_key(cursor.stream_id)
        persistent = self.settings.persistent_chunks
        polled = time.monotonic()
        while cursor.next_seq < limit:
            if time.monotonic() - polled > POLL_INTERVAL:
                # Slow reads must not keep replies waiting: a receiver that gave up (or asked
                # for a resend) is heard within one read, not one window.
                self._connection.process_data_events(time_limit=0)
                polled = time.monotonic()
                if cursor.finished:
                    return
            seq = cursor.next_seq
            piece = reader.get(seq)
            if piece is None:
                break
            header = Chunk(
                stream_id=cursor.stream_id,
                seq=seq,
                crc32=checksum.crc32(piece.data),
                meta=dict(piece.meta) if piece.meta else None,
            )
            props = properties(
                header, persistent=persistent, message_id=f"{cursor.stream_id}:{seq}"
            )
            self._channel.basic_publish(self.topology.exchange, key, piece.data, props)
            cursor.next_seq = seq + 1
        if cursor.next_seq == reader.count and not cursor.end_sent:
            assert reader.digest.hashed == reader.count
            end = End(
                stream_id=cursor.stream_id,
                chunk_count=reader.count,
                size=reader.size,
                sha256=reader.digest.hexdigest(),
            )
            self._channel.basic_publish(self.topology.exchange, key, b"", properties(end))
            cursor.end_sent = True

    def _check_silence(self, cursor: _Cursor, now: float, timeout: float) -> None:
        silent = now - cursor.last_progress
        if silent > timeout:
            detail = "" if cursor.contacted else f"site {cursor.site!r} never took the offer"
            self._finish_failed(cursor, TimedOut(cursor.site, cursor.stream_id, timeout, detail))
            return
        # Resend only once the receiver is known to read: before that the chunks wait in the
        # durable data queue and resending would only pile up duplicates.
        resend_after = self.settings.resend_after
        if (
            cursor.contacted
            and not cursor.inline
            and silent > resend_after
            and now - cursor.last_resend > resend_after
        ):
            log.info(
                "no progress from %s for %.1f s; resending stream %s from chunk %d",
                cursor.site,
                silent,
                cursor.stream_id,
                cursor.stored,
            )
            self._rewind(cursor, cursor.stored)
            cursor.last_resend = now

    @staticmethod
    def _rewind(cursor: _Cursor, seq: int) -> None:
        """Resend from chunk ``seq``, and the end after it (a duplicate end is harmless)."""
        cursor.next_seq = min(cursor.next_seq, seq)
        cursor.end_sent = False

    def _finish_failed(self, cursor: _Cursor, error: TransferFailed) -> None:
        log.warning("%s", error)
        if cursor.inline:
            pass  # no data queue: the offer was the whole stream (and has expired by now)
        elif cursor.contacted:
            # A receiver is on it: tell it to drop the partial object (it deletes the queue).
            abort = Abort(stream_id=cursor.stream_id, reason=str(error))
            self._channel.basic_publish(
                self.topology.exchange,
                self.topology.data_key(cursor.stream_id),
                b"",
                properties(abort),
            )
        else:
            # Nobody took the offer, and it has expired by now: nothing will read the queue.
            self._channel.queue_delete(self.topology.data_queue(cursor.stream_id))
        cursor.error = error
        cursor.finished = True

    # -- replies ----------------------------------------------------------------------------------

    def _on_reply(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        try:
            message = parse(props.type, props.headers)
        except ProtocolError as e:
            dead_letter(channel, self.topology, props, body, str(e))
            return
        cursor = self._cursors.get(message.ident)
        if cursor is None or cursor.finished:
            log.debug("ignoring %s for stream %s (not in flight)", props.type, message.ident)
            return
        if isinstance(message, Progress):
            self._on_progress(cursor, message)
        elif isinstance(message, Done):
            self._on_done(cursor, message)
        else:
            dead_letter(
                channel, self.topology, props, body, f"unexpected {props.type} on a reply queue"
            )

    def _on_progress(self, cursor: _Cursor, progress: Progress) -> None:
        cursor.contacted = True
        if progress.stored > cursor.stored:
            cursor.stored = progress.stored
            self._report(cursor)
        cursor.last_progress = time.monotonic()
        if progress.resend_from is not None:
            log.info(
                "site %s asks to resend stream %s from chunk %d",
                cursor.site,
                cursor.stream_id,
                progress.resend_from,
            )
            self._rewind(cursor, max(progress.resend_from, cursor.stored))

    def _report(self, cursor: _Cursor, complete: bool = False) -> None:
        if self._progress is None or self._reader is None:
            return
        streamer = self._reader.streamer
        total = streamer.size
        stored = cursor.stored * streamer.chunk_size
        if complete or (total is not None and stored > total):
            stored = self._reader.size if total is None else total
        self._progress(cursor.site, cursor.stream_id, stored, total)

    def _on_done(self, cursor: _Cursor, done: Done) -> None:
        cursor.contacted = True
        cursor.finished = True
        cursor.stored_as = done.stored_as
        if done.ok:
            self._report(cursor, complete=True)
            where = f" as {done.stored_as!r}" if done.stored_as else ""
            log.info("site %s stored stream %s%s", cursor.site, cursor.stream_id, where)
            return
        cursor.error = TransferFailed(
            cursor.site, cursor.stream_id, done.code or ErrorCode.PROTOCOL, done.detail
        )
        log.warning("%s", cursor.error)
        if not cursor.inline:
            # The receiver normally deletes it; make sure a refused stream leaves nothing behind.
            self._channel.queue_delete(self.topology.data_queue(cursor.stream_id))
