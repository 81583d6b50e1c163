"""Exhaustion: one site takes every stream slot of another, and everyone else waits.

A serving site serves at most ``max_streams`` streams at once, a receiver receives at most that
many; site-2 asks for (or offers) as many as it can and never takes (or sends) anything. No
broker user holds more than ``user_share`` of the slots (``common/slots.py``), and a slot whose
peer never makes first contact is let go after ``contact_timeout`` (3 s here): another site is
served at once, and the flood's slots come free.
"""

from __future__ import annotations

import time
from pathlib import Path

from objstream.common.errors import FailureCode
from objstream.common.protocol import Done, Offer, Progress, Reply, Request, new_stream_id, parse
from objstream.common.settings import Settings
from objstream.consumer import Retriever
from objstream.producer import FileStreamer
from tests.adversarial.conftest import (
    CONTACT_TIMEOUT,
    StartReceiver,
    StartServer,
    T,
    arrived,
    assert_stored,
    random_bytes,
    served,
)
from tests.adversarial.hostile import Hostile

FLOOD = 8


def ask(site2: Hostile, name: str, reply_to: str) -> None:
    request = Request(request_id=new_stream_id(), kind="file", name=name, requester="site-2")
    site2.send(T.service_key("server"), request, reply_to=reply_to, expiration_ms=30_000)


def answer(site2: Hostile, queue: str) -> Reply:
    """The next reply in ``queue`` (the offers of accepted requests come there too)."""
    while True:
        got = site2.get(queue, timeout=10)
        assert got is not None, "the server did not answer"
        reply = parse(got[0].type, got[0].headers)
        if isinstance(reply, Reply):
            return reply


def test_a_request_flood_holds_at_most_its_share_and_others_are_served(
    users: dict[str, Settings], start_server: StartServer, tmp_path: Path
) -> None:
    settings = users["server"]
    assert (settings.max_streams, settings.user_share) == (FLOOD, 0.5)
    source_dir = tmp_path / "served"
    source_dir.mkdir()
    wanted = random_bytes(source_dir / "weights.bin", 600_000)
    other = random_bytes(source_dir / "other.bin", 600_000)
    server = start_server(source_dir)

    with Hostile(users["site-2"], "site-2") as site2:
        flooded = time.monotonic()
        for _ in range(FLOOD):  # every answer, and every offer, goes nowhere
            ask(site2, "weights.bin", site2.unbound_reply_to())
        queue, reply_to = site2.reply_queue("server")
        ask(site2, "weights.bin", reply_to)  # after the flood: is there room for site-2?
        busy = answer(site2, queue)
        assert (busy.ok, busy.code) == (False, FailureCode.BUSY)
        assert f"broker user 'site-2' holds 4 of {FLOOD} streams (its share: 4)" in busy.detail
        assert (served(server).accepted, served(server).refused) == (4, FLOOD - 4 + 1)

        with Retriever("site-1", tmp_path / "in", users["site-1"]) as retriever:
            started = time.monotonic()
            path = retriever.retrieve_file("server", "other.bin", timeout=8)
            took = time.monotonic() - started
            assert path.read_bytes() == other
            assert took < CONTACT_TIMEOUT, f"site-1 waited {took:.1f} s for a slot"
            # The flood's own object too (it may join a stream nobody takes, or start anew).
            path = retriever.retrieve_file("server", "weights.bin", timeout=8)
            assert path.read_bytes() == wanted

        # The flood's requesters never took their offers: their slots were let go.
        while not (again := _ask(site2, queue, reply_to)).ok:
            assert again.code == FailureCode.BUSY, again
            waited = time.monotonic() - flooded
            assert waited < CONTACT_TIMEOUT + 5, f"site-2's slots still held after {waited:.1f} s"
            time.sleep(0.5)


def _ask(site2: Hostile, queue: str, reply_to: str) -> Reply:
    ask(site2, "weights.bin", reply_to)
    return answer(site2, queue)


def test_an_offer_flood_does_not_hold_up_another_sites_push(
    users: dict[str, Settings], start_receiver: StartReceiver, tmp_path: Path
) -> None:
    """24 offers from site-2, never followed by data: it gets 4 streams (its share of 8), 16
    offers wait (its share of the waiting room), 4 are refused ``busy``; the server's push goes
    through at once."""
    receiver = start_receiver("site-1", tmp_path / "in")
    source = tmp_path / "real.bin"
    data = random_bytes(source, 1024 * 1024)
    with Hostile(users["site-2"], "site-2") as site2:
        queue, reply_to = site2.reply_queue("site-1")
        for i in range(24):
            offer = Offer(
                stream_id=new_stream_id(),
                kind="file",
                name=f"flood-{i}.bin",
                size=1024 * 1024,
                chunk_size=65536,
                chunk_count=16,
                window=8,
                sender="site-2",
                target="site-1",
            )
            site2.send(T.offer_key("site-1"), offer, reply_to=reply_to, expiration_ms=20_000)
        contacts: set[str] = set()
        refused: set[str] = set()
        deadline = time.monotonic() + 10
        while len(refused) < 4 and time.monotonic() < deadline:
            got = site2.get(queue, timeout=1)
            if got is None:
                continue
            message = parse(got[0].type, got[0].headers)
            if isinstance(message, Progress):
                contacts.add(message.stream_id)
            elif isinstance(message, Done) and message.code == FailureCode.BUSY:
                refused.add(message.stream_id)
        assert (len(contacts), len(refused)) == (4, 4)

        started = time.monotonic()
        with FileStreamer("server", users["server"]) as streamer:
            [result] = streamer.stream_file("site-1", source)
        took = time.monotonic() - started
    assert result.ok
    assert_stored(arrived(receiver, "real.bin"), data)
    assert took < CONTACT_TIMEOUT + 3, f"the push took {took:.1f} s"
