"""PyTorch state dicts without pickle on the receiving side (skipped where torch is missing)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from objstream.common.codec import EncodeError, decode, encode
from objstream.common.errors import ObjstreamError
from objstream.common.torch_bridge import TORCH_TO_WIRE, as_torch
from objstream.producer.container_files import load_container
from tests.unit.test_checkpoints import transfer

torch = pytest.importorskip(
    "torch", reason="torch is not installed (pip install 'objstream[torch]')"
)


def _raw(t: Any) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _state_dict() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(5)
    out: dict[str, Any] = {}
    for name in TORCH_TO_WIRE:
        kind = getattr(torch, name, None)
        if kind is None:
            continue
        bits = torch.randint(0, 256, (4 * 6 * kind.itemsize,), dtype=torch.uint8, generator=gen)
        out[name] = (
            bits.view(kind).reshape(4, 6)
            if kind != torch.bool
            else bits.reshape(4, 6, -1)[..., 0] % 2 == 1
        )
    out["transposed"] = torch.randn(5, 3, generator=gen).to(torch.bfloat16).t()
    out["scalar"] = torch.tensor(1.5, dtype=torch.float8_e5m2)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    return out


def _same(a: Any, b: Any) -> bool:
    return bool(a.dtype == b.dtype and a.shape == b.shape and _raw(a) == _raw(b))


def test_a_dict_of_tensors_of_every_dtype_comes_back_as_tensors_bit_exact() -> None:
    state = _state_dict()
    back = as_torch(decode(encode(state)))
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert isinstance(back[key], torch.Tensor)
        assert _same(back[key], tensor), key


def test_tensors_the_codec_cannot_carry_are_refused_by_name() -> None:
    with pytest.raises(EncodeError, match=r"key 'q': a torch\.sparse_coo tensor"):
        encode({"q": torch.eye(3).to_sparse()}, where="key 'q'")


def test_a_state_dict_file_is_read_with_weights_only_and_saved_as_safetensors(
    tmp_path: Path,
) -> None:
    state = {k: v for k, v in _state_dict().items() if k != "complex128"}  # not in safetensors
    src = tmp_path / "model.pt"
    torch.save(state, src)
    out = transfer(load_container(src), src.name, tmp_path / "out")
    assert out.name == "model.safetensors"
    from safetensors.torch import load_file

    back = load_file(str(out))
    for key, tensor in state.items():
        assert _same(back[key], tensor), key


class Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


def test_a_file_that_needs_full_unpickling_is_refused_in_one_line(tmp_path: Path) -> None:
    src = tmp_path / "evil.bin"
    with open(src, "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(
        ObjstreamError, match=r"refused: torch\.load\(weights_only=True\)"
    ) as caught:
        load_container(src)
    assert "\n" not in str(caught.value)


def test_the_assembler_can_give_torch_tensors() -> None:
    from objstream.common.protocol import Offer, new_stream_id
    from objstream.consumer.container_assembler import ContainerAssembler
    from objstream.producer.container_source import ContainerSource

    state = _state_dict()
    source = ContainerSource(state, "m")
    source.prepare(4096)
    offer = Offer(stream_id=new_stream_id(), kind="container", name="m", size=source.size,
                  chunk_size=4096, chunk_count=source.chunk_count, window=4, sender="a",
                  target="b", info=source.info())  # fmt: skip
    assembler = ContainerAssembler(offer, as_torch=True)
    offset = 0
    for piece in source.pieces():
        assembler.take(offset, piece.data, piece.meta)
        offset += len(piece.data)
    back = assembler.finish()
    assert all(_same(back[k], v) for k, v in state.items())
