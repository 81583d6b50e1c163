"""``objstream consumer partials``: what interrupted transfers left, listed and cleaned.

The state files are made by the receiver's own code (:class:`StreamState`); a "running
receiver" is a state this process still holds open and locked (``flock`` locks belong to an
open file, so a second open in the same process is refused as another process would be).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from objstream.common.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from objstream.common.naming import partial_name
from objstream.common.protocol import Offer, new_stream_id
from objstream.consumer.partials import ORPHAN_GRACE, PartialsDir, Status
from objstream.consumer.partials_cli import duration_arg
from objstream.consumer.resume import StreamState, find_resumable, state_path


def _offer(name: str = "f.bin", size: int = 10, chunk_size: int = 4) -> Offer:
    return Offer(stream_id=new_stream_id(), kind="file", name=name, size=size,
                 chunk_size=chunk_size, chunk_count=-(-size // chunk_size), window=4,
                 sender="server", target="site-1")  # fmt: skip


def _left(dest: Path, name: str = "f.bin", *, ended: bool = False, held: bool = False) -> Offer:
    """A stream of 10 bytes with 8 stored, as a receiver leaves it (``held``: still running)."""
    offer = _offer(name)
    (dest / partial_name(offer.stream_id)).write_bytes(b"abcdefgh")
    state = StreamState.create(dest, offer, "reply:server:" + "a" * 32)
    state.save(2, 8, ended=ended)
    if not held:
        os.close(state._fd)  # the receiver died: its lock went with it
    else:
        _HELD.append(state)
    return offer


_HELD: list[StreamState] = []


@pytest.fixture(autouse=True)
def _release_held() -> object:
    yield
    while _HELD:
        _HELD.pop().release()


def _age(dest: Path, offer: Offer, seconds: float) -> None:
    then = time.time() - seconds
    for path in dest.glob(f".objstream-{offer.stream_id}.*"):
        os.utime(path, (then, then), follow_symlinks=False)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["consumer", "partials", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _json(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_each_status_is_listed_with_its_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resumable = _left(tmp_path, "resumable.bin")
    kept = _left(tmp_path, "kept.bin", ended=True)
    held = _left(tmp_path, "held.bin", held=True)
    orphan = new_stream_id()
    (tmp_path / partial_name(orphan)).write_bytes(b"xyz")
    (tmp_path / "done.bin").write_bytes(b"a finished file is none of its business")
    code, out, err = _run(capsys, "--dest", str(tmp_path), "--json")
    assert (code, err) == (EXIT_OK, "")
    got = {row["stream_id"]: row for row in _json(out)}
    assert {sid: row["status"] for sid, row in got.items()} == {
        resumable.stream_id: "resumable",
        kept.stream_id: "kept",
        held.stream_id: "held",
        orphan: "orphan",
    }
    row = got[resumable.stream_id]
    assert (row["name"], row["sender"], row["stored_bytes"], row["total_bytes"]) == (
        "resumable.bin",
        "server",
        8,
        10,
    )
    assert got[orphan]["stored_bytes"] is None
    assert got[orphan]["disk_bytes"] == 3
    assert got[held.stream_id]["name"] == "held.bin"

    code, out, _ = _run(capsys, "--dest", str(tmp_path))
    lines = out.splitlines()
    assert lines[0].split() == ["STATUS", "AGE", "STORED", "/", "TOTAL", "SENDER", "NAME"]
    assert any(line.startswith("resumable") and "8 B / 10 B" in line for line in lines)
    assert lines[-1].startswith("4 partial objects, 1.1 KiB on disk")  # state files count
    assert lines[-1].endswith(", 1 held by a running receiver")
    # Listing took no lock for good: the next receiver still takes the dead one's stream over.
    live, ended = find_resumable(tmp_path)
    assert [i.offer.stream_id for i in live] == [resumable.stream_id]
    assert [i.offer.stream_id for i in ended] == [kept.stream_id]
    for item in live:
        item.state.release()


def test_clean_deletes_all_but_what_a_running_receiver_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resumable = _left(tmp_path, "resumable.bin")
    kept = _left(tmp_path, "kept.bin", ended=True)
    held = _left(tmp_path, "held.bin", held=True)
    orphan = new_stream_id()
    (tmp_path / partial_name(orphan)).write_bytes(b"xyz")
    os.utime(tmp_path / partial_name(orphan), (1, 1))
    (tmp_path / "done.bin").write_bytes(b"kept")
    code, out, err = _run(capsys, "--dest", str(tmp_path), "--clean")
    assert code == EXIT_FAILED
    assert err.count("\n") == 1
    assert err.startswith("objstream: error: 1 partial object left")
    assert "held.bin" in err
    assert out.count("deleted ") == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        ["done.bin", partial_name(held.stream_id), state_path(tmp_path, held.stream_id).name]
    )
    del resumable, kept
    _HELD.pop().release()  # the receiver stops, leaving the stream for a successor
    code, out, err = _run(capsys, "--dest", str(tmp_path), "--clean")
    assert (code, err) == (EXIT_OK, "")
    assert [p.name for p in tmp_path.iterdir()] == ["done.bin"]
    code, out, _ = _run(capsys, "--dest", str(tmp_path), "--clean")
    assert (code, out) == (EXIT_OK, f"nothing to clean in {tmp_path}\n")


def test_older_than_spares_recent_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _left(tmp_path, "old.bin")
    new = _left(tmp_path, "new.bin")
    _age(tmp_path, old, 3 * 86400)
    _age(tmp_path, new, 3600)
    code, out, _ = _run(capsys, "--dest", str(tmp_path), "--older-than", "2d", "--json")
    assert [row["name"] for row in _json(out)] == ["old.bin"]
    code, out, _ = _run(capsys, "--dest", str(tmp_path), "--clean", "--older-than", "2d")
    assert code == EXIT_OK
    assert "old.bin" in out
    assert "new.bin" not in out
    assert {p.name for p in tmp_path.iterdir()} == {
        partial_name(new.stream_id),
        state_path(tmp_path, new.stream_id).name,
    }


def test_a_young_orphan_may_be_a_receiver_setting_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A receiver creates the partial file a moment before its state file: a partial file
    without one is only removed once it is older than that moment could be."""
    orphan = new_stream_id()
    (tmp_path / partial_name(orphan)).write_bytes(b"xyz")
    code, _, err = _run(capsys, "--dest", str(tmp_path), "--clean")
    assert code == EXIT_FAILED
    assert "1 partial object left" in err
    assert (tmp_path / partial_name(orphan)).exists()
    then = time.time() - ORPHAN_GRACE - 1
    os.utime(tmp_path / partial_name(orphan), (then, then))
    code, _, _ = _run(capsys, "--dest", str(tmp_path), "--clean")
    assert code == EXIT_OK
    assert not list(tmp_path.iterdir())


