from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from objstream.common.errors import FailureCode
from objstream.common.streaming import Piece
from objstream.producer.pieces import SharedDigest
from objstream.producer.sources import FileSource, SourceChanged


@pytest.mark.parametrize(("size", "count"), [(0, 0), (1, 1), (4, 1), (5, 2), (12, 3)])
def test_chunks_cover_the_file_exactly(tmp_path: Path, size: int, count: int) -> None:
    path = tmp_path / "f"
    data = bytes(range(size))
    path.write_bytes(data)
    source = FileSource(path)
    source.prepare(4)
    assert source.chunk_count == count
    assert source.size == size
    assert source.name == "f"
    assert b"".join(source.read_chunk(s) for s in range(count)) == data
    assert source.read_chunk(count - 1) == data[(count - 1) * 4 :] if count else True
    source.close()


def _file(tmp_path: Path, size: int = 12) -> Path:
    """A file written a while ago, as files that are sent usually are (a write in the same
    clock tick as the file's last change would not move its mtime on a coarse-grained file
    system; with multigrain timestamps, Linux 6.13+, it would)."""
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(i % 251 for i in range(size)))
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(an_hour_ago, an_hour_ago))
    return path


def _opened(path: Path, chunk_size: int = 4) -> FileSource:
    source = FileSource(path)
    source.prepare(chunk_size)
    return source


def test_a_file_that_shrinks_while_streaming_is_caught(tmp_path: Path) -> None:
    path = _file(tmp_path, 10)
    source = _opened(path)
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(SourceChanged, match=r"x\.bin changed while it was being sent: mtime .*, "
                       r"size 10 -> 5$") as caught:  # fmt: skip
        source.read_chunk(1)
    assert caught.value.code == FailureCode.SOURCE_CHANGED
    assert caught.value.path == path
    source.close()


def test_an_overwrite_in_place_of_the_same_size_is_caught_at_the_next_read(
    tmp_path: Path,
) -> None:
    """The classic ``dd conv=notrunc``: the size stays, the bytes change under the sender."""
    path = _file(tmp_path)
    source = _opened(path)
    assert source.read_chunk(0) == bytes(range(4))
    with open(path, "r+b") as f:
        f.seek(6)
        f.write(b"XY")
    assert path.stat().st_size == 12
    with pytest.raises(SourceChanged, match=r"changed while it was being sent: mtime \S+Z -> "
                       r"\S+Z$"):  # fmt: skip
        source.read_chunk(1)
    with pytest.raises(SourceChanged):  # and every read after, resends included
        source.read_chunk(0)
    with pytest.raises(SourceChanged):
        source.check_unchanged()
    source.close()


def test_an_overwrite_with_its_mtime_put_back_is_caught_by_the_ctime(tmp_path: Path) -> None:
    """``rsync --inplace --times`` and friends restore the mtime; the ctime they cannot."""
    path = _file(tmp_path)
    before = path.stat()
    source = _opened(path)
    with open(path, "r+b") as f:
        f.write(b"Z")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(SourceChanged, match=r"changed while it was being sent: ctime \S+ -> "):
        source.read_chunk(0)
    source.close()


def test_a_file_that_grows_is_caught(tmp_path: Path) -> None:
    path = _file(tmp_path)
    source = _opened(path)
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(SourceChanged, match=r"size 12 -> 16"):
        source.read_chunk(0)
    source.close()


def test_a_file_replaced_by_rename_is_caught(tmp_path: Path) -> None:
    """A new version written aside and renamed over the old one: the open file's bytes are
    unchanged, but the path now names another file."""
    path = _file(tmp_path)
    source = _opened(path)
    assert source.read_chunk(0) == bytes(range(4))
    new = tmp_path / "x.bin.new"
    new.write_bytes(bytes(range(12)))  # even the same bytes
    os.replace(new, path)
    with pytest.raises(SourceChanged, match=r"changed while it was being sent: replaced \(inode "
                       r"\d+ on device \d+ -> inode \d+ on device \d+\)"):  # fmt: skip
        source.read_chunk(1)
    source.close()


def test_a_removed_file_is_caught(tmp_path: Path) -> None:
    path = _file(tmp_path)
    source = _opened(path)
    path.unlink()
    with pytest.raises(SourceChanged, match=r"changed while it was being sent: removed or "):
        source.read_chunk(0)
    source.close()


