"""Real checkpoints without a broker: bfloat16/float8 in the codec, a .safetensors kept whole
(bytes, metadata, order), a sharded directory, refusals that name the dtype."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from objstream.common import dtypes
from objstream.common.codec import EncodeError, decode, encode
from objstream.common.errors import ObjstreamError, ProtocolError, SaveError
from objstream.common.safetensors_format import SafetensorsError
from objstream.producer.container_files import container_name, load_container
from tests.checkpoints import (
    HAND_DTYPES,
    METADATA,
    PACKAGE_DTYPES,
    same_bits,
    write_by_hand,
    write_every_dtype,
    write_sharded,
)
from tests.storing import store


def transfer(container: Any, name: str, dest: Path, save_as: str | None = None) -> Path:
    """Send ``container`` through the source into a ContainerSink, as ``listen`` does."""
    return store(container, name, dest, save_as).path


def _read_all(path: Path) -> tuple[dict[str, Any] | None, dict[str, np.ndarray[Any, Any]]]:
    """Metadata and tensors of a .safetensors, with the reference reader (torch-free)."""
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = {**PACKAGE_DTYPES, **HAND_DTYPES}[info["dtype"]]
        begin, end = info["data_offsets"]
        raw = path.read_bytes()[8 + header_len + begin : 8 + header_len + end]
        out[name] = np.frombuffer(raw, dtype=kind).reshape(info["shape"])
    return metadata, out


@pytest.mark.parametrize("name", sorted(dtypes.ML_DTYPES))
def test_every_ml_dtype_round_trips_in_the_codec(name: str) -> None:
    kind = getattr(ml_dtypes, name)
    array = np.arange(24, dtype=np.float32).reshape(4, 6).astype(kind)
    fortran = np.asfortranarray(array)
    back = decode(encode({"a": array, "f": fortran, "s": array[1, 1], "v": array[::2]}))
    assert same_bits(back["a"], array)
    assert same_bits(back["f"], fortran)
    assert same_bits(back["v"], array[::2])
    assert back["s"].dtype == array.dtype
    assert back["s"].tobytes() == array[1, 1].tobytes()


def test_a_receiver_without_ml_dtypes_names_what_it_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = encode({"w": np.zeros(3, ml_dtypes.bfloat16)})
    monkeypatch.setattr(dtypes, "ml_dtypes_module", lambda: None)
    with pytest.raises(dtypes.DtypeUnavailable, match=r"^bfloat16 needs ml_dtypes"):
        decode(encoded)
    assert issubclass(dtypes.DtypeUnavailable, ProtocolError)


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros(2, dtype=[("a", "<i4")]), "is structured"),
        (np.zeros(2, dtype="V3"), "|V3 (numpy.void) is not one the codec carries"),
        (np.array([object()]), "object arrays would need pickle"),
    ],
)
def test_refusals_name_the_dtype(array: np.ndarray[Any, Any], words: str) -> None:
    with pytest.raises(EncodeError) as caught:
        encode({"x": array}, where="key 'x'")
    assert words in str(caught.value)
    assert "object or structured" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_safetensors_of_every_dtype_comes_back_byte_for_byte(tmp_path: Path) -> None:
    package, hand, arrays = write_every_dtype(tmp_path)
    for src in (package, hand):
        out = transfer(load_container(src), src.name, tmp_path / "out")
        assert out.name == src.name
        if src == package:  # the same header formatting as the package: the same bytes
            assert out.read_bytes() == src.read_bytes()
        metadata, tensors = _read_all(out)
        assert metadata == METADATA
        for key, value in tensors.items():
            assert same_bits(value, arrays[key]), key


def test_reading_a_safetensors_loads_no_tensor(tmp_path: Path) -> None:
    package, _, _ = write_every_dtype(tmp_path)
    container = load_container(package)
    assert isinstance(container, dict)
    assert next(iter(container)) == "__metadata__"
    assert all(type(v).__name__ == "RawArray" for k, v in container.items() if k != "__metadata__")
    # As the package orders them (bigger items first, then by name), which the file keeps.
    with safe_open(str(package), framework="np") as f:
        assert sorted(container)[1:] == sorted(f.keys())


def test_the_python_api_gets_numpy_arrays_of_every_dtype_and_the_metadata(tmp_path: Path) -> None:
    package, hand, arrays = write_every_dtype(tmp_path)
    for src in (package, hand):
        value = decode(encode(load_container(src)))
        assert value["__metadata__"] == METADATA
        for key, array in value.items():
            if key != "__metadata__":
                assert same_bits(array, arrays[key])


def test_an_entry_order_that_is_not_the_packages_is_kept(tmp_path: Path) -> None:
    src = tmp_path / "order.safetensors"
    z, a = np.arange(4, dtype=np.int8), np.ones(2, dtype=np.float64)
    write_by_hand(src, {"z": ("I8", z), "a": ("F64", a)}, {"k": "v"})
    out = transfer(load_container(src), src.name, tmp_path / "out")
    with safe_open(str(out), framework="np") as f:
        assert f.metadata() == {"k": "v"}
        assert np.array_equal(f.get_tensor("z"), z)
    header = json.loads(out.read_bytes()[8 : 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]])
    assert list(header) == ["__metadata__", "z", "a"]


def test_a_sharded_checkpoint_arrives_as_the_same_directory(tmp_path: Path) -> None:
    src = write_sharded(tmp_path / "ckpt")
    assert container_name(src) == "ckpt/"
    dest = tmp_path / "out"
    dest.mkdir()
    out = transfer(load_container(src), "ckpt/", dest)
    assert out == (dest / "ckpt").resolve()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for file in src.iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    again = transfer(load_container(src), "ckpt/", dest)  # never merged into the first
    assert again.name == "ckpt-1"
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []


def test_packed_dtypes_and_bad_headers_are_refused_in_one_line(tmp_path: Path) -> None:
    src = tmp_path / "f4.safetensors"
    write_by_hand(src, {"q": ("F4", np.zeros(2, np.uint8))}, {})
    with pytest.raises(SafetensorsError, match=r"dtype F4 packs 4-bit elements") as caught:
        load_container(src)
    assert "\n" not in str(caught.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 4) + b"[1] ")
    with pytest.raises(ObjstreamError, match="not a JSON object"):
        load_container(bad)


def test_bfloat16_cannot_be_saved_as_npz_and_says_why(tmp_path: Path) -> None:
    with pytest.raises(
        SaveError, match=r"bfloat16 cannot be saved as \.npz.*name it \.safetensors"
    ):
        transfer({"w": np.zeros(3, ml_dtypes.bfloat16)}, "m.npz", tmp_path)
