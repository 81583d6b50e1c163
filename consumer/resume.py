"""Resuming a file stream (or a spooled container) after the receiving process died, or a
file stream after its sender did.

Next to each partial file the receiver keeps a small state file, ``.objstream-<id>.state``:
a first line with the offer (JSON), the sender's ``reply_to``, the broker user the offer came
from and the name it was asked for (retrievals), written once, and a fixed-width
second line ``stored stored_bytes`` (``stored stored_bytes ended`` once the stream is over),
overwritten in place (one ``pwrite``, which a killed process cannot tear) each time the receiver
reports progress. A receiver holds an exclusive ``flock`` on
the state file while it works on the stream, so a receiver starting later (or a second one on
the same directory) resumes only streams whose owner is gone. The prefix's SHA-256 is recomputed
from the partial file; chunks the old process had not acked are redelivered by the broker, and
anything else missing is resent by the sender on request.

When the *sender* goes away (a stream that timed out or was aborted), the verified prefix is kept
the same way, marked ``ended``: no later receiver takes it over (nobody would send the rest), and
:func:`find_kept` finds it when the same object is retrieved from the same site again: the
request then carries ``resume_from`` and the prefix's SHA-256, and only the rest moves.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from objstream.common.admission import Kept
from objstream.common.naming import PARTIAL_PREFIX, partial_name
from objstream.common.protocol import CONTAINER_KIND, FILE_KIND, Offer, to_headers

log = logging.getLogger(__name__)

STATE_SUFFIX = ".state"
COUNTS_WIDTH = 48  # the fixed-width "stored stored_bytes [ended]" line, newline included
ENDED = "ended"


def state_path(dest: Path, stream_id: str) -> Path:
    return dest / f"{PARTIAL_PREFIX}{stream_id}{STATE_SUFFIX}"


class StreamState:
    """The state file of one stream, locked by this process while it is open."""

    def __init__(self, path: Path, fd: int, header_length: int) -> None:
        self.path = path
        self._fd = fd
        self._header_length = header_length

    @classmethod
    def create(
        cls,
        dest: Path,
        offer: Offer,
        reply_to: str,
        requested: str | None = None,
        user_id: str | None = None,
    ) -> StreamState:
        """``requested``: the name a retrieval asked for (push streams: the offer's name);
        ``user_id``: the broker user the offer came from (its data must come from it too)."""
        path = state_path(dest, offer.stream_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {
            "offer": to_headers(offer),
            "reply_to": reply_to,
            "requested": requested,
            "user_id": user_id,
        }
        header = json.dumps(record).encode() + b"\n"
        os.pwrite(fd, header, 0)
        state = cls(path, fd, len(header))
        state.save(0, 0)
        return state

    @property
    def locked(self) -> bool:
        """This process still holds the state (neither released nor removed)."""
        return self._fd >= 0

    def save(self, stored: int, stored_bytes: int, *, ended: bool = False) -> None:
        """Record the verified prefix; ``ended``: its stream is over (the sender went away)."""
        counts = f"{stored} {stored_bytes}{' ' + ENDED if ended else ''}"
        line = counts.ljust(COUNTS_WIDTH - 1).encode() + b"\n"
        os.pwrite(self._fd, line, self._header_length)

    def release(self) -> None:
        """Let go of the stream, keeping the file (and the lock goes): a successor resumes it."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # releases the lock
            self._fd = -1


@dataclass
class Resumable:
    """A stream found on disk whose receiver is gone."""

    offer: Offer
    reply_to: str
    stored: int
    stored_bytes: int
    state: StreamState
    partial: Path
    requested: str
    """The name to ask the sender for to resume it."""
    user_id: str | None = None
    """The broker user the offer came from."""
    pushed: bool = False
    """A push (not a retrieval of ours): its sender must still be one ``accept_from`` names."""
    ended: bool = False
    """Its stream is over (the sender went away): only a retrieval goes on from it."""
    _sha: Any = field(default=None, init=False, repr=False, compare=False)

    def facts(self) -> Kept:
        """What an offer must continue (see :func:`objstream.common.admission.continues`)."""
        return Kept(self.offer.sender, self.offer.chunk_size, self.stored, self.stored_bytes)

    def prefix_sha256(self) -> Any:
        """SHA-256 (a hashlib object) of the bytes already stored, read back from the partial
        file once; the reassembler that resumes the stream takes this object over."""
        if self._sha is None:
            self._sha = self._hash_prefix()
        return self._sha

    def discard(self) -> None:
        """Give the prefix up: its state and partial object go."""
        self.state.remove()
        remove_partial(self.partial)

    def _hash_prefix(self) -> Any:
        sha = hashlib.sha256()
        left = self.stored_bytes
        with open(self.partial, "rb") as f:
            while left:
                block = f.read(min(left, 4 << 20))
                if not block:
                    raise OSError(f"{self.partial} is shorter than its state says")
                sha.update(block)
                left -= len(block)
        return sha


def find_resumable(dest: Path) -> tuple[list[Resumable], list[Resumable]]:
    """Streams in ``dest`` left by a receiver that died, now locked by this process, and the
    prefixes of streams that ended (their sender went away), not locked: nobody takes those
    over, a retrieval of the same object resumes them (:func:`find_kept`).

    Unreadable state files (or ones for another kind than files) are left alone and logged.
    """
    live: list[Resumable] = []
    ended: list[Resumable] = []
    for item in _unowned(dest):
        if item.ended:
            item.state.release()
            ended.append(item)
        else:
            live.append(item)
    return live, ended


def find_kept(dest: Path, sender: str, requested: str) -> Resumable | None:
    """The kept prefix of file ``requested`` from site ``sender`` in ``dest``, if nobody holds
    it (locked by this process then); the one with the most bytes if there are several."""
    best: Resumable | None = None
    for item in _unowned(dest):
        if (
            item.offer.kind != FILE_KIND
            or item.offer.sender != sender
            or item.requested != requested
        ):
            item.state.release()
        elif best is None or item.stored_bytes > best.stored_bytes:
            if best is not None:
                best.state.release()
            best = item
        else:
            item.state.release()
    return best


def adopt(
    kept: Resumable, dest: Path, offer: Offer, reply_to: str, user_id: str | None = None
) -> StreamState:
    """Make the kept prefix the start of the new stream ``offer``: its partial file and state
    take the new stream's names (the old state goes last, so a crash in between loses nothing
    but this attempt)."""
    state = StreamState.create(dest, offer, reply_to, kept.requested, user_id)
    state.save(kept.stored, kept.stored_bytes)
    # Bytes past the verified prefix (written after the last record) must not outlive it.
    os.truncate(kept.partial, kept.stored_bytes)
    os.rename(kept.partial, dest / partial_name(offer.stream_id))
    kept.state.remove()
    return state


def _unowned(dest: Path) -> Iterator[Resumable]:
    """Every readable stream state in ``dest`` whose receiver is gone, locked as it is yielded."""
    for path in sorted(dest.glob(f"{PARTIAL_PREFIX}*{STATE_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live receiver owns it
            continue
        try:
            item = _load(dest, path, fd)
        except (OSError, ValueError, ValidationError) as e:
            log.warning("cannot resume from %s: %s", path, e)
            os.close(fd)
            continue
        yield item


def _load(dest: Path, path: Path, fd: int) -> Resumable:
    with os.fdopen(os.dup(fd), "rb") as f:
        header = f.readline()
        counts = f.readline()
    data = json.loads(header)
    offer = Offer.model_validate(data["offer"])
    reply_to = data["reply_to"]
    requested = data.get("requested") or offer.name
    user_id = data.get("user_id")
    if offer.kind not in (FILE_KIND, CONTAINER_KIND) or not isinstance(reply_to, str):
        raise ValueError(f"streams of kind {offer.kind!r} do not resume")
    if not isinstance(requested, str):
        raise ValueError("no name to ask for")
    if user_id is not None and not isinstance(user_id, str):
        raise ValueError("user_id is not a string")
    stored_text, stored_bytes_text, *flags = counts.decode().split()
    if flags not in ([], [ENDED]):
        raise ValueError(f"unknown state {' '.join(flags)!r}")
    stored, stored_bytes = int(stored_text), int(stored_bytes_text)
    partial = dest / partial_name(offer.stream_id)
    if offer.kind == CONTAINER_KIND:
        # Spooled (the stream's bytes), or stored (a file or a directory laid out as the
        # container is saved, replayed from its journal): its reader checks it.
        if not partial.exists():
            raise ValueError(f"partial object {partial} is missing")
    elif not partial.is_file() or partial.stat().st_size < stored_bytes:
        raise ValueError(f"partial file {partial} is missing or short")
    if offer.size is None or stored_bytes > offer.size or stored_bytes > stored * offer.chunk_size:
        raise ValueError("inconsistent counts")
    if offer.kind == FILE_KIND and stored_bytes != min(stored * offer.chunk_size, offer.size):
        raise ValueError("inconsistent counts")
    state = StreamState(path, fd, len(header))
    pushed = data.get("requested") is None
    return Resumable(
        offer,
        reply_to,
        stored,
        stored_bytes,
        state,
        partial,
        requested,
        user_id,
        pushed,
        ended=bool(flags),
    )


def clear_stream(dest: Path, stream_id: str) -> bool:
    """Before a stream is set up for an offer: remove what a dead receiver left of the same
    stream (it had taken the offer, and died before it acked it, so the broker delivered it
    again: its partial object and state file, with no byte of data). Returns False, and
    removes nothing, if a live receiver holds the stream's state (it took the stream over)."""
    path = state_path(dest, stream_id)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    if fd >= 0:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False  # a live receiver holds it
        path.unlink(missing_ok=True)
        os.close(fd)
    partial = dest / partial_name(stream_id)
    if partial.exists() or partial.is_symlink():
        log.info("removing what a dead receiver left of stream %s", stream_id)
        remove_partial(partial)
    return True


def remove_abandoned(dest: Path, ttl: float) -> list[Path]:
    """Delete partial files (and their state) untouched for longer than ``ttl`` seconds.

    Only files nobody holds: a state file locked by a live receiver is left alone. Returns what
    was removed.
    """
    removed: list[Path] = []
    cutoff = time.time() - ttl
    for partial in dest.glob(f"{PARTIAL_PREFIX}*.part"):
        state = partial.with_suffix(STATE_SUFFIX)
        try:
            if max(partial.stat().st_mtime, _mtime(state)) > cutoff:
                continue
            if state.exists():
                fd = os.open(state, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live receiver holds it
                finally:
                    os.close(fd)
                state.unlink(missing_ok=True)
            remove_partial(partial)
        except OSError as e:
            log.debug("cannot clean %s: %s", partial, e)
            continue
        log.info("removed %s, abandoned for more than %g s", partial, ttl)
        removed.append(partial)
    return removed


def remove_partial(partial: Path) -> None:
    """Remove a partial object (a file, or a directory for a directory container) and the
    files kept beside it (a container's journal)."""
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)
    stem = partial.name.removesuffix(".part")
    for sibling in partial.parent.glob(f"{glob.escape(stem)}.*"):
        if sibling.suffix != STATE_SUFFIX:
            sibling.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
