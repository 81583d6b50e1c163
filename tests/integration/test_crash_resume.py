"""A receiving process killed mid-stream; a new one for the same site finishes the file."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from objstream.common.settings import KiB, MiB, Settings
from objstream.common.topology import Topology
from objstream.producer import FileStreamer, TargetResult
from tests.conftest import random_file, sha256_of, stored_names
from tests.integration.conftest import Declared, count_published_chunks, wait_for_partial
from tests.integration.test_cli import _env, _listener


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_new_receiver_resumes_where_the_old_one_stopped(
    tmp_path: Path,
    settings: Settings,
    declared: Declared,
    monkeypatch: pytest.MonkeyPatch,
    how: signal.Signals,
) -> None:
    """SIGKILL: the state on disk is what the dead one last recorded. SIGTERM: the receiver
    checkpoints, exits 0 and leaves the stream for its successor."""
    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    size = 256 * MiB
    digest = random_file(src, size)
    dest = tmp_path / "in"
    env = _env(settings)
    # Small chunks and a small window: slow enough that a third of the file is still to come
    # when the signal lands, whichever way it lands.
    chunk, window = 64 * KiB, 4
    chunks = size // chunk

    published = count_published_chunks(monkeypatch)
    stored_before = _interrupt_and_take_over(
        env, dest, size // 3, how, lambda: _send(settings, src, chunk, window), published
    )
    assert sha256_of(dest / "big.bin") == digest
    assert not list(dest.glob(".objstream-*"))  # no partial or state file left
    resent = len(published) - chunks
    # It did not start over: at most a couple of windows went again (here: none, the broker
    # redelivered what the dead receiver had not acked), of the third or more stored before.
    assert resent <= 2 * window + 2, (resent, stored_before)
    assert stored_before > chunks // 3


def _interrupt_and_take_over(
    env: dict[str, str],
    dest: Path,
    at: int,
    how: signal.Signals,
    send: Callable[[], object],
    published: list[int],
    between: Callable[[], None] | None = None,
) -> int:
    """A listener takes the stream ``send()`` pushes; once ``at`` bytes are in, it gets ``how``
    (then ``between`` runs) and a second listener finishes the stream. Returns the chunks
    published before that."""
    outcome: list[object] = []
    first = _listener(env, "site-1", dest, "--count", "1", "--json")
    sender = threading.Thread(target=lambda: outcome.append(send()))
    sender.start()
    wait_for_partial(dest, at)
    first.send_signal(how)
    first.wait(10)
    if how == signal.SIGTERM:
        assert first.returncode == 0, first.stderr and first.stderr.read()
        assert list(dest.glob(".objstream-*.state")), "no checkpoint was left"
    if between is not None:
        between()
    sent_before = len(published)
    second = _listener(env, "site-1", dest, "--count", "1", "--json")
    _out, err = second.communicate(timeout=120)
    sender.join(120)
    assert second.returncode == 0, err
    assert outcome, "the sender did not return"
    assert not isinstance(outcome[0], Exception), outcome
    return sent_before


def _send(settings: Settings, src: Path, chunk: int, window: int) -> list[TargetResult] | Exception:
    try:
        with FileStreamer("server", settings) as streamer:
            return streamer.stream_file("site-1", src, chunk_size=chunk, window=window)
    except Exception as e:
        return e


def test_a_container_is_resumed_by_the_next_listener(
    tmp_path: Path, settings: Settings, declared: Declared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``listen`` spools a container like a file: a listener killed half way is followed by
    one that takes it over, and the .npz it writes holds every array exactly."""
    import numpy as np

    from objstream.producer import ContainerStreamer

    declared.sites.add("site-1")
    rng = np.random.default_rng(7)
    model = {
        "w0": rng.standard_normal((4096, 4096), dtype=np.float32),  # 64 MiB each
        "w1": rng.standard_normal((4096, 4096), dtype=np.float32),
        "b": np.arange(10, dtype=">i8"),
        "w2": rng.standard_normal((2048, 8192), dtype=np.float32),
    }
    size = sum(a.nbytes for a in model.values())
    dest = tmp_path / "in"
    env = _env(settings)
    chunk, window = 64 * KiB, 4
    published = count_published_chunks(monkeypatch)

    def send() -> object:
        try:
            with ContainerStreamer("server", settings) as streamer:
                return streamer.stream_container(
                    "site-1", model, "model", chunk_size=chunk, window=window
                )
        except Exception as e:
            return e

    # The partial file here is the spool.
    sent_before = _interrupt_and_take_over(env, dest, size // 3, signal.SIGKILL, send, published)
    with np.load(dest / "model.npz", allow_pickle=False) as got:
        assert sorted(got.files) == sorted(model)
        for key, array in model.items():
            assert got[key].dtype == array.dtype
            assert np.array_equal(got[key], array)
    assert stored_names(dest) == ["model.npz"]  # spool, metas, state all gone
    chunks = len(set(published))
    resent = len(published) - chunks
    assert resent <= 2 * window + 2, (resent, sent_before)
    assert sent_before > chunks // 3


def test_a_successor_binds_the_data_queue_its_predecessor_left_unbound(
    tmp_path: Path, settings: Settings, declared: Declared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver can die after declaring its data queue and before binding it (the moment
    its partial file appears): its successor must not wait on a queue nothing is routed to.
    Here the first listener is killed mid-stream and its queue unbound by hand, the state a
    death between declaring and binding leaves; the second finishes the stream."""
    declared.sites.add("site-1")
    src = tmp_path / "f.bin"
    digest = random_file(src, 8 * MiB)
    dest = tmp_path / "in"

    def unbind() -> None:
        [partial] = dest.glob(".objstream-*.part")
        stream_id = partial.name.removeprefix(".objstream-").removesuffix(".part")
        topology = Topology.from_settings(settings)
        connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        try:
            channel = connection.channel()
            queue = topology.data_queue("site-1", stream_id)
            for to in (None, "site-1"):
                key = topology.data_key(stream_id, "server", to)
                channel.queue_unbind(queue, topology.exchange, routing_key=key)
        finally:
            connection.close()

    published = count_published_chunks(monkeypatch)
    _interrupt_and_take_over(
        _env(settings),
        dest,
        MiB,
        signal.SIGKILL,
        lambda: _send(settings, src, 64 * KiB, 4),
        published,
        between=unbind,
    )
    assert sha256_of(dest / "f.bin") == digest
