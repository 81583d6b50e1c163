"""Compressed chunks: what travels when a target said it decodes them (no I/O).

A sender that may compress says so in its offer (``info["encodings"] = "blosc2"``); a target
that decodes answers with ``encoding = "blosc2"`` in its progress; from then on a chunk to it
may carry ``encoding = "blosc2"``: its body is one Blosc2 chunk (as ``blosc2.compress2`` makes
it: a header naming its codec, filters and sizes, then the compressed blocks). The CRC-32 of a
chunk covers its body as it travels; the SHA-256 of the object covers the original bytes.

The codec is Blosc2's, never code of our own: a bit-shuffle filter (every bit of a 4-byte word
grouped with the same bit of its neighbours, which lines up the sign and exponent bits of
float32 and bfloat16 weights) before the entropy coder. Measured on real float32 and bfloat16
weights (docs/performance.md, "Compression"), that saves 26-35 % where plain zstd saves 20 %,
at over 1 GiB/s with LZ4 as the coder.

:class:`ChunkEncoder` decides, per chunk, whether to compress (:data:`ZSTD` always, when the
chunk shrinks; :data:`AUTO` only while it pays, see there); :func:`decode` undoes it with every
size checked before a byte is decompressed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Final, Literal

from objstream.common.errors import ConfigError, ProtocolError

BLOSC2: Final = "blosc2"
"""The one chunk encoding of protocol v2: a Blosc2 chunk."""
Encoding = Literal["blosc2"]
ENCODINGS_INFO: Final = "encodings"
"""The offer's ``info`` key: the encodings its sender may use, comma-separated."""

NONE: Final = "none"
ZSTD: Final = "zstd"
AUTO: Final = "auto"
MODES: Final = (AUTO, ZSTD, NONE)
"""What ``--compress`` takes (setting ``OBJSTREAM_COMPRESS``; default ``none``)."""

