"""Delta transfer against a real broker: what a target holds from an earlier version does not
move again, counted at the sender's socket (a counting proxy between it and the broker), and
what is stored is byte for byte the new version. Push, broadcast and retrieval; files and
safetensors containers; ``--full``; a held copy changed behind the index's back."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
from safetensors.numpy import save_file

from bench import delay_proxy
from objstream.common.settings import Settings
from objstream.consumer.held import INDEX_NAME
from objstream.consumer.streams import Received
from objstream.producer.container_files import load_container
from objstream.producer.streamer import ContainerStreamer, FileStreamer
from tests.integration.conftest import Declared, StartReceiver, StartServer
from tests.rabbitmq_node import free_port

MIB = 1024 * 1024
TENSORS = 20


@dataclass
class Proxy:
    """A counting proxy in front of the broker: ``url`` goes through it."""

    url: str
    counters: Any

    @property
    def up(self) -> int:
        """Bytes the clients sent the broker through it so far."""
        return int(self.counters[0])


@pytest.fixture
def proxy(broker_url: str) -> Iterator[Proxy]:
    parts = urlsplit(broker_url)
    port = free_port()
    context = mp.get_context("spawn")
    counters, stop, ready = context.Array("q", 2), context.Event(), context.Queue()
    target = (parts.hostname or "127.0.0.1", parts.port or 5672)
    spec = delay_proxy.Listener("127.0.0.1", port, target, counter=0, down_counter=1)
    process = context.Process(
        target=delay_proxy.serve, args=([spec], counters, ready, stop), daemon=True
    )
    process.start()
    ready.get(timeout=30)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{port}"
    yield Proxy(urlunsplit(parts._replace(netloc=netloc)), counters)
    stop.set()
    process.join(10)


def _model(path: Path, seed: int, changed: int | None = None) -> bytes:
    """A 40 MiB safetensors of 20 float32 tensors; ``changed``: that tensor differs."""
    rng = np.random.default_rng(seed)
    tensors = {
        f"layer{i}.weight": rng.standard_normal((512, 1024), np.float32) for i in range(TENSORS)
    }
    if changed is not None:
        tensors[f"layer{changed}.weight"] = tensors[f"layer{changed}.weight"] + 1
    save_file(tensors, str(path))
    return path.read_bytes()


def _push(proxy: Proxy, settings: Settings, to: list[str], path: Path) -> tuple[int, list[Any]]:
    """Send the container at ``path`` through the proxy: bytes at the socket, results."""
    before = proxy.up
    through = settings.model_copy(update={"url": proxy.url})
    with ContainerStreamer("server", through) as streamer:
        results = streamer.stream_container(to, load_container(path), path.name)
    return proxy.up - before, results


def _stored(outcomes: list[Any]) -> Received:
    item = outcomes[-1]
    assert isinstance(item, Received), item
    return item


def test_a_changed_tensor_moves_a_twentieth_at_the_socket_and_survives_a_restart(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, proxy: Proxy
) -> None:
    dest, model = tmp_path / "in", tmp_path / "model.safetensors"
    dest.mkdir()
    size = len(_model(model, 1))
    receiver = start_receiver("site-1", dest, store_containers=True)
    first, results = _push(proxy, settings, ["site-1"], model)
    assert first >= size
    assert results[0].bytes_reused == 0
    receiver.wait_for(1)
    receiver.stop()  # what it holds is on disk, not in a process
    assert (dest / INDEX_NAME).exists()

    receiver = start_receiver("site-1", dest, store_containers=True)
    second_version = _model(model, 1, changed=7)
    second, results = _push(proxy, settings, ["site-1"], model)
    item = _stored(receiver.wait_for(1))
    assert item.path is not None
    assert item.path.read_bytes() == second_version  # byte for byte the new version
    assert second <= 0.15 * size, f"{second} of {size} bytes at the socket"
    assert second >= size / TENSORS  # the changed tensor did move
    assert results[0].bytes_reused == item.reused_bytes >= 0.9 * size
    print(f"\nfirst push {first} bytes at the socket, second {second} ({second / size:.1%})")


def test_a_broadcast_to_four_sites_that_hold_the_first_version(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, proxy: Proxy
) -> None:
    model = tmp_path / "model.safetensors"
    size = len(_model(model, 2))
    sites = [f"site-{n}" for n in range(4)]
    receivers = []
    for site in sites:
        (tmp_path / site).mkdir()
        receivers.append(start_receiver(site, tmp_path / site, store_containers=True))
    _push(proxy, settings, sites, model)
    for receiver in receivers:
        receiver.wait_for(1)
    second_version = _model(model, 2, changed=12)
    second, results = _push(proxy, settings, sites, model)
    assert second <= 0.15 * size, f"{second} of {size} bytes at the socket"
    for receiver in receivers:
        item = _stored(receiver.wait_for(2))
        assert item.path is not None
        assert item.path.read_bytes() == second_version
    assert all(r.bytes_reused >= 0.9 * size for r in results)
    print(f"\nbroadcast to 4 holding sites: {second} bytes at the socket ({second / size:.1%})")


def test_a_file_with_one_chunk_changed_and_full(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, proxy: Proxy
) -> None:
    dest, path = tmp_path / "in", tmp_path / "data.bin"
    dest.mkdir()
    data = bytearray(os.urandom(24 * MIB))
    path.write_bytes(data)
    receiver = start_receiver("site-1", dest)
    through = settings.model_copy(update={"url": proxy.url})
    with FileStreamer("server", through) as streamer:
        streamer.stream_file("site-1", path)
        receiver.wait_for(1)
        data[5 * MIB + 3 : 5 * MIB + 9] = b"change"  # chunk 5 alone
        path.write_bytes(data)
        before = proxy.up
        (result,) = streamer.stream_file("site-1", path)
        delta = proxy.up - before
        before = proxy.up
        (full,) = streamer.stream_file("site-1", path, full=True)
        whole = proxy.up - before
    items = [o for o in receiver.wait_for(3) if isinstance(o, Received)]
    assert [i.path.read_bytes() == bytes(data) for i in items[1:] if i.path] == [True, True]
    assert MIB <= delta <= 1.1 * MIB, delta  # one chunk (and the manifest's 768 bytes)
    assert result.bytes_reused == 23 * MIB
    assert whole >= len(data)
    assert full.bytes_reused == 0


def test_a_held_copy_changed_behind_the_index_is_sent_again(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    """Same size, same modification time, other bytes: the index still lists the old digests,
    the check at the copy refuses the chunk, the sender sends it and what follows, and the
    file verifies."""
    dest, path = tmp_path / "in", tmp_path / "data.bin"
    dest.mkdir()
    data = os.urandom(8 * MIB)
    path.write_bytes(data)
    receiver = start_receiver("site-1", dest)
    with FileStreamer("server", settings) as streamer:
        streamer.stream_file("site-1", path)
        (again,) = streamer.stream_file("site-1", path)  # the first copy is hashed now
        assert again.bytes_reused == 8 * MIB
        receiver.wait_for(2)
        for stored in (dest / "data.bin", dest / "data-1.bin"):  # a local user rewrites them
            st = stored.stat()
            with open(stored, "r+b") as f:
                f.seek(2 * MIB)
                f.write(b"\0" * MIB)
            os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
        (result,) = streamer.stream_file("site-1", path)
    item = _stored(receiver.wait_for(3))
    assert item.path is not None
    assert item.path.read_bytes() == data
    assert item.reused_bytes == 2 * MIB  # chunks 0 and 1 were copied, the rest was sent
    assert result.bytes_reused == 2 * MIB


def test_retrieve_container_moves_only_what_changed(
    tmp_path: Path,
    settings: Settings,
    start_server: StartServer,
    declared: Declared,
    proxy: Proxy,
) -> None:
    model, out = tmp_path / "model.safetensors", tmp_path / "in" / "model.safetensors"
    out.parent.mkdir()
    size = len(_model(model, 3))
    through = settings.model_copy(update={"url": proxy.url})
    server = start_server(through, lambda s: s.add_container("model", load_container(model)))
    declared.sites.add("site-1")
    env = {**os.environ, "OBJSTREAM_URL": settings.url, "OBJSTREAM_NAMESPACE": settings.namespace}
    words = "objstream consumer retrieve-container --site site-1 --from server model --json"
    command = [*words.split(), "--out", str(out)]

    def retrieve() -> tuple[int, dict[str, Any]]:
        before = proxy.up
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return proxy.up - before, json.loads(done.stdout)

    first, _ = retrieve()
    assert first >= size
    second_version = _model(model, 3, changed=0)
    assert server.server is not None
    server.server.add_container("model", load_container(model))  # the next round's model
    second, record = retrieve()
    stored = Path(record["path"])
    assert stored.read_bytes() == second_version
    assert second <= 0.15 * size, f"{second} of {size} bytes at the socket"
    assert record["bytes_reused"] >= 0.9 * size
    server.stop()  # before the proxy it talks through goes
    print(f"\nretrieve-container again: {second} bytes at the socket ({second / size:.1%})")


def test_a_receiver_that_does_not_ask_gets_everything(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, proxy: Proxy
) -> None:
    """A peer without delta transfer (objstream with OBJSTREAM_DELTA=false behaves as one: it
    never says ``delta``) interoperates with a sender that offers it: it gets every chunk."""
    dest, path = tmp_path / "in", tmp_path / "data.bin"
    dest.mkdir()
    data = os.urandom(4 * MIB)
    path.write_bytes(data)
    older = settings.model_copy(update={"delta": False})
    receiver = start_receiver("site-1", dest, older)
    through = settings.model_copy(update={"url": proxy.url})
    with FileStreamer("server", through) as streamer:
        streamer.stream_file("site-1", path)
        before = proxy.up
        (result,) = streamer.stream_file("site-1", path)
        again = proxy.up - before
    items = [o for o in receiver.wait_for(2) if isinstance(o, Received)]
    assert items[-1].path is not None
    assert items[-1].path.read_bytes() == data
    assert again >= len(data)
    assert result.bytes_reused == 0
    assert not (dest / INDEX_NAME).exists()  # it keeps no index either
