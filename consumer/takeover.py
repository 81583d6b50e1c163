"""Taking streams over: a receiver's half of resuming.

Three cases, all resting on the state file next to the partial file
(:mod:`objstream.consumer.resume`):
a receiver that stops checkpoints its streams for a successor (:meth:`TakeOver._suspend`); a
receiver that starts takes over what a dead one left (:meth:`TakeOver._resume_streams`); and a
file stream whose sender went away keeps its verified prefix, which a retrieval of the same file
later continues (:meth:`TakeOver._keep_prefix`, :meth:`TakeOver._adopt`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pika.exceptions

from objstream.common.protocol import CONTAINER_KIND, FILE_KIND, Offer
from objstream.common.reassembly import Reassembler
from objstream.common.settings import Settings
from objstream.common.streaming import ObjectAssembler
from objstream.consumer.container_assembler import OnEntry
from objstream.consumer.container_spool import ContainerSpool
from objstream.consumer.file_sink import FileAssembler
from objstream.consumer.resume import Resumable, adopt, find_resumable, remove_abandoned
from objstream.consumer.streams import Stream

log = logging.getLogger(__name__)


class TakeOver:
    """The take-over half of :class:`objstream.consumer.receiver.Receiver`."""

    dest: Path
    settings: Settings
    _on_entry: OnEntry | None
    _spool_containers: bool
    _streams: dict[str, Stream]

    # Provided by the receiver.
    def _consume(self, stream: Stream) -> None:
        raise NotImplementedError

    def _flush(self, stream: Stream) -> None:
        raise NotImplementedError

    def _send_progress(self, stream: Stream, resend_from: int | None = None) -> None:
        raise NotImplementedError

    def _suspend(self, stream: Stream) -> None:
        """Checkpoint a stream kept on disk (a file, a spooled container) and let go of it."""
        self._flush(stream)
        del self._streams[stream.offer.stream_id]
        if stream.channel is not None and stream.channel.is_open:
            stream.channel.close()  # nothing unacked is lost: the broker requeues it
        stream.leave_on_disk()
        log.info(
            "left stream %s (%r) at chunk %d for the next receiver of %s",
            stream.offer.stream_id, stream.offer.name, stream.reassembler.stored, self.dest,
        )  # fmt: skip

    def _resume_streams(self) -> None:
        """Take over the streams a receiver of this directory left when it died; remove what
        was abandoned longer ago than the stream TTL (its data queue is gone by then)."""
        remove_abandoned(self.dest, self.settings.stream_ttl)
        for item in find_resumable(self.dest):
            offer = item.offer
            if offer.kind == CONTAINER_KIND and not self._spool_containers:
                item.state.release()  # for a receiver that spools containers
                continue
            try:
                sha = item.prefix_sha256()
                assembler = self._reopen(item)
            except (OSError, ValueError) as e:
                log.warning("cannot resume stream %s: %s", offer.stream_id, e)
                item.discard()
                continue
            stream = Stream(
                offer,
                item.reply_to,
                Reassembler.resumed(offer, item.stored, item.stored_bytes, sha),
                assembler,
                timeout=self.settings.timeout,
                state=item.state,
                resumed_bytes=item.stored_bytes,
            )
            try:
                self._consume(stream)
            except pika.exceptions.ChannelClosedByBroker:
                if offer.kind == FILE_KIND:
                    # Its sender gave up on it, or it failed for want of a sender: what is
                    # verified stays, for a retrieval of the same file from that site to resume.
                    log.info("stream %s (%r from %s) has no data queue any more; its %d bytes "
                             "are kept", offer.stream_id, offer.name, offer.sender,
                             item.stored_bytes)  # fmt: skip
                    stream.leave_on_disk()
                else:
                    log.info("stream %s (%r from %s) has no data queue any more; dropped",
                             offer.stream_id, offer.name, offer.sender)  # fmt: skip
                    self._drop(stream)
                continue
            log.info(
                "resuming %s %r from %s at chunk %d of %s",
                offer.kind, offer.name, offer.sender, item.stored, offer.chunk_count,
            )  # fmt: skip
            self._send_progress(stream)  # tells the sender where to go on from

    def _reopen(self, item: Resumable) -> ObjectAssembler:
        if item.offer.kind == FILE_KIND:
            return FileAssembler(self.dest, item.offer, reopen=True)
        return ContainerSpool(self.dest, item.offer, self._on_entry, reopen=True,
                              stored=item.stored, stored_bytes=item.stored_bytes)  # fmt: skip

    def _adopt(self, offer: Offer, reply_to: str, kept: Resumable) -> Stream:
        """A resumed retrieval: the kept prefix becomes the start of stream ``offer``."""
        state = adopt(kept, self.dest, offer, reply_to)
        try:
            assembler = FileAssembler(self.dest, offer, reopen=True)
        except OSError:
            state.remove()
            raise
        log.info("resuming %r from %s at chunk %d of %s (%d bytes kept)", offer.name,
                 offer.sender, kept.stored, offer.chunk_count, kept.stored_bytes)  # fmt: skip
        sha = kept.prefix_sha256()
        reassembler = Reassembler.resumed(offer, kept.stored, kept.stored_bytes, sha)
        return Stream(offer, reply_to, reassembler, assembler, state=state,
                       resumed_bytes=kept.stored_bytes)  # fmt: skip

    def _keep_prefix(self, stream: Stream) -> bool:
        """A file stream whose sender went away (or so it seems): keep what arrived, verified
        chunk by chunk, so asking the sender for the file again moves only the rest."""
        if (
            stream.state is None
            or not stream.reassembler.stored
            or not isinstance(stream.assembler, FileAssembler)
        ):
            return False
        stream.leave_on_disk()
        return True

    @staticmethod
    def _drop(stream: Stream) -> None:
        stream.assembler.discard()
        if stream.state is not None:
            stream.state.remove()


def continues(kept: Resumable, offer: Offer) -> bool:
    """Does ``offer`` pick up exactly where the kept prefix ends?"""
    return (
        offer.kind == FILE_KIND
        and offer.sender == kept.offer.sender
        and offer.resume_from == kept.stored
        and offer.chunk_size == kept.offer.chunk_size
        and offer.size is not None
        and kept.stored_bytes == min(kept.stored * offer.chunk_size, offer.size)
    )
