"""What a receiving site holds already, for delta transfers: an index next to what it stored.

Each destination directory keeps ``.objstream.index.sqlite3`` (SQLite, the standard library's):
one row per object committed there (its path in the directory, the name it was offered under,
the broker user that sent it, its size, modification time and inode, its SHA-256), and, made
the first time a delta asks for them, the SHA-256 of each of its chunks at a chunk size. It
holds digests only, never a copy of the data, and survives restarts.

Nothing in it is trusted without its digest: an object whose size, modification time or inode
changed since it was recorded is dropped from the index, and every chunk copied from it is
hashed again and compared with the sender's manifest before it counts
(:class:`~objstream.common.receive_delta.DeltaReceive`).

A sender's manifest is matched only against objects **the same broker user sent**: a site
cannot learn, by offering digests, whether another party's data is stored here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import struct
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from objstream.common import safetensors_format
from objstream.common.delta import Holds, Manifest, ManifestBuilder, asks_delta, offers_delta
from objstream.common.errors import ObjstreamError
from objstream.common.protocol import CONTAINER_KIND, FILE_KIND, Offer
from objstream.common.safetensors_format import SAFETENSORS_SUFFIX
from objstream.common.streaming import ObjectStreamer

log = logging.getLogger(__name__)

INDEX_NAME = ".objstream.index.sqlite3"
KINDS = (FILE_KIND, CONTAINER_KIND)
NPZ_SUFFIX = ".npz"
TABLES = ("objects", "pieces", "entries", "hashed")
HASH_AT_ONCE = 4
"""Objects hashed at one chunk size for one manifest at most (the most recent of the same
name first); the others count once a manifest had them hashed."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    path TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, user TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ino INTEGER NOT NULL,
    sha256 TEXT NOT NULL, stored REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pieces (
    path TEXT NOT NULL, chunk_size INTEGER NOT NULL, seq INTEGER NOT NULL,
    length INTEGER NOT NULL, sha256 BLOB NOT NULL, PRIMARY KEY (path, chunk_size, seq));
CREATE TABLE IF NOT EXISTS entries (
    path TEXT NOT NULL, chunk_size INTEGER NOT NULL, entry INTEGER NOT NULL,
    key BLOB NOT NULL, first INTEGER NOT NULL, parts INTEGER NOT NULL,
    PRIMARY KEY (path, chunk_size, entry));
CREATE TABLE IF NOT EXISTS hashed (
    path TEXT NOT NULL, chunk_size INTEGER NOT NULL, PRIMARY KEY (path, chunk_size));
