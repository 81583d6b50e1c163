"""The producing half for a pipe (``send-file -``): standard input, size unknown up front.

A pipe is read once, front to back: the stream is of kind ``pipe`` (a file whose size only its
``end`` tells; see docs/protocol.md), and the sender keeps only its last window of pieces for
resends, so memory stays flat whatever the length. A reader thread fills whole chunks (a pipe
hands out 64 KiB at a time; a shorter chunk goes when the input pauses) into a queue of at
most :data:`READ_AHEAD` of them, so reading the next chunk overlaps publishing this one.

The reader reads into buffers made once, on the sender's thread, and allocates nothing
itself: glibc gives each thread an arena of its own, and each arena keeps up to 64 MiB of
freed chunks (``common/buffers.py``), so chunks made on the reader's thread held a second
64 MiB (a 96 MiB pipe peaked at 161 MiB; now as a file's send).
Nothing of it can be read again: a pipe's send cannot be resumed, and a receiver that dies
mid-stream fails it.
"""

from __future__ import annotations

import os
import queue
import select
import threading
from collections.abc import Iterator

from objstream.common.protocol import PIPE_KIND
from objstream.common.streaming import ObjectStreamer, Piece

READ_AHEAD = 2
"""Chunks read ahead of the sender, at most."""

FLUSH_AFTER = 1.0
"""Seconds of silence after which what was read of a chunk is sent as a shorter chunk."""

_POLL = 0.2  # seconds between looks at the cancel flag while the pipe is silent


class PipeSource(ObjectStreamer):
    """The bytes of file descriptor ``fd`` (standard input by default) until its end, sent
    under ``name``.

    ``cancel``, once set, stops a wait for input (raised as :class:`KeyboardInterrupt`, on
    which the sender tells every target ``aborted``): a silent writer must not hold a Ctrl-C.
    """

    kind = PIPE_KIND
    random_access = False

    def __init__(self, name: str, fd: int = 0, cancel: threading.Event | None = None) -> None:
        self.name = name
        self._fd = fd
        self._cancel = cancel
        self._queue: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue()
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        """Set once the first chunk (or the end, or an error) was read: a sender waits for it
        before it offers the stream, since a receiver gives a sender that sends nothing only
        a few seconds after its offer (a command that thinks a while before it writes)."""

    def start(self, chunk_size: int | None = None) -> None:
        """Start reading (in chunks of ``chunk_size``, if :meth:`prepare` was not called)."""
        if chunk_size is not None:
            self.chunk_size = chunk_size
        if self._thread is None:
            for _ in range(READ_AHEAD):  # on this thread: in its arena, made once
                self._free.put(bytearray(self.chunk_size))
            self._thread = threading.Thread(target=self._read, name="objstream-stdin", daemon=True)
            self._thread.start()

    def pieces(self) -> Iterator[Piece]:
        self.start()
        while True:
            item = self._next()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buffer, length = item
            data = bytes(memoryview(buffer)[:length])  # pika takes bytes; made on this thread
            self._free.put(buffer)
            yield Piece(data)

    def _next(self) -> tuple[bytearray, int] | BaseException | None:
        while True:
            try:
                return self._queue.get(timeout=_POLL)
            except queue.Empty:
                if self._cancel is not None and self._cancel.is_set():
                    # As a second Ctrl-C would: the sender tells every target at once.
                    raise KeyboardInterrupt from None

    def _read(self) -> None:
        """On the reader thread: whole chunks into the queue, then ``None`` at the end."""
        try:
            while not self._stop.is_set():
                buffer = self._free_buffer()
                if buffer is None:
                    return  # closed
                length = self._fill(buffer)
                if not length:
                    break
                self._put((buffer, length))
            self._put(None)
        except OSError as e:
            self._put(e)

    def _free_buffer(self) -> bytearray | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=_POLL)
            except queue.Empty:
                continue
        return None

    def _fill(self, buffer: bytearray) -> int:
        """Bytes read into ``buffer``: a whole chunk, or less if the input ended, or paused for
        :data:`FLUSH_AFTER` with something read (a slow writer's bytes move on, not only once
        a chunk is full)."""
        view = memoryview(buffer)
        got = 0
        while got < len(view):
            if got and not select.select([self._fd], [], [], FLUSH_AFTER)[0]:
                break
            read = os.readv(self._fd, [view[got:]])
            if not read:
                break
            got += read
        return got

    def _put(self, item: tuple[bytearray, int] | BaseException | None) -> None:
        self._queue.put(item)  # never more than READ_AHEAD chunks: the free buffers bound it
        self.ready.set()

    def close(self) -> None:
        # The reader may be blocked in a read of a silent pipe: it is a daemon thread, and
        # stops at its next read or put.
        self._stop.set()


__all__ = ["READ_AHEAD", "PipeSource"]
