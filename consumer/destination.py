"""A receiver's destination directory, checked when the receiver starts: a directory that
cannot take files fails there, with one line, and not at every offer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from objstream.common.errors import ConfigError


def check_destination(dest: Path) -> None:
    """Make ``dest`` if it is not there, and check that files can be created in it: a
    directory that cannot take them fails here, at start, not at every offer.

    Raises:
        ConfigError: not a directory, or not writable (one line, exit 2 on the command line).
    """
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"destination {dest} is not a directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest, prefix=".objstream-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to destination {dest}: {e.strerror or e}") from e


__all__ = ["check_destination"]
