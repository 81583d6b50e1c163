"""Saving a directory container (a sharded checkpoint) as the directory it was sent from.

A container whose name ends with ``/`` is a flat dict of files (see
``producer/container_files.py:load_directory``): an entry ``"F/<key>"`` belongs to the
``.safetensors`` file ``F`` (``<key>`` a tensor or ``__metadata__``), an entry ``"F"`` holds the
raw bytes of file ``F``. Everything is written into a partial directory, each file fsynced; on
commit the directory gets the first free final name (``NAME``, ``NAME-1``...) and is never merged
into an existing one.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from objstream.common.naming import candidate_names, confined, partial_name, safe_basename
from objstream.consumer.container_assembler import ContainerEntry
from objstream.consumer.file_sink import DestinationFull, fsync_dir
from objstream.consumer.safetensors_writer import SafetensorsWriter, SaveError


class ContainerDir:
    """Writes one directory container into ``DEST/<partial dir>``, then commits it."""

    def __init__(self, dest: Path, stream_id: str, name: str) -> None:
        self.dest = dest.resolve()
        self.name = safe_basename(name.rstrip("/"))
        self.path = self.dest / partial_name(f"{stream_id}-dir")
        os.mkdir(self.path, 0o700)
        self._shards: dict[str, SafetensorsWriter] = {}
        self._files: set[str] = set()

    def add(self, entry: ContainerEntry) -> None:
        """Write one entry: a tensor or metadata of a shard, or a whole side file."""
        if entry.container_type != "dict":
            raise SaveError(f"a directory container must be a dict, not a {entry.container_type}")
        key = str(entry.key)
        file, sep, rest = key.partition("/")
        if not file or safe_basename(file) != file or file in self._files:
            raise SaveError(f"entry {key!r}: {file!r} is not a plain, new file name")
        if sep:
            if not file.lower().endswith(".safetensors"):
                raise SaveError(f"entry {key!r}: only a .safetensors file has entries")
            shard = self._shards.get(file)
            if shard is None:
                spool = self.path / partial_name(f"{len(self._shards)}-data")
                shard = self._shards[file] = SafetensorsWriter(spool)
            shard.add(rest, entry.value)
            return
        if not isinstance(entry.value, bytes | bytearray) or file in self._shards:
            raise SaveError(f"entry {key!r}: a file of a directory container must be bytes")
        self._files.add(file)
        with open(self.path / file, "xb") as f:
            f.write(entry.value)
            os.fsync(f.fileno())

    def commit(self, container_type: str) -> Path:
        """Finish every shard, then give the directory its final name; returns its path."""
        for file, shard in self._shards.items():
            with open(self.path / file, "xb") as f:
                shard.finish(f)
                f.flush()
                os.fsync(f.fileno())
        self._shards.clear()
        fsync_dir(self.path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)
        for name in candidate_names(self.name):
            final = confined(self.dest, name)
            try:
                # Claim the name (mkdir fails if anything is there), then rename onto the empty
                # directory we just made: rename replaces an empty directory atomically.
                os.mkdir(final)
            except FileExistsError:
                continue
            os.rename(self.path, final)
            fsync_dir(self.dest)
            return final
        raise DestinationFull(errno.EEXIST, f"no free name for {self.name!r} in {self.dest}")

    def discard(self) -> None:
        """Remove the partial directory and its spools (never raises)."""
        for shard in self._shards.values():
            shard.discard()
        shutil.rmtree(self.path, ignore_errors=True)
