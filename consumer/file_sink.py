"""Where a received file's bytes go: a partial file, written in place, then committed atomically."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.naming import candidate_names, confined, partial_name, safe_basename
from common.protocol import Offer
from common.streaming import ObjectAssembler

log = logging.getLogger(__name__)


class DestinationFull(OSError):
    """No candidate final name was free."""


class PartialFile:
    """A stream's bytes, written with ``pwrite`` into ``DEST/.objstream-<id>.part``.

    Nothing appears under a final name until :meth:`commit`, which fsyncs, links the partial file
    to the first free candidate name (``os.link`` fails rather than overwrite, so even a racing
    writer cannot be clobbered) and removes the partial name.
    """

    def __init__(self, dest: Path, stream_id: str, size: int) -> None:
        self.dest = dest.resolve()
        self.path = self.dest / partial_name(stream_id)
        self.size = size
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o600)
        try:
            if size:
                # Reserve the space now: a full disk is refused at the start, not at 90 %.
                try:
                    os.posix_fallocate(self._fd, 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
        except BaseException:
            self.discard()
            raise

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def commit(self, base_name: str) -> Path:
        """Make the content durable and give it its final name; returns the final path."""
        try:
            return commit_partial(self._fd, self.path, self.dest, base_name)
        finally:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Close and remove the partial file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def commit_partial(fd: int, partial: Path, dest: Path, base_name: str) -> Path:
    """fsync ``partial`` (open as ``fd``), link it to the first free name, drop the partial name.

    The destination-collision policy: never overwrite; ``NAME``, then ``STEM-1.EXT``... (``link``
    fails if anything exists under the name, even a dangling symlink, so nothing is clobbered).
    """
    os.fsync(fd)
    # Partial files are private while incomplete; the final file gets the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)
    for name in candidate_names(base_name):
        final = confined(dest, name)
        try:
            os.link(partial, final, follow_symlinks=False)
        except FileExistsError:
            continue
        os.unlink(partial)
        _fsync_dir(dest)
        return final
    raise DestinationFull(errno.EEXIST, f"no free name for {base_name!r} in {dest}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileAssembler(ObjectAssembler):
    """The consuming half for files: pieces go to a :class:`PartialFile` at their offsets."""

    def __init__(self, dest: Path, offer: Offer) -> None:
        assert offer.size is not None  # the protocol requires it for files
        self.name = offer.name
        self.sink = PartialFile(dest, offer.stream_id, offer.size)

    def take(self, offset: int, data: bytes, meta: Mapping[str, Any] | None) -> None:
        self.sink.write(offset, data)

    def finish(self) -> Path:
        return self.sink.commit(safe_basename(self.name))

    def discard(self) -> None:
        self.sink.discard()
