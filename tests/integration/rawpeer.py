"""A sender written with raw pika and the documented protocol, to send what objstream never would.

It plays a hostile or broken peer in tests: corrupt chunks, wrong digests, aborts, garbage.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from typing import Any

import pika

from objstream.common.protocol import Abort, Chunk, End, Offer, new_stream_id, properties
from objstream.common.settings import Settings
from objstream.common.topology import Topology


class RawPeer:
    def __init__(self, settings: Settings, target: str) -> None:
        self.topology = Topology.from_settings(settings)
        self.target = target
        self.stream_id = new_stream_id()
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        self.channel = self.connection.channel()
        self.topology.declare_base(self.channel)
        self.reply = self.topology.declare_reply_queue(self.channel)
        self.topology.declare_inbox(self.channel, target)
        self.topology.declare_data_queue(self.channel, self.stream_id)

    def offer(
        self,
        name: str,
        size: int | None,
        chunk_size: int,
        window: int = 8,
        *,
        kind: str = "file",
        chunk_count: int | None = None,
        info: dict[str, Any] | None = None,
        resume_from: int = 0,
    ) -> None:
        if chunk_count is None and size is not None:
            chunk_count = -(-size // chunk_size)
        offer = Offer(
            stream_id=self.stream_id,
            kind=kind,
            name=name,
            size=size,
            chunk_size=chunk_size,
            chunk_count=chunk_count,
            window=window,
            sender="raw",
            target=self.target,
            info=info,
            resume_from=resume_from,
        )
        self.publish_inbox(b"", properties(offer, reply_to=self.reply))

    def chunk(
        self, seq: int, body: bytes, crc32: int | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        header = Chunk(
            stream_id=self.stream_id,
            seq=seq,
            crc32=zlib.crc32(body) if crc32 is None else crc32,
            meta=meta,
        )
        self.publish_data(body, properties(header))

    def end(self, count: int, size: int, sha256: str) -> None:
        end = End(stream_id=self.stream_id, chunk_count=count, size=size, sha256=sha256)
        self.publish_data(b"", properties(end))

    def abort(self, reason: str) -> None:
        self.publish_data(b"", properties(Abort(stream_id=self.stream_id, reason=reason)))

    def stream(self, name: str, chunks: list[bytes], sha256: str | None = None) -> None:
        """Offer, every chunk in order, and the end."""
        size = sum(len(c) for c in chunks)
        self.offer(name, size, max((len(c) for c in chunks), default=1))
        for seq, body in enumerate(chunks):
            self.chunk(seq, body)
        self.end(len(chunks), size, sha256 or hashlib.sha256(b"".join(chunks)).hexdigest())

    def publish_inbox(self, body: bytes, props: Any) -> None:
        self.channel.basic_publish(
            self.topology.exchange, self.topology.inbox_key(self.target), body, props
        )

    def publish_data(self, body: bytes, props: Any) -> None:
        self.channel.basic_publish(
            self.topology.exchange, self.topology.data_key(self.stream_id), body, props
        )

    def replies(self, until: str = "done", timeout: float = 30) -> list[tuple[str, dict[str, Any]]]:
        """Reply messages (type, headers) received until one of type ``until``."""
        got: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, _ = self.channel.basic_get(self.reply, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.05)
                continue
            got.append((props.type, dict(props.headers)))
            if props.type == until:
                return got
        raise AssertionError(f"no {until} reply within {timeout} s; got {got}")

    def verdict(self, timeout: float = 30) -> dict[str, Any]:
        return self.replies("done", timeout)[-1][1]

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
