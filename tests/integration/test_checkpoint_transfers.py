"""Real checkpoints through the broker: every dtype through send-container/listen, the Python API
and retrieval; a sharded directory; 512 MiB and 1 GiB bfloat16 tensors with memory flat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from bench.checkpoint import WRAPPER
from objstream.common.settings import Settings
from objstream.consumer import Receiver, Retriever
from objstream.producer import ContainerRetriever, ContainerStreamer, RetrievalServer
from objstream.producer.container_files import load_container
from tests.checkpoints import METADATA, every_dtype, same_bits, write_every_dtype, write_sharded
from tests.conftest import stored_names
from tests.integration.conftest import Declared, StartServer
from tests.integration.test_cli import _env, _listener, _objstream

BIG_TENSOR_MIB = int(os.environ.get("OBJSTREAM_TEST_BIG_TENSOR_MIB", "512"))
"""The big tensors' size: 3 of it pushed, one of twice it retrieved (about 20 s here)."""
RSS_LIMIT_MIB = 120
"""Peak RSS of either side, whatever the tensor size: under 120 MiB (about 60 measured)."""


def _send(settings: Settings, declared: Declared, src: Path, dest: Path) -> dict[str, Any]:
    declared.sites.add("site-1")
    env = _env(settings)
    listener = _listener(env, "site-1", dest, "--count", "1", "--json")
    try:
        sent = _objstream(
            "producer", "send-container", "--site", "server", "--to", "site-1",
            "--chunk-size", "64KiB", str(src), env=env,
        )  # fmt: skip
        out, err = listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert sent.returncode == 0, sent.stderr
    assert listener.returncode == 0, err
    record: dict[str, Any] = json.loads(out)
    return record


