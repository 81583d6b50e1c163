"""Turning a name chosen by a peer into a safe file name inside a destination directory."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from pathvalidate import sanitize_filename

FALLBACK_NAME = "unnamed"
PARTIAL_PREFIX = ".objstream-"


def safe_basename(name: str) -> str:
    """The sender's base name, made safe to create in any directory.

    Only the last path component survives (``/`` and ``\\`` both separate); control and invisible
    formatting characters (NUL, newlines, bidi overrides) are dropped; characters that are not
    portable across file systems are removed (pathvalidate, "universal" rules); leading dots are
    stripped, so ``.``, ``..`` and hidden names cannot come out. An empty result becomes
    ``unnamed``.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFC", base)
    base = "".join(ch for ch in base if unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Co"})
    base = sanitize_filename(base, platform="universal", max_len=200)
    base = base.lstrip(". ").rstrip(" ")
    return base or FALLBACK_NAME


def candidate_names(base: str) -> list[str]:
    """Final names to try in order: ``base``, then ``stem-1.ext``, ``stem-2.ext``...

    The destination-collision policy is "never overwrite, add a numeric suffix".
    """
    stem, dot, ext = base.rpartition(".")
    if not stem:  # no extension ("README") or only one ("bin" after stripping dots)
        stem, dot, ext = base, "", ""
    return [base] + [f"{stem}-{i}{dot}{ext}" for i in range(1, 1000)]


def partial_name(stream_id: str) -> str:
    """Name of the partial file a stream is written to before its final rename."""
    return f"{PARTIAL_PREFIX}{stream_id}.part"


def confined(dest: Path, name: str) -> Path:
    """``dest / name``, checked to be directly inside ``dest`` (defence in depth).

    Raises:
        ValueError: the name would resolve anywhere else.
    """
    root = dest.resolve()
    # The name itself is not resolved: whatever sits there (a symlink, say) is never followed,
    # since the caller creates the name with os.link, which fails if anything exists.
    if name in {"", ".", ".."} or os.sep in name or "\0" in name:
        raise ValueError(f"name {name!r} escapes {root}")
    path = root / name
    if path.parent != root:
        raise ValueError(f"name {name!r} escapes {root}")
    return path
