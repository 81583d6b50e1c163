"""file_streaming: the producer creates a temporary file and streams it straight to the consumer
with the file streamer (no retriever); the consumer verifies it and reports."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from objstream.common.errors import SendFailed, TimedOut
from objstream.common.settings import Settings
from objstream.consumer import Receiver
from objstream.jobs.data import file_sha256, write_random_file
from objstream.jobs.runner import Result
from objstream.producer import FileStreamer
from objstream.producer.sender import TargetResult


def producer_side(
    settings: Settings, *, site: str, to: str | list[str], size: int, chunk_size: int, seed: int
) -> Result:
    """Stream a generated file to ``to`` (one site or several: one stream, each target's own
    verdict under ``targets``)."""
    with tempfile.TemporaryDirectory(prefix="objstream-job-") as tmp:
        path = Path(tmp) / f"file_streaming-{size}.bin"
        digest = write_random_file(path, size, seed)
        started = time.monotonic()
        with FileStreamer(site, settings) as streamer:
            try:
                results = streamer.stream_file(to, path, chunk_size=chunk_size)
                failure = None
            except SendFailed as e:
                results = [r for r in e.results if isinstance(r, TargetResult)]
                failure = e
        seconds = time.monotonic() - started
    targets = {
        r.site: {
            "ok": r.ok and r.sha256 == digest,
            "bytes": size,
            "stored_as": r.stored_as,
            **({"error": str(r.error)} if r.error else {}),
        }
        for r in results
    }
    ok = failure is None and all(t["ok"] for t in targets.values())
    return {
        "ok": ok,
        "role": "producer",
        "bytes": size,
        "seconds": round(seconds, 3),
        "sha256": digest,
        "stored_as": results[0].stored_as if len(results) == 1 else None,
        "targets": targets,
        **({"error": str(failure), "error_type": _kind(failure)} if failure else {}),
    }


def _kind(failure: SendFailed) -> str:
    """``TimedOut`` when every target timed out (the job's exit code says so), else the class."""
    if failure.failures and all(isinstance(f, TimedOut) for f in failure.failures):
        return "TimedOut"
    return type(failure).__name__


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
