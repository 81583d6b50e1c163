"""``send-file`` with several files, a tree (``-r``) and standard input (``-``), run as users run
it: the ``objstream`` command in processes of its own, a real broker, ``listen`` receiving."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from objstream.common.cli import EXIT_BROKER, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from objstream.common.naming import TREE_INFO_KEY
from objstream.common.protocol import PIPE_KIND
from objstream.common.settings import Settings
from objstream.consumer.held import INDEX_NAME
from tests.conftest import random_file
from tests.integration.conftest import Declared
from tests.integration.rawpeer import RawPeer
from tests.integration.test_cli import _env

Listen = Callable[..., subprocess.Popen[str]]


def _send(
    settings: Settings, *args: str, stdin: int | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1"]
    return subprocess.run(
        [*command, "--timeout", "20", *args],
        env=env or _env(settings),
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def listen(settings: Settings, declared: Declared) -> Iterator[Listen]:
    """Start ``objstream consumer listen --site site-1 --json`` into a directory; stopped (and
    waited for) at teardown."""
    declared.sites.add("site-1")
    started: list[subprocess.Popen[str]] = []

    def start(dest: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            ["objstream", "consumer", "listen", "--site", "site-1", "--dest", str(dest), "--json",
             *extra],
            env=env or _env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _records(listener: subprocess.Popen[str], code: int = EXIT_OK) -> list[dict[str, object]]:
    """What ``listen --json --count N`` printed, once it exited with ``code``."""
    out, err = listener.communicate(timeout=60)
    assert listener.returncode == code, err
    return [json.loads(line) for line in out.splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (not following symlinks) by relative path, with its
    bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != INDEX_NAME:
            found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def test_several_files_in_one_command_each_verified_one_json_object_each(
    tmp_path: Path, settings: Settings, listen: Listen
) -> None:
    sizes = {"a.bin": 0, "b.bin": 70_000, "c.bin": 300_001}  # empty, inline + 1, chunks + 1
    digests = {name: random_file(tmp_path / name, size) for name, size in sizes.items()}
    listener = listen(tmp_path / "in", "--count", "3")
    sent = _send(settings, "--chunk-size", "64KiB", "--json", *(str(tmp_path / n) for n in sizes))
    assert sent.returncode == EXIT_OK, sent.stderr
    outcomes = [json.loads(line) for line in sent.stdout.splitlines()]
    # One object per file, in order, each shaped as send-file's single-file object.
    assert [o["name"] for o in outcomes] == [str(tmp_path / n) for n in sizes]
    for outcome, name in zip(outcomes, sizes, strict=True):
        assert outcome["ok"] is True
        assert outcome["bytes"] == sizes[name]
        assert outcome["sha256"] == digests[name]
        assert outcome["targets"][0]["stored_as"] == name
    records = _records(listener)
    assert sorted(str(r["name"]) for r in records) == sorted(sizes)
    for name in sizes:
        assert (tmp_path / "in" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_a_missing_file_among_several_fails_alone_and_the_exit_code_says_so(
    tmp_path: Path, settings: Settings, listen: Listen
) -> None:
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / "c.txt").write_bytes(b"third")
    (tmp_path / "dir").mkdir()
    listener = listen(tmp_path / "in", "--count", "2")
    sent = _send(settings, *(str(tmp_path / n) for n in ("a.txt", "missing.txt", "dir", "c.txt")))
    assert sent.returncode == EXIT_FAILED
    errors = sent.stderr.splitlines()
    assert errors == [
        f"objstream: error: {tmp_path / 'missing.txt'}: No such file or directory",
        f"objstream: error: {tmp_path / 'dir'}: is a directory; send it with -r",
    ]
    assert len(sent.stdout.splitlines()) == 2  # one line for each file sent
    _records(listener)
    assert _tree(tmp_path / "in") == {"a.txt": b"first", "c.txt": b"third"}


def test_a_tree_with_nested_directories_is_received_as_the_same_tree(
    tmp_path: Path, settings: Settings, listen: Listen
) -> None:
    src = tmp_path / "src" / "model"
    files = {
        "config.json": 17,
        "empty.bin": 0,
        "shards/part-0.bin": 200_000,
        "shards/part-1.bin": 131_072,  # exactly 2 chunks
        "shards/deep/er/still/x.bin": 65_537,
        "név/ünïcode.txt": 5,
    }
    for name, size in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        random_file(src / name, size)
    (src / "emptydir").mkdir()
    (src / "shards" / "link-in").symlink_to("part-0.bin")  # inside the tree: sent as a file
    (tmp_path / "secret").write_bytes(b"outside")
    (src / "link-out").symlink_to(tmp_path / "secret")  # leaves the tree: skipped
    (src / "loop").symlink_to(".")  # a directory: never followed
    os.mkfifo(src / "fifo")  # would block a reader: skipped
    expected = {f"model/{name}": (src / name).read_bytes() for name in files}
    expected["model/shards/link-in"] = (src / "shards/part-0.bin").read_bytes()
    listener = listen(tmp_path / "in", "--count", str(len(expected)))
    sent = _send(settings, "--chunk-size", "64KiB", "--json", "-r", str(src))
    assert sent.returncode == EXIT_OK, sent.stderr
    assert sorted(sent.stderr.splitlines()) == [
        f"objstream: skipped {src / 'fifo'}: not a regular file",
        f"objstream: skipped {src / 'link-out'}: a symlink leading out of the tree",
        f"objstream: skipped {src / 'loop'}: a symlink to a directory",
    ]
    stored_as = [json.loads(line)["targets"][0]["stored_as"] for line in sent.stdout.splitlines()]
    assert sorted(stored_as) == sorted(expected)
    _records(listener)
    assert _tree(tmp_path / "in") == expected  # every file's bytes, nothing else
    assert not (tmp_path / "in" / "model" / "link-out").exists()

    # Sent again: nothing is overwritten, the directories are shared.
    listener = listen(tmp_path / "in", "--count", "1")
    sent = _send(settings, "-r", str(src / "shards" / "deep"))
    assert sent.returncode == EXIT_OK, sent.stderr
    _records(listener)
    assert (tmp_path / "in" / "deep" / "er" / "still" / "x.bin").read_bytes() == (
        src / "shards/deep/er/still/x.bin"
    ).read_bytes()


def test_a_tree_under_an_existing_name_never_overwrites(
    tmp_path: Path, settings: Settings, listen: Listen
) -> None:
    src = tmp_path / "t"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_bytes(b"new")
    dest = tmp_path / "in"
    (dest / "t" / "sub").mkdir(parents=True)
    (dest / "t" / "sub" / "f.txt").write_bytes(b"old")
    listener = listen(dest, "--count", "1")
    sent = _send(settings, "--json", "-r", str(src))
    assert sent.returncode == EXIT_OK, sent.stderr
    assert json.loads(sent.stdout)["targets"][0]["stored_as"] == "t/sub/f-1.txt"
    _records(listener)
    assert _tree(dest) == {"t/sub/f.txt": b"old", "t/sub/f-1.txt": b"new"}


def test_standard_input_piped_from_a_process_streams_with_flat_memory(
    tmp_path: Path, settings: Settings, listen: Listen
) -> None:
    size = 96 * 1024 * 1024 + 3  # not a multiple of the chunk size
    writer_code = (
        "import hashlib, random, sys\n"
        "r = random.Random(7)\n"
        f"left = {size}\n"
        "while left:\n"
        "    block = r.randbytes(min(left, 1 << 20))\n"
        "    sys.stdout.buffer.write(block)\n"
        "    left -= len(block)\n"
    )
    expected = hashlib.sha256()
    rng = __import__("random").Random(7)
    left = size
    while left:
        block = rng.randbytes(min(left, 1 << 20))
        expected.update(block)
        left -= len(block)
    listener = listen(tmp_path / "in", "--count", "1")
    writer = subprocess.Popen([sys.executable, "-c", writer_code], stdout=subprocess.PIPE)
    assert writer.stdout is not None
    # The sender reports its own peak RSS: it must stay far below what went through it. From
    # VmHWM (peak_rss_mib), not ru_maxrss: Linux carries the parent's peak (this test process,
    # hundreds of MiB late in a suite) into a child's ru_maxrss across fork and exec.
    measure = (
        "import sys\n"
        "from objstream.common.cli import main\n"
        "from objstream.jobs.runner import peak_rss_mib\n"
        "code = main(sys.argv[1:])\n"
        "print('maxrss', int(peak_rss_mib() * 1024), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    sent = subprocess.run(
        [sys.executable, "-c", measure, "producer", "send-file", "--site", "server",
         "--to", "site-1", "--window", "16", "--json", "-", "--name", "piped.bin"],
        env=_env(settings), stdin=writer.stdout, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    writer.stdout.close()
    assert writer.wait(timeout=30) == 0
    assert sent.returncode == EXIT_OK, sent.stderr
    outcome = json.loads(sent.stdout)
    assert outcome["ok"] is True
    assert outcome["name"] == "piped.bin"
    assert outcome["bytes"] == size
    assert outcome["sha256"] == expected.hexdigest()
    [record] = _records(listener)
    assert record["kind"] == PIPE_KIND
    assert record["sha256"] == expected.hexdigest()
    stored = tmp_path / "in" / "piped.bin"
    assert stored.stat().st_size == size
    maxrss_kib = int(sent.stderr.split("maxrss")[-1])
    assert maxrss_kib * 1024 < 90 * 1024 * 1024, f"sender peak RSS {maxrss_kib} KiB"


def test_standard_input_with_other_files_and_empty_input(
    tmp_path: Path, settings: Settings, listen: Listen
) -> None:
    (tmp_path / "a.txt").write_bytes(b"a file")
    listener = listen(tmp_path / "in", "--count", "2")
    with open(os.devnull, "rb") as empty:
        sent = _send(
            settings, str(tmp_path / "a.txt"), "-", "--name", "empty.out", stdin=empty.fileno()
        )
    assert sent.returncode == EXIT_OK, sent.stderr
    assert [line.split(" to ")[0] for line in sent.stdout.splitlines()] == [
        f"sent file {tmp_path / 'a.txt'}",
        "sent standard input as empty.out",
    ]
    _records(listener)
    assert _tree(tmp_path / "in") == {"a.txt": b"a file", "empty.out": b""}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-"], "sending standard input (-) needs --name NAME"),
        (["-", "-", "--name", "x"], "standard input (-) can be sent only once"),
        (["a.txt", "--name", "x"], "--name names standard input: give it with - as a PATH"),
        ([], "the following arguments are required: PATH"),
        (["-", "--name", "n" * 1025], "object name of 1025 characters (at most 1024)"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2_before_connecting(
    tmp_path: Path, args: list[str], message: str
) -> None:
    env = dict(os.environ, OBJSTREAM_URL="amqp://guest:guest@127.0.0.1:1/%2F")  # nothing there
    sent = subprocess.run(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1", *args],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert sent.returncode == EXIT_USAGE, sent.stderr
    [line] = sent.stderr.splitlines()  # argparse's errors too: one line
    assert line.startswith(f"objstream: error: {message}")


HOSTILE_PATHS = [
    "../../escaped.txt",
    "/tmp/absolute.txt",
    "a/../../escaped.txt",
    "a//b.txt",
    "./a.txt",
    "C:/windows.txt",
    "a\\..\\..\\escaped.txt",
    "/".join(["d"] * 65) + "/deep.txt",
]


def test_hostile_relative_paths_from_a_raw_peer_are_refused_and_nothing_escapes(
    tmp_path: Path, settings: Settings, listen: Listen, raw_peer: Callable[[str], RawPeer]
) -> None:
    dest = tmp_path / "box" / "in"
    listener = listen(dest, "--count", str(len(HOSTILE_PATHS)))
    for name in HOSTILE_PATHS:
        peer = raw_peer("site-1")
        peer.offer(name, 5, 1024, info={TREE_INFO_KEY: True})
        verdict = peer.verdict()
        assert verdict["ok"] is False, name
        assert verdict["code"] == "protocol", (name, verdict)
        assert f"path {name[:80]!r}" in verdict["detail"], verdict
    records = _records(listener, EXIT_FAILED)
    assert [r["ok"] for r in records] == [False] * len(HOSTILE_PATHS)
    assert _tree(tmp_path) == {}  # nothing stored, in the destination or anywhere near
    assert not Path("/tmp/absolute.txt").exists()


def test_odd_components_are_confined_and_a_planted_symlink_is_never_followed(
    tmp_path: Path, settings: Settings, listen: Listen, raw_peer: Callable[[str], RawPeer]
) -> None:
    dest = tmp_path / "in"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "planted").symlink_to(outside)  # someone made DEST/planted lead elsewhere
    listener = listen(dest, "--count", "2")

    odd = raw_peer("site-1")  # control characters and leading dots go, as in base names
    odd.offer("...hidden/sub\x1b[31m/x.txt", 5, 1024, info={TREE_INFO_KEY: True})
    odd.chunk(0, b"hello")
    odd.end(1, 5, hashlib.sha256(b"hello").hexdigest())
    verdict = odd.verdict()
    assert verdict["ok"] is True, verdict
    assert verdict["stored_as"] == "hidden/sub[31m/x.txt"
    assert (dest / "hidden" / "sub[31m" / "x.txt").read_bytes() == b"hello"

    planted = raw_peer("site-1")
    planted.offer("planted/x.txt", 5, 1024, info={TREE_INFO_KEY: True})
    planted.chunk(0, b"evil!")
    planted.end(1, 5, hashlib.sha256(b"evil!").hexdigest())
    verdict = planted.verdict()
    assert verdict["ok"] is False
    assert verdict["code"] == "io"
    assert "is not a directory (a symlink or a file)" in verdict["detail"]
    _records(listener, EXIT_FAILED)
    assert list(outside.iterdir()) == []
    assert not any(p.name.startswith(".objstream-") for p in dest.iterdir())


def test_a_pipe_stream_is_held_to_the_receivers_size_limit(
    tmp_path: Path, settings: Settings, listen: Listen, raw_peer: Callable[[str], RawPeer]
) -> None:
    dest = tmp_path / "in"
    listener = listen(dest, "--count", "1", env=_env(settings, OBJSTREAM_MAX_OBJECT_SIZE="4000"))
    peer = raw_peer("site-1")
    peer.offer("endless", None, 1024, kind=PIPE_KIND)  # a pipe tells no size
    for seq in range(5):
        peer.chunk(seq, bytes(1024))
    verdict = peer.verdict()
    assert verdict["ok"] is False
    assert verdict["code"] == "too_large"
    _records(listener, EXIT_FAILED)
    assert _tree(dest) == {}
    assert not any(dest.iterdir())


def test_standard_input_that_thinks_before_it_writes_is_offered_only_once_it_does(
    tmp_path: Path, settings: Settings, listen: Listen
) -> None:
    # The listener lets go of a stream whose sender sends nothing 2 s after the offer; the
    # writer says nothing for 7 s (the sender starts within that).
    listener = listen(
        tmp_path / "in", "--count", "1", env=_env(settings, OBJSTREAM_CONTACT_TIMEOUT="2")
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; time.sleep(7); sys.stdout.write('late')"],
        stdout=subprocess.PIPE,
    )
    assert writer.stdout is not None
    sent = _send(settings, "-", "--name", "late.txt", stdin=writer.stdout.fileno())
    writer.stdout.close()
    writer.wait(timeout=30)
    assert sent.returncode == EXIT_OK, sent.stderr
    _records(listener)
    assert _tree(tmp_path / "in") == {"late.txt": b"late"}


def test_sigterm_while_standard_input_is_silent_stops_at_once_with_143(
    tmp_path: Path, settings: Settings, listen: Listen
) -> None:
    listener = listen(tmp_path / "in")
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdout.write('x' * 5000); "
         "sys.stdout.flush(); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert writer.stdout is not None
    command = ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1"]
    sender = subprocess.Popen(
        [*command, "--json", "-", "--name", "never.txt"],
        env=_env(settings), stdin=writer.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    writer.stdout.close()
    try:
        time.sleep(3)  # the offer is out, the first 5000 bytes sent; then nothing comes
        sent_at = time.monotonic()
        sender.send_signal(signal.SIGTERM)
        out, err = sender.communicate(timeout=20)
        assert time.monotonic() - sent_at < 5
    finally:
        writer.kill()
        writer.wait()
    assert sender.returncode == 143, err
    assert json.loads(out)["ok"] is False
    time.sleep(2)  # the abort reaches the listener
    listener.terminate()
    records = _records(listener)
    assert [(r["ok"], r["code"]) for r in records] == [(False, "aborted")]
    assert "was interrupted" in str(records[0]["detail"])
    assert _tree(tmp_path / "in") == {}


def test_no_broker_is_one_line_exit_3_and_with_json_an_object_per_file(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(b"x")
    env = dict(os.environ, OBJSTREAM_URL="amqp://guest:guest@127.0.0.1:1/%2F")  # nothing there
    sent = subprocess.run(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1", "--json",
         str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sent.returncode == EXIT_BROKER
    [line] = sent.stderr.splitlines()
    assert line.startswith("objstream: error: broker unreachable at amqp://guest:***@127.0.0.1:1")
    outcomes = [json.loads(line) for line in sent.stdout.splitlines()]
    assert [(o["name"], o["ok"]) for o in outcomes] == [
        (str(tmp_path / "a.txt"), False),
        (str(tmp_path / "b.txt"), False),
    ]


def test_ctrl_c_stops_the_list_where_it_is_and_exits_130(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(b"x")
    # Nobody listens: the first file waits for its offer to be taken.
    command = ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1"]
    sender = subprocess.Popen(
        [*command, "--json", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(3)
    sender.send_signal(signal.SIGINT)
    out, err = sender.communicate(timeout=30)
    assert sender.returncode == 130, err
    [outcome] = [json.loads(line) for line in out.splitlines()]  # b.txt never started
    assert outcome["name"] == str(tmp_path / "a.txt")
    assert outcome["ok"] is False
    assert outcome["error"] == "interrupted"
    assert err.splitlines()[-1] == "objstream: interrupted"


def test_a_listener_killed_mid_file_of_a_tree_is_taken_over_into_the_tree(
    tmp_path: Path, settings: Settings, listen: Listen, raw_peer: Callable[[str], RawPeer]
) -> None:
    dest = tmp_path / "in"
    chunks = [os.urandom(1024) for _ in range(3)]
    first = listen(dest)
    peer = raw_peer("site-1")
    peer.offer("t/sub/x.bin", 3 * 1024, 1024, info={TREE_INFO_KEY: True})
    peer.chunk(0, chunks[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # chunk 0 is written (and recorded) once reported
        _, headers = peer.replies("progress")[-1]
        if headers["stored"] >= 1:
            break
    first.kill()
    first.wait()
    second = listen(dest, "--count", "1")
    for seq in (1, 2):
        peer.chunk(seq, chunks[seq])
    peer.end(3, 3 * 1024, hashlib.sha256(b"".join(chunks)).hexdigest())
    verdict = peer.verdict()
    assert verdict["ok"] is True, verdict
    assert verdict["stored_as"] == "t/sub/x.bin"
    [record] = _records(second)
    assert record["resumed_bytes"] == 1024
    assert _tree(dest) == {"t/sub/x.bin": b"".join(chunks)}


def test_a_lone_directory_without_r_says_to_use_it(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    (tmp_path / "d").mkdir()
    sent = _send(settings, str(tmp_path / "d"))
    assert sent.returncode == EXIT_FAILED
    assert sent.stderr.splitlines() == [
        f"objstream: error: {tmp_path / 'd'}: is a directory; send it with -r"
    ]
