"""Retrievers: a site asks another for a named file or container, through the broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pika
import pytest

from objstream.common.errors import Refused, TimedOut, TransferFailed
from objstream.common.protocol import new_stream_id
from objstream.common.settings import KiB, MiB, Settings
from objstream.common.topology import Topology
from objstream.consumer import Retriever
from objstream.producer import ContainerRetriever, FileRetriever, RetrievalServer
from tests.conftest import final_files, kept_bytes, random_file, sha256_of
from tests.integration.conftest import Declared, StartReceiver, StartServer, slow_disk
from tests.integration.rawpeer import (
    declare_base,
    declare_bound,
    declare_reply_queue,
    login_user,
    properties,
)


def test_retrieve_a_file_and_a_container(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "big.bin", 5 * MiB + 1)
    model = {f"layer-{i}": np.full((256, 256), i, dtype=np.float32) for i in range(4)}

    def setup(server: RetrievalServer) -> None:
        FileRetriever(server, source_dir=src)
        ContainerRetriever(server).add_container("model", model)

    start_server(settings, setup)
    with Retriever("site-1", tmp_path / "out", settings) as retriever:
        path = retriever.retrieve_file("server", "big.bin", timeout=20)
        got = retriever.retrieve_container("server", "model", timeout=20)
    assert path == (tmp_path / "out" / "big.bin").resolve()
    assert sha256_of(path) == digest
    assert list(got) == list(model)
    assert all(np.array_equal(got[k], model[k]) and got[k].dtype == np.float32 for k in model)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("missing.bin", "not_found"),
        ("../etc/passwd", "outside_source_dir"),
        ("/etc/passwd", "outside_source_dir"),
        ("sub/../../secret", "outside_source_dir"),
        ("link-out", "outside_source_dir"),
        ("sub", "not_found"),
    ],
)
def test_refusals_are_fast_and_typed(
    tmp_path: Path, settings: Settings, start_server: StartServer, name: str, code: str
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text("no")
    (src / "link-out").symlink_to(tmp_path / "secret")
    start_server(settings, lambda server: FileRetriever(server, source_dir=src))
    with Retriever("site-1", tmp_path / "out", settings) as retriever:
        started = time.monotonic()
        with pytest.raises(Refused) as caught:
            retriever.retrieve_file("server", name, timeout=20)
        # At once, not after the 20 s timeout (typically a few ms; loose for a loaded CI machine).
        assert time.monotonic() - started < 5
    assert caught.value.code == code
    assert caught.value.site == "server"
    assert list((tmp_path / "out").iterdir()) == []


def test_unknown_container_is_not_found(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    start_server(settings, lambda server: None)
    with Retriever("site-1", tmp_path, settings) as retriever, pytest.raises(Refused) as caught:
        retriever.retrieve_container("server", "nope", timeout=10)
    assert caught.value.code == "not_found"


def test_allow_list_uses_the_broker_authenticated_user(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    user = pika.URLParameters(settings.url).credentials.username

    def setup(server: RetrievalServer) -> None:
        ContainerRetriever(server).add_container("secret", {"a": 1}, allow=["alice"])
        ContainerRetriever(server).add_container("shared", {"a": 2}, allow=[user])

    start_server(settings, setup)
    with Retriever("site-1", tmp_path, settings) as retriever:
        with pytest.raises(Refused) as caught:
            retriever.retrieve_container("server", "secret", timeout=10)
        assert retriever.retrieve_container("server", "shared", timeout=10) == {"a": 2}
    assert caught.value.code == "forbidden"
    assert repr(user) in caught.value.detail


def test_eight_requesters_get_equal_copies_at_once(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    rng = np.random.default_rng(5)
    model = {f"w{i}": rng.standard_normal(2 * MiB, dtype=np.float32) for i in range(8)}  # 64 MiB
    start_server(settings, lambda server: ContainerRetriever(server).add_container("m", model))
    results: dict[int, object] = {}

    def fetch(i: int) -> None:
        try:
            with Retriever(f"site-{i}", tmp_path / str(i), settings) as retriever:
                results[i] = retriever.retrieve_container("server", "m", timeout=60)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(range(8))
    for got in results.values():
        assert isinstance(got, dict), got
        assert all(np.array_equal(got[k], model[k]) for k in model)


def test_requesters_of_one_container_share_one_upload(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    """Four sites ask for one 64 MiB container at once: the owner streams it once (one
    broadcast the later requests join), and each site verifies its copy."""
    rng = np.random.default_rng(7)
    model = {f"w{i}": rng.standard_normal(2 * MiB, dtype=np.float32) for i in range(8)}  # 64 MiB
    background = start_server(
        settings, lambda server: ContainerRetriever(server).add_container("m", model)
    )
    server = background.server
    assert server is not None
    results: dict[int, object] = {}
    go = threading.Barrier(4)

    def fetch(i: int) -> None:
        try:
            with Retriever(f"site-{i}", tmp_path / str(i), settings) as retriever:
                go.wait(30)
                results[i] = retriever.retrieve_container("server", "m", timeout=60)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(range(4))
    for got in results.values():
        assert isinstance(got, dict), got
        assert all(np.array_equal(got[k], model[k]) for k in model)
    assert server.accepted == 4
    assert server.joined == 3
    assert server.bytes_published <= 1.1 * 64 * MiB, server.bytes_published / MiB


def test_requester_timing_out_is_reported_and_the_owner_stops(
    tmp_path: Path, settings: Settings, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's disk stalls after a few chunks: the requester gives up after its timeout
    without progress, and tells the owner, which stops long before its own timeout."""

    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "f.bin", 2 * MiB)
    slow_disk(monkeypatch, seconds=3, from_seq=3)
    small = settings.model_copy(update={"chunk_size": 64 * KiB})  # owner's timeout: 20 s
    server = start_server(small, lambda s: FileRetriever(s, source_dir=src))
    with Retriever("site-1", tmp_path / "out", settings) as retriever:
        started = time.monotonic()
        with pytest.raises(TimedOut) as caught:
            retriever.retrieve_file("server", "f.bin", timeout=1)
    assert "timed out after 1 s without progress" in str(caught.value)
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while server.server is not None and server.server.active:
        assert time.monotonic() < deadline, "the owner kept streaming"
        time.sleep(0.1)
    assert final_files(tmp_path / "out") == []
    [kept] = kept_bytes(tmp_path / "out").values()  # the three chunks before the stall
    assert kept == (src / "f.bin").read_bytes()[: 3 * 64 * KiB]


