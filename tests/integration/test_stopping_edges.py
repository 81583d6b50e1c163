"""Stopping and dying at the edges: a listener stopped mid-commit still reports what it stored;
a stream whose sender went away is over for every later listener, and its kept prefix is left
for a retrieval."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from objstream.common.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from objstream.common.errors import TransferFailed
from objstream.common.settings import MiB, Settings
from objstream.common.topology import Topology
from objstream.consumer import Receiver
from objstream.consumer.streams import Received
from objstream.producer import FileRetriever, FileStreamer, TargetResult
from tests.conftest import final_files, kept_bytes, random_file, sha256_of
from tests.integration.conftest import Declared, StartServer, wait_for_partial
from tests.integration.test_cli import _env, _listener
from tests.integration.test_resume_retrieval import _kept_prefix, _retrieve_the_rest, _slow_env


def _records(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def _push(settings: Settings, src: Path, into: list[object]) -> threading.Thread:
    """Push ``src`` to site-1 on a thread; its per-target results (or error) go to ``into``."""

    def send() -> None:
        try:
            with FileStreamer("server", settings) as streamer:
                into.append(streamer.stream_file("site-1", src))
        except Exception as e:
            into.append(e)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def _written(dest: Path, size: int) -> bool:
    """Every byte of the stream is in its partial file, or it is committed already."""
    if (dest / "f.bin").exists():
        return True
    for partial in dest.glob(".objstream-*.part") if dest.exists() else []:
        with contextlib.suppress(FileNotFoundError):  # renamed meanwhile
            if partial.stat().st_size >= size:
                return True
    return False


def test_listen_json_reports_what_it_stored_while_stopping(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """SIGTERM lands when every byte is written and the commit is under way: the listener
    stops, but the object it stored (and told the sender it stored) has its JSON record."""
    declared.sites.update({"site-1", "server"})
    src = tmp_path / "f.bin"
    size = 24 * MiB
    digest = random_file(src, size)
    dest = tmp_path / "in"
    env = _env(settings)
    listener = _listener(env, "site-1", dest, "--json")
    outcome: list[object] = []
    sender = _push(settings, src, outcome)
    try:
        deadline = time.monotonic() + 60
        while not _written(dest, size):
            assert listener.poll() is None, listener.communicate()
            assert time.monotonic() < deadline, "the stream never got going"
            time.sleep(0.001)
        # Frozen past its receive() deadline, then stopped: the loop sees the stop flag before
        # the commit's outcome, and only closing settles the commit.
        listener.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        listener.send_signal(signal.SIGTERM)
        listener.send_signal(signal.SIGCONT)
        out, err = listener.communicate(timeout=30)
    finally:
        listener.kill()
    assert listener.returncode == 0, err
    records = _records(out)
    if not (dest / "f.bin").exists():
        # The stop came before the commit: the stream was left for a successor.
        second = _listener(env, "site-1", dest, "--json", "--count", "1")
        more, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        records += _records(more)
    sender.join(60)
    [results] = outcome
    assert not isinstance(results, Exception), results
    assert isinstance(results, list)
    [result] = results
    assert isinstance(result, TargetResult)
    assert result.ok, result
    assert sha256_of(dest / "f.bin") == digest
    stored = [r for r in records if r.get("ok")]
    assert [(r["name"], r["sha256"]) for r in stored] == [("f.bin", digest)], (records, err)


def test_closing_a_receiver_mid_save_still_hands_over_what_it_stored(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """The Python side of it: ``close()`` settles a save under way, ``drain()`` returns it."""
    declared.sites.update({"site-1", "server"})
    src = tmp_path / "f.bin"
    digest = random_file(src, 3 * MiB)
    saving = threading.Event()
    release = threading.Event()

    def save(item: Received) -> Received:
        saving.set()
        release.wait(10)
        return item

    receiver = Receiver("site-1", tmp_path / "in", settings, save=save)
    outcome: list[object] = []
    sender = _push(settings, src, outcome)
    try:
        deadline = time.monotonic() + 30
        while not saving.is_set():
            assert time.monotonic() < deadline, "the save never started"
            assert receiver.receive(timeout=0.05) is None
        threading.Timer(1.0, release.set).start()
    finally:
        receiver.close()
    [item] = receiver.drain()
    assert isinstance(item, Received), item
    assert (item.name, item.sha256) == ("f.bin", digest)
    assert receiver.drain() == []
    sender.join(30)
    [results] = outcome
    assert isinstance(results, list)
    [result] = results
    assert isinstance(result, TargetResult)
    assert result.ok, result


def _queue_exists(settings: Settings, name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        connection.close()


def test_a_stream_whose_sender_went_away_is_over_for_the_next_listener(
    tmp_path: Path,
    settings: Settings,
    declared: Declared,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Listener A times the stream out (its sender was killed) and keeps the prefix; A is
    killed while its verdict lingers. Listener B does not take that stream over (nobody would
    send the rest): it removes the data queue A left, and a retrieval of the file while B
    runs resumes from the kept prefix."""
    declared.sites.update({"site-1", "server"})
    src = tmp_path / "src"
    src.mkdir()
    size = 48 * MiB
    digest = random_file(src / "big.bin", size)
    dest = tmp_path / "in"
    env = _env(settings)
    first = _listener(env, "site-1", dest, "--timeout", "3", "--json")
    producer = subprocess.Popen(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1",
         str(src / "big.bin")],
        env=_slow_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    second = None
    try:
        try:
            wait_for_partial(dest, 6 * MiB, producer)
        finally:
            producer.kill()
            producer.wait()
        assert first.stdout is not None
        record = json.loads(first.stdout.readline())  # A's verdict: timeout, prefix kept
        assert (record["ok"], record["code"]) == (False, "timeout"), record
        first.kill()  # within the 15 s its verdict lingers: its data queue stays behind
        first.wait()
        queue = Topology.from_settings(settings).data_queue("site-1", str(record["stream_id"]))
        declared.streams.add(str(record["stream_id"]))
        assert _queue_exists(settings, queue)
        kept_chunks = _kept_prefix(dest, src / "big.bin")

        second = _listener(env, "site-1", dest, "--timeout", "30", "--json")
        deadline = time.monotonic() + 15
        while _queue_exists(settings, queue):
            assert second.poll() is None, second.communicate()
            assert time.monotonic() < deadline, "the next listener left the dead stream's queue"
            time.sleep(0.1)
        # While B runs, the prefix is free for a retrieval, which goes on from it.
        _retrieve_the_rest(settings, start_server, monkeypatch, src, dest, kept_chunks, digest)
    finally:
        first.kill()
        if second is not None:
            second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=30)
    assert second.returncode == 0, err
    assert _records(out) == []  # B neither took the stream over nor reported it again
    assert "resuming" not in err
    assert sha256_of(dest / "big.bin") == digest


