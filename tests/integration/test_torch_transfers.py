"""PyTorch state dicts through the broker: sent as tensors, received as tensors (``as_torch``)
by a Receiver (in memory and spooled) and by a Retriever, bit-exact, without pickle."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from objstream.common.settings import Settings
from objstream.consumer import Receiver, Retriever
from objstream.consumer.container_assembler import ContainerEntry
from objstream.producer import ContainerRetriever, ContainerStreamer, RetrievalServer
from tests.integration.conftest import StartServer
from tests.unit.test_torch_checkpoints import _same, _state_dict

torch = pytest.importorskip(
    "torch", reason="torch is not installed (pip install 'objstream[torch]')"
)


def _assert_tensors(got: Any, state: dict[str, Any]) -> None:
    assert list(got) == list(state)
    for key, tensor in state.items():
        assert isinstance(got[key], torch.Tensor), key
        assert _same(got[key], tensor), key


@pytest.mark.parametrize("spool", [False, True], ids=["in-memory", "spooled"])
def test_a_receiver_with_as_torch_returns_the_state_dict_as_tensors(
    tmp_path: Path, settings: Settings, spool: bool
) -> None:
    state = _state_dict()
    got: list[Any] = []

    def site_1() -> None:
        with Receiver(
            "site-1", tmp_path / "in", settings, as_torch=True, spool_containers=spool
        ) as receiver:
            item = receiver.receive(timeout=60)
            assert item is not None
            got.append(item.value)

    consumer = threading.Thread(target=site_1)
    consumer.start()
    time.sleep(0.5)
    with ContainerStreamer("server", settings) as streamer:
        streamer.stream_container("site-1", state, name="model", chunk_size="4KiB")
    consumer.join()
    _assert_tensors(got[0], state)


def test_a_retriever_with_as_torch_gets_tensors_and_on_entry_sees_tensors(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    state = _state_dict()

    def setup(server: RetrievalServer) -> None:
        ContainerRetriever(server).add_container("model", state)

    start_server(settings, setup)
    with Retriever("site-2", tmp_path / "out", settings, as_torch=True) as retriever:
        back = retriever.retrieve_container("server", "model", timeout=30)
    _assert_tensors(back, state)

    entries: dict[Any, Any] = {}

    def on_entry(entry: ContainerEntry) -> None:
        entries[entry.key] = entry.value

    with Retriever(
        "site-3", tmp_path / "out3", settings, as_torch=True, on_entry=on_entry
    ) as retriever:
        assert retriever.retrieve_container("server", "model", timeout=30) is None
    _assert_tensors(entries, state)


def test_without_as_torch_the_same_state_dict_comes_back_as_numpy(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    state = {"w": torch.arange(6, dtype=torch.float32)}

    def setup(server: RetrievalServer) -> None:
        ContainerRetriever(server).add_container("model", state)

    start_server(settings, setup)
    with Retriever("site-2", tmp_path / "out", settings) as retriever:
        back = retriever.retrieve_container("server", "model", timeout=30)
    assert type(back["w"]).__module__ == "numpy"
    assert back["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