def test_owner_shutting_down_mid_stream_is_reported(
    tmp_path: Path, settings: Settings, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from objstream.common.errors import FailureCode

    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "f.bin", 4 * MiB)
    slow_disk(monkeypatch, seconds=0.05)  # the stream takes seconds
    small = settings.model_copy(update={"chunk_size": 64 * KiB})
    server = start_server(small, lambda s: FileRetriever(s, source_dir=src))
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            with Retriever("site-1", tmp_path / "out", settings) as retriever:
                retriever.retrieve_file("server", "f.bin", timeout=10)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=fetch)
    t.start()
    time.sleep(1.0)
    server.stop()  # the owner shuts down: its streams are aborted, requesters told
    t.join(30)
    [error] = outcome
    assert isinstance(error, TransferFailed)
    assert error.code == FailureCode.ABORTED
    assert "shutting down" in error.detail
    assert final_files(tmp_path / "out") == []
    [kept] = kept_bytes(tmp_path / "out").values()  # what arrived, verified, for a retry
    assert 0 < len(kept) < 4 * MiB
    assert kept == (src / "f.bin").read_bytes()[: len(kept)]


def test_a_request_whose_requester_gave_up_is_never_served(
    tmp_path: Path, settings: Settings, start_server: StartServer, declared: Declared
) -> None:
    """Retrieval steps 1 and 5: a retriever that hears nothing within its timeout fails naming
    the site, and its request expires with it, so a server that starts later never serves it;
    a request still waited for is served by that same late server.

    The retriever declares the owner's service queue, so both requests wait there for the
    server: only the expiration objstream puts on the first keeps it from being served.
    """
    declared.sites.add("server")
    with Retriever("site-1", tmp_path / "gave-up", settings) as retriever:
        with pytest.raises(TimedOut) as caught:
            retriever.retrieve_container("server", "m", timeout=1)
    assert caught.value.site == "server"
    assert "site 'server' did not answer the request for 'm'" in str(caught.value)

    outcome: list[object] = []

    def fetch() -> None:
        try:
            with Retriever("site-1", tmp_path / "waits", settings) as retriever:
                outcome.append(retriever.retrieve_container("server", "m", timeout=30))
        except BaseException as e:
            outcome.append(e)

    waiting = threading.Thread(target=fetch)
    waiting.start()
    time.sleep(1.0)  # its request is queued; the first one expired a second ago or more
    server = start_server(settings, lambda s: ContainerRetriever(s).add_container("m", {"a": 1}))
    waiting.join(60)
    assert outcome == [{"a": 1}]
    assert server.server is not None
    assert server.server.accepted == 1, "the request of a requester that gave up was served"
    assert server.server.refused == 0


