"""Committing a received file of a tree (``send-file -r``) into its subdirectory of the
destination, confined there whatever is on disk.

The relative path a peer sent was checked and made safe component by component before the
stream started (:func:`objstream.common.naming.tree_parts`). Here the directories are walked
one component at a time from the destination with ``openat(O_NOFOLLOW | O_DIRECTORY)``: a
symlink planted in the destination (``DEST/DIR -> /etc``), or a file where a directory should
be, fails the commit (``io``) rather than being followed. Missing directories are created
(with the process's umask); existing ones are shared, so files of one tree land in the same
directories. The final name is linked with ``linkat`` relative to the directory's descriptor,
never replacing anything (``NAME``, then ``STEM-1.EXT``..., as for any received file).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from objstream.common.naming import candidate_names

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def open_tree_dir(dest: Path, dirs: Sequence[str]) -> int:
    """A descriptor of ``dest/dirs[0]/dirs[1]/...``, each made if missing and none a symlink.

    Raises:
        OSError: a component is a symlink or not a directory (the path in words), or cannot
            be made.
    """
    fd = os.open(dest, _DIR_FLAGS)
    walked: list[str] = []
    try:
        for part in dirs:
            walked.append(part)
            try:
                child = _open_child(fd, part)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = "/".join(walked)
                    raise OSError(
                        e.errno, f"{where} in {dest} is not a directory (a symlink or a file)"
                    ) from e
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child(fd: int, part: str) -> int:
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        pass
    try:
        os.mkdir(part, 0o777, dir_fd=fd)
    except FileExistsError:  # made meanwhile (another stream of the tree): use it
        pass
    else:
        os.fsync(fd)  # the new directory's entry
    return os.open(part, _DIR_FLAGS, dir_fd=fd)


def link_into_tree(partial: Path, dest: Path, dirs: Sequence[str], base_name: str) -> Path:
    """Link the (synced) partial file ``partial`` to the first free name of ``base_name`` in
    ``dest/dirs...`` and remove the partial name; returns the final path.

    Raises:
        OSError: as :func:`open_tree_dir`; ``EEXIST`` when no candidate name is free.
    """
    dir_fd = open_tree_dir(dest, dirs)
    try:
        for name in candidate_names(base_name):
            try:
                os.link(partial, name, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                continue
            os.unlink(partial)
            os.fsync(dir_fd)
            return dest.joinpath(*dirs, name)
    finally:
        os.close(dir_fd)
    raise FileExistsError(errno.EEXIST, f"no free name for {base_name!r} in {dest.joinpath(*dirs)}")


__all__ = ["link_into_tree", "open_tree_dir"]