TYPESIZE: Final = 4
"""The word the bit-shuffle groups: 4 bytes suits float32 and bfloat16 (measured alike)."""
WORTH: Final = 0.9
"""A compressed chunk travels only if it is at most this fraction of the original."""
PRIOR_SPEED: Final = 1 << 30
PRIOR_RATIO: Final = 0.7
""":data:`AUTO`'s guesses before it measured anything: LZ4 after a bit-shuffle compresses
float32 and bfloat16 weights at about 1 GiB/s to about 0.7 of their size (docs/performance.md,
"Compression"). So a send faster than about 150 MiB/s (loopback) never starts compressing,
nor imports Blosc2."""
FIRST_BURST: Final = 16
"""Chunks :data:`AUTO` publishes before it knows the rate (half the default window)..."""
HOLD_AT_MOST: Final = 1.0
"""... then it holds the next until a target reports chunks stored, at most this long: what went
out over that time is the first measure of the rate. A slow link so loses 16 chunks to plain
bytes, not a whole window; a loopback send waits a few milliseconds, once (and since 16 chunks
went out for the 8 the first report counts, the estimate is high: it errs towards plain)."""


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`.

    Raises:
        ConfigError: it is not.
    """
    if mode not in MODES:
        raise ConfigError(f"compress must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def offers(info: object) -> bool:
    """Does an offer's ``info`` say its sender may send :data:`BLOSC2` chunks?"""
    if not isinstance(info, dict):
        return False
    value = info.get(ENCODINGS_INFO)
    return isinstance(value, str) and BLOSC2 in value.split(",")


@functools.cache
def _blosc2() -> ModuleType:
    """blosc2, imported on first use: it takes a third of a second, which a send or a receive
    without compression must not pay."""
    import blosc2

    module: ModuleType = blosc2
    return module


def welcome(info: object) -> Encoding | None:
    """The encoding a receiver answers an offer with ``info``: :data:`BLOSC2` if its sender may
    send it (every objstream receiver decodes it), else None (and the sender never hears of
    it: an older sender would not know the field)."""
    return BLOSC2 if offers(info) else None


def _compress(data: bytes, codec: str, level: int) -> bytes:
    blosc2 = _blosc2()
    body: bytes = blosc2.compress2(
        data,
        typesize=TYPESIZE,
        codec=blosc2.Codec[codec],
        clevel=level,
        filters=[blosc2.Filter.BITSHUFFLE],
        nthreads=1,
    )
    return body


@dataclass
class Rates:
    """Running measures of one send's compression: how much it saves, how fast it runs, and
    how fast the send publishes (which a slow link holds back)."""

    original: int = 0  # bytes compressed
    compressed: int = 0  # what they became (the chunks that did not shrink: as they were)
    seconds: float = 0.0  # spent compressing them
    published: int = 0  # wire bytes published since ``since``
    since: float | None = None

    @property
    def ratio(self) -> float:
        return self.compressed / self.original if self.original else 1.0

    @property
    def speed(self) -> float:
        """Original bytes compressed per second (0 before the first)."""
        return self.original / self.seconds if self.seconds else 0.0


@dataclass
class ChunkEncoder:
    """Per chunk of one send: compress it, or not (``mode`` one of :data:`MODES`).

    :data:`AUTO` compresses with LZ4 (the fastest of Blosc2's coders at a ratio close to zstd's
    on weights) while it pays: a chunk compressed takes ``1/speed`` more CPU per byte and saves
    ``(1 - ratio)/rate`` of link time per byte, ``rate`` being the wire bytes the send publishes
    per second. So it compresses while ``rate < speed * (1 - ratio) / 2``: the 2 counts the
    target's decompression (about as fast) and keeps a loopback send, whose rate is what the
    CPUs allow, plain. The first :attr:`window` goes plain (the rate is not known yet); until
    a chunk was compressed, ``speed`` and ``ratio`` are :data:`PRIOR_SPEED` and
    :data:`PRIOR_RATIO`. From then on every :attr:`probe_every` chunk is compressed whatever
    the decision, to keep the measures fresh: data that does not compress costs little, data
    that does is found again.
    """

    mode: str
    clock: Callable[[], float] = time.perf_counter
    probe_every: int = 16
    window: float = 0.25  # seconds of publishing the rate is measured over
    rates: Rates = field(default_factory=Rates)
    _count: int = 0
    _rate: float | None = None  # wire bytes a second, over the last window (None: not yet)

    def __post_init__(self) -> None:
        check_mode(self.mode)

    @property
    def active(self) -> bool:
        """Does this send offer compressed chunks at all?"""
        return self.mode != NONE

    def encode(self, data: bytes) -> tuple[bytes, Encoding | None]:
        """The body to publish for ``data``, and its encoding (None: ``data`` as it is)."""
        self._count += 1
        if not data or not self._compresses():
            return data, None
        codec, level = ("ZSTD", 1) if self.mode == ZSTD else ("LZ4", 5)
        _blosc2()  # imported before the clock starts: its import is no measure of its speed
        began = self.clock()
        body = _compress(data, codec, level)
        rates = self.rates
        rates.seconds += self.clock() - began
        rates.original += len(data)
        if len(body) > len(data) * WORTH:
            rates.compressed += len(data)
            return data, None
        rates.compressed += len(body)
        return body, BLOSC2

    def published(self, wire_bytes: int, now: float) -> None:
        """``wire_bytes`` went out at ``now`` (what the rate is measured from)."""
        rates = self.rates
        if rates.since is None:
            rates.since = now
        rates.published += wire_bytes
        if now - rates.since >= self.window:
            self._measured(now)

    def holds(self, now: float) -> bool:
        """Must the send hold its next publication (:data:`FIRST_BURST`)?"""
        rates = self.rates
        if self.mode != AUTO or self._rate is not None or self._count < FIRST_BURST:
            return False
        if rates.since is None or now - rates.since < HOLD_AT_MOST:
            return True
        self._measured(now)  # nobody reported yet: a slow start (or target) it is
        return False

    def stored(self, now: float) -> None:
        """A target reported more chunks stored: before the rate is known, what went out in
        the time that took is its first measure."""
        if self._rate is None and self.rates.since is not None:
            self._measured(now)

    def _measured(self, now: float) -> None:
        rates = self.rates
        assert rates.since is not None
        self._rate = rates.published / max(now - rates.since, 1e-6)
        rates.published, rates.since = 0, now

    def _compresses(self) -> bool:
        if self.mode == NONE:
            return False
        if self.mode == ZSTD:
            return True
        rates, rate = self.rates, self._rate
        if not rates.original:  # nothing compressed yet: as measured on weights elsewhere
            return rate is not None and rate < PRIOR_SPEED * (1.0 - PRIOR_RATIO) / 2.0
        if self._count % self.probe_every == 1:
            return True
        return rate is not None and rate < rates.speed * (1.0 - rates.ratio) / 2.0


def decode(body: bytes, encoding: str | None, length: int | None, limit: int) -> bytes:
    """The original bytes of a chunk's ``body`` (``body`` itself when not encoded).

    ``length`` is the exact length the offer implies (files), else None; ``limit`` the most a
    chunk may hold (the offer's ``chunk_size``). The Blosc2 header is checked against both and
    against the body before anything is decompressed (Blosc2 allocates what its header says).

    Raises:
        ProtocolError: an unknown encoding, a header that does not add up, or a body that does
            not decompress.
    """
    if encoding is None:
        return body
    if encoding != BLOSC2:
        raise ProtocolError(f"unknown chunk encoding {encoding!r}")
    try:
        size, compressed, _ = _blosc2().get_cbuffer_sizes(body)
    except (ValueError, RuntimeError) as e:
        raise ProtocolError(f"not a Blosc2 chunk: {e}") from None
    if compressed != len(body):
        raise ProtocolError(f"a Blosc2 chunk of {compressed} bytes in a body of {len(body)}")
    if size > limit or (length is not None and size != length):
        expected = f"{length}" if length is not None else f"at most {limit}"
        raise ProtocolError(f"a Blosc2 chunk of {size} bytes, expected {expected}")
    try:
        data = _blosc2().decompress2(body, nthreads=1)
    except (ValueError, RuntimeError) as e:
        raise ProtocolError(f"a Blosc2 chunk that does not decompress: {e}") from None
    if not isinstance(data, bytes) or len(data) != size:
        raise ProtocolError(f"a Blosc2 chunk of {size} bytes that decompressed otherwise")
    return data
