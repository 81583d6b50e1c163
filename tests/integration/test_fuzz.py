"""Random headers and bodies thrown at a receiver: it never crashes, never stores garbage under
a final name, dead-letters what it cannot use, and keeps serving."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pika
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from objstream.common.protocol import MessageType
from objstream.common.settings import KiB, Settings
from objstream.producer import FileStreamer
from tests.conftest import random_file, sha256_of, stored_path
from tests.integration.conftest import DeadLetters, MakeRawPeer, StartReceiver

FIELDS = ["objstream", "stream_id", "kind", "name", "size", "chunk_size", "chunk_count",
          "window", "sender", "target", "info", "inline", "seq", "crc32", "meta", "sha256",
          "reason", "stored", "site", "ok", "code"]  # fmt: skip
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=40)
    | st.sampled_from([1, 2, "file", "container", "site-1", "0" * 32, "a" * 64]),
    lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=4,
)  # fmt: skip
headers = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), values, max_size=12)
types = st.sampled_from([t.value for t in MessageType]) | st.text(max_size=10) | st.none()


def test_fuzzed_messages_never_hurt_the_receiver(
    tmp_path: Path,
    settings: Settings,
    start_receiver: StartReceiver,
    raw_peer: MakeRawPeer,
    dead_letters: DeadLetters,
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    peer = raw_peer("site-1")
    peer.offer("victim.bin", size=64 * KiB, chunk_size=4 * KiB)  # a live data queue to fuzz too
    sent = {"n": 0}

    @hsettings(max_examples=300, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(type_=types, headers=headers, body=st.binary(max_size=5000), to_data=st.booleans())
    def throw(type_: str | None, headers: dict[str, Any], body: bytes, to_data: bool) -> None:
        props = pika.BasicProperties(
            type=type_, headers=headers, reply_to=peer.reply_to, user_id=peer.user
        )
        if to_data:
            peer.publish_data(body, props)
        else:
            peer.publish_inbox(body, props)
        sent["n"] += 1

    throw()
    # Still serving: a good file arrives after the barrage.
    src = tmp_path / "good.bin"
    digest = random_file(src, 20 * KiB)
    with FileStreamer("server", settings) as streamer:
        [result] = streamer.stream_file("site-1", src)
    assert result.ok
    deadline = time.monotonic() + 60
    while not (good := [o for o in receiver.outcomes if getattr(o, "name", "") == "good.bin"]):
        assert time.monotonic() < deadline, receiver.outcomes
        time.sleep(0.05)
    assert sha256_of(stored_path(good[0])) == digest
    finals = [p.name for p in dest.iterdir() if not p.name.startswith(".objstream")]
    assert finals == ["good.bin"]  # nothing else ever landed under a final name
    assert sent["n"] >= 300
    assert dead_letters(), "the garbage should have been dead-lettered"