def test_symlinks_are_removed_never_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hostile names in the directory: a partial file, a state file and a file inside a
    partial directory that are symlinks to files outside. Only the links go."""
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious"
    precious.write_text("keep me")
    dest = tmp_path / "in"
    dest.mkdir()
    a, b, c, d = new_stream_id(), new_stream_id(), new_stream_id(), new_stream_id()
    (dest / partial_name(a)).symlink_to(precious)
    (dest / partial_name(d)).symlink_to(outside, target_is_directory=True)
    (dest / f".objstream-{b}.state").symlink_to(precious)
    (dest / partial_name(c)).mkdir()
    (dest / partial_name(c) / "x").symlink_to(precious)
    (dest / partial_name(c) / "sub").symlink_to(outside, target_is_directory=True)
    (dest / ".objstream-nothex.part").write_text("not a name of ours")
    (dest / ".objstream-nothex.part.state").write_text("nor this")
    for path in dest.iterdir():
        os.utime(path, (1, 1), follow_symlinks=False)
    code, out, _ = _run(capsys, "--dest", str(dest), "--json")
    rows = {row["stream_id"]: row for row in _json(out)}
    assert rows[b]["status"] == "orphan"
    assert "symlink" in str(rows[b]["problem"])
    assert set(rows) == {a, b, c, d}
    code, out, err = _run(capsys, "--dest", str(dest), "--clean")
    assert (code, err) == (EXIT_OK, "")
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert sorted(p.name for p in dest.iterdir()) == [
        ".objstream-nothex.part",
        ".objstream-nothex.part.state",
    ]


def test_a_garbled_state_makes_an_orphan(tmp_path: Path) -> None:
    sid = new_stream_id()
    (tmp_path / partial_name(sid)).write_bytes(b"ab")
    state_path(tmp_path, sid).write_text("not json\n1 2\n")
    with PartialsDir(tmp_path) as directory:
        [found] = directory.scan()
    assert found.status is Status.ORPHAN
    assert found.problem
    assert "state file" in found.problem


def test_a_name_with_a_newline_stays_on_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _left(tmp_path, "two\nlines.bin")
    _, out, _ = _run(capsys, "--dest", str(tmp_path))
    assert len(out.splitlines()) == 3
    assert '"two\\nlines.bin"' in out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--dest", "missing"], "no such directory"),
        (["--dest", "file"], "is not a directory"),
    ],
)
def test_a_bad_directory_is_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    says: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    code, out, err = _run(capsys, *args, "--clean")
    assert (code, out) == (EXIT_USAGE, "")
    assert err.count("\n") == 1
    assert says in err


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("1.5m", 90), ("12h", 43200), ("7d", 604800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert duration_arg(text) == seconds
