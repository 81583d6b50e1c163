"""The pure helpers of the link bench (bench/links.py, bench/shaping.py): rates, tbf, report.

The bench itself needs root, namespaces and a broker node, so it is run by hand, never here.
"""

from __future__ import annotations

import pytest

from bench.links import MiB, Row, format_rows, mbit, raw_size
from bench.shaping import addresses, format_rate, parse_rate, parse_sites, tbf_args


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("100mbit", 100_000_000),
        ("1gbit", 1_000_000_000),
        ("1Gbit", 1_000_000_000),
        (" 512kbit ", 512_000),
        ("2.5mbit", 2_500_000),
        ("64000", 64_000),
        ("none", None),
        ("unshaped", None),
        ("0", None),
    ],
)
def test_rates_read_as_tc_writes_them(text: str, bits: int | None) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["", "fast", "100mb", "100 MiB", "-1mbit", "1000bit"])
def test_what_is_not_a_rate_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_sites_are_one_rate_each() -> None:
    assert parse_sites("1gbit,1gbit,100mbit,none") == [10**9, 10**9, 10**8, None]
    with pytest.raises(ValueError, match="at least one"):
        parse_sites(" , ")
    with pytest.raises(ValueError, match="at most 250"):
        parse_sites(",".join(["1mbit"] * 251))


def test_rates_are_written_for_people() -> None:
    assert format_rate(10**9) == "1 Gbit/s"
    assert format_rate(100_000_000) == "100 Mbit/s"
    assert format_rate(2_500_000) == "2.5 Mbit/s"
    assert format_rate(512_000) == "512 kbit/s"
    assert format_rate(None) == "unshaped"


def test_tbf_holds_10_ms_of_burst_and_50_ms_of_queue() -> None:
    assert tbf_args(100_000_000) == [
        "tbf", "rate", "100000000bit", "burst", "125000", "limit", str(125000 + 625000)
    ]  # fmt: skip
    # A slow link keeps a bucket and a queue the kernel can work with.
    slow = tbf_args(1_000_000)
    assert slow[4] == str(16 * 1024)
    assert slow[6] == str(16 * 1024 + 64 * 1024)


def test_each_site_has_its_own_private_30() -> None:
    assert addresses(1) == ("10.231.1.1", "10.231.1.2")
    assert addresses(250) == ("10.231.250.1", "10.231.250.2")
    for bad in (0, 251):
        with pytest.raises(ValueError, match="outside"):
            addresses(bad)


def test_raw_download_is_about_3_seconds_of_the_link_within_the_object() -> None:
    size = 200 * MiB
    assert raw_size(100_000_000, size) == 37_500_000
    assert raw_size(10**9, size) == size  # 3 s would be more than the object
    assert raw_size(1_000_000, size) == 4 * MiB  # at least 4 MiB
    assert raw_size(1_000_000, MiB) == MiB  # never more than the object
    assert raw_size(None, size) == size


def test_report_gives_both_units_and_the_ratio() -> None:
    assert mbit(MiB) == pytest.approx(8.388608)
    table = format_rows([Row("site-1", "100 Mbit/s", 12 * MiB, 11.4 * MiB, 4.21, 0.0503)])
    assert table.splitlines()[2] == (
        "| site-1 | 100 Mbit/s | 50.3 | 12.0 (101) | 11.4 (96) | 0.95 | 4.21 |"
    )
