"""A container received straight into the file it is saved as, without a broker: every format
comes out exact, a stream taken over at any chunk comes out the same, a container that cannot
be stored is refused at its offer, and a hostile stream leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from objstream.common.errors import ProtocolError, SaveError
from objstream.common.protocol import Offer
from objstream.common.safetensors_format import HEADER_META
from objstream.common.streaming import Piece
from objstream.consumer.container_sink import STRUCTURE_LIMIT, ContainerSink
from objstream.producer.container_source import ContainerSource
from tests.storing import CHUNK, offer_of, store

RNG = np.random.default_rng(11)

CONTAINERS: dict[str, Any] = {
    "m.npz": {
        "w": RNG.standard_normal((30, 40)).astype(np.float32),
        "big_endian": np.arange(1700, dtype=">i8"),
        "fortran": np.asfortranarray(RNG.integers(0, 9, (50, 7))),
        "scalar": 3.5,
        "numbers": list(range(400)),
        "empty": np.zeros((0, 3), np.float16),
    },
    "t.safetensors": {
        "__metadata__": {"format": "pt"},
        "w": RNG.standard_normal((100, 33)).astype(ml_dtypes.bfloat16),
        "big_endian": np.arange(3333, dtype=">f4"),
        "complex_big_endian": (np.arange(1000) * (1 + 2j)).astype(">c8"),
        "f8": np.arange(77, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
    },
    "j.json": {"text": "hello" * 300, "nested": [1, 2, {"z": None}], "flag": True},
    "ckpt/": {
        "model.safetensors/__metadata__": {"format": "pt"},
        "model.safetensors/x": np.arange(1000, dtype=np.float32),
        "model.safetensors/y": np.arange(10, dtype=np.int8),
        "config.json": b'{"hidden": 8}' * 300,
    },
}


def _check(name: str, container: Any, path: Path) -> None:
    """``path`` holds ``container`` exactly, in the format ``name`` says."""
    if name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as saved:
            assert saved.files == list(container)
            for key, value in container.items():
                assert saved[key].dtype == np.asarray(value).dtype, key
                assert np.array_equal(saved[key], np.asarray(value)), key
    elif name.endswith(".json"):
        assert json.loads(path.read_text()) == container
    elif name.endswith(".safetensors"):
        _check_safetensors(path, container)
    else:
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
        assert (path / "config.json").read_bytes() == container["config.json"]
        tensors = load_file(str(path / "model.safetensors"))
        assert np.array_equal(tensors["x"], container["model.safetensors/x"])
        assert np.array_equal(tensors["y"], container["model.safetensors/y"])


def _check_safetensors(path: Path, container: dict[str, Any]) -> None:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    assert list(header) == list(container)  # the order, __metadata__ first
    assert header["__metadata__"] == container["__metadata__"]
    for key, value in container.items():
        if key == "__metadata__":
            continue
        begin, end = header[key]["data_offsets"]
        little = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        got = np.frombuffer(raw[8 + length + begin : 8 + length + end], little)
        assert got.reshape(header[key]["shape"]).tobytes() == value.astype(little).tobytes(), key


@pytest.mark.parametrize("name", list(CONTAINERS))
def test_every_format_comes_out_exact_and_alone(tmp_path: Path, name: str) -> None:
    open_before = len(os.listdir("/proc/self/fd"))
    stored = store(CONTAINERS[name], name, tmp_path)
    assert len(os.listdir("/proc/self/fd")) == open_before  # every file closed
    _check(name, CONTAINERS[name], stored.path)
    assert [p.name for p in tmp_path.iterdir()] == [name.rstrip("/")]  # no journal, no partial
    assert stored.value is None


@pytest.mark.parametrize("name", ["m.npz", "t.safetensors"])
def test_as_memmap_gives_the_arrays_mapped_from_the_stored_file(tmp_path: Path, name: str) -> None:
    container = CONTAINERS[name]
    stored = store(container, name, tmp_path, as_memmap=True)
    arrays = {k: v for k, v in container.items() if k != "__metadata__"}
    assert list(stored.value) == list(arrays)
    for key, value in arrays.items():
        mapped = stored.value[key]
        expected = np.asarray(value)
        assert np.array_equal(mapped, expected), key
        if expected.size:
            assert isinstance(mapped, np.memmap), key
            assert not mapped.flags.writeable
            assert Path(str(mapped.filename)) == stored.path


def test_a_list_comes_back_as_a_list_of_maps(tmp_path: Path) -> None:
    items: list[np.ndarray[Any, Any]] = [np.arange(5, dtype=np.int16), np.ones((2, 2))]
    stored = store(items, "l.npz", tmp_path, as_memmap=True)
    assert isinstance(stored.value, list)
    assert [np.asarray(a).tolist() for a in stored.value] == [i.tolist() for i in items]
    with np.load(stored.path) as saved:
        assert saved.files == ["arr_0", "arr_1"]


def test_a_file_from_the_safetensors_package_comes_out_byte_for_byte(tmp_path: Path) -> None:
    """The sender announces the header's length: tensors go to their final offsets and the
    header fills exactly its place, as the package writes it."""
    from safetensors.numpy import save_file

    src = tmp_path / "src.safetensors"
    save_file({"a": np.arange(99, dtype=np.float32), "b": np.ones((3, 7), np.int64)}, str(src))
    from objstream.producer.container_files import load_container

    stored = store(load_container(src), "m.safetensors", tmp_path / "out")
    assert stored.path.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("announced", [16, 24, 99_999_992, 4096, "x", -8, None])
def test_a_wrong_header_announcement_costs_a_move_not_the_file(
    tmp_path: Path, announced: Any
) -> None:
    container = CONTAINERS["t.safetensors"]
    source = ContainerSource(container, "t.safetensors")
    offer = offer_of(source, "t.safetensors")
    pieces = list(source.pieces())
    assert HEADER_META in (pieces[0].meta or {})
    meta = {**dict(pieces[0].meta or {}), HEADER_META: announced}
    sink = ContainerSink(tmp_path, offer)
    _feed(sink, [Piece(pieces[0].data, meta), *pieces[1:]])
    _check_safetensors(sink.finish().path, container)


def _feed(sink: ContainerSink, pieces: list[Piece], offset: int = 0) -> int:
    for piece in pieces:
        sink.take(offset, piece.data, piece.meta)
        offset += len(piece.data)
    return offset


@pytest.mark.parametrize("name", list(CONTAINERS))
def test_a_stream_taken_over_at_any_chunk_comes_out_the_same(tmp_path: Path, name: str) -> None:
    """A receiver dies after chunk k was recorded (and two more were written, not recorded):
    the next one replays the journal, finds the prefix's SHA-256 from disk, and goes on."""
    container = CONTAINERS[name]
    source = ContainerSource(container, name)
    offer = offer_of(source, name, chunk=999)  # cuts items of every size
    pieces = list(source.pieces())
    stream = b"".join(p.data for p in pieces)
    for k in range(1, len(pieces)):
        dest = tmp_path / str(k)
        dest.mkdir()
        first = ContainerSink(dest, offer)
        stored_bytes = _feed(first, pieces[:k])
        _feed(first, pieces[k : k + 2], stored_bytes)
        first.suspend()
        second = ContainerSink(dest, offer, reopen=True, stored=k, stored_bytes=stored_bytes)
        sha = second.prefix_sha256().hexdigest()
        assert sha == hashlib.sha256(stream[:stored_bytes]).hexdigest(), k
        _feed(second, pieces[k:], stored_bytes)
        path = second.finish().path
        _check(name, container, path)
        assert [p.name for p in dest.iterdir()] == [name.rstrip("/")], k


