"""What a serving site serves, and finding it: named containers (encoded once, when added) and
the files under one source directory.

Looking an object up is I/O (resolving a path, opening a file); what follows from it (which
refusal, whether the requester may have it) is the serve session's
(:mod:`objstream.common.serve_session`). A name is confined to the source directory: resolved
with symlinks followed, it must stay inside; a name the file system cannot even look up (a
component longer than it allows) is simply not there.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objstream.common.errors import ConfigError
from objstream.common.protocol import Request
from objstream.common.serve_session import Absent, Found, Listed, Missing, Shelf
from objstream.common.settings import check_object_name
from objstream.common.streaming import ObjectStreamer
from objstream.producer.container_source import ContainerSource
from objstream.producer.sources import FileSource


@dataclass(frozen=True)
class _Served:
    value: Any
    allow: frozenset[str] | None


def _allow(users: Iterable[str] | None) -> frozenset[str] | None:
    return None if users is None else frozenset(users)


class Catalog:
    """The containers and the source directory one site serves."""

    def __init__(self, site: str, chunk_size: int) -> None:
        self.site = site
        self._chunk_size = chunk_size
        self._containers: dict[str, _Served] = {}
        self._source_dir: _Served | None = None

    def add_container(self, name: str, container: Any, allow: Iterable[str] | None = None) -> None:
        """Serve ``container`` under ``name``, encoded now (see
        :meth:`~objstream.producer.serving.RetrievalServer.add_container`)."""
        source = ContainerSource(container, check_object_name(name))
        source.prepare(self._chunk_size)
        self._containers[name] = _Served(source, _allow(allow))

    def set_source_dir(
        self, source_dir: str | os.PathLike[str], allow: Iterable[str] | None = None
    ) -> None:
        """Serve the files under ``source_dir`` (names resolved inside it, nowhere else)."""
        root = Path(source_dir).resolve()
        if not root.is_dir():
            raise ConfigError(f"source dir {source_dir} is not a directory")
        self._source_dir = _Served(root, _allow(allow))

    def look_up(self, request: Request) -> tuple[Found | Missing, ObjectStreamer | None]:
        """What ``request`` names: its facts and a source to stream it from (which the caller
        closes if it is not used), or why it is not there."""
        if request.kind == "container":
            served = self._containers.get(request.name)
            if served is None:
                return Missing(
                    Absent.NOT_SERVED, f"no container {request.name!r} at {self.site}"
                ), None
            prepared: ContainerSource = served.value
            if request.keys is not None:
                return self._entries(request, prepared, served.allow)
            source = prepared.reuse()  # encoded when added, not here
            return Found(source.size, len(prepared.container), served.allow), source
        found, file = self._file(request.name)
        if request.range_start is not None and request.range_end is not None:
            if not isinstance(found, Found) or not isinstance(file, FileSource):
                return found, file
            try:
                file.restrict(request.range_start, request.range_end)
            except ValueError:
                file.close()
                detail = (
                    f"bytes {request.range_start}:{request.range_end} are not all in "
                    f"{request.name!r} ({found.size} bytes) at {self.site}"
                )
                return Missing(Absent.NOT_SERVED, detail), None
            return Found(file.size, None, found.allow), file
        return found, file

    def _entries(
        self, request: Request, prepared: ContainerSource, allow: frozenset[str] | None
    ) -> tuple[Found | Missing, ObjectStreamer | None]:
        """The entries of a container whose names match ``request.keys``, encoded now (only
        they are read): a container of its own, under the same name."""
        container = prepared.container
        patterns = request.keys or []
        if not isinstance(container, dict) or prepared.directory:
            kind = "directory" if prepared.directory else type(container).__name__
            detail = (
                f"container {request.name!r} is a {kind}: only a dict's entries are selected "
                "(keys); retrieve it whole"
            )
            return Missing(Absent.NOT_SERVED, detail), None
        chosen = {
            key: value
            for key, value in container.items()
            if any(fnmatch.fnmatchcase(str(key), pattern) for pattern in patterns)
        }
        if not chosen:
            return Missing(
                Absent.NOT_SERVED,
                f"no entry of container {request.name!r} at {self.site} matches "
                f"{', '.join(patterns)}",
            ), None
        source = ContainerSource(chosen, request.name)
        source.prepare(self._chunk_size)
        return Found(source.size, len(chosen), allow), source

    def listing(self, of: str | None, prefix: str) -> list[Shelf]:
        """What is served, for a list request (of ``of``: file, container, None for both):
        each container on a shelf of its own, then the files under the source dir, walked
        lazily and only from the directory ``prefix`` names. Which of them the requester is
        shown is the serve session's to decide."""
        shelves: list[Shelf] = []
        if of in (None, "container"):
            for name in sorted(self._containers):
                served = self._containers[name]
                prepared: ContainerSource = served.value
                size = prepared.size or 0  # known: encoded when added
                entry = Listed("container", name, size, len(prepared.container))
                shelves.append(Shelf(served.allow, (entry,)))
        if of in (None, "file") and self._source_dir is not None:
            root: Path = self._source_dir.value
            shelves.append(Shelf(self._source_dir.allow, _files(root, prefix)))
        return shelves

    def _file(self, name: str) -> tuple[Found | Missing, ObjectStreamer | None]:
        served = self._source_dir
        if served is None:
            return Missing(Absent.NOT_SERVED, f"site {self.site} serves no files"), None
        root: Path = served.value
        if "\x00" in name or os.path.isabs(name):
            return Missing(Absent.OUTSIDE, f"{name!r} is not a relative name"), None
        try:
            path = (root / name).resolve()  # follows symlinks: a link out of the dir is refused
            if path == root or not path.is_relative_to(root):
                return Missing(Absent.OUTSIDE, f"{name!r} is outside the source dir"), None
            if not path.is_file():
                return Missing(Absent.NOT_SERVED, f"no file {name!r} at {self.site}"), None
            source = FileSource(path)
        except OSError as e:  # a name too long to look up, a file that cannot be opened
            return Missing(
                Absent.UNREADABLE, f"cannot read {name[:200]!r}: {e.strerror or e}"
            ), None
        return Found(source.size, None, served.allow), source


def _files(root: Path, prefix: str) -> Iterator[Listed]:
    """The files a request could name under ``root``, depth first in name order, from the
    directory ``prefix`` names (``a/b`` for ``a/b/c``): regular files, and links to files that
    stay inside ``root`` (the others would be refused); links to directories are not entered.
    What cannot be read is left out."""
    head = prefix.rpartition("/")[0]
    if "\x00" in prefix or os.path.isabs(prefix):
        return
    start = (root / head).resolve() if head else root
    if not start.is_relative_to(root) or not start.is_dir():
        return
    pending = [start]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(Path(entry.path))
                    continue
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if target == root or not target.is_relative_to(root) or not target.is_file():
                        continue
                elif not entry.is_file(follow_symlinks=False):
                    continue  # a FIFO, a socket, a device
                size = entry.stat().st_size
            except OSError:
                continue
            yield Listed("file", Path(entry.path).relative_to(root).as_posix(), size)
        pending.extend(reversed(subfolders))  # the first in name order is walked first
