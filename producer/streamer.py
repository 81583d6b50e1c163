"""The sending API: ``Streamer`` for any kind, ``FileStreamer`` and ``ContainerStreamer``.

Each instance holds one broker connection for a site; use it from one thread (or one per
thread)::

    with FileStreamer("server", settings) as streamer:
        results = streamer.stream_file(["site-1"], "big.bin")

    with ContainerStreamer("server", settings) as streamer:
        streamer.stream_container("site-1", {"w1": weights}, name="model")
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from objstream.common.amqp import Closing, connect
from objstream.common.settings import (
    Settings,
    check_chunk_size,
    check_object_name,
    check_site,
    parse_rate,
    parse_size,
)
from objstream.common.streaming import ObjectStreamer, ProgressHook
from objstream.producer.sender import ReplyQueue, StreamSender, TargetResult
from objstream.producer.sources import FileSource


class Streamer(Closing):
    """Streams objects of any kind (an :class:`ObjectStreamer`) from ``site`` to other sites.

    ``cancel``, once set (from a signal handler or another thread), stops the stream in
    progress: every target is told ``aborted`` at once (a file's verified prefix stays with the
    receiver for a resume) and the send raises :class:`SendFailed`.
    """

    def __init__(
        self,
        site: str,
        settings: Settings | None = None,
        *,
        progress: ProgressHook | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.site = check_site(site)  # before connecting
        name = f"objstream producer {site}"
        self._connection = connect(self.settings, name)
        try:
            self._sender = StreamSender(
                self._connection,
                self.settings,
                site,
                progress=progress,
                cancel=cancel,
                reconnect=lambda: connect(self.settings, name),
                replies=ReplyQueue.NAMED,
            )
        except BaseException:
            self.close()
            raise

    def stream_object(
        self,
        targets: str | Sequence[str],
        source: ObjectStreamer,
        *,
        chunk_size: int | str | None = None,
        timeout: float | None = None,
        window: int | None = None,
        rate_limit: int | str | None = None,
    ) -> list[TargetResult]:
        """Stream ``source`` to each target; return once each stored and verified it.

        Args:
            targets: a site name or several; each gets the whole object.
            source: the producing half of the object.
            chunk_size: bytes per chunk (int or "256KiB"); default from the settings (1 MiB).
            timeout: seconds without progress from a target before it counts as failed.
            window: chunks in flight beyond what a target has stored.
            rate_limit: most bytes a second this send publishes, whatever the number of
                targets, resends included (int, or "10MiB", "80mbit"); 0: no limit; default
                from the settings (none).

        Returns:
            One :class:`TargetResult` per target, in the order given.

        Raises:
            SendFailed: a target failed; the error says which and why.
            ObjectTooLarge, BrokerUnreachable, EncodeError: as named.
        """
        sites = [targets] if isinstance(targets, str) else list(targets)
        size = int(self.settings.chunk_size) if chunk_size is None else parse_size(chunk_size)
        rate = None if rate_limit is None else parse_rate(rate_limit) if rate_limit != 0 else 0
        try:
            return self._sender.send(
                source,
                sites,
                timeout=timeout,
                window=window,
                chunk_size=check_chunk_size(size),
                rate_limit=rate,
            )
        finally:
            source.close()

    def serve(self, seconds: float) -> None:
        """Let the connection work (heartbeats) for ``seconds`` while the caller waits for
        something between two sends (a pipe's first bytes)."""
        self._sender.process_events(seconds)

    @property
    def bytes_published(self) -> int:
        """Message bodies published so far (chunks, inline offers), every stream: one copy of
        each chunk whatever the number of targets, plus what was sent again."""
        return self._sender.bytes_published

    def close(self) -> None:
        """Close the broker connection."""
        sender = getattr(self, "_sender", None)
        if sender is not None:
            sender.close()
        else:
            self._connection.close()


class FileStreamer(Streamer):
    """Streams files, chunk by chunk, verified (NVIDIA FLARE's name for it)."""

    def stream_file(
        self,
        targets: str | Sequence[str],
        file_name: str | os.PathLike[str],
        **options: Any,
    ) -> list[TargetResult]:
        """Stream the file ``file_name``; receivers store it under its base name.

        Takes the options of :meth:`Streamer.stream_object` (chunk_size, timeout, window,
        rate_limit).
        """
        return self.stream_object(targets, FileSource(file_name), **options)


class ContainerStreamer(Streamer):
    """Streams a dict, list or set entry by entry; big entries are chunked too."""

    def stream_container(
        self,
        targets: str | Sequence[str],
        container: dict[Any, Any] | list[Any] | set[Any],
        name: str = "container",
        **options: Any,
    ) -> list[TargetResult]:
        """Stream ``container`` under ``name``; return once every target has it verified.

        Values may be None, bool, int, float, complex, str, bytes, bytearray, lists, tuples,
        dicts, sets and numpy arrays of non-object dtypes, nested freely. A value that cannot be
        encoded is refused (:class:`~objstream.common.codec.EncodeError`, naming the key and the
        type) before anything is sent. Takes the options of :meth:`Streamer.stream_object`.
        """
        # Imported here: the codec imports numpy, which sending a file never needs.
        from objstream.producer.container_source import ContainerSource

        source = ContainerSource(container, check_object_name(name))
        return self.stream_object(targets, source, **options)
