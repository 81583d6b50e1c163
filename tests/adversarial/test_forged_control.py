"""Forged control messages: a site answers for another one.

A target of a broadcast (or a joiner of a shared upload) learns the sender's reply queue from
its own offer (``reply_to`` = ``reply:server:QID``) and may publish answers into it with the
one key that names itself, ``reply:server:QID:site-2``; a site that was asked for something
learns the requester's private queue the same way. With those keys it claims to be another
site: ``done(site="site-1", ok=true)``, a refusal of someone else's request, an abort of a
stream promised to someone else. None of that may count: an answer counts for the site its key
names, from a user that speaks for that site (``common/identity.py``). The key that names the
victim the broker refuses outright (403).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from objstream.common.errors import FailureCode, Refused, SendFailed
from objstream.common.protocol import (
    Abort,
    Done,
    Offer,
    Progress,
    Reply,
    Request,
    new_stream_id,
    parse,
)
from objstream.common.request_session import PublishRequest
from objstream.common.settings import Settings
from objstream.consumer import Received, Retriever
from objstream.consumer.requests import RequestTracker
from objstream.producer import FileStreamer, RetrievalServer, TargetResult
from objstream.producer.sender import StreamSender
from tests.adversarial.conftest import (
    StartReceiver,
    StartServer,
    T,
    arrived,
    assert_stored,
    dead_by_id,
    random_bytes,
    served,
)
from tests.adversarial.hostile import Hostile, marked
from tests.integration.conftest import slow_disk, wait_for_partial


def assert_refused_topic(refusal: str | None, key: str) -> None:
    assert refusal is not None, f"the broker let site-2 publish {key}"
    assert refusal.startswith("403 ACCESS_REFUSED"), refusal
    assert f"access to topic '{key}'" in refusal


def assert_dead_from_site2(settings: Settings, site: str, ids: set[str]) -> None:
    """The forgeries were dead-lettered by ``site``'s worker, each signed by site-2's user."""
    for message_id, props in dead_by_id(settings, site, ids).items():
        if message_id in ids:
            assert props.user_id == "site-2", message_id


class CoTarget(threading.Thread):
    """site-2 as a target of the server's broadcast: it takes its offer from its own inbox,
    forges ``progress`` and ``done(ok=true)`` for ``victim`` with its own reply key, tries the
    key naming the victim, then refuses the stream for itself (so the send ends at once)."""

    def __init__(self, settings: Settings, victim: str) -> None:
        super().__init__(name="hostile-co-target", daemon=True)
        self.settings = settings
        self.victim = victim
        self.forged: set[str] = set()  # message ids
        self.refusal: str | None = None
        self.victim_key = ""
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with Hostile(self.settings, "site-2") as site2:
                got = site2.get(T.inbox("site-2"), timeout=30)
                assert got is not None, "site-2 got no offer"
                props, _ = got
                offer = parse(props.type, props.headers)
                assert isinstance(offer, Offer)
                sid, own = offer.stream_id, T.reply_key(props.reply_to, "site-2")
                assert offer.chunk_count is not None
                stored = Progress(stream_id=sid, site=self.victim, stored=offer.chunk_count)
                done = Done(stream_id=sid, site=self.victim, ok=True, stored_as="forged.bin")
                for message in (stored, done):
                    message_id = marked(f"forged-{type(message).__name__.lower()}")
                    site2.send(own, message, message_id=message_id)
                    self.forged.add(message_id)
                self.victim_key = T.reply_key(props.reply_to, self.victim)
                self.refusal = site2.refusal(self.victim_key, done)
                mine = Done(stream_id=sid, site="site-2", ok=False, code=FailureCode.REFUSED)
                site2.send(own, mine)
        except BaseException as e:
            self.error = e

    def finish(self) -> None:
        self.join(30)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        assert_refused_topic(self.refusal, self.victim_key)


def results_of(failed: pytest.ExceptionInfo[SendFailed]) -> dict[str, TargetResult]:
    results = [r for r in failed.value.results if isinstance(r, TargetResult)]
    return {r.site: r for r in results}


def test_a_co_target_cannot_report_another_target_stored(
    users: dict[str, Settings], start_receiver: StartReceiver, tmp_path: Path
) -> None:
    """site-1 takes a second to commit; site-2 says at once that site-1 stored it. The send
    hears site-1 only from site-1: its real verdict, after the commit, with its real name."""
    source = tmp_path / "model.bin"
    data = random_bytes(source, 2 * 1024 * 1024 + 5)
    committed: list[float] = []

    def slow_commit(item: Received) -> Received:
        time.sleep(1.0)
        committed.append(time.monotonic())
        return item

    receiver = start_receiver("site-1", tmp_path / "site-1", save=slow_commit)
    attack = CoTarget(users["site-2"], victim="site-1")
    with FileStreamer("server", users["server"]) as streamer:
        with pytest.raises(SendFailed) as failed:
            streamer.stream_file(["site-1", "site-2"], source)
        returned = time.monotonic()
    attack.finish()

    results = results_of(failed)
    assert results["site-1"].stored_as == "model.bin", "site-2's verdict counted for site-1"
    assert results["site-1"].ok, results["site-1"]
    assert results["site-2"].error is not None
    assert results["site-2"].error.code == FailureCode.REFUSED
    assert_stored(arrived(receiver, "model.bin"), data)
    assert committed, "site-1 never committed"
    assert returned >= committed[0], "the send ended before site-1 committed"
    assert_dead_from_site2(users["server"], "server", attack.forged)

    # The next broadcast, with nobody forging anything, goes through.
    again = start_receiver("site-2", tmp_path / "site-2")
    with FileStreamer("server", users["server"]) as streamer:
        assert all(r.ok for r in streamer.stream_file(["site-1", "site-2"], source))
    assert_stored(arrived(again, "model.bin"), data)


def test_a_forged_verdict_for_a_target_that_never_ran_times_out(
    users: dict[str, Settings], start_receiver: StartReceiver, tmp_path: Path
) -> None:
    """site-1 runs nothing: whatever site-2 says for it, the send fails for site-1 (timeout,
    it never took the offer) rather than report it stored."""
    source = tmp_path / "model.bin"
    data = random_bytes(source, 300_000)
    attack = CoTarget(users["site-2"], victim="site-1")
    with FileStreamer("server", users["server"]) as streamer:
        with pytest.raises(SendFailed) as failed:
            streamer.stream_file(["site-1", "site-2"], source, timeout=3)
    attack.finish()

    site1 = results_of(failed)["site-1"]
    assert not site1.ok
    assert site1.error is not None
    assert site1.error.code == FailureCode.TIMEOUT
    assert "site 'site-1' never took the offer" in site1.error.detail
    assert site1.stored_as is None
    assert_dead_from_site2(users["server"], "server", attack.forged)

    receiver = start_receiver("site-1", tmp_path / "site-1")
    (tmp_path / "later.bin").write_bytes(data)
    with FileStreamer("server", users["server"]) as streamer:
        [result] = streamer.stream_file("site-1", tmp_path / "later.bin")
    assert result.ok
    assert_stored(arrived(receiver, "later.bin"), data)


def test_a_joiner_of_a_shared_upload_cannot_fail_another_requester(
    users: dict[str, Settings],
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """site-1 retrieves a file; site-2 asks for the same one while it streams, joins the upload
    (the same stream id) and, with its own key to the owner's reply queue, says that site-1
    failed its checksum. site-1's retrieval completes all the same."""
    source_dir = tmp_path / "served"
    source_dir.mkdir()
    data = random_bytes(source_dir / "shared.bin", 3 * 1024 * 1024)
    slow_disk(monkeypatch, 0.04)  # 48 chunks: about 2 s of streaming to join and forge in
    server = start_server(source_dir, users["server"].model_copy(update={"chunk_size": 65536}))

    outcome: dict[str, object] = {}
    dest = tmp_path / "site-1"

    def retrieve() -> None:
        try:
            with Retriever("site-1", dest, users["site-1"]) as retriever:
                outcome["path"] = retriever.retrieve_file("server", "shared.bin", timeout=8)
        except BaseException as e:
            outcome["error"] = e

    requester = threading.Thread(target=retrieve, name="site-1-retrieves", daemon=True)
    requester.start()
    wait_for_partial(dest, 65536)
    [partial] = dest.glob(".objstream-*.part")
    sid = partial.name.removeprefix(".objstream-").removesuffix(".part")

    with Hostile(users["site-2"], "site-2") as site2:
        queue, reply_to = site2.reply_queue("server")
        request = Request(
            request_id=new_stream_id(), kind="file", name="shared.bin", requester="site-2"
        )
        site2.send(T.service_key("server"), request, reply_to=reply_to)
        answers = {props.type: props for props, _ in site2.take(queue, 2)}
        reply = parse("reply", answers["reply"].headers)
        assert isinstance(reply, Reply)
        assert (reply.ok, reply.stream_id) == (True, sid), "site-2 did not join the upload"
        owner = answers["offer"].reply_to  # the serving worker's reply queue
        forged = Done(stream_id=sid, site="site-1", ok=False, code=FailureCode.CHECKSUM)
        forged_id = marked("forged-done")
        site2.send(T.reply_key(owner, "site-2"), forged, message_id=forged_id)
        refusal = site2.refusal(T.reply_key(owner, "site-1"), forged)
        mine = Done(stream_id=sid, site="site-2", ok=False, code=FailureCode.REFUSED)
        site2.send(T.reply_key(owner, "site-2"), mine)

    requester.join(30)
    assert "error" not in outcome, outcome
    path = outcome["path"]
    assert isinstance(path, Path)
    assert path.read_bytes() == data
    assert served(server).joined == 1
    assert_refused_topic(refusal, T.reply_key(owner, "site-1"))
    assert_dead_from_site2(users["server"], "server", {forged_id})


