from __future__ import annotations

from pathlib import Path

import pytest

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
