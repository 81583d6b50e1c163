"""Turning a name chosen by a peer into a safe file name inside a destination directory."""

from __future__ import annotations

import errno
import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path

from pathvalidate import sanitize_filename

FALLBACK_NAME = "unnamed"
PARTIAL_PREFIX = ".objstream-"

NAME_MAX = 255
"""Bytes a file name may have on common file systems (ext4, XFS, btrfs, tmpfs, NFS): the limit
is in bytes, so 200 characters of a non-Latin script can exceed it."""

MAX_BASE_BYTES = 200
"""Bytes of UTF-8 a received base name is cut to, leaving room below :data:`NAME_MAX` for a
collision suffix (``-999``) and a suffix a container's format adds (``.safetensors``)."""

MAX_EXTENSION_BYTES = 20
"""A suffix (dot included) at most this long is kept when a name is cut: ``.safetensors``,
``.tar.gz``'s ``.gz``; a longer "suffix" is just part of the name."""

COLLISION_LIMIT = 1000
"""``NAME``, then ``STEM-1.EXT`` ... ``STEM-999.EXT``."""

_NOT_PORTABLE = str.maketrans(dict.fromkeys('"*/:<>?\\|'))
"""Characters some file system refuses in a name (control characters are dropped before)."""


class NameTooLong(OSError):
    """A final name longer than the destination's file system allows (``ENAMETOOLONG``).

    Received names are cut to fit (:func:`safe_basename`, :func:`candidate_names`): this is the
    refusal for a file system with a smaller limit, in words rather than a failed ``link``.
    """

    def __init__(self, name: str, size: int, limit: int, dest: Path) -> None:
        self.name = name
        self.size = size
        self.limit = limit
        self.dest = dest
        shown = repr(name) if len(name) <= 40 else f"{name[:40]!r}..."
        super().__init__(
            errno.ENAMETOOLONG,
            f"name {shown} is {size} bytes, more than the {limit} a file name may have in {dest}",
        )