def test_a_change_after_the_last_read_is_caught_by_check_unchanged(tmp_path: Path) -> None:
    path = _file(tmp_path)
    source = _opened(path)
    data = b"".join(source.read_chunk(seq) for seq in range(3))
    assert data == bytes(range(12))
    with open(path, "r+b") as f:
        f.write(b"!")
    with pytest.raises(SourceChanged, match="mtime"):
        source.check_unchanged()
    source.close()


def test_an_unchanged_file_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, 4096 + 1)
    source = _opened(path, 64)
    monkeypatch.chdir(tmp_path.parent)  # a relative path would name another file now
    for _ in range(2):  # resends read again
        data = b"".join(source.read_chunk(seq) for seq in range(source.chunk_count or 0))
        assert data == path.read_bytes()
        source.check_unchanged()
    os.link(path, tmp_path / "another name")  # a hard link changes the ctime: not the bytes
    with pytest.raises(SourceChanged, match="ctime"):
        source.check_unchanged()
    source.close()


def test_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a regular file"):
        FileSource(tmp_path)


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: a send of one hung for ever."""
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            FileSource(fifo)
        except BaseException as e:
            errors.append(e)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(5)
    if opener.is_alive():
        with open(fifo, "wb"):  # let the blocked open go, then fail the test
            pass
        pytest.fail("opening a FIFO blocked")
    [error] = errors
    assert "not a regular file" in str(error)


def test_shared_digest_hashes_each_chunk_once_whatever_the_resends() -> None:
    import hashlib

    chunks = [b"a", b"b", b"c"]
    digest = SharedDigest()
    # Two targets interleaved, one rewinding: each chunk still counted once, in order.
    for seq in [0, 0, 1, 0, 1, 2, 1, 2, 2]:
        digest.feed(seq, chunks[seq])
    assert digest.hashed == 3
    assert digest.hexdigest() == hashlib.sha256(b"abc").hexdigest()


def test_a_container_is_encoded_once_however_often_it_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from objstream.common import codec
    from objstream.producer import container_source

    calls: list[str] = []
    real = codec.encode

    def counting(value: object, where: str = "") -> codec.Encoded:
        calls.append(where)
        return real(value, where=where)

    monkeypatch.setattr(container_source, "encode", counting)
    source = container_source.ContainerSource({"a": b"x" * 100, "b": [1, 2]}, "m")
    source.prepare(64)
    assert len(calls) == 2
    whole = b"".join(source.piece(s).data for s in range(source.chunk_count or 0))
    twins = [source.reuse() for _ in range(3)]
    twins[0].prepare(16)  # another chunk size: cut again, not encoded again
    assert len(calls) == 2
    assert twins[0].chunk_count != source.chunk_count
    for twin in twins:
        assert b"".join(twin.piece(s).data for s in range(twin.chunk_count or 0)) == whole


def test_the_resume_prefix_is_hashed_while_the_connection_keeps_working(tmp_path: Path) -> None:
    """The prefix hash runs on a worker thread; meanwhile the connection processes events
    (heartbeats) instead of starving."""
    import hashlib
    import time

    from objstream.producer.pieces import PieceReader
    from objstream.producer.sender import Resume, StreamSender

    data = bytes(range(256)) * 64
    path = tmp_path / "f"
    path.write_bytes(data)

    class SlowFile(FileSource):
        def piece(self, seq: int) -> Piece:
            time.sleep(0.05)  # a slow disk
            return super().piece(seq)

    class Connection:
        events = 0

        def process_events(self, time_limit: float) -> None:
            self.events += 1
            time.sleep(time_limit)

    source = SlowFile(path)
    source.prepare(1024)
    sender = StreamSender.__new__(StreamSender)
    connection = Connection()
    sender._connection = connection  # type: ignore[assignment]
    reader = PieceReader(source)
    prefix = hashlib.sha256(data[: 8 * 1024]).hexdigest()
    assert sender._resume_point(reader, Resume(8, prefix)) == 8
    assert connection.events >= 3  # 8 reads of 50 ms: the connection was served meanwhile
    assert reader.digest.hashed == 8
    assert sender._resume_point(PieceReader(source), Resume(8, "0" * 64)) == 0  # changed: whole
    source.close()