def test_a_journal_that_does_not_match_the_state_is_not_resumed(tmp_path: Path) -> None:
    source = ContainerSource(CONTAINERS["m.npz"], "m.npz")
    offer = offer_of(source, "m.npz")
    pieces = list(source.pieces())
    first = ContainerSink(tmp_path, offer)
    stored_bytes = _feed(first, pieces[:5])
    first.suspend()
    with pytest.raises(ValueError, match="journal"):
        ContainerSink(tmp_path, offer, reopen=True, stored=9, stored_bytes=stored_bytes + 5000)
    journal = tmp_path / f".objstream-{offer.stream_id}.meta"
    journal.write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match="journal"):
        ContainerSink(tmp_path, offer, reopen=True, stored=5, stored_bytes=stored_bytes)


@pytest.mark.parametrize(
    ("container", "name", "words"),
    [
        ({"w": np.zeros(3, ml_dtypes.bfloat16)}, "m.npz", "bfloat16 cannot be saved as .npz"),
        ({"w": np.zeros(3)}, "m.json", "it holds arrays (<f8); name it .npz"),
        ({1, 2}, "s.npz", "a set is saved as .json"),
        ({"w": np.zeros(3), "a": "x", "b": 2}, "m.safetensors", "2 of its entries are not"),
        ({"w": np.zeros(3, "<c16")}, "m.safetensors", "<c16 has no safetensors equivalent"),
        ([np.zeros(3)], "d/", "a directory container is a dict, not a list"),
    ],
)
def test_a_container_that_cannot_be_stored_as_asked_is_refused_at_its_offer(
    tmp_path: Path, container: Any, name: str, words: str
) -> None:
    source = ContainerSource(container, name)
    offer = offer_of(source, name)
    with pytest.raises(SaveError) as refused:
        ContainerSink(tmp_path, offer)
    assert words in str(refused.value)
    assert "\n" not in str(refused.value)
    assert os.listdir(tmp_path) == []


