"""Real checkpoints through the broker: every dtype through send-container/listen, the Python API
and retrieval; a sharded directory; a multi-GiB bfloat16 file with both sides' memory flat."""

from __future__ import annotations

import json
import os
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
from tests.integration.conftest import Declared, StartServer
from tests.integration.test_cli import _env, _listener, _objstream

GiB = 1 << 30
BIG_GIB = float(os.environ.get("OBJSTREAM_TEST_BIG_CHECKPOINT_GIB", "2"))
"""Size of the big bfloat16 file (2 GiB as issue 15 asks: 24-44 s here, so CI runs it whole)."""
RSS_LIMIT_MIB = 150


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
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
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


def _big_bfloat16(path: Path, gib: float) -> None:
    """A bfloat16 safetensors of ``gib`` GiB in 32 MiB tensors, written without holding it."""
    tensor = np.arange(16 << 20, dtype=np.float32).astype(ml_dtypes.bfloat16)  # 32 MiB
    count = max(1, int(gib * GiB) // tensor.nbytes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        header[f"layer.{i:04d}"] = {
            "dtype": "BF16", "shape": [4096, 4096],
            "data_offsets": [i * tensor.nbytes, (i + 1) * tensor.nbytes],
        }  # fmt: skip
    # Formatted as the safetensors package does, so the received file must be the same bytes.
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _ in range(count):
            f.write(tensor.view(np.uint8).data)


def _side(rss_file: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(rss_file), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_big_bfloat16_file_streams_with_both_sides_memory_flat(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    src = tmp_path / "big.safetensors"
    _big_bfloat16(src, BIG_GIB)
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
    print(f"{BIG_GIB} GiB bf16: {seconds:.1f} s, peak RSS sender {sender_mib:.0f} MiB, "
          f"receiver {receiver_mib:.0f} MiB")  # fmt: skip
    # Measured (VmHWM) for 2 GiB: sender 56 MiB, receiver 94 MiB (one 32 MiB tensor decoded
    # at a time); 24-44 s, so CI runs the full 2 GiB.
    assert sender_mib < RSS_LIMIT_MIB
    assert receiver_mib < RSS_LIMIT_MIB
    assert received.stat().st_size == src.stat().st_size
    with open(src, "rb") as a, open(received, "rb") as b:
        while block := a.read(8 << 20):
            assert block == b.read(8 << 20)