CREATE INDEX IF NOT EXISTS objects_user ON objects (user, kind);
"""


@dataclass(frozen=True)
class Location:
    """Where a held chunk is: ``length`` bytes at ``offset`` of the file ``path`` (in the
    directory), or, for a container, chunk ``piece`` of the container stored at ``path``
    cut as a sender cuts it."""

    path: str
    offset: int = 0
    length: int = 0
    piece: int | None = None


@dataclass
class Held:
    """What one stream holds of its manifest: the bitmap and where each held chunk is."""

    holds: Holds
    where: dict[int, Location] = field(default_factory=dict)
    reused: int = 0  # bytes copied from what was held
    sources: dict[str, ObjectStreamer] = field(default_factory=dict)  # containers, opened once


class HeldIndex:
    """The index of one destination directory (see the module's docstring).

    Every call opens its own SQLite connection: the index is used from the connection's
    thread and the disk thread, and by every receiver of the directory.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.path = dest / INDEX_NAME
        self._schema_made = False  # by this object: once, not on every connection

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if not self.path.exists():
            self._schema_made = False  # (made anew if someone removed the file)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                if not self._schema_made:
                    db.executescript(_SCHEMA)
                    self._schema_made = True
                yield db
        finally:
            db.close()

    # -- what is stored -------------------------------------------------------------------------

    def record(self, path: Path, offer: Offer, user: str | None, sha256: str) -> None:
        """An object was committed at ``path``: it may serve later deltas from ``user`` (a
        file; a container saved as ``.safetensors``)."""
        if user is None or not _indexable(offer.kind, path):
            return
        try:
            rel = path.resolve().relative_to(self.dest.resolve()).as_posix()
            st = os.stat(path, follow_symlinks=False)
            with self._db() as db:
                _forget(db, rel, TABLES[1:])
                db.execute(
                    "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rel,
                        offer.name,
                        offer.kind,
                        user,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ino,
                        sha256,
                        time.time(),
                    ),
                )
        except (OSError, ValueError, sqlite3.Error) as e:
            log.warning("cannot index %s for later deltas: %s", path, e)

    def wanted(self, offer: Offer, user: str | None) -> bool:
        """Ask for ``offer``'s manifest? It allows a delta, and something of its kind that
        ``user`` sent is still here as it was stored (a manifest costs the sender a read of the
        whole source before the first chunk: not for nothing)."""
        if offer.kind not in KINDS or user is None or offer.resume_from or offer.inline:
            return False
        if not asks_delta(offer.info) or not self.path.exists():
            return False
        if not offers_delta(
            random_access=True, chunk_size=offer.chunk_size, chunk_count=offer.chunk_count
        ):
            return False  # a manifest or an answer beyond what the protocol bounds
        try:  # (reads only: this runs on the connection's thread; find() drops what went)
            with self._db() as db:
                return any(same for _, _, same in self._recorded(db, user, offer.kind))
        except sqlite3.Error as e:
            log.warning("cannot read the index %s: %s", self.path, e)
            return False

    # -- what a manifest finds ------------------------------------------------------------------

    def find(self, manifest: Manifest, offer: Offer, user: str) -> Held:
        """Which chunks of ``manifest`` this directory holds, from what ``user`` sent it."""
        held = Held(Holds(manifest.chunk_count))
        with self._db() as db:
            objects = self._current(db, user, offer.kind)
            self._hash_some(db, objects, offer)
            if offer.kind == CONTAINER_KIND:
                _find_entries(db, manifest, offer.chunk_size, user, held)
            else:
                _find_chunks(db, manifest, offer, user, held)
        return held

    def _current(self, db: sqlite3.Connection, user: str, kind: str) -> list[tuple[str, str]]:
        """``user``'s objects still as they were recorded (path, name), newest first; the
        others are dropped from the index."""
        current = []
        for path, name, same in self._recorded(db, user, kind):
            if same:
                current.append((path, name))
                continue
            log.info("%s changed or went since it was stored: no longer indexed", path)
            _forget(db, path, TABLES)
        return current

    def _recorded(
        self, db: sqlite3.Connection, user: str, kind: str
    ) -> Iterator[tuple[str, str, bool]]:
        """``user``'s objects of ``kind``, newest first: path, name, and whether the file is
        still as it was recorded (size, mtime, inode)."""
        rows = db.execute(
            "SELECT path, name, size, mtime_ns, ino FROM objects WHERE user = ? AND kind = ? "
            "ORDER BY stored DESC",
            (user, kind),
        ).fetchall()
        for path, name, size, mtime_ns, ino in rows:
            try:
                st = os.stat(self._confined(path), follow_symlinks=False)
                same = (st.st_size, st.st_mtime_ns, st.st_ino) == (size, mtime_ns, ino)
            except (OSError, ValueError):
                same = False
            yield path, name, same

    def _hash_some(
        self, db: sqlite3.Connection, objects: list[tuple[str, str]], offer: Offer
    ) -> None:
        """Hash, at ``chunk_size``, the objects of the offer's name first and then the newest,
        at most :data:`HASH_AT_ONCE` of them not hashed at that size yet."""
        kind, name, chunk_size = offer.kind, offer.name, offer.chunk_size
        done = {
            path
            for (path,) in db.execute("SELECT path FROM hashed WHERE chunk_size = ?", (chunk_size,))
        }
        todo = [p for p, n in objects if n == name] + [p for p, n in objects if n != name]
        for path in [p for p in dict.fromkeys(todo) if p not in done][:HASH_AT_ONCE]:
            try:
                if kind == CONTAINER_KIND:
                    entries = self._entry_keys(path, chunk_size)
                    db.executemany(
                        "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)", entries
                    )
                else:
                    pieces = list(self._chunk_digests(path, chunk_size))
                    db.executemany("INSERT OR REPLACE INTO pieces VALUES (?, ?, ?, ?, ?)", pieces)
            except (OSError, ValueError, ObjstreamError) as e:
                log.info("cannot hash %s for a delta: %s", path, e)
                continue
            db.execute("INSERT OR REPLACE INTO hashed VALUES (?, ?)", (path, chunk_size))

    def _chunk_digests(
        self, path: str, chunk_size: int
    ) -> Iterator[tuple[str, int, int, int, bytes]]:
        buffer = bytearray(chunk_size)
        with open(self._confined(path), "rb", buffering=0, opener=_no_follow) as f:
            seq = 0
            while n := f.readinto(buffer):
                yield path, chunk_size, seq, n, hashlib.sha256(memoryview(buffer)[:n]).digest()
                seq += 1

    def _entry_keys(
        self, path: str, chunk_size: int
    ) -> list[tuple[str, int, int, bytes, int, int]]:
        """The entries of the container saved at ``path``, cut as a sender cuts it."""
        builder = ManifestBuilder()
        source = self.open_container(path, chunk_size)
        for seq in range(source.chunk_count or 0):
            piece = source.piece(seq)
            builder.add(piece.data, piece.meta)
        manifest = builder.build()
        return [
            (path, chunk_size, index, manifest.entry_key(index), entry.first, entry.parts)
            for index, entry in enumerate(manifest.entries)
        ]

    def open_container(self, path: str, chunk_size: int) -> ObjectStreamer:
        """The container saved at ``path`` (a ``.safetensors``, a ``.npz`` or a directory, read
        lazily), cut into chunks as a sender streams it, with the sender's encoder.

        Raises:
            ObjstreamError, OSError, ValueError: it cannot be read so.
        """
        from objstream.producer.container_files import load_directory
        from objstream.producer.container_source import ContainerSource

        where = self._confined(path)
        source: ContainerSource
        if where.is_dir():
            source = ContainerSource(load_directory(where), path + "/")
        elif where.suffix.lower() == NPZ_SUFFIX:
            source = ContainerSource(lazy_npz(where), path)
        else:
            source = ContainerSource(safetensors_format.load(where), path)
        source.prepare(chunk_size)
        return source

    # -- copying a held chunk -------------------------------------------------------------------

    def read(self, held: Held, where: Location, digest: bytes, chunk_size: int) -> bytes | None:
        """The held chunk at ``where`` if it still hashes to ``digest`` (else None)."""
        try:
            if where.piece is not None:
                source = held.sources.get(where.path)
                if source is None:
                    source = held.sources[where.path] = self.open_container(where.path, chunk_size)
                data = bytes(source.piece(where.piece).data)
            else:
                fd = os.open(self._confined(where.path), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    data = os.pread(fd, where.length, where.offset)
                finally:
                    os.close(fd)
        except (OSError, ValueError, ObjstreamError) as e:
            log.info("cannot read a held chunk of %s: %s", where.path, e)
            return None
        if hashlib.sha256(data).digest() != digest:
            log.info("a held chunk of %s changed: the sender sends it", where.path)
            return None
        return data

    def _confined(self, rel: str) -> Path:
        """``rel`` in the directory, never outside it (symlinks followed to check).

        Raises:
            ValueError: it leads outside.
        """
        path = self.dest / rel
        if not path.resolve().is_relative_to(self.dest.resolve()):
            raise ValueError(f"{rel!r} leads outside {self.dest}")
        return path


def _find_chunks(
    db: sqlite3.Connection, manifest: Manifest, offer: Offer, user: str, held: Held
) -> None:
    """A file's chunks, each wherever a chunk of its digest and length is."""
    chunk_size = offer.chunk_size
    known: dict[tuple[bytes, int], Location] = {}
    rows = db.execute(
        "SELECT p.path, p.seq, p.length, p.sha256 FROM pieces p JOIN objects o "
        "ON p.path = o.path WHERE o.user = ? AND p.chunk_size = ?",
        (user, chunk_size),
    )
    for path, seq, length, digest in rows:
        known.setdefault((bytes(digest), length), Location(path, seq * chunk_size, length))
    for seq in range(manifest.chunk_count):
        where = known.get((manifest.digest(seq), offer.chunk_length(seq) or 0))
        if where is not None:
            held.holds.add(seq)
            held.where[seq] = where


def _find_entries(
    db: sqlite3.Connection, manifest: Manifest, chunk_size: int, user: str, held: Held
) -> None:
    """A container's entries, each wherever an entry of the same bytes is (its chunks'
    digests, head and size: :meth:`Manifest.entry_key`): all its chunks or none."""
    known: dict[bytes, tuple[str, int]] = {}
    rows = db.execute(
        "SELECT e.path, e.key, e.first FROM entries e JOIN objects o ON e.path = o.path "
        "WHERE o.user = ? AND e.chunk_size = ?",
        (user, chunk_size),
    )
    for path, key, first in rows:
        known.setdefault(bytes(key), (path, first))
    for index, entry in enumerate(manifest.entries):
        found = known.get(manifest.entry_key(index))
        if found is None:
            continue
        path, first = found
        for part in range(entry.parts):
            held.holds.add(entry.first + part)
            held.where[entry.first + part] = Location(path, piece=first + part)


def _forget(db: sqlite3.Connection, path: str, tables: tuple[str, ...]) -> None:
    for table in tables:  # names of ours, never a peer's
        db.execute(f"DELETE FROM {table} WHERE path = ?", (path,))


def _indexable(kind: str, path: Path) -> bool:
    """Can a committed object of ``kind``, saved at ``path``, serve a delta? A file, or a
    container saved as ``.safetensors``, ``.npz`` or a directory (read back lazily, as it was
    sent; a ``.json`` holds no arrays worth it)."""
    suffix = path.suffix.lower()
    return kind == FILE_KIND or (
        kind == CONTAINER_KIND and (suffix in (SAFETENSORS_SUFFIX, NPZ_SUFFIX) or path.is_dir())
    )


def lazy_npz(path: Path) -> dict[str, Any]:
    """A ``.npz`` whose members are stored (as a receiver writes it), each array read from the
    file as it is sent, never loaded whole; never unpickled.

    Raises:
        ObjstreamError: a compressed member, an object or Fortran-ordered array, not a ``.npy``.
    """
    import numpy as np  # only for a container: receiving files never loads it

    from objstream.common.codec import FileRange, RawArray

    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    arrays: dict[str, RawArray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for member in archive.infolist():
            if not member.filename.endswith(".npy") or member.compress_type != zipfile.ZIP_STORED:
                raise ObjstreamError(f"{path}: member {member.filename!r} is not a stored .npy")
            f.seek(member.header_offset)
            local = f.read(30)
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            f.seek(member.header_offset + 30 + name_length + extra_length)
            reader = readers.get(np.lib.format.read_magic(f))
            if reader is None:
                raise ObjstreamError(
                    f"{path}: {member.filename!r}: an .npy header of another version"
                )
            shape, fortran, dtype = reader(f)
            if fortran or dtype.hasobject:
                raise ObjstreamError(f"{path}: {member.filename!r} is not a plain C-ordered array")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            key = member.filename[: -len(".npy")]
            arrays[key] = RawArray(dtype.str, tuple(shape), FileRange(str(path), f.tell(), nbytes))
    return arrays


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)
