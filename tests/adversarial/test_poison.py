"""Poison from one site into another's queues: what its user may publish, built to hurt.

site-2 may publish offers to any site (``offer:S``) and requests to any owner (``serve:S``),
and anything in them: a header table pika's recursive decoder cannot take (2,000 levels deep),
one with 5,000 values, a body of garbage, an offer or request of the wrong types. The victim's
worker must reject each (the broker dead-letters it to the victim's own ``NS.dead.SITE``, with
the publisher's validated ``user_id``) and go on: the next real transfer arrives intact.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pika
import pytest

from objstream.common.settings import Settings
from objstream.consumer import Retriever
from objstream.producer import FileStreamer
from tests.adversarial.conftest import (
    NAMESPACE,
    StartReceiver,
    StartServer,
    T,
    arrived,
    assert_stored,
    dead_by_id,
    random_bytes,
)
from tests.adversarial.hostile import Hostile, marked
from tests.poison import RawHeaders, entry, nested_table, table_of

UNDECODABLE = ("2000-deep", "5000-values")
"""Poisons whose header table stays beyond objstream's bounds (read back without headers)."""

WRONG_TYPES = {
    "offer": {
        "objstream": 2,
        "stream_id": 12345,
        "kind": ["file"],
        "name": {"nested": 1},
        "size": "huge",
        "chunk_size": -1,
        "chunk_count": "x",
        "window": Decimal("1.5"),
        "sender": 7,
        "target": True,
    },
    # A requester and reply_to that agree, so the only thing wrong is the types: a request id
    # that is no id cannot even be refused (the refusal must name it).
    "request": {"objstream": 2, "request_id": "not-hex", "kind": "file", "name": ["x"],
                "requester": "site-2"},
}  # fmt: skip


def publish_poisons(site2: Hostile, key: str, message_type: str) -> dict[str, str]:
    """Publish the four poisons to ``key``; returns their message ids by poison."""
    ids = {what: marked(what) for what in ("2000-deep", "5000-values", "garbage", "wrong-types")}

    def props(what: str, **more: Any) -> dict[str, Any]:
        return {
            "type": message_type,
            "message_id": ids[what],
            "user_id": site2.user,
            "reply_to": T.reply_to("site-2", "0" * 32),
            "delivery_mode": 2,
            **more,
        }

    many = table_of(b"".join(entry(f"k{i}", b"t", b"\x01") for i in range(5000)))
    site2.publish(key, RawHeaders(nested_table(2000), **props("2000-deep")))
    site2.publish(key, RawHeaders(many, **props("5000-values")))
    site2.publish(key, pika.BasicProperties(**props("garbage")), os.urandom(4096))
    wrong = pika.BasicProperties(**props("wrong-types", headers=WRONG_TYPES[message_type]))
    site2.publish(key, wrong)
    return ids


def assert_dead_lettered(
    victim: Settings,
    site: str,
    queue: str,
    ids: dict[str, str],
    alive: Callable[[], object] = lambda: None,
) -> None:
    """Every poison is in ``site``'s dead letters, rejected from ``queue``, signed by site-2
    (``alive``: fails the test if the victim's worker died meanwhile)."""
    dead = dead_by_id(victim, site, set(ids.values()), alive=alive)
    for what, message_id in ids.items():
        props = dead[message_id]
        assert props.user_id == "site-2", what
        if what in UNDECODABLE:
            assert props.headers is None, what  # still beyond the bounds: left out
        else:
            [death] = props.headers["x-death"]
            assert (death["reason"], death["queue"]) == ("rejected", queue), what


def test_poison_in_an_inbox_is_dead_lettered_and_pushes_go_on(
    users: dict[str, Settings], start_receiver: StartReceiver, tmp_path: Path
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    with Hostile(users["site-2"], "site-2") as site2:
        ids = publish_poisons(site2, T.offer_key("site-1"), "offer")
    assert_dead_lettered(
        users["site-1"], "site-1", T.inbox("site-1"), ids, alive=lambda: receiver.wait_for(0)
    )

    data = random_bytes(tmp_path / "after.bin", 700_000)
    with FileStreamer("server", users["server"]) as streamer:
        [result] = streamer.stream_file("site-1", tmp_path / "after.bin")
    assert result.ok
    assert_stored(arrived(receiver, "after.bin"), data)
    assert len(receiver.wait_for(1)) == 1  # no stream came of the poison


def test_poison_in_a_service_queue_is_dead_lettered_and_retrievals_go_on(
    users: dict[str, Settings], start_server: StartServer, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    data = random_bytes(served / "weights.bin", 600_000)
    start_server(served)
    with Hostile(users["site-2"], "site-2") as site2:
        ids = publish_poisons(site2, T.service_key("server"), "request")
    assert_dead_lettered(users["server"], "server", T.service_queue("server"), ids)

    with Retriever("site-1", tmp_path / "in", users["site-1"]) as retriever:
        path = retriever.retrieve_file("server", "weights.bin", timeout=8)
    assert path.read_bytes() == data


def test_the_listen_command_outlives_poison(users: dict[str, Settings], tmp_path: Path) -> None:
    """``objstream consumer listen``, the process a poison used to crash at every restart (pika
    raised RecursionError decoding the 2,000-deep table): it dead-letters the poison, stays up,
    receives the next push, and exits 0 when told to stop."""
    objstream = shutil.which("objstream")
    assert objstream is not None, "objstream is not on PATH (run with the venv's bin first)"
    dest = tmp_path / "in"
    env = {
        **os.environ,
        "OBJSTREAM_URL": users["site-1"].url,
        "OBJSTREAM_NAMESPACE": NAMESPACE,
        "OBJSTREAM_RESEND_AFTER": "1",
        "OBJSTREAM_CONTACT_TIMEOUT": "3",
    }
    listener = subprocess.Popen(
        [objstream, "consumer", "listen", "--site", "site-1", "--dest", str(dest),
         "--timeout", "8"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with Hostile(users["site-2"], "site-2") as site2:
            _wait_for_consumer(site2, T.inbox("site-1"), listener)
            ids = publish_poisons(site2, T.offer_key("site-1"), "offer")
        assert_dead_lettered(
            users["site-1"], "site-1", T.inbox("site-1"), ids, alive=lambda: _running(listener)
        )

        data = random_bytes(tmp_path / "after.bin", 500_000)
        with FileStreamer("server", users["server"]) as streamer:
            [result] = streamer.stream_file("site-1", tmp_path / "after.bin")
        assert result.ok
        assert (dest / "after.bin").read_bytes() == data
        assert listener.poll() is None
    finally:
        listener.send_signal(signal.SIGTERM)
        out, err = listener.communicate(timeout=60)
    assert listener.returncode == 0, err
    assert out.splitlines() == [
        f"received file after.bin from server (user server) -> {dest / 'after.bin'} "
        f"({len(data)} bytes, sha256 {result.sha256} verified)"
    ]
    assert "Traceback" not in err
    assert err.count("dead-lettering") == len(ids), err


def _running(listener: subprocess.Popen[str]) -> None:
    if listener.poll() is not None:
        pytest.fail(f"the listener exited ({listener.returncode}): {listener.communicate()[1]}")


def _wait_for_consumer(site2: Hostile, queue: str, process: subprocess.Popen[str]) -> None:
    """Until ``queue`` has a consumer (a passive declare: any user may look)."""
    deadline = time.monotonic() + 60
    while site2.channel.queue_declare(queue, passive=True).method.consumer_count == 0:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the listener never consumed its inbox"
        time.sleep(0.1)
