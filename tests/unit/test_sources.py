from __future__ import annotations

from pathlib import Path

import pytest

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


def test_a_file_that_shrinks_while_streaming_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    source = FileSource(path)
    source.prepare(4)
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(SourceChanged, match="shrank"):
        source.read_chunk(1)
    source.close()


def test_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a regular file"):
        FileSource(tmp_path)


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
