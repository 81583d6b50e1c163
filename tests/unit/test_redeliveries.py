"""The redelivery limit a consumer counts itself on classic queues (no broker)."""

from __future__ import annotations

import json
from pathlib import Path

from objstream.common.redeliveries import LIMIT, RedeliveryJournal, fingerprint, journal_for


def test_a_message_whose_handling_never_ends_is_refused_after_the_limit(tmp_path: Path) -> None:
    """Each journal stands for a new process (the last one died handling the message)."""
    path = tmp_path / "q.redeliveries"
    key = fingerprint("offer:site-1", "m", None, "offer", "site-2", b"")
    for _ in range(LIMIT):
        assert RedeliveryJournal(path).handle(key)  # ...and the process dies
    assert json.loads(path.read_text()) == {key: LIMIT}
    assert not RedeliveryJournal(path).handle(key)  # rejected: the broker dead-letters it
    assert not path.exists()  # nothing left to count


def test_a_message_handled_is_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "q.redeliveries"
    journal = RedeliveryJournal(path)
    assert journal.handle("k")
    journal.handled("k")
    assert not path.exists()
    assert RedeliveryJournal(path).handle("k")


def test_an_unwritable_journal_counts_in_memory(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    journal = RedeliveryJournal(blocked / "q.redeliveries")  # its directory is a file
    for _ in range(LIMIT):
        assert journal.handle("k")
    assert not journal.handle("k")


def test_quorum_queues_count_themselves() -> None:
    assert journal_for("ns.site.a", "quorum") is None
    assert journal_for("ns.site.a", "classic") is not None


def test_fingerprints_tell_parts_apart() -> None:
    assert fingerprint("ab", "c") != fingerprint("a", "bc")