def test_forged_answers_to_a_requester_do_not_count(
    users: dict[str, Settings],
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """site-1 asked site-2 for something, so its private queue takes answers with site-2's key
    ``reply:site-1:QID:site-2``. Then it asks the server. site-2, told (the worst case) the
    request id and then the promised stream id, answers in the server's place: a refusal, an
    acceptance of a stream of its own, an offer of it; once the server has accepted, an abort
    of the promised stream and an offer of it. None counts: the retrieval from the server
    completes. The key naming the server the broker refuses."""
    source_dir = tmp_path / "served"
    source_dir.mkdir()
    data = random_bytes(source_dir / "weights.bin", 700_000)

    # What the worst-case adversary is told, and a hold on the owner's offer until it forged.
    asked: list[tuple[str, str]] = []  # (owner, request id) of site-1's requests
    promised: list[str] = []  # stream ids the server's replies promise
    replied, forged_all = threading.Event(), threading.Event()
    publish, reply, send = RequestTracker._publish, RetrievalServer._reply, StreamSender.send

    def spy_publish(tracker: RequestTracker, action: PublishRequest) -> None:
        asked.append((action.owner, action.request.request_id))
        publish(tracker, action)

    def spy_reply(server: RetrievalServer, reply_to: str, message: Reply) -> None:
        reply(server, reply_to, message)
        if message.stream_id is not None:
            promised.append(message.stream_id)
            replied.set()

    def held_send(sender: StreamSender, *args: Any, **kwargs: Any) -> list[TargetResult]:
        assert forged_all.wait(20)
        return send(sender, *args, **kwargs)

    monkeypatch.setattr(RequestTracker, "_publish", spy_publish)
    monkeypatch.setattr(RetrievalServer, "_reply", spy_reply)
    monkeypatch.setattr(StreamSender, "send", held_send)

    outcome: dict[str, object] = {}

    def retrieve() -> None:
        try:
            with Retriever("site-1", tmp_path / "site-1", users["site-1"]) as retriever:
                with pytest.raises(Refused) as refused:
                    retriever.retrieve_file("site-2", "anything.bin", timeout=8)
                outcome["site-2"] = refused.value
                outcome["path"] = retriever.retrieve_file("server", "weights.bin", timeout=8)
        except BaseException as e:
            outcome["error"] = e

    requester = threading.Thread(target=retrieve, name="site-1-retrieves", daemon=True)
    requester.start()
    forged: set[str] = set()
    try:
        with Hostile(users["site-2"], "site-2") as site2:
            # site-2 as an owner site-1 asks: the request names site-1's private queue.
            got = site2.get(T.service_queue("site-2"), timeout=20)
            assert got is not None, "site-1 never asked site-2"
            props, _ = got
            first = parse(props.type, props.headers)
            assert isinstance(first, Request)
            private = props.reply_to
            own = T.reply_key(private, "site-2")
            no = Reply(request_id=first.request_id, ok=False, code=FailureCode.NOT_FOUND)
            site2.send(own, no)

            _wait(lambda: len(asked) == 2, "site-1 never asked the server")
            owner, request_id = asked[1]
            assert owner == "server"
            fake = new_stream_id()
            early: dict[str, Reply | Offer | Abort] = {
                "refusal": Reply(request_id=request_id, ok=False, code=FailureCode.NOT_FOUND),
                "acceptance": Reply(request_id=request_id, ok=True, stream_id=fake, size=5),
                "offer": _offer(fake),
            }
            for what, message in early.items():
                forged.add(_forge(site2, own, message, f"early-{what}"))
            no_from_server = Reply(request_id=request_id, ok=False, code=FailureCode.NOT_FOUND)
            refusal = site2.refusal(T.reply_key(private, "server"), no_from_server)

            server = start_server(source_dir)
            assert replied.wait(20), "the server never accepted"
            time.sleep(0.3)  # its reply is in site-1's queue before what follows
            sid = promised[0]
            late: dict[str, Reply | Offer | Abort] = {
                "abort": Abort(stream_id=sid, reason="forged"),
                "offer": _offer(sid),
            }
            for what, message in late.items():
                forged.add(_forge(site2, own, message, f"late-{what}"))
    finally:
        forged_all.set()  # the server's offer may go now, after every forgery

    requester.join(30)
    assert "error" not in outcome, outcome
    assert isinstance(outcome["site-2"], Refused)
    path = outcome["path"]
    assert isinstance(path, Path)
    assert path.read_bytes() == data
    assert served(server).accepted == 1
    assert_refused_topic(refusal, T.reply_key(private, "server"))
    assert_dead_from_site2(users["site-1"], "site-1", forged)


def _offer(stream_id: str) -> Offer:
    """An offer of 5 bytes in the server's name."""
    return Offer(
        stream_id=stream_id,
        kind="file",
        name="weights.bin",
        size=5,
        chunk_size=5,
        chunk_count=1,
        window=1,
        sender="server",
        target="site-1",
    )


def _forge(site2: Hostile, key: str, message: Reply | Offer | Abort, what: str) -> str:
    message_id = marked(what)
    # An offer's reply_to must name its sender: the server's form, a queue of nobody's.
    reply_to = T.reply_to("server", new_stream_id()) if isinstance(message, Offer) else None
    site2.send(key, message, reply_to=reply_to, message_id=message_id)
    return message_id


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
