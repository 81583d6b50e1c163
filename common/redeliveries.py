"""A redelivery limit for classic queues, counted by the consumer itself.

A message that kills its consumer (not an exception: the adapter's guard catches those, but a
process killed while it handles one) comes back to the next consumer, which may die on it too.
Quorum queues count deliveries (``x-delivery-limit``) and dead-letter such a message; classic
queues only say that a message was delivered before (``redelivered``). So for an inbox or a
service queue on classic queues, the consumer keeps a small journal on disk: before it handles
a *redelivered* message it adds one to that message's count, after it handled it (whatever
came of it) it forgets it. A message found with :data:`LIMIT` counts already was delivered
that often without its handling ever ending: it is rejected (the broker dead-letters it).

Only redelivered messages touch the disk; the journal keeps at most :data:`KEEP` entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LIMIT = 3
"""Redeliveries of one message whose handling never ended before it is rejected."""
KEEP = 256


def state_dir() -> Path:
    """Where objstream keeps what must outlive a process that is not tied to a destination
    directory: ``$XDG_STATE_HOME/objstream``, by default ``~/.local/state/objstream``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "objstream"


def fingerprint(*parts: str | bytes | None) -> str:
    """One message, as the journal knows it: a digest of what identifies it."""
    sha = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else (part or b"")
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.hexdigest()


class RedeliveryJournal:
    """The counts of the redelivered messages of one queue whose handling has not ended.

    Args:
        path: the journal file (made with its directory if missing); None keeps the counts in
            memory only (a journal that cannot be written still bounds redeliveries within
            one process, and says so once).
        limit: see :data:`LIMIT`.
    """

    def __init__(self, path: Path | None, limit: int = LIMIT) -> None:
        self.path = path
        self.limit = limit
        self._counts: dict[str, int] = {}
        if path is not None:
            try:
                self._counts = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError) as e:
                log.warning("redelivery journal %s unreadable (%s): starting afresh", path, e)

    def handle(self, key: str) -> bool:
        """A redelivered message arrives: False if it was delivered :attr:`limit` times
        without its handling ending (reject it); else its count goes up, on disk first."""
        count = self._counts.get(key, 0)
        if count >= self.limit:
            self._counts.pop(key, None)
            self._save()
            return False
        self._counts[key] = count + 1
        while len(self._counts) > KEEP:
            del self._counts[next(iter(self._counts))]
        self._save()
        return True

    def handled(self, key: str) -> None:
        """Its handling ended (it was acked, rejected or refused)."""
        if self._counts.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            if not self._counts:
                self.path.unlink(missing_ok=True)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._counts))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("redelivery journal %s not written (%s): counting in memory", self.path, e)
            self.path = None


def journal_for(queue: str, queue_type: str) -> RedeliveryJournal | None:
    """The journal of inbox or service queue ``queue``; None for quorum queues, whose broker
    counts deliveries itself (``x-delivery-limit``)."""
    if queue_type == "quorum":
        return None
    return RedeliveryJournal(state_dir() / f"{queue}.redeliveries")
