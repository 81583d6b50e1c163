"""``send-container`` into ``listen``: .npz, .safetensors and .json round trips, as processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import load_file, save_file

from objstream.common.settings import Settings
from tests.integration.conftest import Declared
from tests.integration.test_cli import _env, _listener, _objstream


def _round_trip(
    tmp_path: Path, settings: Settings, declared: Declared, src: Path, *extra: str
) -> tuple[Path, dict[str, Any]]:
    declared.sites.add("site-1")
    dest = tmp_path / "in"
    env = _env(settings)
    listener = _listener(env, "site-1", dest, "--count", "1", "--json")
    try:
        sent = _objstream(
            "producer", "send-container", "--site", "server", "--to", "site-1",
            "--chunk-size", "64KiB", *extra, str(src), env=env,
        )  # fmt: skip
        out, err = listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert sent.returncode == 0, sent.stderr
    assert listener.returncode == 0, err
    record = json.loads(out)
    assert record["kind"] == "container"
    return dest, record


def _model() -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(3)
    return {
        "layer-0": rng.standard_normal((300, 200)).astype(np.float32),
        "layer-1": rng.integers(-5, 5, (1000,), dtype=np.int64),
        "scale": np.array(0.5, dtype=np.float16),
    }


def test_npz_round_trip(tmp_path: Path, settings: Settings, declared: Declared) -> None:
    model = _model()
    src = tmp_path / "model.npz"
    np.savez(src, **model)  # type: ignore[arg-type]  # numpy's stub: **model could name allow_pickle
    dest, record = _round_trip(tmp_path, settings, declared, src)
    assert record["path"] == str((dest / "model.npz").resolve())
    with np.load(dest / "model.npz", allow_pickle=False) as back:
        assert list(back.files) == list(model)
        for key, value in model.items():
            assert back[key].dtype == value.dtype
            assert np.array_equal(back[key], value)


def test_safetensors_round_trip(tmp_path: Path, settings: Settings, declared: Declared) -> None:
    model = _model()
    src = tmp_path / "weights.safetensors"
    save_file(model, str(src))
    dest, _ = _round_trip(tmp_path, settings, declared, src)
    back = load_file(str(dest / "weights.safetensors"))
    assert set(back) == set(model)
    for key, value in model.items():
        assert back[key].dtype == value.dtype
        assert np.array_equal(back[key], value)


@pytest.mark.parametrize(
    "document",
    [{"epochs": 3, "layers": [1, 2, {"x": None}], "name": "ünï"}, [1, "two", [3.5]], {}],
    ids=["dict", "list", "empty"],
)
def test_json_round_trip(
    tmp_path: Path, settings: Settings, declared: Declared, document: object
) -> None:
    src = tmp_path / "config.json"
    src.write_text(json.dumps(document), encoding="utf-8")
    dest, _ = _round_trip(tmp_path, settings, declared, src)
    assert json.loads((dest / "config.json").read_text(encoding="utf-8")) == document


def test_existing_container_file_is_not_overwritten(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    src = tmp_path / "model.npz"
    np.savez(src, a=np.arange(3))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "model.npz").write_bytes(b"keep")
    dest, record = _round_trip(tmp_path, settings, declared, src)
    assert (dest / "model.npz").read_bytes() == b"keep"
    assert record["path"].endswith("model-1.npz")
    with np.load(dest / "model-1.npz") as back:
        assert np.array_equal(back["a"], np.arange(3))
