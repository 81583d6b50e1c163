"""The partial objects a destination directory keeps, found and removed safely.

A receiver (``listen``, ``retrieve-file``, ``retrieve-container``) writes each stream into
``DIR/.objstream-<id>.part`` (a file, or a directory for a directory container), with a state
file ``.objstream-<id>.state`` beside it and, for a container, its journal
(``.objstream-<id>.meta``, ``.objstream-<id>.heads``); see :mod:`objstream.consumer.resume`.
What an interrupted transfer leaves stays there so that it can resume. A running receiver holds
an exclusive ``flock`` on the state file of every stream it works on: that lock is how this
module tells a partial in use from one left behind, and :meth:`PartialsDir.remove` takes the
same lock before it deletes anything, so that no receiver can take the stream over meanwhile.

Every file is reached by its name relative to ``DIR`` (opened once as a directory): a name
is never resolved, a symlink is never followed (it is removed as a link), and a partial
directory is removed with :func:`shutil.rmtree`, which does not follow symlinks inside it.
Only names of the exact form above are ever touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from objstream.common.errors import ConfigError
from objstream.common.naming import PARTIAL_PREFIX
from objstream.common.protocol import Offer
from objstream.consumer.resume import ENDED, STATE_SUFFIX

PARTIAL_FILE = re.compile(
    rf"^{re.escape(PARTIAL_PREFIX)}(?P<id>[0-9a-f]{{32}})\.(?P<suffix>part|state|meta|heads)$"
)
"""The names a receiver gives the files of a stream in its destination directory."""

DATA_SUFFIXES = ("part", "meta", "heads")
"""A stream's files besides its state file (removed first: the state goes last)."""

ORPHAN_GRACE = 60.0
"""Seconds a partial object without a state file is left alone: a receiver creates the partial
file a moment before its state file (and a small inline stream never gets one), so a young one
may be in use. Older ones are leftovers nothing will resume."""

STATE_READ_LIMIT = 1 << 20
"""Bytes of a state file read at most (its offer record is a few KiB)."""

_OPEN_STATE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Status(StrEnum):
    """What becomes of a partial object."""

    HELD = "held"
    """A running receiver holds it (it is receiving or resuming it): never removed."""
    RESUMABLE = "resumable"
    """Its receiver is gone: the next receiver on the directory (same site) takes it over."""
    KEPT = "kept"
    """Its sender went away: a retrieval of the same file from the same site continues it."""
    ORPHAN = "orphan"
    """No readable state: nothing will resume it."""


class Removal(StrEnum):
    """What :meth:`PartialsDir.remove` did."""

    REMOVED = "removed"
    HELD = "held"
    """Nothing: a running receiver holds it."""
    GONE = "gone"
    """Nothing: its receiver finished or moved it meanwhile."""


@dataclass(frozen=True)
class Partial:
    """One stream's files in the directory."""

    stream_id: str
    status: Status
    files: tuple[str, ...]
    """Its file names in the directory (the state file last)."""
    modified: float
    """The newest modification time of its files (a receiver touches the state file at each
    progress report)."""
    disk_bytes: int
    """What its files take on disk (apparent sizes; symlinks count as themselves)."""
    kind: str | None = None
    name: str | None = None
    """The name the sender gave the object."""
    sender: str | None = None
    stored_bytes: int | None = None
    """Bytes of the object verified and recorded in the state file."""
    total_bytes: int | None = None
    problem: str | None = None
    """Why its state could not be read (orphans)."""

    def age(self, now: float | None = None) -> float:
        """Seconds since any of its files last changed."""
        return max(0.0, (time.time() if now is None else now) - self.modified)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "status": self.status.value,
            "kind": self.kind,
            "name": self.name,
            "sender": self.sender,
            "stored_bytes": self.stored_bytes,
            "total_bytes": self.total_bytes,
            "disk_bytes": self.disk_bytes,
            "age_s": round(self.age(now), 3),
            "files": list(self.files),
            "problem": self.problem,
        }


