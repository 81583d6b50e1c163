"""Compressed chunks against a real broker (issue 24, item 4): negotiated per target, so an
objstream that decodes them gets them, a peer that never said it does (an older objstream, a
peer written from the protocol before them) gets plain chunks, and a hostile sender's
compressed chunk cannot make a receiver allocate what the offer does not allow."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import pika

from objstream.common.compression import BLOSC2, ENCODINGS_INFO
from objstream.common.protocol import Chunk, Done, Progress, parse
from objstream.common.settings import KiB, MiB, Settings
from objstream.common.topology import Topology
from objstream.consumer import Retriever
from objstream.consumer.streams import Received
from objstream.producer import ContainerStreamer, FileRetriever, FileStreamer
from tests.conftest import sha256_of, stored_path
from tests.integration.conftest import (
    DeadReasons,
    Declared,
    MakeRawPeer,
    StartReceiver,
    StartServer,
)
from tests.integration.rawpeer import declare_base, declare_bound, login_user, properties
from tests.integration.test_cli import _env, _listener, _objstream


def weights_file(path: Path, size: int) -> str:
    """float32 weights as a trained layer holds them (small, normally distributed); their
    SHA-256."""
    rng = np.random.default_rng(7)
    data = (rng.standard_normal(size // 4) * 0.02).astype(np.float32).tobytes()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


class PlainReceiver:
    """A receiving site written from the protocol as it was before compressed chunks: it never
    says it decodes them, and takes every chunk as plain bytes (a compressed one would fail its
    length or its digest). It takes one offer, stores in memory, verifies, answers."""

    def __init__(self, settings: Settings, site: str) -> None:
        self.topology = Topology.from_settings(settings)
        self.namespace = settings.namespace
        self.site = site
        self.user = login_user(settings)
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        self.channel = self.connection.channel()
        declare_base(self.channel, self.topology, site)
        self.inbox = declare_bound(self.channel, self.topology, f"{self.namespace}.site.{site}",
                                   f"offer:{site}")  # fmt: skip
        self.encodings: list[object] = []  # the encoding header of every chunk taken
        self.data = bytearray()

    def take(self, timeout: float = 30) -> bool:
        """Receive one stream from the inbox; True if its digest verified."""
        offer_props = self._get(self.inbox, timeout)
        offer: Any = parse(offer_props.type, offer_props.headers)
        sid, sender = offer.stream_id, offer.sender
        data_queue = f"{self.namespace}.data.{self.site}.{sid}"
        self.channel.queue_declare(data_queue, auto_delete=True)
        for key in (f"data:{sid}:{sender}", f"data:{sid}:{sender}:{self.site}"):
            self.channel.queue_bind(data_queue, self.namespace, key)
        reply_key = f"{offer_props.reply_to}:{self.site}"
        self._answer(reply_key, Progress(stream_id=sid, site=self.site, stored=0))
        stored, digest = 0, hashlib.sha256()
        while True:
            props = self._get(data_queue, timeout, keep_body=True)
            message: Any = parse(props.type, props.headers)
            if props.type == "end":
                ok = message.sha256 == digest.hexdigest() and message.size == len(self.data)
                self._answer(reply_key, Done(stream_id=sid, site=self.site, ok=ok,
                                             code=None if ok else "checksum"))  # fmt: skip
                return bool(ok)
            self.encodings.append(props.headers.get("encoding"))
            if message.seq == stored and zlib.crc32(self.body) == message.crc32:
                self.data += self.body
                digest.update(self.body)
                stored += 1
            self._answer(reply_key, Progress(stream_id=sid, site=self.site, stored=stored))

    def _get(self, queue: str, timeout: float, *, keep_body: bool = False) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is not None:
                self.body = body
                return props
            self.connection.process_data_events(time_limit=0.02)
        raise AssertionError(f"nothing in {queue} within {timeout} s")

    def _answer(self, key: str, message: Progress | Done) -> None:
        props = properties(message, persistent=False, user_id=self.user)
        self.channel.basic_publish(self.namespace, key, b"", props)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def test_send_file_compresses_for_a_receiver_that_decodes(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    size = 24 * MiB
    src = tmp_path / "weights.bin"
    digest = weights_file(src, size)
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "--count", "1")
    try:
        sent = _objstream(
            "producer", "send-file", "--site", "server", "--to", "site-1",
            "--compress", "zstd", "--json", str(src),
            env=env,
        )  # fmt: skip
        listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert sent.returncode == 0, sent.stderr
    assert sha256_of(tmp_path / "in" / "weights.bin") == digest
    result = json.loads(sent.stdout)
    assert result["ok"]
    assert result["bytes"] == size
    assert result["bytes_published"] <= 0.9 * size, result


def test_a_container_of_weights_travels_compressed_and_arrives_equal(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    rng = np.random.default_rng(3)
    model = {f"layer{i}.weight": (rng.standard_normal((512, 512)) * 0.02).astype(np.float32)
             for i in range(6)}  # fmt: skip
    receiver = start_receiver("site-1", tmp_path / "in")
    with ContainerStreamer("server", settings.model_copy(update={"compress": "zstd"})) as streamer:
        [result] = streamer.stream_container("site-1", model, "model", chunk_size="256KiB")
    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert sorted(received.value) == sorted(model)
    for name, array in model.items():
        assert np.array_equal(received.value[name], array)
    assert result.bytes_published < 0.95 * result.size


def test_a_receiver_that_never_said_it_decodes_gets_plain_chunks(
    settings: Settings, declared: Declared, tmp_path: Path
) -> None:
    declared.sites.add("old")
    src = tmp_path / "weights.bin"
    weights_file(src, 3 * MiB)
    old = PlainReceiver(settings, "old")
    try:
        with FileStreamer("server", settings.model_copy(update={"compress": "zstd"})) as streamer:
            sending = _in_thread(lambda: streamer.stream_file("old", src, chunk_size="256KiB"))
            assert old.take()
            [result] = sending()
    finally:
        old.close()
    assert result.ok
    assert bytes(old.data) == src.read_bytes()
    assert old.encodings == [None] * 12
    assert result.bytes_published == 3 * MiB


def test_a_broadcast_to_an_old_and_a_new_receiver_goes_plain_once(
    settings: Settings, declared: Declared, tmp_path: Path, start_receiver: StartReceiver
) -> None:
    """The broker copies one publication to both: it can only be what both decode."""
    declared.sites.update({"old", "new"})
    src = tmp_path / "weights.bin"
    digest = weights_file(src, 3 * MiB)
    new = start_receiver("new", tmp_path / "in")
    old = PlainReceiver(settings, "old")
    try:
        with FileStreamer("server", settings.model_copy(update={"compress": "zstd"})) as streamer:
            sending = _in_thread(
                lambda: streamer.stream_file(["old", "new"], src, chunk_size="256KiB")
            )
            assert old.take()
            results = sending()
    finally:
        old.close()
    assert [r.ok for r in results] == [True, True]
    [received] = new.wait_for(1)
    assert isinstance(received, Received)
    assert sha256_of(stored_path(received)) == digest
    assert set(old.encodings) == {None}
    assert results[0].bytes_published == 3 * MiB  # one upload, plain


def _blosc(data: bytes) -> bytes:
    packed: bytes = blosc2.compress2(data, typesize=4, codec=blosc2.Codec.LZ4, clevel=5)
    return packed


def test_a_compressed_chunk_larger_than_the_offer_allows_is_dead_lettered(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer, dead_reasons: DeadReasons
) -> None:
    """A few hundred bytes that would decompress to 64 MiB, in a stream of 64 KiB chunks: the
    receiver reads the size in the chunk's header and never decompresses it; the stream goes on
    with the honest chunk."""
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    piece = bytes(64 * KiB)
    peer.offer("bomb.bin", size=len(piece), chunk_size=len(piece),
               info={ENCODINGS_INFO: BLOSC2})  # fmt: skip
    [(kind, contact)] = list(peer._answers)
    assert (kind, contact["encoding"]) == ("progress", BLOSC2)  # it said it decodes them

    bomb = _blosc(bytes(64 * MiB))
    peer.publish_data(bomb, _chunk(peer, 0, bomb))
    honest = _blosc(piece)
    peer.publish_data(honest, _chunk(peer, 0, honest))
    peer.end(1, len(piece), hashlib.sha256(piece).hexdigest())

    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert stored_path(received).read_bytes() == piece
    assert any("a Blosc2 chunk of 67108864 bytes, expected 65536" in r for r in dead_reasons())


def test_a_receiver_does_not_mention_encodings_to_a_sender_that_did_not_offer_them(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    peer.stream("plain.bin", [b"abcd", b"ef"])
    replies = peer.replies()
    assert replies[-1][1]["ok"] is True
    assert all("encoding" not in headers for _, headers in replies)


def test_a_served_file_travels_compressed_to_a_requester_that_decodes(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 8 * MiB
    digest = weights_file(src / "w.bin", size)
    serving = settings.model_copy(update={"compress": "zstd"})
    server = start_server(serving, lambda s: FileRetriever(s, source_dir=src)).server
    assert server is not None
    with Retriever("site-1", tmp_path / "in", settings) as retriever:
        path = retriever.retrieve_file("server", "w.bin", timeout=30)
    assert sha256_of(path) == digest
    assert server.bytes_published <= 0.9 * size


def _chunk(peer: Any, seq: int, body: bytes) -> Any:
    header = Chunk(stream_id=peer.stream_id, seq=seq, crc32=zlib.crc32(body), encoding=BLOSC2)
    return properties(header, persistent=False, user_id=peer.user)


def _in_thread(call: Any) -> Any:
    """Run ``call`` on a thread; the returned function joins it and gives its result."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return lambda: future.result(timeout=60)