def test_an_offer_of_a_dtype_unknown_here_is_refused(tmp_path: Path) -> None:
    offer = offer_of(ContainerSource({"w": np.zeros(3)}, "m.npz"), "m.npz")
    offer = offer.model_copy(update={"info": {**dict(offer.info or {}), "dtypes": "<V7,<f8"}})
    with pytest.raises(SaveError, match="dtype '<V7' is not allowed"):
        ContainerSink(tmp_path, offer)


def test_what_the_offer_does_not_say_is_checked_entry_by_entry(tmp_path: Path) -> None:
    """A peer that announces no dtypes (or lies) is stopped at the entry, not after it."""
    container = {"ok": np.zeros(3), "w": np.zeros(300_000, ml_dtypes.bfloat16)}
    source = ContainerSource(container, "m.npz")
    offer = offer_of(source, "m.npz")
    offer = offer.model_copy(update={"info": {"container": "dict", "entries": 2}})
    sink = ContainerSink(tmp_path, offer)
    with pytest.raises(SaveError, match=r"'w': bfloat16 cannot be saved as \.npz"):
        _feed(sink, list(source.pieces()))
    sink.discard()
    assert os.listdir(tmp_path) == []


def _finish(sink: ContainerSink, pieces: list[Piece]) -> None:
    _feed(sink, pieces)
    sink.finish()


def _hostile(pieces: list[Piece], how: str) -> list[Piece]:
    if how == "out of order":
        return [pieces[1], pieces[0], *pieces[2:]]
    if how == "part skipped":
        return [p for i, p in enumerate(pieces) if i != 1]
    if how == "entry repeated":
        return [pieces[0], *pieces]
    if how == "too many bytes":
        return [Piece(pieces[0].data + b"\0" * 5000, pieces[0].meta), *pieces[1:]]
    if how == "huge head":
        return [Piece(b"x", {"entry": 0, "head": STRUCTURE_LIMIT + 1, "size": 2**40})]
    if how == "bad head":
        return [Piece(b"x", {"entry": 0, "head": 0, "size": 5})]
    if how == "garbage structure":
        return [Piece(b"\xc1" * 10, {"entry": 0, "head": 10, "size": 10})]
    if how == "payload mismatch":
        return [Piece(pieces[0].data, {**dict(pieces[0].meta or {}), "size": 99999})]
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "error", "words"),
    [
        ("out of order", ProtocolError, "unexpected piece"),
        ("part skipped", ProtocolError, "unexpected piece"),
        ("entry repeated", ProtocolError, "starts before entry 0 ends"),
        ("too many bytes", ProtocolError, "bytes > announced"),
        ("huge head", SaveError, "more than the 16777216 a stored container takes"),
        ("bad head", ProtocolError, "bad head"),
        ("garbage structure", ProtocolError, "malformed value structure"),
        ("payload mismatch", ProtocolError, "payload bytes, the entry carries"),
    ],
)
def test_a_hostile_stream_fails_and_leaves_nothing(
    tmp_path: Path, how: str, error: type[Exception], words: str
) -> None:
    container = {"w": RNG.standard_normal(3000).astype(np.float32), "b": np.arange(5)}
    source = ContainerSource(container, "m.npz")
    offer = offer_of(source, "m.npz")
    sink = ContainerSink(tmp_path, offer)
    with pytest.raises(error, match=words):
        _finish(sink, _hostile(list(source.pieces()), how))
    sink.discard()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([["w", np.zeros(2)], ["w", np.ones(2)]], "entry 'w' comes twice"),
        ([[1, np.zeros(2)], ["1", np.ones(2)]], "comes twice"),
        ([np.zeros(2)], r"not a \(str or int key, value\) pair"),
    ],
)
def test_entries_a_dict_cannot_hold_are_refused(
    tmp_path: Path, entries: list[Any], words: str
) -> None:
    """A peer's own encoding of a dict: keys repeated (or the same once made str), an entry
    that is no pair."""
    source = ContainerSource(entries, "m.npz")  # a list's entries, sent as a dict's
    offer = offer_of(source, "m.npz")
    offer = offer.model_copy(update={"info": {"container": "dict", "entries": len(entries)}})
    sink = ContainerSink(tmp_path, offer)
    with pytest.raises((SaveError, ProtocolError), match=words):
        _feed(sink, list(source.pieces()))
    sink.discard()
    assert os.listdir(tmp_path) == []


def test_a_destination_without_room_refuses_the_offer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import objstream.consumer.container_sink as sink_module

    monkeypatch.setattr(sink_module, "free_bytes", lambda _: 10)
    offer = offer_of(ContainerSource({"w": np.zeros(300)}, "m.npz"), "m.npz")
    with pytest.raises(OSError, match="do not fit"):
        ContainerSink(tmp_path, offer)
    assert os.listdir(tmp_path) == []


def test_chunk_size_does_not_change_the_file(tmp_path: Path) -> None:
    container = CONTAINERS["t.safetensors"]
    paths = [
        store(container, "t.safetensors", tmp_path / str(chunk), chunk=chunk).path
        for chunk in (CHUNK, 1 << 20, 7)
    ]
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()


def test_an_offer_without_container_facts_is_a_protocol_error(tmp_path: Path) -> None:
    offer = offer_of(ContainerSource({"w": 1}, "m.npz"), "m.npz")
    bad = Offer.model_validate({**offer.model_dump(), "info": {"container": "tuple"}})
    with pytest.raises(ProtocolError, match="container type 'tuple'"):
        ContainerSink(tmp_path, bad)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"as_memmap": True}, "as_memmap needs store_containers=True"),
        ({"store_as": "m.npz"}, "store_as needs store_containers=True"),
        ({"store_containers": True, "on_entry": print}, "on_entry takes the entries in memory"),
        ({"store_containers": True, "spool_containers": True}, "decodes the container into"),
        ({"store_containers": True, "as_torch": True}, "as_torch builds tensors in memory"),
    ],
)
def test_options_that_contradict_storing_are_refused_before_connecting(
    options: dict[str, Any], words: str
) -> None:
    from objstream.common.errors import ConfigError
    from objstream.consumer.options import ReceiverOptions, store_options

    with pytest.raises(ConfigError, match=words):
        store_options(ReceiverOptions(**options))  # type: ignore[typeddict-item]


def test_pieces_are_taken_inline_unless_they_complete_a_big_structure(tmp_path: Path) -> None:
    from objstream.consumer.container_assembler import INLINE_STRUCTURE

    source = ContainerSource({"w": np.zeros(3)}, "m.npz")
    sink = ContainerSink(tmp_path, offer_of(source, "m.npz"))
    [piece] = list(source.pieces())
    assert sink.inline(len(piece.data), piece.meta)
    big = {"entry": 0, "head": INLINE_STRUCTURE + 1, "size": INLINE_STRUCTURE + 10}
    assert not sink.inline(CHUNK, big)
    sink.discard()