def test_every_dtype_through_send_container_and_listen(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    package, hand, arrays = write_every_dtype(tmp_path)
    for src in (package, hand):
        record = _send(settings, declared, src, tmp_path / "in")
        out = Path(record["path"])
        assert out.name == src.name
        with safe_open(str(out), framework="np") as f:
            assert f.metadata() == METADATA
        back = load_container(out)  # our reader: it needs no numpy dtype
        assert isinstance(back, dict)
        for key, value in back.items():
            if key != "__metadata__":
                data = value.data.read(0, value.data.nbytes)
                assert data == np.ascontiguousarray(arrays[key]).tobytes(), key
        if src == package:
            assert out.read_bytes() == src.read_bytes()


def test_a_sharded_checkpoint_through_send_container_and_listen(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    src = write_sharded(tmp_path / "llama")
    record = _send(settings, declared, src, tmp_path / "in")
    out = Path(record["path"])
    assert out == (tmp_path / "in" / "llama").resolve()
    assert stored_names(out) == sorted(p.name for p in src.iterdir())
    for file in src.iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name


def test_every_dtype_through_the_python_api_and_retrieval(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    arrays = every_dtype()
    package, _, _ = write_every_dtype(tmp_path)
    got: list[Any] = []

    def site_1() -> None:
        with Receiver("site-1", tmp_path / "inbox", settings) as receiver:
            item = receiver.receive(timeout=60)
            assert item is not None
            got.append(item.value)

    consumer = threading.Thread(target=site_1)
    consumer.start()
    time.sleep(0.5)
    with ContainerStreamer("server", settings) as streamer:
        streamer.stream_container("site-1", dict(arrays), name="arrays")
    consumer.join()
    assert list(got[0]) == list(arrays)
    assert all(same_bits(got[0][k], arrays[k]) for k in arrays)

    def setup(server: RetrievalServer) -> None:
        ContainerRetriever(server).add_container("ckpt", load_container(package))

    start_server(settings, setup)
    with Retriever("site-2", tmp_path / "out", settings) as retriever:
        back = retriever.retrieve_container("server", "ckpt", timeout=30)
    assert back["__metadata__"] == METADATA
    for key, value in back.items():
        if key != "__metadata__":
            assert same_bits(value, arrays[key]), key


def _big_bfloat16(path: Path, tensor_mib: int, count: int) -> None:
    """A bfloat16 safetensors of ``count`` tensors of ``tensor_mib`` MiB each, formatted as the
    safetensors package does (so the received file must be the same bytes), written without
    holding a tensor."""
    rng = np.random.default_rng(5)
    block = rng.standard_normal(16 << 20, dtype=np.float32).astype(ml_dtypes.bfloat16)  # 32 MiB
    size = tensor_mib << 20
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        header[f"embed.{i}"] = {
            "dtype": "BF16", "shape": [size // 2 // 4096, 4096],
            "data_offsets": [i * size, (i + 1) * size],
        }  # fmt: skip
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for n in range(count * size // block.nbytes):
            f.write(np.roll(block, n).view(np.uint8).data)


def _side(rss_file: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``objstream ARGS`` in a process that writes its peak RSS (VmHWM, MiB) to ``rss_file``
    as it exits: everything it ever held, anonymous or not."""
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(rss_file), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as x, open(b, "rb") as y:
        while block := x.read(8 << 20):
            if block != y.read(8 << 20):
                return False
    return True


def test_big_tensors_are_pushed_with_both_sides_memory_flat(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """3 x 512 MiB bfloat16 tensors (one embedding matrix each): each chunk goes straight to
    its place in the .safetensors, so the listener never holds a tensor (it held all 512 MiB
    of one before)."""
    src = tmp_path / "big.safetensors"
    _big_bfloat16(src, BIG_TENSOR_MIB, 3)
    declared.sites.add("site-1")
    env = _env(settings)
    listener = _side(tmp_path / "rx", "consumer", "listen", "--site", "site-1", "--dest",
                     str(tmp_path / "in"), "--count", "1", "--json", env=env)  # fmt: skip
    started = time.monotonic()
    try:
        sender = _side(tmp_path / "tx", "producer", "send-container", "--site", "server",
                       "--to", "site-1", str(src), env=env)  # fmt: skip
        _, send_err = sender.communicate(timeout=600)
        out, err = listener.communicate(timeout=120)
    finally:
        listener.kill()
    seconds = time.monotonic() - started
    assert sender.returncode == 0, send_err
    assert listener.returncode == 0, err
    received = Path(json.loads(out)["path"])
    sender_mib = float((tmp_path / "tx").read_text())
    receiver_mib = float((tmp_path / "rx").read_text())
    print(f"3 x {BIG_TENSOR_MIB} MiB bf16 pushed: {seconds:.1f} s, peak RSS sender "
          f"{sender_mib:.0f} MiB, receiver {receiver_mib:.0f} MiB")  # fmt: skip
    assert sender_mib < RSS_LIMIT_MIB
    assert receiver_mib < RSS_LIMIT_MIB
    assert _same_file(src, received)
    assert stored_names(tmp_path / "in") == ["big.safetensors"]


def test_a_big_tensor_is_retrieved_with_the_requester_memory_flat(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """One 1 GiB tensor through serve and retrieve-container --out; and the same container
    asked for as .npz (which has no bfloat16) is refused at its offer, before a chunk moves."""
    src = tmp_path / "big.safetensors"
    _big_bfloat16(src, 2 * BIG_TENSOR_MIB, 1)
    declared.sites.add("server")
    env = _env(settings)
    server = _side(tmp_path / "srv", "producer", "serve", "--site", "server", "--container",
                   f"m={src}", env=env)  # fmt: skip
    try:
        time.sleep(1.5)
        refused = _objstream("consumer", "retrieve-container", "--site", "site-1", "--from",
                             "server", "m", "--out", str(tmp_path / "out" / "m.npz"),
                             env=env)  # fmt: skip
        started = time.monotonic()
        requester = _side(tmp_path / "rq", "consumer", "retrieve-container", "--site", "site-1",
                          "--from", "server", "m", "--out", str(tmp_path / "out" / "m.safetensors"),
                          env=env)  # fmt: skip
        _, err = requester.communicate(timeout=600)
        seconds = time.monotonic() - started
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert "cannot be stored as 'm.npz': bfloat16 cannot be saved as .npz" in refused.stderr
    assert "name it .safetensors" in refused.stderr
    assert requester.returncode == 0, err
    requester_mib = float((tmp_path / "rq").read_text())
    print(f"1 x {2 * BIG_TENSOR_MIB} MiB bf16 retrieved: {seconds:.1f} s, peak RSS requester "
          f"{requester_mib:.0f} MiB")  # fmt: skip
    assert requester_mib < RSS_LIMIT_MIB
    assert _same_file(src, tmp_path / "out" / "m.safetensors")
    assert stored_names(tmp_path / "out") == ["m.safetensors"]
