"""The sending API: ``Streamer`` for any kind, ``FileStreamer`` and ``ContainerStreamer``.

Each instance holds one broker connection for a site; use it from one thread (or one per
thread)::

    with FileStreamer("server", settings) as streamer:
        results = streamer.stream_file(["site-1"], "big.bin")

    with ContainerStreamer("server", settings) as streamer:
        streamer.stream_container("site-1", {"w1": weights}, name="model")
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import Any, TypedDict, Unpack

from objstream.common.amqp import Closing, connect
from objstream.common.errors import ConfigError, ObjstreamError
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
from objstream.producer.transfer import Quorum, Transfer


class DeltaOption(TypedDict, total=False):
    """The keyword of :meth:`Streamer.stream_object` that turns delta transfers off."""

    full: bool | None


class Streamer(Closing):
    """Streams objects of any kind (an :class:`ObjectStreamer`) from ``site`` to other sites.

    ``cancel``, once set (from a signal handler or another thread), stops the stream in
    progress: every target is told ``aborted`` at once (a file's verified prefix stays with the
    receiver for a resume) and the send raises :class:`SendFailed`; a k-of-N send's stragglers
    (``min_targets``) are told too. ``on_straggler`` gets each straggler's result as it ends
    (from the thread that drives them).
    """

    def __init__(
        self,
        site: str,
        settings: Settings | None = None,
        *,
        progress: ProgressHook | None = None,
        cancel: threading.Event | None = None,
        on_straggler: Callable[[TargetResult], None] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.site = check_site(site)  # before connecting
        self._on_straggler = on_straggler
        # A k-of-N send's stragglers, driven on a thread of their own: their results.
        self._going_on: Future[list[TargetResult]] | None = None
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
        min_targets: int | None = None,
        stragglers: str = "wait",
        **delta: Unpack[DeltaOption],
    ) -> list[TargetResult]:
        """Stream ``source`` to each target; return once each stored and verified it (with
        ``min_targets``, once that many did).

        Args:
            targets: a site name or several; each gets the whole object.
            source: the producing half of the object.
            chunk_size: bytes per chunk (int or "256KiB"); default from the settings (1 MiB).
            timeout: seconds without progress from a target before it counts as failed.
            window: chunks in flight beyond what a target has stored.
            rate_limit: most bytes a second this send publishes, whatever the number of
                targets, resends included (int, or "10MiB", "80mbit"); 0: no limit; default
                from the settings (none).
            min_targets: k of N: succeed as soon as this many targets verified. The others
                (the stragglers) go on in the background, on this streamer's connection, until
                they verify, fail or time out: :meth:`stragglers` waits for their results, and
                the streamer's ``on_straggler`` (called from the background thread) gets each
                as it ends.
                The next send and :meth:`close` wait for them first. Fewer than
                ``min_targets`` can still verify: the rest are told to stop and it raises.
            stragglers: ``"wait"`` (the default) or ``"cancel"``: once ``min_targets``
                verified, tell the others to stop (each fails ``aborted``) and return.
            full: send every chunk, even to a target that holds some already from an earlier
                version (default: not ``settings.delta``, i.e. only what each target lacks;
                each result's ``bytes_reused`` says what it held).

        Returns:
            One :class:`TargetResult` per target, in the order given (with ``min_targets``:
            per target that ended by then, the stragglers' come from :meth:`stragglers`).

        Raises:
            SendFailed: a target failed (with ``min_targets``: fewer than that many verified);
                the error says which and why.
            ObjectTooLarge, BrokerUnreachable, EncodeError: as named.
        """
        sites = [targets] if isinstance(targets, str) else list(targets)
        size = int(self.settings.chunk_size) if chunk_size is None else parse_size(chunk_size)
        rate = None if rate_limit is None else parse_rate(rate_limit) if rate_limit != 0 else 0
        quorum = None
        if min_targets is not None:
            if stragglers not in ("wait", "cancel"):
                raise ConfigError(f"stragglers must be 'wait' or 'cancel', not {stragglers!r}")
            quorum = Quorum(min_targets, stragglers == "cancel", self._on_straggler)
        self.stragglers()  # one send at a time on the connection: the last one's first
        try:
            transfer = self._sender.prepare(
                source,
                sites,
                timeout=timeout,
                window=window,
                chunk_size=check_chunk_size(size),
                rate_limit=rate,
                full=delta.get("full"),
            )
            results = transfer.run(quorum=quorum)
        except BaseException:
            source.close()
            raise
        if transfer.stragglers:
            self._go_on(transfer, source)
        else:
            source.close()
        return results

    def _go_on(self, transfer: Transfer, source: ObjectStreamer) -> None:
        """Drive a k-of-N send's stragglers on a thread of their own (the source stays open)."""
        going_on: Future[list[TargetResult]] = Future()

        def finish() -> None:
            try:
                going_on.set_result(transfer.finish())
            except BaseException as e:  # raised by stragglers()
                going_on.set_exception(e)
            finally:
                source.close()

        self._going_on = going_on
        threading.Thread(target=finish, name="objstream-stragglers", daemon=True).start()

    def stragglers(self) -> list[TargetResult]:
        """Wait for the stragglers of the last send with ``min_targets`` (cancel it with the
        streamer's ``cancel`` event) and return their results, in the order given: verified
        or failed, never raising for them. Empty if none were left going.

        Raises:
            BrokerUnreachable: the connection was lost while they went on (and not regained).
        """
        going_on, self._going_on = self._going_on, None
        if going_on is None:
            return []
        while not going_on.done():
            wait([going_on], timeout=0.2)  # a signal (Ctrl-C) is handled between two waits
        return going_on.result()

    def serve(self, seconds: float) -> None:
        """Let the connection work (heartbeats) for ``seconds`` while the caller waits for
        something between two sends (a pipe's first bytes). While a k-of-N send's stragglers
        go on, their thread works the connection: this only waits."""
        if self._going_on is not None:
            wait([self._going_on], timeout=seconds)
            return
        self._sender.process_events(seconds)

    @property
    def bytes_published(self) -> int:
        """Message bodies published so far (chunks, inline offers), every stream: one copy of
        each chunk whatever the number of targets, plus what was sent again."""
        return self._sender.bytes_published

    def close(self) -> None:
        """Close the broker connection, once a k-of-N send's stragglers ended."""
        if getattr(self, "_going_on", None) is not None:
            with contextlib.suppress(ObjstreamError):  # their results were not asked for
                self.stragglers()
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
        rate_limit, min_targets, stragglers, full).
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