def test_a_stream_whose_sender_went_away_is_not_taken_over_by_the_python_receiver(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """The same with the library: a Receiver on the directory starts, takes nothing over and
    reports nothing for the ended stream; the kept prefix stays for a retrieval."""
    declared.sites.update({"site-1", "server"})
    src = tmp_path / "big.bin"
    random_file(src, 48 * MiB)
    dest = tmp_path / "in"
    env = _env(settings)
    first = _listener(env, "site-1", dest, "--timeout", "2", "--json")
    producer = subprocess.Popen(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1", str(src)],
        env=_slow_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        try:
            wait_for_partial(dest, 4 * MiB, producer)
        finally:
            producer.kill()
            producer.wait()
        assert first.stdout is not None
        record = json.loads(first.stdout.readline())
        assert record["code"] == "timeout", record
    finally:
        first.kill()
        first.wait()
    declared.streams.add(str(record["stream_id"]))
    kept = _kept_prefix(dest, src)
    started = time.monotonic()
    with Receiver("site-1", dest, settings) as receiver:
        assert receiver.active_streams == 0
        try:
            item = receiver.receive(timeout=1)
        except TransferFailed as e:  # pragma: no cover - what the old code did, later
            pytest.fail(f"the ended stream was taken over: {e}")
        assert item is None
    assert time.monotonic() - started < 10
    assert _kept_prefix(dest, src) == kept


@contextlib.contextmanager
def _load(processes: int = 2) -> Iterator[None]:
    """Keep the machine's cores busy: signals land on a loaded machine, as in a soak."""
    burners = [subprocess.Popen(["python", "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


@pytest.mark.parametrize(
    ("how", "code"),
    [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupted_retrieval_tells_the_owner_at_once(
    tmp_path: Path,
    settings: Settings,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    how: signal.Signals,
    code: int,
) -> None:
    """``retrieve-file`` gets a signal mid-stream (on a loaded machine): the owner is told
    ``aborted`` and stops within 5 s (not after its 20 s timeout), the verified part is kept,
    and the command exits 128 + the signal's number."""
    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "big.bin", 64 * MiB)
    out = tmp_path / "out"
    slow = settings.model_copy(update={"chunk_size": 64 * 1024, "window": 2})
    server = start_server(slow, lambda s: FileRetriever(s, source_dir=src))
    with _load():
        requester = subprocess.Popen(
            ["objstream", "consumer", "retrieve-file", "--site", "site-1", "--from", "server",
             "--dest", str(out), "big.bin"],
            env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        try:
            wait_for_partial(out, 2 * MiB, requester)
            requester.send_signal(how)
            interrupted = time.monotonic()
            _out, err = requester.communicate(timeout=30)
            while server.server is not None and server.server.active:
                assert time.monotonic() - interrupted < 5, "the owner kept streaming"
                time.sleep(0.05)
        finally:
            requester.kill()
    assert requester.returncode == code, err
    assert err.strip().splitlines()[-1] == "objstream: interrupted"
    assert final_files(out) == []
    [kept] = kept_bytes(out).values()
    assert len(kept) >= 2 * MiB
    assert kept == (src / "big.bin").read_bytes()[: len(kept)]


@pytest.mark.parametrize(
    ("how", "code"),
    [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupted_sender_tells_its_targets_at_once_under_load(
    tmp_path: Path, settings: Settings, declared: Declared, how: signal.Signals, code: int
) -> None:
    """A broadcast to two listeners; the sender gets a signal mid-stream on a loaded machine:
    both listeners end the stream ``aborted`` within 5 s, and the sender exits 128 + the
    signal's number."""
    declared.sites.update({"site-1", "site-2"})
    src = tmp_path / "big.bin"
    random_file(src, 64 * MiB)
    env = _env(settings)
    listeners = [
        _listener(env, site, tmp_path / site, "--count", "1", "--json")
        for site in ("site-1", "site-2")
    ]
    with _load():
        sender = subprocess.Popen(
            ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1,site-2",
             "--window", "2", "--chunk-size", "64KiB", str(src)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        try:
            wait_for_partial(tmp_path / "site-1", 2 * MiB, sender)
            sender.send_signal(how)
            interrupted = time.monotonic()
            _out, err = sender.communicate(timeout=30)
            records = []
            for listener in listeners:
                lout, _lerr = listener.communicate(
                    timeout=max(0.1, interrupted + 5 - time.monotonic())
                )
                records += _records(lout)
        finally:
            for process in (sender, *listeners):
                process.kill()
    assert sender.returncode == code, err
    assert err.strip().splitlines()[-1] == "objstream: interrupted"
    assert [(r["ok"], r["code"]) for r in records] == [(False, "aborted")] * 2, records


def test_a_dead_target_of_a_broadcast_parks_only_its_backlog_on_the_broker(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """1 GiB broadcast to 3 sites; site-3's listener is SIGKILLed at 10 %. Its data queue never
    holds more than its backlog (``backlog_windows``) and the window it had not acked, polled
    throughout; site-1 and site-2 store the file; site-3 fails after the sender's timeout."""
    sites = ("site-1", "site-2", "site-3")
    declared.sites.update(sites)
    src = tmp_path / "big.bin"
    size = 1024 * MiB
    digest = random_file(src, size)
    env = _env(settings)
    listeners = {site: _listener(env, site, tmp_path / site, "--count", "1") for site in sites}
    sender = subprocess.Popen(
        ["objstream", "producer", "send-file", "--site", "server", "--to", ",".join(sites),
         "--timeout", "8", "--json", str(src)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    highest = 0
    try:
        wait_for_partial(tmp_path / "site-3", size // 10, sender)
        [partial] = (tmp_path / "site-3").glob(".objstream-*.part")
        stream_id = partial.name.removeprefix(".objstream-").removesuffix(".part")
        declared.streams.add(stream_id)
        listeners["site-3"].kill()
        queue = Topology.from_settings(settings).data_queue("site-3", stream_id)
        connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        try:
            channel = connection.channel()
            while sender.poll() is None:
                ready = channel.queue_declare(queue, passive=True).method.message_count
                highest = max(highest, ready)
                time.sleep(0.05)
        finally:
            connection.close()
        out, err = sender.communicate(timeout=60)
        finished = {site: listeners[site].communicate(timeout=30) for site in sites[:2]}
    finally:
        for process in (sender, *listeners.values()):
            process.kill()
    window = 32  # the default, in 1 MiB chunks
    backlog = int(settings.backlog_windows * window)
    assert 0 < highest <= backlog + window + 2, highest
    print(f"at most {highest} chunks ready in the dead target's queue (backlog {backlog})")
    outcome = json.loads(out)
    by_site = {t["site"]: t for t in outcome["targets"]}
    assert by_site["site-3"]["ok"] is False, outcome
    for site in sites[:2]:
        assert by_site[site]["ok"] is True, (outcome, err)
        assert listeners[site].returncode == 0, finished[site]
        assert sha256_of(tmp_path / site / "big.bin") == digest


def test_a_sender_interrupted_before_the_target_answered_is_heard_of_at_once(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """The listener is frozen when the offer comes, so the sender has heard nothing from it
    when Ctrl-C lands: the abort goes to the inbox behind the offer, and the listener, once it
    runs again, ends the stream ``aborted`` at once (before: ``timeout``, its timeout later)."""
    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    random_file(src, 8 * MiB)
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "--count", "1", "--json")
    time.sleep(2)  # it consumes its inbox
    listener.send_signal(signal.SIGSTOP)
    sender = subprocess.Popen(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1", str(src)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        time.sleep(3)  # the offer is out; nothing came back
        sender.send_signal(signal.SIGINT)
        _err = sender.communicate(timeout=30)[1]
        listener.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        out, err = listener.communicate(timeout=15)  # its timeout is 60 s
    finally:
        for process in (sender, listener):
            process.send_signal(signal.SIGCONT)
            process.kill()
    assert sender.returncode == EXIT_INTERRUPTED, _err
    assert time.monotonic() - resumed < 5
    [record] = _records(out)
    assert (record["ok"], record["code"]) == (False, "aborted"), (record, err)
    assert not (tmp_path / "in" / "big.bin").exists()


def test_a_listener_killed_as_it_takes_an_offer_leaves_nothing_in_the_way(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """SIGKILL the moment the partial file appears: the dead listener may not have acked the
    offer, and the next listener gets it again. What the dead one left of that stream (an
    empty partial file, a state of 0 bytes) must not fail it with 'File exists' (before:
    refused ``io``, the sender failed, 4 of 4 tries)."""
    declared.sites.update({"site-1", "server"})
    src = tmp_path / "f.bin"
    digest = random_file(src, 300 * 1024)
    dest = tmp_path / "in"
    env = _env(settings)
    first = _listener(env, "site-1", dest, "--json")
    time.sleep(2)  # it consumes its inbox
    outcome: list[object] = []
    sender = _push(settings, src, outcome)
    try:
        deadline = time.monotonic() + 30
        while not (dest.exists() and list(dest.glob(".objstream-*.part"))):
            assert time.monotonic() < deadline, "no stream began"
            time.sleep(0.002)
        first.kill()
        first.wait()
        second = _listener(env, "site-1", dest, "--json", "--count", "1")
        _out, err = second.communicate(timeout=60)
    finally:
        first.kill()
    sender.join(60)
    [results] = outcome
    assert isinstance(results, list), results
    assert [r.ok for r in results] == [True], results
    assert second.returncode == 0, err
    assert sha256_of(dest / "f.bin") == digest
    assert not list(dest.glob(".objstream-*"))
