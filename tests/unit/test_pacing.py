"""The rate limit's pacing (issue 24, item 5), over simulated time: a :class:`TokenBucket` asked
before each publication, as a transfer asks it, with a clock the test moves."""

from __future__ import annotations

import math
import random

import pytest

from objstream.common.errors import ConfigError
from objstream.common.pacing import BURST_CHUNKS, TokenBucket, pacer
from objstream.common.settings import MiB, Settings, parse_rate

CHUNK = 1 * MiB


def _run(
    rate: float, total: int, *, late: float = 0.0, chunk: int = CHUNK, seed: int = 0
) -> list[tuple[float, int]]:
    """Publish ``total`` bytes in chunks as the driver does: wait as long as the bucket says
    (each wait ending up to ``late`` s late, as a poll does), then publish. Returns each
    publication's (time, bytes published so far), the transfer starting at 0."""
    rng = random.Random(seed)
    bucket = TokenBucket(rate, chunk, 0.0)
    now, sent, log = 0.0, 0, []
    while sent < total:
        wait = bucket.wait(now)
        if wait > 0:
            now += wait + rng.uniform(0, late)
            continue
        size = min(chunk, total - sent)
        bucket.spend(size, now)
        sent += size
        log.append((now, sent))
    return log


@pytest.mark.parametrize(
    ("rate", "late"),
    [(8 * MiB, 0.0), (8 * MiB, 0.002), (10_000_000, 0.001), (125_000_000, 0.001), (200 * MiB, 0)],
)
def test_the_rate_is_honoured_within_5_percent_and_never_exceeded(rate: float, late: float) -> None:
    log = _run(rate, 64 * MiB + 3, late=late)
    # Never ahead of the rate, from the start of the transfer to any publication.
    for when, sent in log:
        assert sent <= rate * when + 1e-6 * rate, (when, sent)
    # And not much behind it: late wake-ups are made up for by the second chunk of room.
    when, sent = log[-1]
    achieved = sent / when
    assert rate * 0.95 <= achieved <= rate * 1.0000001, achieved / rate


def test_the_first_chunk_waits_its_turn_the_bucket_starts_empty() -> None:
    bucket = TokenBucket(8 * MiB, CHUNK, 100.0)
    assert bucket.wait(100.0) == pytest.approx(CHUNK / (8 * MiB))
    assert bucket.wait(100.0 + CHUNK / (8 * MiB)) == 0


def test_after_a_pause_at_most_two_chunks_go_at_once() -> None:
    bucket = TokenBucket(8 * MiB, CHUNK, 0.0)
    now = 3600.0  # a window full for an hour: the bucket filled, up to its bound
    at_once = 0
    while bucket.wait(now) == 0:
        bucket.spend(CHUNK, now)
        at_once += 1
    assert at_once == BURST_CHUNKS == 2
    assert bucket.wait(now) == pytest.approx(CHUNK / (8 * MiB))


def test_a_round_that_publishes_several_chunks_is_paid_for_by_the_next_waits() -> None:
    # A broadcast chunk and two resends that came due in the same round: the bucket goes
    # below empty and the next publication waits for all three.
    rate = 8 * MiB
    bucket = TokenBucket(rate, CHUNK, 0.0)
    now = bucket.wait(0.0)
    for _ in range(3):
        bucket.spend(CHUNK, now)
    assert bucket.wait(now) == pytest.approx(3 * CHUNK / rate)


def test_a_short_last_chunk_is_charged_what_it_carried() -> None:
    bucket = TokenBucket(1000, 100, 0.0)
    bucket.spend(10, bucket.wait(0.0))
    assert bucket.wait(0.1) == pytest.approx(0.01)  # 90 bytes left: 10 more in 0.01 s


def test_a_clock_that_goes_back_adds_nothing() -> None:
    bucket = TokenBucket(1000, 100, 10.0)
    assert bucket.wait(5.0) == pytest.approx(0.1)
    assert bucket.wait(10.05) == pytest.approx(0.05)
    assert bucket.wait(10.0) == pytest.approx(0.05)  # earlier than the last look: no change


@pytest.mark.parametrize("rate", [None, 0])
def test_no_rate_or_zero_makes_no_pacer(rate: float | None) -> None:
    assert pacer(rate, CHUNK, 0.0) is None


def test_a_rate_makes_a_pacer() -> None:
    bucket = pacer(8 * MiB, CHUNK, 0.0)
    assert isinstance(bucket, TokenBucket)
    assert bucket.rate == 8 * MiB


@pytest.mark.parametrize("rate", [-1, -0.5, math.inf, math.nan])
def test_bad_rates_are_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        TokenBucket(rate, CHUNK, 0.0)
    with pytest.raises(ValueError, match="rate limit"):
        pacer(rate, CHUNK, 0.0)


def test_a_chunk_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk"):
        TokenBucket(1000, 0, 0.0)


# -- what RATE may be -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [
        ("10MiB", 10 * MiB),
        ("10M", 10 * MiB),  # one letter: a power of 1024, as sizes are
        ("10m", 10 * MiB),
        ("10MB", 10_000_000),
        ("10MiB/s", 10 * MiB),
        ("1.5M", 3 * MiB // 2),
        ("1048576", MiB),
        ("80mbit", 10_000_000),  # tc's units: powers of 1000
        ("80Mbit/s", 10_000_000),
        ("1gbit", 125_000_000),
        ("1 GBIT", 125_000_000),
        ("800kbit", 100_000),
        ("8bit", 1),
        ("8kibit", 1024),
        ("8mibit", MiB),
        (4096, 4096),
    ],
)
def test_rates_accepted(text: str | int, bytes_per_s: int) -> None:
    assert parse_rate(text) == bytes_per_s


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("lots", "not a rate: 'lots'"),
        ("", "not a rate"),
        ("mbit", "not a rate"),
        ("-5", "not a rate"),
        ("10 MiB/h", "not a rate"),
        ("inf", "not a rate"),
        ("80mbps", "not a rate"),  # tc's mbps is megabytes: ambiguous, refused
        ("0", "below 1 byte per second"),
        ("0mbit", "below 1 byte per second"),
        ("4bit", "below 1 byte per second"),
        (0, "below 1 byte per second"),
    ],
)
def test_rates_refused(text: str | int, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_rate(text)


def test_the_setting_reads_the_environment_and_refuses_nonsense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().rate_limit is None
    monkeypatch.setenv("OBJSTREAM_RATE_LIMIT", "80mbit")
    assert Settings().rate_limit == 10_000_000
    assert Settings(rate_limit="2MiB").rate_limit == 2 * MiB  # a keyword wins
    for bad in ("lots", "0", True):
        with pytest.raises(ConfigError, match="invalid setting: rate_limit"):
            Settings(rate_limit=bad)