def test_no_server_times_out_naming_the_site(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("nobody")
    with Retriever("site-1", tmp_path, settings) as retriever, pytest.raises(TimedOut) as caught:
        retriever.retrieve_file("nobody", "x", timeout=1)
    assert "'nobody' did not answer" in str(caught.value)


def test_a_listener_of_the_same_site_does_not_steal_the_stream(
    tmp_path: Path, settings: Settings, start_server: StartServer, start_receiver: StartReceiver
) -> None:
    listener = start_receiver("site-1", tmp_path / "listen")
    start_server(settings, lambda s: ContainerRetriever(s).add_container("m", [1, 2, 3]))
    with Retriever("site-1", tmp_path / "out", settings) as retriever:
        assert retriever.retrieve_container("server", "m", timeout=10) == [1, 2, 3]
    assert listener.outcomes == []


def test_a_killed_requester_does_not_leave_the_owner_streaming(
    tmp_path: Path, settings: Settings, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL, no goodbye: the owner's own timeout without progress stops the stream."""
    import signal
    import subprocess

    from tests.integration.test_cli import _env

    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "f.bin", 8 * MiB)
    slow_disk(monkeypatch, seconds=0.05)  # the stream takes seconds
    owner = settings.model_copy(update={"chunk_size": 64 * KiB, "timeout": 3})
    server = start_server(owner, lambda s: FileRetriever(s, source_dir=src))
    requester = subprocess.Popen(
        ["objstream", "consumer", "retrieve-file", "--site", "site-1", "--from", "server",
         "f.bin", "--dest", str(tmp_path / "out")],
        env=_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while server.server is None or not server.server.active:
        assert time.monotonic() < deadline, "the retrieval never started"
        time.sleep(0.05)
    requester.send_signal(signal.SIGKILL)
    requester.wait(10)
    deadline = time.monotonic() + 20
    while server.server.active:
        assert time.monotonic() < deadline, "the owner kept streaming to a dead requester"
        time.sleep(0.1)


def test_an_offer_that_overtakes_its_reply_is_still_taken(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """An owner replies on one connection and streams on another: the broker may deliver the
    offer first. A hand-made owner sends them in that order on purpose."""
    import hashlib
    import zlib

    from objstream.common.protocol import Inline, Offer, Reply, parse

    declared.sites.add("server")
    topo = Topology.from_settings(settings)
    content = b"overtaken\n"
    outcome: list[object] = []

    def owner() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        try:
            channel = connection.channel()
            declare_base(channel, topo, "site-1")
            queue = declare_bound(
                channel, topo, topo.service_queue("server"), topo.service_key("server")
            )
            deadline = time.monotonic() + 20
            while (got := channel.basic_get(queue, auto_ack=True))[0] is None:
                assert time.monotonic() < deadline, "no request came"
                time.sleep(0.02)
            _, props, _ = got
            request = parse(props.type, props.headers)
            sid = new_stream_id()
            offer = Offer(
                stream_id=sid, kind="file", name="x.txt", size=len(content),
                chunk_size=1024, chunk_count=1, window=1, sender="server", target="site-1",
                inline=Inline(crc32=zlib.crc32(content),
                              sha256=hashlib.sha256(content).hexdigest()),
            )  # fmt: skip
            # v2: answers go through the exchange with a key naming their publisher; the
            # verdict comes back to the owner's own reply queue, bound for the requester.
            user = login_user(settings)
            answer_key = f"{props.reply_to}:server"
            verdicts, own_reply_to = declare_reply_queue(
                channel, settings.namespace, "server", "site-1"
            )
            offer_props = properties(offer, reply_to=own_reply_to, user_id=user)
            channel.basic_publish(topo.exchange, answer_key, content, offer_props)
            reply = Reply(request_id=request.ident, ok=True, stream_id=sid, size=len(content))
            channel.basic_publish(topo.exchange, answer_key, b"", properties(reply, user_id=user))
            while (got := channel.basic_get(verdicts, auto_ack=True))[0] is None:
                assert time.monotonic() < deadline, "no verdict came"
                time.sleep(0.02)
            outcome.append(got[2:] and got[1].headers)
        finally:
            connection.close()

    thread = threading.Thread(target=owner)
    thread.start()
    with Retriever("site-1", tmp_path / "out", settings) as retriever:
        path = retriever.retrieve_file("server", "x.txt", timeout=20)
    thread.join(20)
    assert path.read_bytes() == content
    [verdict] = outcome
    assert verdict["ok"] is True  # type: ignore[index]


def test_a_name_too_long_for_the_file_system_is_refused_and_serving_goes_on(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    """A requester asks for a name with a 300-byte component: the lookup's ENAMETOOLONG (which
    used to end serve) is a plain not_found, and the next request is served."""
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "ok.bin", 1000)
    server = start_server(settings, lambda s: FileRetriever(s, source_dir=src))
    with Retriever("site-1", tmp_path / "out", settings) as retriever:
        with pytest.raises(Refused) as caught:
            retriever.retrieve_file("server", "a" * 300, timeout=20)
        assert caught.value.code == "not_found"
        assert "File name too long" in caught.value.detail
        assert sha256_of(retriever.retrieve_file("server", "ok.bin", timeout=20)) == digest
    assert server.server is not None
    assert server.server.refused == 1