class PartialsDir:
    """A destination directory, opened once; its partial objects are reached through it.

    Raises:
        ConfigError: ``dest`` is not an existing directory.
    """

    def __init__(self, dest: Path) -> None:
        self.path = Path(dest)
        try:
            # The directory named is the user's choice (it may be a symlink to one); nothing
            # inside it is ever resolved.
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(f"--dest {str(dest)!r}: no such directory") from None
        except NotADirectoryError:
            raise ConfigError(f"--dest {str(dest)!r} is not a directory") from None
        except PermissionError:
            raise ConfigError(f"--dest {str(dest)!r}: permission denied") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PartialsDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- finding ------------------------------------------------------------------------------

    def scan(self) -> list[Partial]:
        """Every stream's partial object in the directory, oldest first."""
        groups: dict[str, list[str]] = {}
        for name in os.listdir(self._fd):
            match = PARTIAL_FILE.match(name)
            if match is not None:
                groups.setdefault(match["id"], []).append(name)
        found = [self._look(stream_id, names) for stream_id, names in groups.items()]
        return sorted((p for p in found if p is not None), key=lambda p: p.modified)

    def _look(self, stream_id: str, names: list[str]) -> Partial | None:
        state = f"{PARTIAL_PREFIX}{stream_id}{STATE_SUFFIX}"
        files = tuple(sorted(n for n in names if n != state)) + ((state,) if state in names else ())
        stats = [s for s in (self._lstat(n) for n in files) if s is not None]
        if not stats:
            return None  # removed meanwhile
        modified = max(s.st_mtime for s in stats)
        disk = sum(self._size(n) for n in files)
        if state not in names:
            return Partial(stream_id, Status.ORPHAN, files, modified, disk, problem="no state file")
        held, record, problem = self._read_state(state)
        if record is None:
            status = Status.HELD if held else Status.ORPHAN
            return Partial(stream_id, status, files, modified, disk, problem=problem)
        offer, stored_bytes, ended = record
        if held:
            status = Status.HELD
        elif problem is not None:
            status = Status.ORPHAN
        else:
            status = Status.KEPT if ended else Status.RESUMABLE
        return Partial(
            stream_id,
            status,
            files,
            modified,
            disk,
            kind=offer.kind,
            name=offer.name,
            sender=offer.sender,
            stored_bytes=stored_bytes,
            total_bytes=offer.size,
            problem=problem,
        )

    def _read_state(self, name: str) -> tuple[bool, tuple[Offer, int, bool] | None, str | None]:
        """``(held, (offer, stored_bytes, ended) or None, problem)`` of state file ``name``.

        The lock is only tried, and let go at once: a receiver starting at that very moment
        would leave the stream for the next one (as with two receivers starting together).
        """
        try:
            fd = os.open(name, _OPEN_STATE, dir_fd=self._fd)
        except OSError as e:
            return False, None, f"state file unreadable: {_reason(e)}"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False, None, "state file is not a regular file"
            held = not _try_lock(fd)
            data = os.pread(fd, STATE_READ_LIMIT, 0)
        except OSError as e:
            return False, None, f"state file unreadable: {_reason(e)}"
        finally:
            os.close(fd)  # lets the lock go
        try:
            return held, parse_state(data), None
        except (ValueError, ValidationError) as e:
            return held, None, f"state file unreadable: {str(e).splitlines()[0][:200]}"

    def _lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _size(self, name: str) -> int:
        """Apparent size of ``name``; of a directory (not a symlink), of what it holds."""
        info = self._lstat(name)
        if info is None:
            return 0
        if not stat.S_ISDIR(info.st_mode):
            return info.st_size
        total = 0
        with contextlib.suppress(OSError):
            for _top, _dirs, files, top_fd in os.fwalk(name, dir_fd=self._fd):
                for file in files:
                    with contextlib.suppress(OSError):
                        total += os.stat(file, dir_fd=top_fd, follow_symlinks=False).st_size
        return total

    # -- removing -----------------------------------------------------------------------------

    def remove(self, partial: Partial, now: float | None = None) -> Removal:
        """Delete ``partial``'s files, its state file last, unless a running receiver holds it
        now (or it is an orphan younger than :data:`ORPHAN_GRACE`, which one may be setting
        up): then nothing is deleted.

        The state file's lock is held while the others go, so no receiver takes the stream
        over half deleted.
        """
        state = f"{PARTIAL_PREFIX}{partial.stream_id}{STATE_SUFFIX}"
        try:
            fd = os.open(state, _OPEN_STATE, dir_fd=self._fd)
        except OSError as e:
            # None there, or a symlink where the state file should be (a leftover: removed
            # as a link below).
            if e.errno not in (errno.ENOENT, errno.ELOOP):
                raise
            fd = -1
        try:
            if fd >= 0 and not _try_lock(fd):
                return Removal.HELD
            if fd < 0 and partial.status is not Status.ORPHAN:
                return Removal.GONE  # finished, or taken over under a new id, meanwhile
            if fd < 0 and partial.age(now) < ORPHAN_GRACE:
                return Removal.HELD
            for suffix in DATA_SUFFIXES:
                self._delete(f"{PARTIAL_PREFIX}{partial.stream_id}.{suffix}")
            self._delete(state)
        finally:
            if fd >= 0:
                os.close(fd)
        return Removal.REMOVED

    def _delete(self, name: str) -> None:
        info = self._lstat(name)
        if info is None:
            return
        if stat.S_ISDIR(info.st_mode):
            # rmtree with dir_fd works through file descriptors and never follows a symlink.
            shutil.rmtree(name, dir_fd=self._fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._fd)


def parse_state(data: bytes) -> tuple[Offer, int, bool]:
    """``(offer, stored_bytes, ended)`` of a state file's content (see
    :mod:`objstream.consumer.resume`).

    Raises:
        ValueError, ValidationError: it is not a state file this version writes.
    """
    header, _, rest = data.partition(b"\n")
    counts = rest.split(b"\n", 1)[0].decode("ascii").split()
    record = json.loads(header)
    if not isinstance(record, dict):
        raise ValueError("no offer record")
    offer = Offer.model_validate(record.get("offer"))
    if len(counts) not in (2, 3) or (len(counts) == 3 and counts[2] != ENDED):
        raise ValueError("no counts line")
    stored_bytes = int(counts[1])
    if stored_bytes < 0 or (offer.size is not None and stored_bytes > offer.size):
        raise ValueError("inconsistent counts")
    return offer, stored_bytes, len(counts) == 3


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock a receiver holds on a state file it works on; False if one
    does. (Kept until ``fd`` is closed.)"""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _reason(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "it is a symlink"
    return error.strerror or str(error)
