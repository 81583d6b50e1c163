"""Compressed chunks without a broker: the encoder's choices, the decoder's checks, the
negotiation in both sessions (an offer says the sender may; a target answers it decodes; only
then, and only to targets that said so, do chunks go compressed)."""

from __future__ import annotations

import hashlib
import os
import zlib

import blosc2
import numpy as np
import pytest

from objstream.common import compression
from objstream.common.compression import BLOSC2, ENCODINGS_INFO, ChunkEncoder, decode
from objstream.common.errors import ConfigError, ProtocolError
from objstream.common.protocol import Chunk, End, Offer, Progress, new_stream_id, parse, to_headers
from objstream.common.reassembly import ChunkVerdict, Reassembler
from objstream.common.receive_actions import Commit, SendProgress, Terms, Write
from objstream.common.receive_session import ReceiveSession
from objstream.common.send_session import SendSession
from objstream.common.send_table import Pacing, Plan, PublishChunk, PublishOffer, SourceFacts

KIB = 1024


def weights(nbytes: int, seed: int = 0) -> bytes:
    """float32 weights as a trained layer holds them (small, normally distributed)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(nbytes // 4) * 0.02).astype(np.float32).tobytes()


class Clock:
    """When each chunk went out (the encoder times its own compressing)."""

    def __init__(self) -> None:
        self.now = 0.0


# -- the encoder ------------------------------------------------------------------------------


def test_zstd_compresses_every_chunk_that_shrinks_and_it_decodes_to_the_same_bytes() -> None:
    encoder = ChunkEncoder("zstd")
    data = weights(256 * KIB)
    body, encoding = encoder.encode(data)
    assert encoding == BLOSC2
    assert len(body) < 0.9 * len(data)
    assert decode(body, encoding, len(data), len(data)) == data


def test_what_does_not_shrink_goes_as_it_is() -> None:
    data = os.urandom(256 * KIB)
    assert ChunkEncoder("zstd").encode(data) == (data, None)
    assert ChunkEncoder("zstd").encode(b"") == (b"", None)


def test_none_never_compresses() -> None:
    encoder = ChunkEncoder("none")
    assert not encoder.active
    assert encoder.encode(bytes(64 * KIB)) == (bytes(64 * KIB), None)


def test_an_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="compress must be one of auto, zstd, none, not 'lz4'"):
        ChunkEncoder("lz4")


def _publish(encoder: ChunkEncoder, clock: Clock, data: bytes, rate: float, count: int) -> int:
    """Publish ``count`` chunks of ``data`` at ``rate`` wire bytes a second; how many went
    compressed."""
    compressed = 0
    for _ in range(count):
        body, encoding = encoder.encode(data)
        compressed += encoding is not None
        clock.now += len(body) / rate
        encoder.published(len(body), clock.now)
    return compressed


def test_auto_stays_plain_on_a_fast_link_and_never_starts_compressing() -> None:
    clock = Clock()
    encoder = ChunkEncoder("auto")
    assert _publish(encoder, clock, weights(256 * KIB), 400 * 2**20, 400) == 0
    assert encoder.rates.original == 0  # not even a probe: Blosc2 need not be imported


def test_auto_compresses_on_a_slow_link_once_the_rate_is_measured() -> None:
    clock = Clock()
    encoder = ChunkEncoder("auto")
    data = weights(256 * KIB)
    first = _publish(encoder, clock, data, 10 * 2**20, 10)  # the first 0.25 s: plain
    assert first == 0
    assert _publish(encoder, clock, data, 10 * 2**20, 100) >= 95
    assert encoder.rates.ratio < 0.9


def test_auto_stops_compressing_what_does_not_shrink_but_probes_it_again() -> None:
    clock = Clock()
    encoder = ChunkEncoder("auto", probe_every=16)
    noise = os.urandom(256 * KIB)
    _publish(encoder, clock, noise, 10 * 2**20, 20)  # measured, tried, did not shrink
    tried = encoder.rates.original
    assert _publish(encoder, clock, noise, 10 * 2**20, 160) == 0
    assert encoder.rates.original == tried + 10 * len(noise)  # one probe in 16
    assert _publish(encoder, clock, weights(256 * KIB), 10 * 2**20, 200) > 150  # found again


def test_auto_holds_after_its_first_burst_until_a_target_reports_and_measures_that() -> None:
    encoder = ChunkEncoder("auto")
    data = weights(64 * KIB)
    for i in range(compression.FIRST_BURST):
        assert not encoder.holds(0.001 * i)
        assert encoder.encode(data) == (data, None)  # the rate is not known: plain
        encoder.published(len(data), 0.001 * i)
    assert encoder.holds(0.1)
    encoder.stored(0.5)  # 16 x 64 KiB in half a second: 2 MiB/s, a slow link
    assert not encoder.holds(0.5)
    assert encoder.encode(data)[1] == BLOSC2

    fast = ChunkEncoder("auto")
    for i in range(compression.FIRST_BURST):
        fast.encode(data)
        fast.published(len(data), 0.0001 * i)
    fast.stored(0.002)  # 1 MiB in 2 ms: loopback
    assert not fast.holds(0.002)
    assert fast.encode(data) == (data, None)


def test_auto_holds_at_most_a_second_when_nobody_reports() -> None:
    encoder = ChunkEncoder("auto")
    data = weights(64 * KIB)
    for _ in range(compression.FIRST_BURST):
        encoder.encode(data)
        encoder.published(len(data), 0.0)
    assert encoder.holds(compression.HOLD_AT_MOST - 0.01)
    assert not encoder.holds(compression.HOLD_AT_MOST)
    assert encoder.encode(data)[1] == BLOSC2  # 1 MiB in a second: slow


@pytest.mark.parametrize("mode", ["zstd", "none"])
def test_only_auto_ever_holds(mode: str) -> None:
    encoder = ChunkEncoder(mode)
    for _ in range(2 * compression.FIRST_BURST):
        encoder.encode(weights(4 * KIB))
    assert not encoder.holds(0.5)


# -- the decoder -------------------------------------------------------------------------------


def _blosc(data: bytes) -> bytes:
    packed: bytes = blosc2.compress2(data, typesize=4, codec=blosc2.Codec.LZ4, clevel=5)
    return packed


def test_decode_checks_the_size_its_header_claims_before_decompressing() -> None:
    bomb = _blosc(bytes(64 * 2**20))  # 64 MiB of zeros in a few hundred bytes
    assert len(bomb) < 64 * KIB
    with pytest.raises(ProtocolError, match="a Blosc2 chunk of 67108864 bytes, expected at most"):
        decode(bomb, BLOSC2, None, 1 << 20)
    small = _blosc(bytes(1000))
    with pytest.raises(ProtocolError, match="a Blosc2 chunk of 1000 bytes, expected 1001"):
        decode(small, BLOSC2, 1001, 1 << 20)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\x05" * 64, "a Blosc2 chunk of"),
        (b"abc", "not a Blosc2 chunk"),
        (_blosc(weights(64 * KIB))[:-100], "in a body of"),
    ],
    ids=["garbage", "too-short", "truncated"],
)
def test_decode_refuses_a_body_that_is_no_blosc2_chunk(body: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode(body, BLOSC2, None, 1 << 20)


def test_decode_refuses_an_unknown_encoding_and_passes_plain_bodies() -> None:
    with pytest.raises(ProtocolError, match="unknown chunk encoding 'gzip'"):
        decode(b"x", "gzip", None, 10)
    assert decode(b"plain", None, 5, 10) == b"plain"


# -- the wire ----------------------------------------------------------------------------------


def test_the_encoding_fields_travel_and_are_left_out_when_unset() -> None:
    sid = new_stream_id()
    chunk = Chunk(stream_id=sid, seq=0, crc32=1, encoding="blosc2")
    assert parse("chunk", to_headers(chunk)) == chunk
    assert "encoding" not in to_headers(Chunk(stream_id=sid, seq=0, crc32=1))
    progress = Progress(stream_id=sid, site="b", stored=0, encoding="blosc2")
    assert parse("progress", to_headers(progress)) == progress
    assert "encoding" not in to_headers(Progress(stream_id=sid, site="b", stored=0))
    with pytest.raises(ProtocolError):
        parse("chunk", {**to_headers(chunk), "encoding": "gzip"})


# -- the receiving side ------------------------------------------------------------------------


def _offer(size: int, chunk_size: int, *, offered: bool = True) -> Offer:
    info = {ENCODINGS_INFO: BLOSC2} if offered else None
    return Offer(stream_id=new_stream_id(), kind="file", name="w.bin", size=size,
                 chunk_size=chunk_size, chunk_count=-(-size // chunk_size), window=8,
                 sender="a", target="b", info=info)  # fmt: skip


def _receiver(offer: Offer) -> ReceiveSession:
    reassembler = Reassembler(offer)
    reassembler.accept()
    return ReceiveSession(reassembler, "b", Terms(5.0, 8), now=0.0)


def test_a_receiver_says_it_decodes_only_to_a_sender_that_offered_it() -> None:
    [progress] = _receiver(_offer(100, 10)).start()
    assert progress == SendProgress(0, 0, None, BLOSC2)
    [progress] = _receiver(_offer(100, 10, offered=False)).start()
    assert progress == SendProgress(0, 0, None, None)


def test_a_compressed_file_is_checked_by_the_crc_of_what_came_and_the_digest_of_the_bytes() -> None:
    data = weights(192 * KIB)
    chunk_size = 64 * KIB
    offer = _offer(len(data), chunk_size)
    session = _receiver(offer)
    disk = bytearray(len(data))
    encoder = ChunkEncoder("zstd")
    for seq in range(3):
        piece = data[seq * chunk_size : (seq + 1) * chunk_size]
        body, encoding = encoder.encode(piece)
        assert encoding == BLOSC2
        chunk = Chunk(stream_id=offer.stream_id, seq=seq, crc32=zlib.crc32(body), encoding=encoding)
        for action in session.receive(seq + 1, chunk, body, 0.0):
            if isinstance(action, Write):
                disk[action.offset : action.offset + len(action.body)] = action.body
    end = End(stream_id=offer.stream_id, chunk_count=3, size=len(data),
              sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
    assert Commit() in session.receive(4, end, b"", 0.0)  # the SHA-256 of the bytes matched
    assert bytes(disk) == data


def test_a_compressed_chunk_with_a_crc_of_the_original_is_corrupt() -> None:
    data = weights(64 * KIB)
    reassembler = Reassembler(_offer(len(data), len(data)))
    reassembler.accept()
    body, _ = ChunkEncoder("zstd").encode(data)
    outcome = reassembler.chunk(0, zlib.crc32(data), body, BLOSC2)
    assert outcome.verdict is ChunkVerdict.CORRUPT
    assert reassembler.stored == 0


@pytest.mark.parametrize(
    ("length", "words"),
    [
        (32 * KIB, "a Blosc2 chunk of 32768 bytes, expected 65536"),
        (128 * KIB, "a Blosc2 chunk of 131072 bytes, expected 65536"),
    ],
)
def test_a_compressed_chunk_that_decodes_to_the_wrong_length_is_a_protocol_error(
    length: int, words: str
) -> None:
    reassembler = Reassembler(_offer(64 * KIB, 64 * KIB))
    reassembler.accept()
    body = _blosc(bytes(length))
    with pytest.raises(ProtocolError, match=words):
        reassembler.chunk(0, zlib.crc32(body), body, BLOSC2)
    assert reassembler.stored == 0


def test_a_compressed_chunk_in_a_stream_whose_offer_did_not_announce_them_is_refused() -> None:
    data = weights(64 * KIB)
    reassembler = Reassembler(_offer(len(data), len(data), offered=False))
    reassembler.accept()
    body = _blosc(data)
    with pytest.raises(ProtocolError, match="encoded blosc2, but its offer did not say"):
        reassembler.chunk(0, zlib.crc32(body), body, BLOSC2)


def test_a_body_of_exactly_the_chunk_size_may_come_compressed_or_not() -> None:
    data = weights(64 * KIB)
    reassembler = Reassembler(_offer(2 * len(data), len(data)))
    reassembler.accept()
    assert reassembler.chunk(0, zlib.crc32(data), data).verdict is ChunkVerdict.WRITE
    body = _blosc(data)
    outcome = reassembler.chunk(1, zlib.crc32(body), body, BLOSC2)
    assert outcome.verdict is ChunkVerdict.WRITE
    assert outcome.piece == data


# -- the sending side --------------------------------------------------------------------------


def _sender(sites: tuple[str, ...], *, compress: bool = True) -> SendSession:
    facts = SourceFacts("file", "w.bin", 100, 1000, 10, True)
    return SendSession.create(
        facts,
        sites,
        stream_id=new_stream_id(),
        sender="me",
        pacing=Pacing(4, 30.0, 5.0),
        plan=Plan(0, None, compress),
        now=0.0,
    )


def _contact(session: SendSession, site: str, *, decodes: bool) -> None:
    progress = Progress(stream_id=session.stream_id, site=site, stored=0,
                        encoding=BLOSC2 if decodes else None)  # fmt: skip
    session.receive(progress, 0.0, key=f"reply:me:{'1' * 32}:{site}", user=site)


def test_the_offer_says_the_sender_may_compress_only_when_it_may() -> None:
    [offer] = _sender(("a",)).start_actions()
    assert isinstance(offer, PublishOffer)
    assert offer.offer.info == {ENCODINGS_INFO: BLOSC2}
    [offer] = _sender(("a",), compress=False).start_actions()
    assert isinstance(offer, PublishOffer)
    assert offer.offer.info is None


def test_the_broadcast_goes_compressed_only_when_every_target_decodes_it() -> None:
    session = _sender(("a", "b"))
    session.start_actions()
    _contact(session, "a", decodes=True)
    _contact(session, "b", decodes=True)
    [chunk] = session.next_publications()
    assert chunk == PublishChunk(0, None, encoded=True)

    session = _sender(("a", "b"))
    session.start_actions()
    _contact(session, "a", decodes=True)
    _contact(session, "b", decodes=False)  # an objstream before compressed chunks
    [chunk] = session.next_publications()
    assert chunk == PublishChunk(0, None, encoded=False)


def test_a_target_that_says_it_decodes_to_a_sender_that_did_not_offer_gets_plain_chunks() -> None:
    session = _sender(("a",), compress=False)
    session.start_actions()
    _contact(session, "a", decodes=True)
    [chunk] = session.next_publications()
    assert chunk == PublishChunk(0, None, encoded=False)


def test_compression_is_not_offered_when_the_info_is_full() -> None:
    info: dict[str, str | int | float | bool] = {f"k{i}": i for i in range(16)}
    facts = SourceFacts("file", "w.bin", 100, 1000, 10, True, info)
    session = SendSession.create(facts, ("a",), stream_id=new_stream_id(), sender="me",
                                 pacing=Pacing(4, 30.0, 5.0), plan=Plan(0, None, True),
                                 now=0.0)  # fmt: skip
    [offer] = session.start_actions()
    assert isinstance(offer, PublishOffer)
    assert offer.offer.info == info
    assert compression.offers(offer.offer.info) is False
