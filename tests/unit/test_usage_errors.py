"""Mistakes a user makes on the command line fail at once, before anything moves: a
destination that cannot take files (not at every offer), a target given twice, a count below 1."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from objstream.common.cli import EXIT_USAGE
from objstream.common.errors import ConfigError
from objstream.consumer.destination import check_destination


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody may create files in: a read-only tmpfs for root (whom permission
    bits do not stop), mode 0555 for anyone else."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", str(path)], check=False)


def test_a_read_only_destination_is_a_config_error(read_only: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot write to destination .*ro"):
        check_destination(read_only)
    with pytest.raises(ConfigError, match="cannot write to destination"):
        check_destination(read_only / "sub")  # cannot even be made


def test_a_file_as_destination_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_destination(tmp_path / "f")


def test_a_writable_destination_is_made_and_left_clean(tmp_path: Path) -> None:
    check_destination(tmp_path / "a" / "b")
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_listen_on_a_read_only_destination_exits_2_at_start(read_only: Path) -> None:
    done = subprocess.run(
        ["objstream", "consumer", "listen", "--site", "site-1", "--dest", str(read_only),
         "--url", "amqp://guest:guest@127.0.0.1:1/%2F"],  # never reached
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("objstream: error: cannot write to destination"), line


def test_a_target_given_twice_is_a_usage_error_before_connecting() -> None:
    done = subprocess.run(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "dd,site-2,dd",
         "--url", "amqp://guest:guest@127.0.0.1:1/%2F", "/etc/hostname"],  # never reached
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("objstream: error: argument --to: site given twice: dd")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("count", ["-1", "0", "two"])
def test_listen_count_must_be_a_whole_number_of_1_or_more(tmp_path: Path, count: str) -> None:
    done = subprocess.run(
        ["objstream", "consumer", "listen", "--site", "site-1", "--dest", str(tmp_path),
         "--count", count],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "argument --count:" in done.stderr.strip().splitlines()[-1]


def test_a_password_without_apply_is_a_usage_error() -> None:
    done = subprocess.run(
        ["objstream", "admin", "permissions", "--site", "s", "--user", "u", "--password", "x"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stdout == ""  # no script printed as if the password were used
    [line] = done.stderr.strip().splitlines()
    assert line == (
        "objstream: error: --password is used only with --apply (the script prints "
        "'<password>' to fill in)"
    )


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["producer", "send-file", "--site", "s"], "the following arguments are required"),
        (["prodcer"], "invalid choice: 'prodcer'"),
        (["consumer", "listen", "--site", "s", "--dest", "d", "--cuont", "1"], "--cuont"),
    ],
)
def test_argparse_usage_errors_are_one_line(argv: list[str], words: str) -> None:
    done = subprocess.run(
        ["objstream", *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == EXIT_USAGE
    [line] = done.stderr.strip().splitlines()  # was argparse's usage block, then the error
    assert line.startswith("objstream: error: ")
    assert words in line
    assert line.endswith("--help)")


@pytest.mark.parametrize(
    ("rate", "words"),
    [
        ("0", "rate limit '0' is below 1 byte per second (leave it unset for no limit)"),
        ("lots", "not a rate: 'lots' (use bytes per second as 10MiB"),
        ("-5MiB", "not a rate: '-5MiB'"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["producer", "send-file", "--site", "server", "--to", "site-1", "/etc/hostname"],
        ["producer", "send-container", "--site", "server", "--to", "site-1", "m.npz"],
        ["producer", "serve", "--site", "server", "--source-dir", "."],
    ],
    ids=["send-file", "send-container", "serve"],
)
def test_a_bad_rate_limit_is_one_line_exit_2_before_connecting(
    command: list[str], rate: str, words: str
) -> None:
    done = subprocess.run(
        ["objstream", *command, f"--rate-limit={rate}",
         "--url", "amqp://guest:guest@127.0.0.1:1/%2F"],  # never reached
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("objstream: error: invalid setting: rate_limit: "), line
    assert words in line
