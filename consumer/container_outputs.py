"""Where a received container's bytes go in the file it is saved as: ``.safetensors``, ``.npz``,
``.json``, or a directory of files.

Each output takes the container entry by entry, as :class:`~objstream.consumer.container_sink.
ContainerSink` learns them: an entry's structure comes first (:meth:`Output.begin`, which checks
that the format can hold it and says where each of its payload buffers goes, a
:class:`~objstream.consumer.destinations.Destination`), then its payload bytes, which the sink
writes there as they arrive (``pwrite``: no entry is ever whole in memory), then
:meth:`Output.end`. :meth:`Output.finish`
writes what only the end can know (a ``.safetensors`` header, a ``.npz`` central directory),
syncs, and gives the file its final name.

Every decision depends only on the entries seen so far, so replaying the entries' structures
(a receiver that takes a stream over after a crash) lays the file out the same way, writing the
same headers again; the payload already written stays where it is.

- ``.safetensors``: tensors are written one after the other from a header space reserved
  before the first one: the exact length the sender announced in its offer
  (:func:`~objstream.common.safetensors_format.header_lengths`), so the file comes out as the
  safetensors package writes it, else an estimate
  (:func:`~objstream.common.safetensors_format.header_reserve`); the header, padded with
  spaces, fills it at the end (a header that outgrows it moves the tensors once). A
  big-endian array is byte-swapped on the way; a Fortran-ordered one cannot be written in C
  order as it arrives and is refused.
- ``.npz``: each entry is a stored zip member ``KEY.npy`` (:mod:`objstream.common.npz_format`),
  its CRC-32 computed as its bytes arrive and written into its local header at its end.
- ``.json``: entries without payload buffers only (strings, numbers...), kept until the end.
- a directory (a container named ``.../``): ``F/<key>`` entries are tensors of the
  ``.safetensors`` file ``F``, an ``F`` entry the bytes of file ``F``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from objstream.common import dtypes
from objstream.common.decoding import ArraySpec, BytesSpec, Described
from objstream.common.errors import SaveError
from objstream.common.naming import candidate_names, confined, safe_basename
from objstream.common.npz_format import (
    LOCAL_CRC_OFFSET,
    Member,
    central_directory,
    local_header,
    npy_header,
)
from objstream.common.safetensors_format import (
    METADATA_KEY,
    WIRE_TO_ST,
    SafetensorsError,
    check_metadata,
    header_reserve,
    padded_header,
    split_directory_key,
)
from objstream.consumer.destinations import Crc, Destination, StoredArray, open_output
from objstream.consumer.file_sink import DestinationFull, commit_partial, fsync_dir
from objstream.consumer.output_formats import (
    FORMATS,
    jsonable,
    npz_member,
    small_array,
    unsaveable,
)

log = logging.getLogger(__name__)

MOVE_BLOCK = 4 * 1024 * 1024
MAX_DEPTH = 16
"""Deepest folder of a directory container a peer may make under the destination."""


def _entry(described: Described, container_type: str, index: int, fmt: str) -> tuple[str, Any]:
    """``(name, value)`` of an entry: a dict's key and value, ``arr_N`` for a list's item."""
    if container_type == "set":
        raise SaveError(f"a set cannot be saved as {fmt}; name it .json")
    if container_type == "dict":
        key, value = described.raw
        return str(key), value
    return f"arr_{index}", described.raw


# -- .safetensors ---------------------------------------------------------------------------------


@dataclass
class SafetensorsFile:
    """One ``.safetensors`` file written tensor by tensor (see the module's description).

    Args:
        path: the (partial) file.
        expected: entries still to come when it is made (the header space depends on it).
        announced: the header length the sender announced with the file's first entry, if it
            did (the header space then).
    """

    path: Path
    expected: int
    announced: int | None = None
    fd: int = field(init=False)
    metadata: dict[str, str] | None = field(init=False, default=None)
    tensors: list[tuple[str, str, list[int], int]] = field(init=False, default_factory=list)
    codes: list[str] = field(init=False, default_factory=list)  # their wire dtypes
    _names: set[str] = field(init=False, default_factory=set)
    reserve: int | None = field(init=False, default=None)
    _seen: int = field(init=False, default=0)
    _data: int = field(init=False, default=0)  # tensor bytes laid out so far

    def __post_init__(self) -> None:
        self.fd = open_output(self.path)

    def add(self, name: str, value: Any, buffers: list[int]) -> list[Destination]:
        """Entry ``name``: ``__metadata__`` (kept for the header) or a tensor (laid out after
        the others: where its bytes go)."""
        self._seen += 1
        if name == METADATA_KEY and not buffers:
            if self.reserve is not None or self.metadata is not None:
                raise SaveError(f"entry {name!r} comes after the tensors")
            try:
                self.metadata = check_metadata(value, f"entry {name!r}")
            except SafetensorsError as e:
                raise SaveError(str(e)) from None
            return []
        if not isinstance(value, ArraySpec) or len(buffers) != 1:
            raise unsaveable(name, value, ".safetensors (arrays only)")
        code = dtypes.little_code(value.dtype_code)
        swap = value.dtype if code != value.dtype_code else None  # big-endian: swapped
        kind = WIRE_TO_ST.get(code)
        if kind is None:
            raise SaveError(
                f"entry {name!r}: dtype {value.dtype_code} has no safetensors equivalent"
            )
        if value.fortran and sum(n > 1 for n in value.shape) > 1:
            raise SaveError(
                f"entry {name!r}: a Fortran-ordered array cannot be written as .safetensors "
                "(C order) as it arrives; send it C-ordered, or name the container .npz"
            )
        if name in self._names:
            raise SaveError(f"entry {name!r} comes twice")
        self._names.add(name)
        if self.reserve is None:  # the first tensor: the header's space is decided now
            own = header_reserve(self.metadata, self.expected - self._seen + 1)
            # The exact length the sender announced makes the file the package would write
            # (no padding beyond 8 bytes); a peer's word, so bounded by a few times our own.
            announced = self.announced or 0
            self.reserve = announced if 0 < announced <= 4 * own else own
        offset = self.reserve + self._data
        self.tensors.append((name, kind, list(value.shape), value.nbytes))
        self.codes.append(code)
        self._data += value.nbytes
        return [Destination(self.fd, offset, value.nbytes, swap)]

    def write_header(self) -> int:
        """The header into its reserved space (a header that outgrew it moves the tensors
        first); returns the file's length."""
        reserve = self.reserve if self.reserve is not None else header_reserve(self.metadata, 0)
        header = padded_header(self.metadata, self.tensors, reserve)
        if header is None:
            grown = header_reserve(self.metadata, len(self.tensors) + 64)
            _move(self.fd, reserve, grown, self._data)
            reserve, header = grown, padded_header(self.metadata, self.tensors, grown)
            assert header is not None
        os.pwrite(self.fd, header, 0)
        os.ftruncate(self.fd, reserve + self._data)
        self.reserve = reserve
        return reserve + self._data

    def arrays(self) -> list[StoredArray]:
        """Where each tensor is in the finished file (call after :meth:`write_header`)."""
        assert self.reserve is not None
        at = self.reserve  # the header's length prefix and text
        found = []
        for (name, _, shape, size), code in zip(self.tensors, self.codes, strict=True):
            found.append(StoredArray(name, at, dtypes.numpy_dtype(code), tuple(shape)))
            at += size
        return found

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _move(fd: int, start: int, to: int, size: int) -> None:
    """Move ``size`` bytes at ``start`` to ``to`` (> ``start``) within ``fd``, last block first
    (the ranges overlap), a block at a time."""
    end = size
    while end > 0:
        begin = max(0, end - MOVE_BLOCK)
        block = os.pread(fd, end - begin, start + begin)
        os.pwrite(fd, block, to + begin)
        end = begin


# -- a container as one file ----------------------------------------------------------------------


@dataclass
class FileOutput:
    """A container saved as one file: ``.safetensors``, ``.npz`` or ``.json``.

    Args:
        dest: the destination directory.
        partial: the partial file in it.
        name: the final name (its suffix says the format: one of :data:`FORMATS`).
        container_type: ``dict``, ``list`` or ``set``.
        expected: entries the container announces.
    """

    dest: Path
    partial: Path
    name: str
    container_type: str
    expected: int
    fmt: str = field(init=False)
    _tensors: SafetensorsFile | None = field(init=False, default=None)
    _fd: int = field(init=False, default=-1)
    _pos: int = field(init=False, default=0)  # .npz: where the next member goes
    _members: list[Member] = field(init=False, default_factory=list)
    _crc: Crc | None = field(init=False, default=None)
    _json: Any = field(init=False, default=None)
    _arrays: list[StoredArray] = field(init=False, default_factory=list)  # .npz
    _names: set[str] = field(init=False, default_factory=set)  # .npz members

    def __post_init__(self) -> None:
        self.fmt = Path(self.name).suffix.lower()
        if self.fmt not in FORMATS:
            raise SaveError(f"{self.name!r}: not a format a container is saved as {FORMATS}")
        if self.container_type == "set" and self.fmt != ".json":
            raise SaveError(f"a set cannot be saved as {self.fmt}; name it .json")
        if self.fmt == ".safetensors":
            self._tensors = SafetensorsFile(self.partial, self.expected)
        else:
            self._fd = open_output(self.partial)
        self._json = {} if self.container_type == "dict" else []

    def begin(
        self, index: int, described: Described, header: int | None = None
    ) -> list[Destination]:
        if self.fmt == ".json":
            self._json_entry(index, described)
            return []
        name, value = _entry(described, self.container_type, index, self.fmt)
        if self._tensors is not None:
            if index == 0:
                self._tensors.announced = header
            return self._tensors.add(name, value, described.buffers)
        return self._npz_entry(name, value, described.buffers)

    def _json_entry(self, index: int, described: Described) -> None:
        if described.buffers:
            raise SaveError(
                f"entry {index} holds arrays or large bytes; name the container .npz or "
                ".safetensors"
            )
        if self.container_type == "dict":
            key, value = described.raw
            if str(key) in self._json:
                raise SaveError(f"entry {key!r} comes twice")
            self._json[str(key)] = jsonable(value, key)
        else:
            self._json.append(jsonable(described.raw, index))

    def _npz_entry(self, name: str, value: Any, buffers: list[int]) -> list[Destination]:
        if name == METADATA_KEY and not buffers and isinstance(value, dict):
            log.warning("%s: .npz has no place for safetensors __metadata__; dropped", self.name)
            return []
        member = npz_member(name)
        if member in self._names:
            raise SaveError(f"entry {name!r} comes twice")
        self._names.add(member)
        small: bytes | None = None
        if isinstance(value, ArraySpec) and len(buffers) == 1:
            if value.dtype_code in dtypes.ML_DTYPES:
                raise SaveError(
                    f"entry {name!r}: {value.dtype_code} cannot be saved as .npz (numpy would "
                    "read it back as raw bytes); name it .safetensors"
                )
            dtype, shape, fortran = value.dtype, value.shape, value.fortran
        elif not buffers:
            array = small_array(value, name)
            dtype, shape, fortran, small = array.dtype, array.shape, False, array.tobytes()
        else:
            raise unsaveable(name, value, ".npz")
        ml = dtypes.ml_name(dtype)
        if ml is not None:
            raise SaveError(
                f"entry {name!r}: {ml} cannot be saved as .npz (numpy would read it back as raw "
                "bytes); name it .safetensors"
            )
        head = npy_header(dtype, shape, fortran)
        nbytes = len(small) if small is not None else buffers[0]
        local = local_header(member, len(head) + nbytes)
        data = self._pos + len(local) + len(head)
        self._members.append(Member(member, self._pos, len(head) + nbytes, 0))
        self._arrays.append(StoredArray(name, data, dtype, shape, fortran))
        os.pwrite(self._fd, local + head, self._pos)
        self._pos = data + nbytes
        self._crc = Crc(zlib.crc32(head))
        if small is None:
            return [Destination(self._fd, data, nbytes, crc=self._crc)]
        os.pwrite(self._fd, small, data)
        self._crc.value = zlib.crc32(small, self._crc.value)
        return []

    def end(self, index: int) -> None:
        if self._crc is None:
            return
        last = self._members[-1]
        self._members[-1] = Member(last.name, last.offset, last.size, self._crc.value)
        at = last.offset + LOCAL_CRC_OFFSET
        os.pwrite(self._fd, self._crc.value.to_bytes(4, "little"), at)
        self._crc = None

    def finish(self) -> Path:
        if self._tensors is not None:
            self._tensors.write_header()
            fd = self._tensors.fd
        else:
            fd = self._fd
            if self.fmt == ".json":
                tail = json.dumps(self._json).encode()
                os.pwrite(fd, tail, 0)
                os.ftruncate(fd, len(tail))
            else:
                tail = central_directory(self._members, self._pos)
                os.pwrite(fd, tail, self._pos)
                os.ftruncate(fd, self._pos + len(tail))
        try:
            return commit_partial(fd, self.partial, self.dest, self.name)
        finally:
            self.close()

    def arrays(self) -> list[StoredArray]:
        """Where each array is in the finished file (``.safetensors`` and ``.npz``), for
        memory maps."""
        if self._tensors is not None:
            return self._tensors.arrays()
        return list(self._arrays)

    def close(self) -> None:
        if self._tensors is not None:
            self._tensors.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        self.partial.unlink(missing_ok=True)


# -- a directory of files -------------------------------------------------------------------------


@dataclass
class DirOutput:
    """A directory container (a sharded checkpoint) saved as the directory it was sent from
    (fields as :class:`FileOutput`'s).

    Everything goes into a partial directory, each file synced; on :meth:`finish` the
    directory gets the first free final name (``NAME``, ``NAME-1``...) and is never merged into
    an existing one.
    """

    dest: Path
    partial: Path
    name: str
    container_type: str
    expected: int
    _shards: dict[str, SafetensorsFile] = field(init=False, default_factory=dict)
    _files: dict[str, int] = field(init=False, default_factory=dict)
    _folders: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        if self.container_type != "dict":
            raise SaveError(f"a directory container must be a dict, not a {self.container_type}")
        self.partial.mkdir(mode=0o700, exist_ok=True)  # it exists when a stream is taken over

    def begin(
        self, index: int, described: Described, header: int | None = None
    ) -> list[Destination]:
        key, value = described.raw
        key = str(key)
        file, rest = split_directory_key(key)
        if file in self._files or file in self._folders:
            raise SaveError(f"entry {key!r}: {file!r} is not a new file of this directory")
        if rest is not None:
            shard = self._shards.get(file)
            if shard is None:
                path = self._place(key, file)
                shard = SafetensorsFile(path, self.expected - index, header)
                self._shards[file] = shard
            return shard.add(rest, value, described.buffers)
        if file in self._shards:
            raise SaveError(f"entry {key!r}: {file!r} is a .safetensors file of this directory")
        fd = self._files[file] = open_output(self._place(key, file))
        if isinstance(value, BytesSpec) and len(described.buffers) == 1:
            os.ftruncate(fd, value.length)
            return [Destination(fd, 0, value.length)]
        if isinstance(value, bytes | bytearray) and not described.buffers:
            os.pwrite(fd, value, 0)
            os.ftruncate(fd, len(value))
            return []
        raise SaveError(f"entry {key!r}: a file of a directory container must be bytes")

    def _place(self, key: str, file: str) -> Path:
        """Where ``file`` (a ``/``-separated path a peer chose) goes in the partial directory,
        its folders made: every part a plain name that :func:`safe_basename` keeps as it is
        (no ``..``, no hidden or empty part, no separator of another system), at most
        :data:`MAX_DEPTH` folders deep, never where a file of this directory already is."""
        parts = file.split("/")
        if len(parts) > MAX_DEPTH + 1 or any(safe_basename(p) != p for p in parts):
            raise SaveError(f"entry {key!r}: {file!r} is not a plain relative file path")
        folders = ["/".join(parts[:n]) for n in range(1, len(parts))]
        if any(f in self._files or f in self._shards for f in folders):
            raise SaveError(f"entry {key!r}: a file of this directory is in the way of {file!r}")
        if folders:
            (self.partial / folders[-1]).mkdir(parents=True, exist_ok=True)
            self._folders.update(folders)
        return self.partial / file

    def end(self, index: int) -> None:
        pass

    def finish(self) -> Path:
        for folder in sorted(self._folders, key=len, reverse=True):
            fsync_dir(self.partial / folder)
        for shard in self._shards.values():
            shard.write_header()
            os.fsync(shard.fd)
        for fd in self._files.values():
            os.fsync(fd)
        self.close()
        fsync_dir(self.partial)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.partial, 0o777 & ~umask)
        base = safe_basename(self.name.rstrip("/"))
        for name in candidate_names(base):
            final = confined(self.dest, name)
            try:
                # Claim the name (mkdir fails if anything is there), then rename onto the empty
                # directory just made: rename replaces an empty directory atomically.
                os.mkdir(final)
            except FileExistsError:
                continue
            os.rename(self.partial, final)
            fsync_dir(self.dest)
            return final
        raise DestinationFull(errno.EEXIST, f"no free name for {base!r} in {self.dest}")

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        for fd in self._files.values():
            if fd >= 0:
                os.close(fd)
        self._files = dict.fromkeys(self._files, -1)

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.partial, ignore_errors=True)
