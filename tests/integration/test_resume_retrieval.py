"""A sender that dies mid-file: the receiver keeps the verified prefix, and asking the owner for
the file again (``resume_from``) moves only the rest."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pika
import pytest

from objstream.common.errors import FailureCode, TimedOut, TransferFailed
from objstream.common.protocol import Request, new_stream_id, parse
from objstream.common.settings import KiB, MiB, Settings
from objstream.common.topology import Topology
from objstream.consumer import Retriever
from objstream.producer import ContainerRetriever, FileRetriever, RetrievalServer
from tests.conftest import final_files, kept_bytes, random_file, sha256_of, stored_names
from tests.integration.conftest import (
    Declared,
    StartReceiver,
    StartServer,
    count_published_chunks,
    slow_disk,
    wait_for_partial,
)
from tests.integration.rawpeer import declare_reply_queue, login_user, properties
from tests.integration.test_cli import _env, _objstream

CHUNK = 64 * KiB


def _slow_env(settings: Settings) -> dict[str, str]:
    # Small chunks, a small window: a 64 MiB file takes seconds, so the kill lands mid-stream.
    return {**_env(settings), "OBJSTREAM_CHUNK_SIZE": "64KiB", "OBJSTREAM_WINDOW": "2"}


def _fetch_in_background(
    settings: Settings, out: Path, name: str, timeout: float
) -> tuple[threading.Thread, list[BaseException]]:
    """Retrieve ``name`` from "server" on a thread; what it raises goes to the list."""
    failures: list[BaseException] = []

    def fetch() -> None:
        try:
            with Retriever("site-1", out, settings) as retriever:
                retriever.retrieve_file("server", name, timeout=timeout)
        except BaseException as e:
            failures.append(e)

    fetcher = threading.Thread(target=fetch)
    fetcher.start()
    return fetcher, failures


def _kept_prefix(dest: Path, source: Path) -> int:
    """Checks what the failed stream left and returns its length in chunks."""
    assert final_files(dest) == []
    [kept] = kept_bytes(dest).values()
    assert len(kept) % CHUNK == 0
    assert 0 < len(kept) < source.stat().st_size
    with open(source, "rb") as f:
        assert kept == f.read(len(kept))  # exactly the source's first bytes
    return len(kept) // CHUNK


def _retrieve_the_rest(
    settings: Settings,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    src: Path,
    dest: Path,
    kept_chunks: int,
    digest: str,
) -> None:
    """Serve ``src`` (again) and retrieve big.bin into ``dest``: only what was not kept moves."""
    published = count_published_chunks(monkeypatch)
    start_server(settings, lambda s: FileRetriever(s, source_dir=src))
    with Retriever("site-1", dest, settings) as retriever:
        item = retriever.retrieve("file", "server", "big.bin", timeout=20)
    assert item.path is not None
    assert sha256_of(item.path) == digest
    assert item.resumed_bytes == kept_chunks * CHUNK
    chunks = item.size // CHUNK
    assert min(published) == kept_chunks  # nothing before the kept prefix moved again
    assert len(published) <= chunks - kept_chunks + 4, (len(published), chunks, kept_chunks)
    assert stored_names(dest) == ["big.bin"]  # no partial or state left


def test_owner_killed_mid_file_then_asked_again_sends_only_the_rest(
    tmp_path: Path,
    settings: Settings,
    declared: Declared,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    declared.sites.add("server")
    src = tmp_path / "src"
    src.mkdir()
    size = 64 * MiB
    digest = random_file(src / "big.bin", size)
    out = tmp_path / "out"
    owner = subprocess.Popen(
        ["objstream", "producer", "serve", "--site", "server", "--source-dir", str(src)],
        env=_slow_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        fetcher, failures = _fetch_in_background(settings, out, "big.bin", timeout=3)
        wait_for_partial(out, size // 4, owner)
        owner.kill()  # SIGKILL: no abort, no goodbye
    finally:
        owner.kill()
        owner.wait()
    fetcher.join(30)
    [error] = failures
    assert isinstance(error, TimedOut), error
    assert "are kept" in str(error)
    kept_chunks = _kept_prefix(out, src / "big.bin")

    # The owner restarted, with another default chunk size: the requester's counts win.
    _retrieve_the_rest(settings, start_server, monkeypatch, src, out, kept_chunks, digest)


def test_a_source_changed_since_is_sent_whole(
    tmp_path: Path, settings: Settings, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "f.bin", 4 * MiB)
    slow_disk(monkeypatch, seconds=0.02)
    small = settings.model_copy(update={"chunk_size": CHUNK})
    server = start_server(small, lambda s: FileRetriever(s, source_dir=src))
    out = tmp_path / "out"
    fetcher, failures = _fetch_in_background(settings, out, "f.bin", timeout=10)
    wait_for_partial(out, 10 * CHUNK)
    server.stop()  # the owner shuts down: the stream is aborted, the prefix kept
    fetcher.join(30)
    [error] = failures
    assert isinstance(error, TransferFailed)
    assert error.code == FailureCode.ABORTED
    _kept_prefix(out, src / "f.bin")

    monkeypatch.undo()  # the disk is fast again
    digest = random_file(src / "f.bin", 4 * MiB)  # same name, same size, other bytes
    published = count_published_chunks(monkeypatch)
    start_server(small, lambda s: FileRetriever(s, source_dir=src))
    with Retriever("site-1", out, settings) as retriever:
        item = retriever.retrieve("file", "server", "f.bin", timeout=20)
    assert item.path is not None
    assert sha256_of(item.path) == digest
    assert item.resumed_bytes == 0
    assert sorted(published) == list(range(4 * MiB // CHUNK))  # all of it, once
    assert stored_names(out) == ["f.bin"]


def test_a_push_whose_producer_died_is_finished_by_a_retrieval(
    tmp_path: Path,
    settings: Settings,
    declared: Declared,
    start_receiver: StartReceiver,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A push stream's prefix is kept the same way; once the producer site serves the file,
    retrieving it resumes."""
    declared.sites.update({"site-1", "server"})
    src = tmp_path / "src"
    src.mkdir()
    size = 64 * MiB
    digest = random_file(src / "big.bin", size)
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest, settings.model_copy(update={"timeout": 3}))
    producer = subprocess.Popen(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1",
         str(src / "big.bin")],
        env=_slow_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_partial(dest, size // 4, producer)
    finally:
        producer.kill()
        producer.wait()
    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.TIMEOUT
    kept_chunks = _kept_prefix(dest, src / "big.bin")

    _retrieve_the_rest(settings, start_server, monkeypatch, src, dest, kept_chunks, digest)


def test_a_killed_requester_is_resumed_by_the_next_one(
    tmp_path: Path, settings: Settings, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "f.bin", 8 * MiB)
    slow_disk(monkeypatch, seconds=0.01)
    small = settings.model_copy(update={"chunk_size": CHUNK, "window": 2})
    start_server(small, lambda s: FileRetriever(s, source_dir=src))
    out = tmp_path / "out"
    requester = subprocess.Popen(
        ["objstream", "consumer", "retrieve-file", "--site", "site-1", "--from", "server",
         "--dest", str(out), "f.bin"],
        env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_partial(out, 2 * MiB, requester)
    finally:
        requester.kill()
        requester.wait()
    assert final_files(out) == []

    monkeypatch.undo()
    with Retriever("site-1", out, settings) as retriever:
        item = retriever.retrieve("file", "server", "f.bin", timeout=20)
    assert item.path is not None
    assert sha256_of(item.path) == digest
    assert item.resumed_bytes >= CHUNK  # what the killed one had recorded
    assert stored_names(out) == ["f.bin"]


def test_the_cli_says_it_resumed(
    tmp_path: Path, settings: Settings, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "f.bin", 2 * MiB)
    slow_disk(monkeypatch, seconds=3, from_seq=4)
    small = settings.model_copy(update={"chunk_size": CHUNK})
    server = start_server(small, lambda s: FileRetriever(s, source_dir=src))
    out = tmp_path / "out"
    env = _env(settings)
    args = ("consumer", "retrieve-file", "--site", "site-1", "--from", "server", "--dest",
            str(out))  # fmt: skip
    first = _objstream(*args, "--timeout", "1", "f.bin", env=env)
    assert first.returncode == 4, first.stderr  # timed out without progress
    assert "are kept" in first.stderr
    server.stop()
    monkeypatch.undo()
    start_server(small, lambda s: FileRetriever(s, source_dir=src))
    second = _objstream(*args, "--json", "f.bin", env=_env(settings))
    assert second.returncode == 0, second.stderr
    assert '"resumed_bytes": 262144' in second.stdout  # the 4 chunks before the stall
    assert sha256_of(out / "f.bin") == digest


@pytest.mark.parametrize(
    ("kind", "chunk_size", "words"),
    [("container", 64 * KiB, "only files resume"), ("file", 16, "at least 4096")],
)
def test_resume_requests_the_owner_cannot_serve_are_refused(
    tmp_path: Path,
    settings: Settings,
    start_server: StartServer,
    kind: str,
    chunk_size: int,
    words: str,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "m", 1 * MiB)

    def setup(server: RetrievalServer) -> None:
        FileRetriever(server, source_dir=src)
        ContainerRetriever(server).add_container("m", {"a": 1})

    start_server(settings, setup)
    topo = Topology.from_settings(settings)
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        channel = connection.channel()
        reply_queue, reply_to = declare_reply_queue(channel, settings.namespace, "site-1", "server")
        request = Request(
            request_id=new_stream_id(), kind=kind, name="m", requester="site-1",
            resume_from=1, chunk_size=chunk_size, prefix_sha256="0" * 64,
        )  # fmt: skip
        props = properties(
            request, persistent=False, reply_to=reply_to, user_id=login_user(settings)
        )
        channel.basic_publish(topo.exchange, topo.service_key("server"), b"", props)
        deadline = time.monotonic() + 10
        while True:
            method, props, _ = channel.basic_get(reply_queue, auto_ack=True)
            if method is not None:
                break
            assert time.monotonic() < deadline, "no reply"
            time.sleep(0.05)
        reply = parse(props.type, props.headers)
        assert reply.ok is False  # type: ignore[union-attr]
        assert reply.code == "unsupported"  # type: ignore[union-attr]
        assert words in reply.detail  # type: ignore[union-attr]
    finally:
        connection.close()


def test_a_retriever_whose_connection_broke_as_it_was_interrupted_keeps_the_prefix(
    settings: Settings,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A Ctrl-C can land inside pika and leave the connection unusable: closing then cannot
    tell the owner, but the verified prefix stays on disk (it was deleted) and is resumed."""
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "big.bin", 32 * MiB)
    dest = tmp_path / "in"
    slow = settings.model_copy(update={"chunk_size": CHUNK, "window": 2})
    server = start_server(slow, lambda s: FileRetriever(s, source_dir=src))
    retrievers: list[Retriever] = []

    def interrupt(site: str, stream_id: str, stored: int, total: int | None) -> None:
        if stored > 4 * MiB:
            retrievers[0]._core.connection.close()  # the broken connection, for real
            raise KeyboardInterrupt

    def fetch() -> None:
        with Retriever("site-1", dest, slow, progress=interrupt) as retriever:
            retrievers.append(retriever)
            retriever.retrieve_file("server", "big.bin", timeout=20)

    with pytest.raises(KeyboardInterrupt):
        fetch()
    kept_chunks = _kept_prefix(dest, src / "big.bin")
    server.stop()
    _retrieve_the_rest(slow, start_server, monkeypatch, src, dest, kept_chunks, digest)
