"""What protocol v2 asks of a requester, checked against a raw owner (raw pika, the design):
the request's key, ``reply_to`` and ``user_id``, replies and offers through the exchange to
the requester's own reply queue, the data queue the requester declares, and one broadcast
feeding two requesters (a shared upload)."""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from objstream.common.errors import BrokerRefused, Refused, TransferFailed
from objstream.common.protocol import Abort, Chunk, End, Offer, Reply, Request, new_stream_id, parse
from objstream.common.settings import Settings
from objstream.common.topology import Topology
from objstream.consumer import Retriever
from tests.integration.conftest import Declared, in_background
from tests.integration.rawpeer import (
    declare_base,
    declare_bound,
    declare_reply_queue,
    login_user,
    properties,
)

CONTENT = b"0123456789abcdef" * 4  # 4 chunks of 16
CHUNK = 16


class RawOwner:
    """Site ``server`` serving by hand: it collects requests from its service queue."""

    def __init__(self, settings: Settings) -> None:
        self.ns = settings.namespace
        self.user = login_user(settings)
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        self.channel = self.connection.channel()
        topo = Topology.from_settings(settings)
        declare_base(self.channel, topo, "server")
        self.service = declare_bound(self.channel, topo, f"{self.ns}.serve.server", "serve:server")
        self.requests: list[tuple[str, Any, Request]] = []  # (routing key, props, request)

    def wait_requests(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"only {len(self.requests)} requests came"
            method, props, _ = self.channel.basic_get(self.service, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.05)
                continue
            request = parse(props.type, props.headers)
            assert isinstance(request, Request)
            self.requests.append((method.routing_key, props, request))

    def answer(
        self, props: Any, message: Reply | Offer | Abort, reply_to: str | None = None
    ) -> None:
        """Through the exchange, with the key naming this site as the publisher."""
        out = properties(message, reply_to=reply_to, user_id=self.user)
        self.channel.basic_publish(self.ns, f"{props.reply_to}:server", b"", out)

    def data(self, sid: str, message: Chunk | End, body: bytes = b"") -> None:
        """A broadcast to every requester of stream ``sid``."""
        out = properties(message, persistent=False, user_id=self.user)
        self.channel.basic_publish(self.ns, f"data:{sid}:server", body, out)


@pytest.fixture
def raw_owner(settings: Settings, declared: Declared) -> Iterator[RawOwner]:
    declared.sites.add("server")
    owner = RawOwner(settings)
    yield owner
    owner.connection.close()


def test_the_request_names_the_requester_and_a_refusal_comes_back(
    tmp_path: Path, settings: Settings, raw_owner: RawOwner
) -> None:
    def fetch() -> object:
        with Retriever("site-1", tmp_path, settings) as retriever:
            return retriever.retrieve_file("server", "nope.bin", timeout=20)

    thread, outcome = in_background(fetch)
    raw_owner.wait_requests(1)
    key, props, request = raw_owner.requests[0]
    assert key == "serve:server"
    assert re.fullmatch(r"reply:site-1:[0-9a-f]{32}", props.reply_to)
    assert props.user_id == "guest"
    assert props.expiration is not None
    assert request.requester == "site-1"
    refusal = Reply(request_id=request.request_id, ok=False, code="not_found", detail="no such")
    raw_owner.answer(props, refusal)
    thread.join(30)
    [error] = outcome
    assert isinstance(error, Refused)
    assert error.code == "not_found"


def test_two_requesters_share_one_broadcast(
    tmp_path: Path, settings: Settings, declared: Declared, raw_owner: RawOwner
) -> None:
    """The owner answers both requests with one stream id and publishes each chunk once: each
    requester's own data queue (``NS.data.R.ID``) gets it."""
    declared.sites.update({"site-1", "site-2"})
    fetchers = []
    for site in ("site-1", "site-2"):

        def fetch(site: str = site) -> object:
            with Retriever(site, tmp_path / site, settings) as retriever:
                return retriever.retrieve_file("server", "shared.bin", timeout=20)

        fetchers.append(in_background(fetch))
    raw_owner.wait_requests(2)
    sid = new_stream_id()
    declared.streams.add(sid)
    digest = hashlib.sha256(CONTENT).hexdigest()
    verdicts, own_reply_to = declare_reply_queue(
        raw_owner.channel, raw_owner.ns, "server", "site-1", "site-2"
    )
    for _, props, request in raw_owner.requests:
        reply = Reply(request_id=request.request_id, ok=True, stream_id=sid, size=len(CONTENT))
        raw_owner.answer(props, reply)
        offer = Offer(stream_id=sid, kind="file", name="shared.bin", size=len(CONTENT),
                      chunk_size=CHUNK, chunk_count=4, window=8, sender="server",
                      target=request.requester)  # fmt: skip
        raw_owner.answer(props, offer, reply_to=own_reply_to)
    answers = _answers(raw_owner, verdicts, until=lambda got: len(got) >= 2)
    assert {h["site"] for _, h in answers} == {"site-1", "site-2"}  # both first contacts
    for seq in range(4):
        body = CONTENT[seq * CHUNK : (seq + 1) * CHUNK]
        raw_owner.data(sid, Chunk(stream_id=sid, seq=seq, crc32=zlib.crc32(body)), body)
    raw_owner.data(sid, End(stream_id=sid, chunk_count=4, size=len(CONTENT), sha256=digest))

    for thread, outcome in fetchers:
        thread.join(30)
        [path] = outcome
        assert isinstance(path, Path), path
        assert path.read_bytes() == CONTENT
    done = _answers(raw_owner, verdicts, until=lambda got: sum(t == "done" for t, _ in got) >= 2)
    assert sorted(h["site"] for t, h in done if t == "done") == ["site-1", "site-2"]


def test_an_accepted_stream_aborted_before_its_offer_fails_the_retrieval_at_once(
    tmp_path: Path, settings: Settings, declared: Declared, raw_owner: RawOwner
) -> None:
    """A shared upload that failed before this request joined it: the owner sends ``abort`` for
    the accepted stream id to the reply queue, and the retrieval fails now, not at its timeout."""
    declared.sites.add("site-1")

    def fetch() -> object:
        with Retriever("site-1", tmp_path, settings) as retriever:
            return retriever.retrieve_file("server", "shared.bin", timeout=60)

    thread, outcome = in_background(fetch)
    raw_owner.wait_requests(1)
    _, props, request = raw_owner.requests[0]
    sid = new_stream_id()
    raw_owner.answer(props, Reply(request_id=request.request_id, ok=True, stream_id=sid, size=9))
    aborted = time.monotonic()
    raw_owner.answer(props, Abort(stream_id=sid, reason="the source could not be read"))
    thread.join(30)
    assert time.monotonic() - aborted < 10  # not the 60 s timeout
    [error] = outcome
    assert isinstance(error, TransferFailed), error
    assert error.code == "aborted"
    assert error.site == "server"
    assert "the source could not be read" in error.detail


def _answers(
    owner: RawOwner, queue: str, until: Callable[[list[tuple[str, Any]]], bool]
) -> list[tuple[str, Any]]:
    got: list[tuple[str, Any]] = []
    deadline = time.monotonic() + 20
    while not until(got):
        assert time.monotonic() < deadline, got
        method, props, _ = owner.channel.basic_get(queue, auto_ack=True)
        if method is None:
            owner.connection.process_data_events(time_limit=0.05)
            continue
        got.append((props.type, props.headers))
    return got


def test_a_refused_declare_of_the_owners_service_queue_is_skipped(
    tmp_path: Path, settings: Settings, raw_owner: RawOwner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under least privilege a requester may not declare the owner's service queue (the admin
    did): the broker refuses and closes the channel; the request goes out all the same."""
    refused: list[str] = []

    def not_allowed(self: Topology, channel: Any, site: str) -> str:
        refused.append(site)
        try:  # a real refusal closes the channel it happens on
            channel.declare_queue(f"{self.namespace}.no-such-queue", passive=True)
        except BrokerRefused:
            pass
        raise BrokerRefused(403, "ACCESS_REFUSED - access to queue refused", "declaring")

    monkeypatch.setattr(Topology, "declare_service_queue", not_allowed)

    def fetch() -> object:
        with Retriever("site-1", tmp_path, settings) as retriever:
            return retriever.retrieve_file("server", "nope.bin", timeout=20)

    thread, outcome = in_background(fetch)
    raw_owner.wait_requests(1)
    _, props, request = raw_owner.requests[0]
    raw_owner.answer(props, Reply(request_id=request.request_id, ok=False, code="not_found"))
    thread.join(30)
    assert refused == ["server"]
    [error] = outcome
    assert isinstance(error, Refused)
