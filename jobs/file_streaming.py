"""file_streaming: the producer creates a temporary file and streams it straight to the consumer
with the file streamer (no retriever); the consumer verifies it and reports."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from objstream.common.settings import Settings
from objstream.consumer import Receiver
from objstream.jobs.data import file_sha256, write_random_file
from objstream.jobs.runner import Result
from objstream.producer import FileStreamer


def producer_side(
    settings: Settings, *, site: str, to: str, size: int, chunk_size: int, seed: int
) -> Result:
    with tempfile.TemporaryDirectory(prefix="objstream-job-") as tmp:
        path = Path(tmp) / f"file_streaming-{size}.bin"
        digest = write_random_file(path, size, seed)
        started = time.monotonic()
        with FileStreamer(site, settings) as streamer:
            [result] = streamer.stream_file(to, path, chunk_size=chunk_size)
        seconds = time.monotonic() - started
    return {
        "ok": result.ok and result.sha256 == digest,
        "role": "producer",
        "bytes": size,
        "seconds": round(seconds, 3),
        "sha256": digest,
        "stored_as": result.stored_as,
    }


def consumer_side(settings: Settings, *, site: str, dest: str, timeout: float) -> Result:
    with Receiver(site, dest, settings) as receiver:
        item = receiver.receive(timeout=timeout)
    if item is None or item.path is None:
        return {"ok": False, "role": "consumer", "error": f"no file arrived in {timeout:g} s"}
    on_disk = file_sha256(item.path)  # verify what landed, not only what the stream said
    return {
        "ok": on_disk == item.sha256,
        "role": "consumer",
        "bytes": item.size,
        "path": str(item.path),
        "sha256": on_disk,
    }
