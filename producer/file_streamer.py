"""``FileStreamer``: stream a file to one or more sites (NVIDIA FLARE's name for it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType

from common.broker import connect
from common.settings import Settings, check_chunk_size, parse_size
from producer.sender import StreamSender, TargetResult
from producer.sources import FileSource


class FileStreamer:
    """Streams files from ``site`` to other sites, chunk by chunk, verified.

    One instance holds one broker connection; use it from one thread (or one per thread)::

        with FileStreamer("server", settings) as streamer:
            results = streamer.stream_file(["site-1"], "big.bin")
    """

    def __init__(self, site: str, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.site = site
        self._connection = connect(self.settings, f"objstream producer {site}")
        try:
            self._sender = StreamSender(self._connection, self.settings, site)
        except BaseException:
            self.close()
            raise

    def stream_file(
        self,
        targets: str | Sequence[str],
        file_name: str | os.PathLike[str],
        *,
        chunk_size: int | str | None = None,
        timeout: float | None = None,
        window: int | None = None,
    ) -> list[TargetResult]:
        """Stream ``file_name`` to each target; return once each stored and verified it.

        Args:
            targets: a site name or several; each gets the whole file.
            file_name: path of the file to send; the receivers store it under its base name.
            chunk_size: bytes per chunk (int or "256KiB"); default from the settings (1 MiB).
            timeout: seconds without progress from a target before it counts as failed.
            window: chunks in flight beyond what a target has stored.

        Returns:
            One :class:`TargetResult` per target, in the order given.

        Raises:
            SendFailed: a target failed; the error says which and why.
            ObjectTooLarge, BrokerUnreachable, OSError: as named.
        """
        sites = [targets] if isinstance(targets, str) else list(targets)
        size = int(self.settings.chunk_size) if chunk_size is None else parse_size(chunk_size)
        source = FileSource(file_name, check_chunk_size(size))
        try:
            return self._sender.send(source, sites, timeout=timeout, window=window)
        finally:
            source.close()

    def close(self) -> None:
        """Close the broker connection."""
        if self._connection.is_open:
            self._connection.close()

    def __enter__(self) -> FileStreamer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