def cut_utf8(text: str, limit: int) -> str:
    """The longest prefix of ``text`` that is at most ``limit`` bytes in UTF-8 (never half a
    character)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    # A cut inside a multi-byte sequence leaves an incomplete tail, which "ignore" drops.
    return data[:limit].decode("utf-8", "ignore")


def split_extension(name: str) -> tuple[str, str]:
    """``(stem, suffix)`` with the suffix (``.ext``, dot included) empty unless it is short
    (:data:`MAX_EXTENSION_BYTES`) and something comes before it."""
    stem, dot, ext = name.rpartition(".")
    suffix = dot + ext
    if not stem or not ext or len(suffix.encode("utf-8", "surrogatepass")) > MAX_EXTENSION_BYTES:
        return name, ""
    return stem, suffix


def fit_name(name: str, limit: int = MAX_BASE_BYTES) -> str:
    """``name`` cut to at most ``limit`` bytes of UTF-8, keeping its extension: the stem is
    shortened, never the ``.safetensors`` that says what the file is."""
    if len(name.encode("utf-8", "surrogatepass")) <= limit:
        return name
    stem, suffix = split_extension(name)
    room = limit - len(suffix.encode("utf-8", "surrogatepass"))
    return cut_utf8(stem, room) + suffix


def safe_basename(name: str) -> str:
    """The sender's base name, made safe to create in any directory.

    Only the last path component survives (``/`` and ``\\`` both separate); control and invisible
    formatting characters (NUL, newlines, bidi overrides) are dropped; characters that are not
    portable across file systems are removed (pathvalidate, "universal" rules); leading dots are
    stripped, so ``.``, ``..`` and hidden names cannot come out. The result is at most
    :data:`MAX_BASE_BYTES` bytes of UTF-8 (a file system's limit is in bytes), cut in the stem
    so a short extension survives (:func:`fit_name`). An empty result becomes ``unnamed``.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFC", base)
    base = "".join(ch for ch in base if unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Co"})
    # pathvalidate would remove these too, but it cuts a long name first, by characters in
    # some versions and always dropping the extension: remove them, cut, then let it apply
    # the rest of its rules (reserved names, trailing dots) to a name that fits.
    base = base.translate(_NOT_PORTABLE).lstrip(". ").rstrip(" ")
    base = fit_name(base, MAX_BASE_BYTES)
    base = sanitize_filename(base, platform="universal", max_len=NAME_MAX, fs_encoding="utf-8")
    base = fit_name(base.lstrip(". ").rstrip(" "), MAX_BASE_BYTES).rstrip(" ")
    return base or FALLBACK_NAME


TREE_INFO_KEY = "path"
"""The offer ``info`` entry (``True``) that says a file's ``name`` is a relative path, ``/``
between its components, to recreate under the destination (``send-file -r``). A receiver that
does not know it stores the file under its base name."""

MAX_TREE_DEPTH = 64
"""Most components a received relative path may have."""


def is_tree_name(info: Mapping[str, object] | None) -> bool:
    """Whether an offer's ``info`` says its name is a relative path (:data:`TREE_INFO_KEY`)."""
    return info is not None and info.get(TREE_INFO_KEY) is True


def tree_parts(name: str) -> list[str]:
    """The components of a relative path a peer sent (``DIR/sub/file.bin``), each made safe
    like a base name (:func:`safe_basename`).

    ``/`` and ``\\`` both separate. The path must be plainly relative: not absolute, no empty,
    ``.`` or ``..`` component, no drive (``C:``), no NUL, at most :data:`MAX_TREE_DEPTH`
    components; anything else is refused, never rewritten into something else (a peer that
    sends ``a/../../x`` means harm or is broken).

    Raises:
        ValueError: the path is not a plain relative path (the reason).
    """
    if "\0" in name:
        raise ValueError(f"path {name!r} holds a NUL")
    raw = name.replace("\\", "/").split("/")
    if raw[0] == "":
        raise ValueError(f"path {name!r} is absolute")
    if len(raw) > MAX_TREE_DEPTH:
        raise ValueError(
            f"path {name[:80]!r}... has {len(raw)} components (at most {MAX_TREE_DEPTH})"
        )
    for part in raw:
        if part in {"", ".", ".."}:
            raise ValueError(f"path {name!r} is not a plain relative path ({part!r} in it)")
    if len(raw[0]) == 2 and raw[0][1] == ":" and raw[0][0].isalpha():
        raise ValueError(f"path {name!r} starts with a drive")
    return [safe_basename(part) for part in raw]


def candidate_names(base: str) -> list[str]:
    """Final names to try in order: ``base``, then ``stem-1.ext``, ``stem-2.ext``...

    The destination-collision policy is "never overwrite, add a numeric suffix". A suffixed
    name is at most :data:`NAME_MAX` bytes: the stem gives way (a name of
    :data:`MAX_BASE_BYTES` never needs to).
    """
    # No extension ("README"), only one ("bin" after stripping dots) or a long one: the
    # number goes at the end.
    stem, suffix = split_extension(base)
    names = [base]
    for i in range(1, COLLISION_LIMIT):
        tail = f"-{i}{suffix}"
        names.append(cut_utf8(stem, NAME_MAX - len(tail.encode("utf-8", "surrogatepass"))) + tail)
    return names


def stored_name(name: str, info: Mapping[str, object] | None, path: Path) -> str:
    """What a sender is told its object was stored as: the final file's name, or for a file
    of a tree (:func:`is_tree_name`) its path relative to the destination (``DIR/sub/f-1.bin``)."""
    if not is_tree_name(info):
        return path.name
    try:
        depth = len(tree_parts(name))
    except ValueError:
        return path.name
    return "/".join(path.parts[-depth:])


def partial_name(stream_id: str) -> str:
    """Name of the partial file a stream is written to before its final rename."""
    return f"{PARTIAL_PREFIX}{stream_id}.part"


def confined(dest: Path, name: str) -> Path:
    """``dest / name``, checked to be directly inside ``dest`` (defence in depth) and short
    enough for its file system.

    Raises:
        ValueError: the name would resolve anywhere else.
        NameTooLong: the name has more bytes than ``dest``'s file system allows in a name.
    """
    root = dest.resolve()
    # The name itself is not resolved: whatever sits there (a symlink, say) is never followed,
    # since the caller creates the name with os.link, which fails if anything exists.
    if name in {"", ".", ".."} or os.sep in name or "\0" in name:
        raise ValueError(f"name {name!r} escapes {root}")
    path = root / name
    if path.parent != root:
        raise ValueError(f"name {name!r} escapes {root}")
    try:
        size = len(os.fsencode(name))  # what the file system is given
    except UnicodeEncodeError:
        raise ValueError(f"name {name!r} cannot be encoded as a file name") from None
    limit = min(NAME_MAX, _name_max(root))
    if size > limit:
        raise NameTooLong(name, size, limit, root)
    return path


def _name_max(root: Path) -> int:
    """The longest name (bytes) ``root``'s file system takes; :data:`NAME_MAX` if it won't say.
    Some take fewer than 255 (eCryptfs: 143)."""
    try:
        return os.pathconf(root, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX
