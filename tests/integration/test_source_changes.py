"""The source is what was sent: a file written to, truncated or replaced while it is sent fails
the send with ``source_changed``, and every target is told ``aborted`` at once (it used to
verify a mix of old bytes and bytes that never existed, or wait out its timeout)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from objstream.common.errors import FailureCode, SendFailed, TransferFailed
from objstream.common.settings import KiB, Settings
from objstream.producer import FileStreamer
from objstream.producer.sources import FileSource
from tests.conftest import random_file
from tests.integration.conftest import StartReceiver

CHUNK = 64 * KiB


def _overwrite(path: Path) -> None:
    """``dd conv=notrunc``: the same size, other bytes in the middle."""
    with open(path, "r+b") as f:
        f.seek(10 * CHUNK)
        f.write(os.urandom(CHUNK))


def _truncate(path: Path) -> None:
    os.truncate(path, 5 * CHUNK)


@pytest.mark.parametrize("change", [_overwrite, _truncate], ids=["overwritten", "shrunk"])
def test_a_file_that_changes_mid_send_fails_it_and_aborts_every_target_at_once(
    tmp_path: Path,
    settings: Settings,
    start_receiver: StartReceiver,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[Path], None],
) -> None:
    src = tmp_path / "big.bin"
    random_file(src, 64 * CHUNK)
    one = start_receiver("site-1", tmp_path / "one")
    two = start_receiver("site-2", tmp_path / "two")
    original = FileSource.read_chunk

    def changing(self: FileSource, seq: int) -> bytes:
        if seq == 3:
            change(self.path)  # someone writes to it while it is sent
        return original(self, seq)

    monkeypatch.setattr(FileSource, "read_chunk", changing)
    slow = settings.model_copy(update={"timeout": 60})
    started = time.monotonic()
    with FileStreamer("server", slow) as streamer, pytest.raises(SendFailed) as caught:
        streamer.stream_file(["site-1", "site-2"], src, chunk_size=CHUNK, window=4)
    assert {f.code for f in caught.value.failures} == {FailureCode.SOURCE_CHANGED}
    assert "changed while it was being sent" in str(caught.value)
    for receiver in (one, two):
        [outcome] = receiver.wait_for(1, timeout=20)
        assert isinstance(outcome, TransferFailed)
        assert outcome.code == FailureCode.ABORTED
    assert time.monotonic() - started < 20  # at once, not after the 60 s timeout
    for dest in (tmp_path / "one", tmp_path / "two"):
        assert not (dest / "big.bin").exists()  # nothing was "verified"
