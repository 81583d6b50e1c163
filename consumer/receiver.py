"""``Receiver``: the receiving side of a site. Takes offers from the site's inbox and streams in.

One receiver holds one connection and works in the thread that calls :meth:`Receiver.receive`.
Each accepted stream gets its own channel on its data queue (prefetch = the sender's window), so
acks always go to the channel that delivered. Chunks are judged by the pure
:class:`~objstream.common.reassembly.Reassembler` and written by
:class:`~objstream.consumer.file_sink.PartialFile`; the
receiver only moves bytes and messages between them and the broker.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from objstream.common.broker import Closing, connect, connection_lost, dead_letter, reestablish
from objstream.common.errors import (
    BrokerUnreachable,
    ConfigError,
    ErrorCode,
    ObjstreamError,
    ProtocolError,
    TransferFailed,
)
from objstream.common.protocol import (
    CONTAINER_KIND,
    FILE_KIND,
    Abort,
    Chunk,
    Done,
    End,
    Inline,
    Offer,
    Progress,
    parse,
    properties,
)
from objstream.common.reassembly import ChunkVerdict, Failure, Reassembler
from objstream.common.settings import NAME_PATTERN, Settings
from objstream.common.streaming import ObjectAssembler, ProgressHook
from objstream.common.topology import Topology
from objstream.consumer.container_assembler import ContainerAssembler, OnEntry
from objstream.consumer.container_spool import ContainerSpool
from objstream.consumer.file_sink import FileAssembler
from objstream.consumer.resume import Resumable, StreamState, remove_abandoned
from objstream.consumer.streams import Received, Stream
from objstream.consumer.takeover import TakeOver, continues

AssemblerFactory = Callable[[Offer], ObjectAssembler]

log = logging.getLogger(__name__)

RECENT_STREAMS = 4096  # finished stream ids remembered, to drop late duplicates quietly
FLUSH_INTERVAL = 0.05  # seconds: acks/progress never wait longer than this
CLEANUP_INTERVAL = 60.0  # seconds between looks for abandoned partial files
# Failures after which a file's verified prefix is kept (the sender went away, not bad data).
KEEP_PREFIX_ON = frozenset({ErrorCode.TIMEOUT, ErrorCode.ABORTED})


class Receiver(TakeOver, Closing):
    """Receives the objects streamed to ``site`` into the directory ``dest``.

    Use :meth:`receive` (or iterate) to get each object as it completes::

        with Receiver("site-1", "/data/in", settings) as receiver:
            item = receiver.receive(timeout=60)

    A stream that fails raises :class:`TransferFailed` from :meth:`receive`; the receiver itself
    goes on and can be asked for the next object.

    Files go to ``dest``; containers come back in :attr:`Received.value`, or entry by entry to
    ``on_entry`` (then they are not kept). With ``spool_containers`` a container goes to
    ``dest`` first and is decoded once complete, so that it survives this process like a file
    does (at the cost of its size on disk while in transit; see
    :mod:`objstream.consumer.container_spool`). ``assemblers`` adds custom kinds: a mapping from a
    kind name to a factory that takes the :class:`Offer` and returns an
    :class:`~objstream.common.streaming.ObjectAssembler`.
    """

    def __init__(
        self,
        site: str,
        dest: str | Path,
        settings: Settings | None = None,
        *,
        on_entry: OnEntry | None = None,
        assemblers: Mapping[str, AssemblerFactory] | None = None,
        listen: bool = True,
        progress: ProgressHook | None = None,
        spool_containers: bool = False,
    ) -> None:
        if not re.match(NAME_PATTERN, site):
            raise ConfigError(f"invalid site name {site!r} (letters, digits, '_', '.', '-')")
        self.settings = settings or Settings()
        self.site = site
        self.dest = Path(dest)
        self.dest.mkdir(parents=True, exist_ok=True)
        if not self.dest.is_dir():
            raise ConfigError(f"destination {self.dest} is not a directory")
        self.topology = Topology.from_settings(self.settings)
        self._on_entry = on_entry
        self._spool_containers = spool_containers
        self._assemblers: dict[str, AssemblerFactory] = {
            FILE_KIND: lambda offer: FileAssembler(self.dest, offer),
            CONTAINER_KIND: self._container_assembler,
            **(assemblers or {}),
        }
        self._streams: dict[str, Stream] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._outcomes: deque[Received | TransferFailed] = deque()
        self._progress = progress
        self._stream_timeouts: dict[str, float] = {}  # per-stream progress timeouts (retrievals)
        # Retrievals: the name asked for, and the kept prefix a resumed stream continues.
        self._requested: dict[str, str] = {}
        self._kept_for: dict[str, Resumable] = {}
        self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL
        self._inbox_tag: str | None = None
        self._listen = listen
        self.reconnects = 0
        """How often the connection was lost and re-established."""
        self._connection = connect(self.settings, f"objstream consumer {site}")
        try:
            self._control = self._connection.channel()
            self.topology.declare_base(self._control)
            self._open_queues()
            if listen:
                self._resume_streams()
                self._resume_inbox()
        except BaseException:
            self._connection.close()
            raise

    # -- public API -------------------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Received | None:
        """Wait for the next object to complete; ``None`` if none did within ``timeout`` s.

        Raises:
            TransferFailed: the next stream to end failed (the partial file is gone).
            BrokerUnreachable: the broker connection was lost.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._outcomes:
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None
            try:
                self._connection.process_data_events(time_limit=wait)
                self._housekeeping()
            except pika.exceptions.AMQPError as e:
                if not connection_lost(e, self._connection):
                    raise BrokerUnreachable(self.settings.masked_url, f"broker error: {e!r}") from e
                self._recover(e)
        outcome = self._outcomes.popleft()
        if isinstance(outcome, TransferFailed):
            raise outcome
        return outcome

    def __iter__(self) -> Receiver:
        return self

    def __next__(self) -> Received:
        item = self.receive()
        assert item is not None  # no timeout: receive() only returns with an object
        return item

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def close(self, checkpoint: bool = True) -> None:
        """Stop and disconnect.

        With ``checkpoint`` (the default), file streams (and spooled containers) in progress
        are left for the next receiver of this site and directory: what was written is acked
        and recorded, and that receiver takes over from there (the sender waits, up to its
        timeout). Other streams fail and their senders are told.
        """
        try:
            if self._connection.is_open:
                for stream in list(self._streams.values()):
                    if stream.closing:
                        continue
                    if checkpoint and stream.state is not None:
                        self._suspend(stream)
                    else:
                        reason = f"receiver of site {self.site} shut down"
                        self._fail(stream, ErrorCode.ABORTED, reason)
                self._housekeeping()
                self._connection.close()
        except pika.exceptions.AMQPError:
            log.debug("connection already gone while closing", exc_info=True)
        finally:
            for stream in self._streams.values():
                stream.assembler.discard()

    def _recover(self, error: BaseException) -> None:
        """Reconnect after a lost connection (broker restart...) and go on with every stream."""
        log.warning("connection to the broker lost (%s); reconnecting", error)

        def setup() -> None:
            self._connection = connect(self.settings, f"objstream consumer {self.site}")
            self._control = self._connection.channel()
            self.topology.declare_base(self._control)
            self._open_queues()

        reestablish(self.settings, self.settings.timeout, setup)
        self.reconnects += 1
        self._inbox_tag = None
        now = time.monotonic()
        for stream in list(self._streams.values()):
            if stream.closing or stream.channel is None:
                continue
            stream.unacked_tag = 0  # delivery tags of the old channel mean nothing now
            stream.last_activity = now
            try:
                self._consume(stream)
            except pika.exceptions.ChannelClosedByBroker:
                self._fail(stream, ErrorCode.PROTOCOL, "the data queue is gone after a reconnect")
                continue
            # Chunks in flight may be gone with the broker: ask for them from here at once.
            self._send_progress(stream, resend_from=stream.reassembler.stored)
        self._resume_inbox()
        log.info("reconnected to %s; %d stream(s) go on", self.settings.masked_url,
                 len(self._streams))  # fmt: skip

    def _open_queues(self) -> None:
        """Declare and open what this receiver consumes besides data queues (its inbox)."""
        if self._listen:
            self._inbox = self.topology.declare_inbox(self._control, self.site)
            self._inbox_channel = self._connection.channel()
            # One offer at a time, acked once accepted: the limit on streams is exact.
            self._inbox_channel.basic_qos(prefetch_count=1)

    # -- inbox ------------------------------------------------------------------------------------

    def _resume_inbox(self) -> None:
        if not self._listen:
            return
        if self._inbox_tag is None and len(self._streams) < self.settings.max_streams:
            self._inbox_tag = self._inbox_channel.basic_consume(self._inbox, self._on_offer)

    def _pause_inbox(self) -> None:
        if self._inbox_tag is not None:
            self._inbox_channel.basic_cancel(self._inbox_tag)
            self._inbox_tag = None

    def _on_offer(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        if len(self._streams) >= self.settings.max_streams:
            channel.basic_nack(method.delivery_tag, requeue=True)  # wait for a free slot
            self._pause_inbox()
            return
        try:
            self._take_offer(props, body)
        finally:
            channel.basic_ack(method.delivery_tag)
        if len(self._streams) >= self.settings.max_streams:
            self._pause_inbox()

    def _take_offer(self, props: Any, body: bytes) -> None:
        try:
            offer = parse(props.type, props.headers)
            if not isinstance(offer, Offer):
                raise ProtocolError(f"unexpected {props.type} message where offers arrive")
            if offer.target != self.site:
                raise ProtocolError(
                    f"offer for site {offer.target!r} on the inbox of {self.site!r}"
                )
            if not isinstance(props.reply_to, str) or not props.reply_to:
                raise ProtocolError("offer without reply_to")
            if body and offer.inline is None:
                raise ProtocolError(f"offer with a {len(body)}-byte body (must be empty)")
        except ProtocolError as e:
            dead_letter(self._control, self.topology, props, body, str(e))
            return
        sid = offer.stream_id
        if sid in self._streams or sid in self._recent:
            log.debug("duplicate offer for stream %s ignored", sid)
            return
        if offer.size is not None and offer.size > self.settings.max_object_size:
            self._reply_refusal(
                offer,
                props.reply_to,
                ErrorCode.TOO_LARGE,
                f"{offer.size} bytes exceed site {self.site}'s limit of "
                f"{int(self.settings.max_object_size)} bytes",
            )
            return
        factory = self._assemblers.get(offer.kind)
        if factory is None:
            self._reply_refusal(
                offer,
                props.reply_to,
                ErrorCode.REFUSED,
                f"site {self.site} does not receive objects of kind {offer.kind!r}",
            )
            return
        kept = self._kept_for.pop(sid, None)
        if kept is not None and not offer.resume_from:
            log.info("%s %r comes whole (it changed at %s); dropping the %d bytes kept",
                     offer.kind, offer.name, offer.sender, kept.stored_bytes)  # fmt: skip
            kept.discard()
            kept = None
        if offer.resume_from and (kept is None or not continues(kept, offer)):
            if kept is not None:
                kept.state.release()
            self._reply_refusal(offer, props.reply_to, ErrorCode.PROTOCOL,
                                f"the offer resumes from chunk {offer.resume_from}, but no "
                                "partial file to match is kept here")  # fmt: skip
            return
        try:
            if kept is not None:
                stream = self._adopt(offer, props.reply_to, kept)
            else:
                stream = Stream(offer, props.reply_to, Reassembler(offer), factory(offer))
                stream.reassembler.accept()
        except ProtocolError as e:
            self._reply_refusal(offer, props.reply_to, ErrorCode.PROTOCOL, str(e))
            return
        except OSError as e:
            self._reply_refusal(
                offer,
                props.reply_to,
                ErrorCode.IO,
                f"cannot store {offer.size} bytes in {self.dest}: {e.strerror or e}",
            )
            return
        stream.timeout = self._stream_timeouts.pop(sid, self.settings.timeout)
        if offer.inline is not None:
            self._streams[sid] = stream
            self._take_inline(stream, offer.inline, body)
            return
        if stream.assembler.resumable and stream.state is None:
            try:  # what a receiver started after a crash needs to take over
                stream.state = StreamState.create(
                    self.dest, offer, props.reply_to, self._requested.get(sid)
                )
            except OSError as e:
                stream.assembler.discard()
                self._reply_refusal(offer, props.reply_to, ErrorCode.IO, f"state file: {e}")
                return
        try:
            self._consume(stream)
        except pika.exceptions.ChannelClosedByBroker as e:
            self._drop(stream)
            self._reply_refusal(offer, props.reply_to, ErrorCode.PROTOCOL, f"data queue gone: {e}")
            return
        log.info(
            "receiving %s %r (%d bytes) from %s as stream %s",
            offer.kind,
            offer.name,
            offer.size,
            offer.sender,
            sid,
        )
        self._send_progress(stream)  # first contact: the sender may resend from here on

    def _container_assembler(self, offer: Offer) -> ObjectAssembler:
        if self._spool_containers and offer.inline is None:
            return ContainerSpool(self.dest, offer, self._on_entry)
        return ContainerAssembler(offer, self._on_entry)

    def _consume(self, stream: Stream) -> None:
        """Start reading the stream's data queue on a channel of its own."""
        stream.channel = self._connection.channel()
        stream.channel.basic_qos(prefetch_count=stream.offer.window)
        queue = self.topology.data_queue(stream.offer.stream_id)
        # Passive: the sender declared it, with its own idle TTL (which may differ from ours).
        stream.channel.queue_declare(queue, passive=True)
        stream.consumer_tag = stream.channel.basic_consume(queue, partial(self._on_data, stream))
        self._streams[stream.offer.stream_id] = stream

    def _reply_refusal(self, offer: Offer, reply_to: str, code: ErrorCode, detail: str) -> None:
        log.warning("refusing stream %s from %s: %s", offer.stream_id, offer.sender, detail)
        done = Done(stream_id=offer.stream_id, site=self.site, ok=False, code=code, detail=detail)
        self._control.basic_publish("", reply_to, b"", properties(done))
        self._remember(offer.stream_id)
        self._outcomes.append(TransferFailed(offer.sender, offer.stream_id, code, detail))

    # -- data -------------------------------------------------------------------------------------

    def _on_data(self, stream: Stream, channel: Any, method: Any, props: Any, body: bytes) -> None:
        stream.last_activity = time.monotonic()
        stream.unacked_tag = method.delivery_tag
        if stream.reassembler.finished:
            return  # a late duplicate (a resent end, say); acked with the rest
        try:
            message = parse(props.type, props.headers)
            if message.ident != stream.offer.stream_id:
                raise ProtocolError(
                    f"message for stream {message.ident} on the data queue of "
                    f"{stream.offer.stream_id}"
                )
            if isinstance(message, Chunk):
                self._on_chunk(stream, message, props, body)
            elif isinstance(message, End):
                stream.reassembler.record_end(message)
            elif isinstance(message, Abort):
                self._fail(stream, ErrorCode.ABORTED, f"sender gave up: {message.reason}")
                return
            else:
                raise ProtocolError(f"unexpected {props.type} message on a data queue")
        except ProtocolError as e:
            dead_letter(self._control, self.topology, props, body, str(e))
        if stream.reassembler.finished:
            return
        if stream.reassembler.complete:
            self._finish(stream)
        elif stream.reassembler.stored - stream.reported >= stream.report_every:
            self._flush(stream)

    def _take_inline(self, stream: Stream, inline: Inline, body: bytes) -> None:
        """A small object that came whole inside its offer: store, verify, commit at once."""
        offer = stream.offer
        assert offer.chunk_count is not None
        assert offer.size is not None
        try:
            if offer.chunk_count:
                outcome = stream.reassembler.chunk(0, inline.crc32, body)
                if outcome.verdict is not ChunkVerdict.WRITE:  # corrupt: nothing to resend from
                    self._fail(stream, ErrorCode.CHECKSUM, outcome.detail)
                    return
                if not self._store(stream, 0, outcome.offset, body, inline.meta):
                    return
            elif body:
                raise ProtocolError("inline offer of 0 chunks with a body")
            end = End(stream_id=offer.stream_id, chunk_count=offer.chunk_count, size=offer.size,
                      sha256=inline.sha256)  # fmt: skip
            stream.reassembler.record_end(end)
        except ProtocolError as e:
            self._fail(stream, ErrorCode.PROTOCOL, str(e))
            return
        self._finish(stream)

    def _store(
        self, stream: Stream, seq: int, offset: int, body: bytes, meta: Mapping[str, Any] | None
    ) -> bool:
        """Hand a chunk to the assembler; on failure fail the stream and return False."""
        try:
            stream.assembler.take(offset, body, meta)
            return True
        except ProtocolError as e:
            self._fail(stream, ErrorCode.PROTOCOL, str(e))
        except OSError as e:
            self._fail(stream, ErrorCode.IO, f"storing chunk {seq}: {e.strerror or e}")
        except Exception as e:  # an on_entry callback or a custom assembler failed
            log.debug("assembler failed", exc_info=True)
            self._fail(stream, ErrorCode.REFUSED, f"the receiving side failed: {e!r}")
        return False

    def _on_chunk(self, stream: Stream, chunk: Chunk, props: Any, body: bytes) -> None:
        outcome = stream.reassembler.chunk(chunk.seq, chunk.crc32, body)
        if outcome.verdict is ChunkVerdict.WRITE:
            self._store(stream, chunk.seq, outcome.offset, body, chunk.meta)
            return
        if outcome.verdict is ChunkVerdict.CORRUPT:
            dead_letter(self._control, self.topology, props, body, outcome.detail)
        elif outcome.verdict is ChunkVerdict.AHEAD:
            log.debug("stream %s: %s", stream.offer.stream_id, outcome.detail)
        if outcome.resend_from is not None:
            self._send_progress(stream, resend_from=outcome.resend_from)

    def _flush(self, stream: Stream) -> None:
        """Ack what was delivered (all of it is stored or judged), then report progress."""
        if stream.state is not None:  # before the ack: a crash then only redelivers
            stream.state.save(stream.reassembler.stored, stream.reassembler.stored_bytes)
        if stream.unacked_tag:
            stream.channel.basic_ack(stream.unacked_tag, multiple=True)
            stream.unacked_tag = 0
        if stream.reassembler.stored != stream.reported:
            self._send_progress(stream)
        stream.last_flush = time.monotonic()

    def _send_progress(self, stream: Stream, resend_from: int | None = None) -> None:
        stored = stream.reassembler.stored
        progress = Progress(
            stream_id=stream.offer.stream_id, site=self.site, stored=stored, resend_from=resend_from
        )
        self._control.basic_publish(
            "", stream.reply_to, b"", properties(progress, persistent=False)
        )
        stream.reported = stored
        if self._progress is not None:
            offer = stream.offer
            self._progress(
                offer.sender, offer.stream_id, stream.reassembler.stored_bytes, offer.size
            )

    def _finish(self, stream: Stream) -> None:
        failure = stream.reassembler.verify()
        result: Any = None
        if failure is None:
            try:
                result = stream.assembler.finish()
            except OSError as e:
                failure = Failure(ErrorCode.IO, f"committing into {self.dest}: {e.strerror or e}")
            except ObjstreamError as e:
                failure = Failure(ErrorCode.PROTOCOL, str(e))
            if failure is not None:
                stream.reassembler.fail(failure)
        if failure is not None:
            self._fail(stream, failure.code, failure.detail)
            return
        stream.reassembler.mark_done()
        offer = stream.offer
        if self._progress is not None:
            self._progress(
                offer.sender,
                offer.stream_id,
                stream.reassembler.stored_bytes,
                stream.reassembler.stored_bytes,
            )
        path = result if isinstance(result, Path) else None
        size = stream.reassembler.stored_bytes
        log.info(
            "stored %s %r from %s (%d bytes)%s",
            offer.kind,
            offer.name,
            offer.sender,
            size,
            f" as {path}" if path else "",
        )
        self._end(
            stream,
            Done(
                stream_id=offer.stream_id,
                site=self.site,
                ok=True,
                stored_as=path.name if path else None,
            ),
            Received(
                offer.stream_id,
                offer.kind,
                offer.name,
                size,
                stream.reassembler.sha256,
                offer.sender,
                path=path,
                value=result,
                info=dict(offer.info or {}),
                resumed_bytes=stream.resumed_bytes,
            ),
        )

    def _fail(self, stream: Stream, code: ErrorCode, detail: str) -> None:
        stream.reassembler.fail(Failure(code, detail))
        if code in KEEP_PREFIX_ON and self._keep_prefix(stream):
            detail += (f"; the {stream.reassembler.stored_bytes} bytes received are kept: "
                       f"retrieving {stream.offer.name!r} from {stream.offer.sender} resumes "
                       "there")  # fmt: skip
        else:
            stream.assembler.discard()
        log.warning(
            "stream %s from %s failed (%s): %s",
            stream.offer.stream_id,
            stream.offer.sender,
            code,
            detail,
        )
        offer = stream.offer
        self._end(
            stream,
            Done(stream_id=offer.stream_id, site=self.site, ok=False, code=code, detail=detail),
            TransferFailed(offer.sender, offer.stream_id, code, detail),
        )

    def _end(self, stream: Stream, done: Done, outcome: Received | TransferFailed) -> None:
        if stream.state is not None:
            stream.state.remove()
        if stream.unacked_tag:
            stream.channel.basic_ack(stream.unacked_tag, multiple=True)
            stream.unacked_tag = 0
        self._control.basic_publish("", stream.reply_to, b"", properties(done))
        stream.closing = True  # the channel is closed outside its own callback
        self._outcomes.append(outcome)

    def _remember(self, stream_id: str) -> None:
        self._recent[stream_id] = None
        while len(self._recent) > RECENT_STREAMS:
            self._recent.popitem(last=False)

    # -- between event batches --------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now > self._next_cleanup:
            self._next_cleanup = now + CLEANUP_INTERVAL
            remove_abandoned(self.dest, self.settings.stream_ttl)
        for sid, stream in list(self._streams.items()):
            if not stream.closing:
                if now - stream.last_activity > stream.timeout:
                    self._fail(
                        stream,
                        ErrorCode.TIMEOUT,
                        f"no data from {stream.offer.sender} for {stream.timeout:g} s",
                    )
                elif stream.unacked_tag and now - stream.last_flush > FLUSH_INTERVAL:
                    self._flush(stream)
            if stream.closing:
                del self._streams[sid]
                self._remember(sid)
                if stream.channel is not None:  # inline streams have none
                    if stream.channel.is_open:
                        stream.channel.close()
                    self._control.queue_delete(self.topology.data_queue(sid))
        self._resume_inbox()
