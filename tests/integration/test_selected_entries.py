"""Selective retrieval of a container's entries (issue 23, item 3): ``retrieve-container NAME
--keys PATTERN,...`` (``keys=`` in Python) moves only the entries whose names match, and the
owner reads and sends them alone. Against the real broker.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from objstream.common.errors import ConfigError, FailureCode, Refused
from objstream.common.settings import MiB, Settings
from objstream.consumer import Retriever
from objstream.producer import ContainerRetriever, FileRetriever
from objstream.producer.container_files import load_container
from tests.conftest import random_file
from tests.integration.conftest import Declared, StartServer
from tests.integration.test_cli import _env

TENSORS = 20


def _model(path: Path) -> dict[str, np.ndarray]:
    """20 tensors of 512 KiB each (10 MiB), saved as a safetensors file."""
    rng = np.random.default_rng(7)
    model = {
        f"layers.{i}.weight": rng.standard_normal(128 * 1024).astype(np.float32)
        for i in range(TENSORS)
    }
    save_file(model, str(path))
    return model


def test_one_tensor_of_twenty_moves_about_a_twentieth_of_the_bytes(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    model = _model(tmp_path / "model.safetensors")
    served = load_container(tmp_path / "model.safetensors")
    server = start_server(
        settings, lambda s: ContainerRetriever(s).add_container("model", served)
    ).server
    assert server is not None
    with Retriever("site-1", tmp_path / "in", settings) as retriever:
        whole = retriever.retrieve_container("server", "model", timeout=30)
        whole_bytes = server.bytes_published
        one = retriever.retrieve_container("server", "model", timeout=30, keys=["layers.7.*"])
        one_bytes = server.bytes_published - whole_bytes
        two = retriever.retrieve_container(
            "server", "model", timeout=30, keys=["layers.1?.weight", "layers.3.*"]
        )
    assert sorted(whole) == sorted(model)
    assert list(one) == ["layers.7.weight"]
    np.testing.assert_array_equal(one["layers.7.weight"], model["layers.7.weight"])
    # About a twentieth: the tensor's bytes and its entry's small structure, nothing else.
    assert 0.95 * whole_bytes / TENSORS <= one_bytes <= 1.05 * whole_bytes / TENSORS, (
        one_bytes,
        whole_bytes,
    )
    assert sorted(two) == sorted([f"layers.1{i}.weight" for i in range(10)] + ["layers.3.weight"])
    for key in two:
        np.testing.assert_array_equal(two[key], model[key])


def test_keys_that_match_nothing_are_refused_not_found(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    start_server(settings, lambda s: ContainerRetriever(s).add_container("m", {"a": 1, "b": 2}))
    start_server(settings, lambda s: ContainerRetriever(s).add_container("l", [1, 2]), "owner-2")
    with Retriever("site-1", tmp_path / "in", settings) as retriever:
        with pytest.raises(Refused) as refused:
            retriever.retrieve_container("server", "m", timeout=30, keys=["c*"])
        assert refused.value.code is FailureCode.NOT_FOUND
        assert "no entry of container 'm' at server matches c*" in str(refused.value)
        with pytest.raises(Refused) as refused:
            retriever.retrieve_container("owner-2", "l", timeout=30, keys=["0"])
        assert refused.value.code is FailureCode.NOT_FOUND
        assert "is a list: only a dict's entries are selected" in str(refused.value)
        assert retriever.retrieve_container("server", "m", timeout=30, keys=["b"]) == {"b": 2}
        with pytest.raises(ConfigError, match="only a container's entries are selected"):
            retriever.retrieve("file", "server", "m", keys=["b"])
        with pytest.raises(ConfigError, match="65 entry patterns"):
            retriever.retrieve_container("server", "m", keys=[f"k{i}" for i in range(65)])


def test_retrieve_container_keys_writes_only_the_matching_tensors(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"server", "site-1"})
    model = _model(tmp_path / "model.safetensors")
    env = _env(settings)
    serve = subprocess.Popen(
        ["objstream", "producer", "serve", "--site", "server",
         "--container", f"model={tmp_path / 'model.safetensors'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        got = subprocess.run(
            ["objstream", "consumer", "retrieve-container", "--site", "site-1", "--from",
             "server", "model", "--keys", "layers.2.*,layers.19.weight",
             "--out", str(tmp_path / "part.safetensors"), "--json", "--timeout", "30"],
            env=env, capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
        listed = subprocess.run(
            ["objstream", "consumer", "retrieve-container", "--site", "site-1", "--from",
             "server", "--list", "--keys", "x"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        serve.terminate()
        serve.communicate(timeout=30)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["ok"]
    part = load_file(str(tmp_path / "part.safetensors"))
    assert sorted(part) == ["layers.19.weight", "layers.2.weight"]
    for key, value in part.items():
        np.testing.assert_array_equal(value, model[key])
    assert listed.returncode == 2
    assert listed.stderr.strip().endswith("--keys selects the entries to retrieve: not with --list")


def test_a_byte_range_of_a_file_moves_only_those_bytes(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    """``byte_range`` (``--range``): the owner reads and sends only those bytes, stored as a
    file of their own; a range beyond the file is refused not_found."""
    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "big.bin", 10 * MiB)
    data = (src / "big.bin").read_bytes()
    server = start_server(settings, lambda s: FileRetriever(s, source_dir=src)).server
    assert server is not None
    start, end = MiB + 5, 3 * MiB + 7
    with Retriever("site-1", tmp_path / "in", settings) as retriever:
        path = retriever.retrieve_file("server", "big.bin", timeout=30, byte_range=(start, end))
        with pytest.raises(Refused) as refused:
            retriever.retrieve_file("server", "big.bin", timeout=30, byte_range=(0, 10 * MiB + 1))
        with pytest.raises(ConfigError, match="only a file's bytes are selected"):
            retriever.retrieve("container", "server", "big.bin", byte_range=(0, 1))
    assert path.read_bytes() == data[start:end]
    assert server.bytes_published == end - start
    assert refused.value.code is FailureCode.NOT_FOUND
    assert f"bytes 0:{10 * MiB + 1} are not all in 'big.bin' ({10 * MiB} bytes)" in str(
        refused.value
    )


def test_retrieve_file_range_stores_the_bytes_and_usage_errors_are_one_line(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"server", "site-1"})
    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "big.bin", 2 * MiB)
    env = _env(settings)
    serve = subprocess.Popen(
        ["objstream", "producer", "serve", "--site", "server", "--source-dir", str(src)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    retrieve = ["objstream", "consumer", "retrieve-file", "--site", "site-1", "--from", "server"]
    try:
        got = subprocess.run(
            [*retrieve, "big.bin", "--range", "1KiB:1MiB", "--dest", str(tmp_path / "in")],
            env=env, capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
        bad = [
            subprocess.run(
                [*retrieve, *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for args in (["big.bin", "--range", "5:5", "--dest", "x"], ["--list", "--range", "0:1"])
        ]
    finally:
        serve.terminate()
        serve.communicate(timeout=30)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "in" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()[
        1024 : 1024 * 1024
    ]
    assert [b.returncode for b in bad] == [2, 2]
    assert bad[0].stderr.strip().splitlines()[-1].startswith("objstream: error: argument --range")
    assert "'5:5': END must be after START" in bad[0].stderr
    assert bad[1].stderr.strip().endswith("--range selects the bytes to retrieve: not with --list")
