"""What ``send-file PATH...`` sends: each path a file, a directory tree (``-r``) or standard
input (``-``), turned into a list of :class:`Item`, each opened only when its turn comes.

A tree is walked in sorted order, without following symlinks to directories (no loops, no
escape). Each regular file is sent under its path relative to the tree's parent, ``/``
between components (``DIR/sub/file.bin``), with the offer ``info`` entry that tells a receiver
to recreate the directories (:data:`~objstream.common.naming.TREE_INFO_KEY`). A symlink to a
regular file inside the tree is sent as that file's content under the link's name; a symlink
that leads out of the tree, dangles or names a directory, and anything that is not a regular
file (a FIFO, a socket, a device), is skipped with a warning. Empty directories are not sent.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from objstream.common.errors import ObjstreamError
from objstream.common.naming import TREE_INFO_KEY
from objstream.common.settings import MAX_NAME_LENGTH, check_object_name
from objstream.common.streaming import MetaValue, ObjectStreamer
from objstream.producer.sources import FileSource

if TYPE_CHECKING:
    import threading

STDIN = "-"


class TreeFileSource(FileSource):
    """A file of a tree, offered under its relative path (``DIR/sub/file.bin``)."""

    def __init__(self, path: str | os.PathLike[str], relative: str) -> None:
        super().__init__(path)
        self.name = relative

    def info(self) -> dict[str, MetaValue]:
        return {TREE_INFO_KEY: True}


@dataclass
class Item:
    """One object to send: ``label`` names it to the user (its path, or ``-``), ``open``
    makes its source when its turn comes (a missing file fails then, alone)."""

    label: str
    open: Callable[[], ObjectStreamer]


@dataclass
class FileSet:
    """The items of a command line, in order, and what was skipped (one warning each)."""

    items: list[Item] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def expand(
    paths: list[str],
    *,
    recursive: bool,
    stdin_name: str | None,
    cancel: threading.Event | None = None,
) -> FileSet:
    """The items of ``paths`` (``-`` is standard input, sent as ``stdin_name``).

    Raises:
        ValueError: a usage error (``-`` twice, ``-`` without a name, a tree with no name).
        ConfigError: a name too long for an offer.
    """
    found = FileSet()
    if paths.count(STDIN) > 1:
        raise ValueError("standard input (-) can be sent only once")
    for path in paths:
        if path == STDIN:
            if not stdin_name:
                raise ValueError("sending standard input (-) needs --name NAME")
            check_object_name(stdin_name)
            found.items.append(Item(STDIN, _pipe(stdin_name, cancel)))
        elif recursive and os.path.isdir(path):
            _walk(Path(path), found)
        else:
            # A directory without -r fails when its turn comes: FileSource says what it is.
            found.items.append(Item(path, _file(path)))
    return found


def _pipe(name: str, cancel: threading.Event | None) -> Callable[[], ObjectStreamer]:
    def make() -> ObjectStreamer:
        from objstream.producer.pipe_source import PipeSource

        return PipeSource(name, cancel=cancel)

    return make


def _file(path: str) -> Callable[[], ObjectStreamer]:
    def make() -> ObjectStreamer:
        if os.path.isdir(path):
            raise ObjstreamError("is a directory; send it with -r")
        return FileSource(path)

    return make


def _tree_file(path: Path, relative: str) -> Callable[[], ObjectStreamer]:
    return lambda: TreeFileSource(path, relative)


def _walk(root: Path, found: FileSet) -> None:
    top = root.resolve()  # the tree, wherever a symlink given on the command line led
    base = top.name
    if not base:
        raise ValueError(f"{root} has no name to send it under (the file system's root)")
    errors: list[OSError] = []
    before = len(found.items)
    hidden = 0
    for dirpath, dirnames, filenames in os.walk(top, onerror=errors.append):
        # Hidden names (.git, .cache) stay home, as in a directory container: a receiver
        # would store them without their dot, where nobody looks for them.
        hidden += sum(n.startswith(".") for n in (*dirnames, *filenames))
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():  # os.walk does not descend into it: say so
                found.skipped.append(f"{_shown(root, top, here / name)}: a symlink to a directory")
        for name in sorted(n for n in filenames if not n.startswith(".")):
            _add(root, top, here / name, base, found)
    for error in errors:
        found.skipped.append(f"{error.filename}: {error.strerror or error}")
    if hidden:
        found.skipped.append(f"{root}: {hidden} hidden names (starting with '.') left out")
    if len(found.items) == before:
        found.skipped.append(f"{root}: no files to send")


def _shown(root: Path, top: Path, path: Path) -> str:
    """``path`` as the user named the tree (``data/sub/x``, not ``/abs/data/sub/x``)."""
    return str(root / path.relative_to(top))


def _add(root: Path, top: Path, path: Path, base: str, found: FileSet) -> None:
    shown = _shown(root, top, path)
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = path.resolve()
            if not target.is_relative_to(top):
                found.skipped.append(f"{shown}: a symlink leading out of the tree")
                return
            st = os.stat(target)
    except OSError as e:
        found.skipped.append(f"{shown}: {e.strerror or e}")
        return
    if not stat.S_ISREG(st.st_mode):
        found.skipped.append(f"{shown}: not a regular file")
        return
    relative = "/".join((base, *path.relative_to(top).parts))
    if len(relative) > MAX_NAME_LENGTH:
        found.skipped.append(f"{shown}: its path has more than {MAX_NAME_LENGTH} characters")
        return
    found.items.append(Item(shown, _tree_file(path, relative)))


__all__ = ["STDIN", "FileSet", "Item", "TreeFileSource", "expand"]
