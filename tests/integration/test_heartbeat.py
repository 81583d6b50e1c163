"""Nothing long on the connection's thread: a slow resume-prefix hash (10 s, heartbeat 2 s)
runs on a worker thread while the sender's connection keeps answering heartbeats."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from objstream.common.amqp import connect
from objstream.common.settings import KiB, Settings
from objstream.consumer.streams import Received
from objstream.producer.sender import Resume, StreamSender
from objstream.producer.sources import FileSource
from tests.conftest import random_file, sha256_of
from tests.integration.conftest import BackgroundReceiver

CHUNK = 64 * KiB


class SlowPrefix(FileSource):
    """Its first ``slow`` reads (the prefix hash) take a second each: a slow disk."""

    slow = 10

    def read_chunk(self, seq: int) -> bytes:
        if self.slow:
            self.slow -= 1
            time.sleep(1.0)
        return super().read_chunk(seq)


def test_a_slow_prefix_hash_does_not_starve_heartbeats(
    tmp_path: Path,
    settings: Settings,
    start_receiver: Callable[..., BackgroundReceiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    beating = settings.model_copy(update={"heartbeat": 2})
    src = tmp_path / "big.bin"
    digest = random_file(src, 12 * CHUNK)
    receiver = start_receiver("site-1", tmp_path / "in")
    sender = StreamSender(connect(beating, "objstream producer heartbeat"), beating, "server")
    source = SlowPrefix(src)
    try:
        # The requester's prefix does not match (all zeros): after 10 s of hashing on a worker
        # thread, the whole file goes, on the same connection.
        [result] = sender.send(source, ["site-1"], chunk_size=CHUNK, resume=Resume(10, "0" * 64))
    finally:
        source.close()
        sender.close()
    assert result.ok
    assert "changed since the requester's first 10 chunks" in caplog.text
    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert received.path is not None
    assert sha256_of(received.path) == digest
