"""Carrying out what a stream's :class:`~objstream.common.receive_session.ReceiveSession`
decides: the receive side's action executor. It decides nothing: every action is done as the
session said, in order, and a failure is handed back to the session, whose answer replaces
what was still to do.

Each stream's actions run in order through its own queue (:attr:`Stream.pending`). Most are
quick and run at once on the connection's thread; two kinds go elsewhere (:mod:`.offload`):

- a :class:`Write` into an assembler that decodes or runs user code (a container built in
  memory, ``on_entry``, a custom kind) runs on a take thread, and the stream's later actions
  (its acks above all) wait for it: a chunk is acked only once taken, and the broker's prefetch
  bounds what waits;
- a :class:`Commit` (finishing, fsync and link, decoding a spooled container, the save), a
  :class:`Discard` and a :class:`LeaveOnDisk` run on the disk thread, and the stream goes on
  meanwhile (it sends ``progress`` while it commits).

Acks and rejects name delivery tags of the channel that delivered; after a reconnect the
stream has a new channel, and what was queued for the old one is dropped (the broker
redelivers it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from objstream.common.amqp import Channel, Connection
from objstream.common.errors import ObjstreamError
from objstream.common.protocol import Done, Progress, envelope
from objstream.common.receive_actions import (
    Ack,
    Action,
    Checkpoint,
    Commit,
    DeadLetter,
    DeleteQueue,
    Discard,
    FillHeld,
    FindHeld,
    Finished,
    LeaveOnDisk,
    Reconsume,
    RemoveCheckpoint,
    Retire,
    SendProgress,
    SendVerdict,
    Write,
)
from objstream.common.settings import Settings
from objstream.common.streaming import ProgressHook
from objstream.common.tls import broker_user
from objstream.common.topology import Topology
from objstream.consumer.held_chunks import HeldChunks
from objstream.consumer.offload import Offload
from objstream.consumer.streams import Received, Save, Stored, Stream

log = logging.getLogger(__name__)


class SaveFailed(Exception):
    """The save hook raised (its cause): the transfer fails with code ``io``."""


class StreamActions:
    """The executor of every stream of one receiver (or retriever).

    Args:
        site: this site (it signs progress and verdicts).
        settings: the receiver's settings.
        topology: names and keys.
        offload: the disk and take threads.
        progress: called as chunks are stored.
        save: runs as part of each commit, before the verdict.
        finished: told when a stream is over (the table hands the outcome out).
        reconsume: told when a stream must consume its data queue again.
    """

    def __init__(
        self,
        site: str,
        settings: Settings,
        topology: Topology,
        offload: Offload,
        *,
        progress: ProgressHook | None,
        save: Save | None,
        finished: Callable[[Stream, Finished], None],
        reconsume: Callable[[Stream], None],
    ) -> None:
        self.site = site
        self.topology = topology
        self.offload = offload
        self._user = broker_user(settings)  # every message we publish carries it (v2)
        self._progress = progress
        self._save = save
        self._finished = finished
        self._reconsume = reconsume
        self._connection: Connection | None = None
        self._control: Channel | None = None
        self.held_chunks = HeldChunks(None, offload, self.run)
        """Delta transfers: its ``index`` is set by a receiver that keeps one."""
        self.resend_requests = 0
        """Progress reports that asked a sender to resend (a gap, a corrupt chunk)."""

    def bind(self, connection: Connection, control: Channel) -> None:
        """The (new) connection, and the channel progress and verdicts go out on."""
        self._connection = connection
        self._control = control
        self.held_chunks.wake = connection.call_threadsafe

    def run(self, stream: Stream, actions: Sequence[Action]) -> None:
        """Queue ``actions`` behind the stream's others and do what can be done now."""
        stream.pending.extend((stream.generation, action) for action in actions)
        self._pump(stream)

    def _pump(self, stream: Stream) -> None:
        while stream.pending and not stream.taking:
            generation, action = stream.pending.popleft()
            follow = self._do(stream, generation, action)
            if follow is not None:  # it failed: what the session says now replaces the rest
                stream.pending.clear()
                stream.pending.extend((stream.generation, a) for a in follow)

    # -- one action -------------------------------------------------------------------------------

    def _do(self, stream: Stream, generation: int, action: Action) -> list[Action] | None:
        if isinstance(action, Write):
            return self._write(stream, action)
        if isinstance(action, FindHeld | FillHeld):
            self.held_chunks.do(stream, action)
            return None
        if isinstance(action, Ack | DeadLetter):
            if generation == stream.generation:  # tags of the channel that delivered
                self._settle(stream, action)
        elif isinstance(action, SendProgress):
            self._send_progress(stream, action)
        elif isinstance(action, SendVerdict):
            self._publish(stream.reply_to, action.done, persistent=True)
        elif isinstance(action, Commit):
            work, then = partial(self._finish_object, stream), partial(self._committed, stream)
            self.offload.on_disk(work, then)
        elif isinstance(action, Checkpoint | RemoveCheckpoint | Discard | LeaveOnDisk):
            self._do_kept(stream, action)
        else:
            self._do_queue(stream, action)
        return None

    def _do_kept(
        self, stream: Stream, action: Checkpoint | RemoveCheckpoint | Discard | LeaveOnDisk
    ) -> None:
        """The actions on what is kept on disk: the state file and the partial object."""
        sid = stream.offer.stream_id
        if isinstance(action, Checkpoint):
            if stream.state is not None:
                stream.state.save(action.stored, action.stored_bytes)
        elif isinstance(action, RemoveCheckpoint):
            if stream.state is not None:
                stream.state.remove()
        elif isinstance(action, Discard):
            self._on_disk(stream, f"discarding stream {sid}", stream.discard)
        else:  # syncs the partial file
            if action.ended and stream.state is not None:
                # Recorded now, before the verdict goes out and the outcome is reported: a
                # receiver killed from here on leaves a stream that nobody takes over.
                stream.state.save(action.stored, action.stored_bytes, ended=True)
            keep = partial(stream.leave_on_disk, ended=action.ended)
            self._on_disk(stream, f"keeping stream {sid} on disk", keep)

    def _do_queue(self, stream: Stream, action: Action) -> None:
        """The actions on the stream's data queue, and its end."""
        if isinstance(action, Finished):
            self._finished(stream, action)
        elif isinstance(action, Reconsume):
            self._reconsume(stream)
        elif isinstance(action, Retire):
            self._retire(stream)
        elif isinstance(action, DeleteQueue):
            assert self._control is not None
            self._control.delete_queue(self.topology.data_queue(self.site, stream.offer.stream_id))

    def _settle(self, stream: Stream, action: Ack | DeadLetter) -> None:
        assert stream.channel is not None
        if isinstance(action, Ack):
            stream.channel.ack(action.tag, multiple=action.multiple)
            return
        log.warning(
            "dead-lettering delivery %d of stream %s (from %s): %s",
            action.tag,
            stream.offer.stream_id,
            stream.offer.sender,
            action.reason,
        )
        stream.channel.reject(action.tag)

    def _write(self, stream: Stream, write: Write) -> list[Action] | None:
        take = partial(stream.assembler.take, write.offset, write.body, write.meta)
        if stream.assembler.inline(len(write.body), write.meta):
            try:
                take()
            except Exception as e:
                log.debug("storing chunk %d failed", write.seq, exc_info=True)
                return stream.session.write_raised(write.seq, e)
            return None
        stream.taking = True  # the rest waits: in order, and acked only once taken
        self.offload.take(take, partial(self._taken, stream, write.seq))
        return None

    def _taken(self, stream: Stream, seq: int, _: Any, error: BaseException | None) -> None:
        stream.taking = False
        if error is not None:
            log.debug("taking chunk %d failed", seq, exc_info=error)
            stream.pending.clear()
            self.run(stream, stream.session.write_raised(seq, error))
            return
        self._pump(stream)

    def _on_disk(self, stream: Stream, what: str, work: Callable[[], None]) -> None:
        """Run ``work`` on the disk thread; it concerns a stream that has ended here."""

        def then(_: Any, error: BaseException | None) -> None:
            if error is not None:
                log.warning("%s: %s", what, error)

        self.offload.on_disk(work, then)

    # -- committing -------------------------------------------------------------------------------

    def _finish_object(self, stream: Stream) -> Received:
        """On the disk thread: finish the object and save it."""
        offer, session = stream.offer, stream.session
        value = stream.assembler.finish()
        path = value if isinstance(value, Path) else None
        if isinstance(value, Stored):
            path, value = value.path, value.value
        received = Received(
            offer.stream_id,
            offer.kind,
            offer.name,
            session.stored_bytes,
            session.reassembler.sha256,
            offer.sender,
            path=path,
            value=value,
            info=dict(offer.info or {}),
            resumed_bytes=stream.resumed_bytes,
            sender_user=stream.user_id,
            reused_bytes=stream.held.reused if stream.held is not None else 0,
        )
        self.held_chunks.record(stream, path, session.reassembler.sha256)
        if self._save is not None:
            try:
                received = self._save(received)
            except Exception as e:
                raise SaveFailed(str(e)) from e
        return received

    def _committed(self, stream: Stream, result: Any, error: BaseException | None) -> None:
        """On the connection's thread: the commit's outcome goes to the session."""
        session = stream.session
        if error is not None:
            saving = isinstance(error, SaveFailed)
            cause = error.__cause__ if saving and error.__cause__ is not None else error
            if not isinstance(cause, OSError | ObjstreamError):
                log.debug("committing stream %s failed", stream.offer.stream_id, exc_info=cause)
            self.run(stream, session.commit_raised(cause, saving=saving))
            return
        assert isinstance(result, Received)
        stream.received = result
        offer = stream.offer
        if self._progress is not None:
            self._progress(offer.sender, offer.stream_id, result.size, result.size)
        self.run(stream, session.committed(result.value, result.path))

    # -- publishing and the data queue ------------------------------------------------------------

    def _send_progress(self, stream: Stream, action: SendProgress) -> None:
        offer = stream.offer
        progress = Progress(
            stream_id=offer.stream_id,
            site=self.site,
            stored=action.stored,
            resend_from=action.resend_from,
            encoding=action.encoding,
            delta=action.delta or None,
            holds=action.holds,
        )
        self._publish(stream.reply_to, progress, persistent=False)
        self.resend_requests += action.resend_from is not None
        if self._progress is not None:
            self._progress(offer.sender, offer.stream_id, action.stored_bytes, offer.size)

    def publish_verdict(self, reply_to: str, done: Done) -> None:
        """A verdict on an offer that never became a stream (a refusal)."""
        self._publish(reply_to, done, persistent=True)

    def _publish(self, reply_to: str, message: Done | Progress, *, persistent: bool) -> None:
        """An answer to ``reply_to`` (``reply:S:QID``): through the exchange, with the key
        that names this site as its publisher."""
        assert self._control is not None
        props = envelope(message, persistent=persistent, user_id=self._user)
        key = self.topology.reply_key(reply_to, self.site)
        self._control.publish(self.topology.exchange, key, b"", props)

    def _retire(self, stream: Stream) -> None:
        """Unbind the data queue of a stream that ended (late resends are then unroutable) and
        close its channel; the session deletes the queue a little later."""
        if stream.channel is None or self._connection is None:
            return
        sid = stream.offer.stream_id
        # On the stream's own channel (a new one after a reconnect): a refusal closes only it.
        channel = stream.channel if stream.channel.is_open else self._connection.channel()
        try:
            self.topology.unbind_data_queue(channel, self.site, sid, stream.offer.sender)
        except ObjstreamError as e:
            log.warning("stream %s: could not unbind its data queue (%s)", sid, e)
        with contextlib.suppress(ObjstreamError):
            channel.close()
