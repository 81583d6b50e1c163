"""A checkpoint directory with subdirectories through the command line (issue 22, items 1 and
3): pushed with ``send-container DIR`` and retrieved with ``retrieve-container --out``, it
arrives as the same tree; an ``--out`` no format fits fails before anything moves."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from objstream.common.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from objstream.common.settings import Settings
from objstream.consumer.held import INDEX_NAME
from tests.integration.conftest import Declared
from tests.integration.test_cli import _env, _listener, _objstream


def _checkpoint(root: Path) -> Path:
    (root / "tokenizer" / "special").mkdir(parents=True)
    save_file({"w": np.arange(50_000, dtype=np.float32)}, str(root / "model-1.safetensors"))
    save_file({"e": np.ones((30, 4), np.float16)}, str(root / "tokenizer" / "enc.safetensors"))
    (root / "config.json").write_text('{"layers": 2}')
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (root / "tokenizer" / "special" / "map.json").write_text("{}")
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != INDEX_NAME
    }


@pytest.fixture
def serving(tmp_path: Path, settings: Settings, declared: Declared) -> Iterator[dict[str, str]]:
    declared.sites.add("server")
    env = _env(settings)
    src = _checkpoint(tmp_path / "ckpt")
    server = subprocess.Popen(
        ["objstream", "producer", "serve", "--site", "server", "--container", f"ck={src}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)
    assert server.poll() is None, server.communicate()
    yield env
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err


def _retrieve(env: dict[str, str], out: Path | str) -> subprocess.CompletedProcess[str]:
    return _objstream(
        "consumer", "retrieve-container", "--site", "site-1", "--from", "server", "ck",
        "--out", str(out), "--timeout", "20", env=env,
    )  # fmt: skip


def test_a_served_directory_is_retrieved_as_the_same_tree(
    tmp_path: Path, serving: dict[str, str]
) -> None:
    src = tmp_path / "ckpt"
    (tmp_path / "rc").mkdir()
    cases: list[tuple[Path | str, Path]] = [
        (tmp_path / "rc" / "ck", tmp_path / "rc" / "ck"),  # no suffix: the directory OUT
        (f"{tmp_path / 'rc' / 'ck2'}/", tmp_path / "rc" / "ck2"),
        (tmp_path / "rc", tmp_path / "rc" / "ck-1"),  # into it, under its own name
    ]
    for out, expect in cases:
        done = _retrieve(serving, out)
        assert done.returncode == EXIT_OK, done.stderr
        assert done.stdout.strip() == str(expect.resolve())
        assert _tree(expect) == _tree(src)  # subdirectories, every byte


def test_an_out_no_format_fits_fails_before_anything_moves(
    tmp_path: Path, serving: dict[str, str]
) -> None:
    unreachable = {**serving, "OBJSTREAM_URL": "amqp://guest:guest@127.0.0.1:1/%2F"}
    for out, words in [("x.txt", ".txt is not a container format"), ("x.pt", "pickles")]:
        done = _retrieve(unreachable, tmp_path / out)  # a usage error: no broker asked
        assert done.returncode == EXIT_USAGE, done.stderr
        assert done.stderr.count("\n") == 1
        assert words in done.stderr
    refused = _retrieve(serving, tmp_path / "ck.safetensors")  # refused at its offer
    assert refused.returncode == EXIT_FAILED
    assert "it is a directory of files; save it as a directory" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written


def test_send_container_dir_keeps_its_subdirectories(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = _checkpoint(tmp_path / "llama")
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "--count", "1", "--json")
    try:
        sent = _objstream(
            "producer", "send-container", "--site", "server", "--to", "site-1", str(src),
            env=env,
        )  # fmt: skip
        out, err = listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert sent.returncode == EXIT_OK, sent.stderr
    assert listener.returncode == EXIT_OK, err
    stored = Path(json.loads(out)["path"])
    assert stored == (tmp_path / "in" / "llama").resolve()
    assert _tree(stored) == _tree(src)
