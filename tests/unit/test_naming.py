from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from objstream.common.naming import (
    FALLBACK_NAME,
    MAX_BASE_BYTES,
    NAME_MAX,
    NameTooLong,
    candidate_names,
    confined,
    cut_utf8,
    fit_name,
    safe_basename,
)
from objstream.consumer.output_formats import final_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.npz", "model.npz"),
        ("../x", "x"),
        ("../../etc/passwd", "passwd"),
        ("/etc/passwd", "passwd"),
        ("a/b", "b"),
        ("a\\b\\c.txt", "c.txt"),
        ("x\x00y", "xy"),
        ("line\nbreak\r\t.bin", "linebreak.bin"),
        ("\u202etxt.exe", "txt.exe"),
        (".", FALLBACK_NAME),
        ("..", FALLBACK_NAME),
        ("...", FALLBACK_NAME),
        ("dir/", FALLBACK_NAME),
        ("", FALLBACK_NAME),
        (".bashrc", "bashrc"),
        (" spaced ", "spaced"),
        ("crème brûlée.txt", "crème brûlée.txt"),
        ("a:b*?.txt", "ab.txt"),
        ("*" * 300 + "model.bin", "model.bin"),  # removed before the cut, not after
        ("CON.txt", "CON_.txt"),
        ("name. . .", "name"),
    ],
)
def test_safe_basename(name: str, expected: str) -> None:
    assert safe_basename(name) == expected


def test_very_long_names_are_cut_keeping_the_extension() -> None:
    assert safe_basename("x" * 5000 + ".bin") == "x" * (MAX_BASE_BYTES - 4) + ".bin"


def test_names_are_cut_by_utf8_bytes_not_characters(tmp_path: Path) -> None:
    """200 characters of CJK are 600 bytes: more than a file system takes in a name."""
    name = "模" * 250 + ".safetensors"
    base = safe_basename(name)
    assert len(base.encode()) <= MAX_BASE_BYTES
    assert base == "模" * ((MAX_BASE_BYTES - len(".safetensors")) // 3) + ".safetensors"
    for candidate in (base, candidate_names(base)[1], candidate_names(base)[-1]):
        path = confined(tmp_path, candidate)
        path.write_bytes(b"")  # the file system takes it
        assert path.name == candidate


def test_a_long_non_latin_name_is_committed_and_its_collisions_too(tmp_path: Path) -> None:
    """What a receiver does with a pushed file's name: sanitize, then link to a free name."""
    from objstream.consumer.file_sink import PartialFile

    name = "重みファイル" * 40 + ".safetensors"  # 240 characters, 732 bytes
    finals = []
    for sid in ("0" * 32, "1" * 32):
        sink = PartialFile(tmp_path, sid, 1)
        sink.write(0, b"x")
        finals.append(sink.commit(safe_basename(name)))
    assert [f.suffix for f in finals] == [".safetensors", ".safetensors"]
    assert finals[1].stem.endswith("-1")
    assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in finals)


@pytest.mark.parametrize(
    ("text", "limit", "cut"),
    [("abc", 3, "abc"), ("abc", 2, "ab"), ("aé", 2, "a"), ("aé", 3, "aé"), ("€€", 5, "€"),
     ("\U0001d518x", 3, ""), ("", 0, "")],
)  # fmt: skip
def test_cut_utf8_never_splits_a_character(text: str, limit: int, cut: str) -> None:
    assert cut_utf8(text, limit) == cut


@pytest.mark.parametrize(
    ("name", "fitted"),
    [
        ("a" * 30 + ".safetensors", "a" * 8 + ".safetensors"),  # the stem gives way
        ("a" * 30, "a" * 20),
        ("a." + "b" * 30, "a." + "b" * 18),  # a 31-byte "extension" is just name
        ("short.bin", "short.bin"),
    ],
)
def test_fit_name_keeps_a_short_extension(name: str, fitted: str) -> None:
    assert fit_name(name, 20) == fitted


def test_collision_suffixes_fit_even_after_a_full_length_name() -> None:
    for base in ("x" * NAME_MAX, "é" * 127 + ".safetensors", "y" * 250 + ".npz"):
        names = candidate_names(base)
        assert all(len(n.encode()) <= NAME_MAX for n in names[1:])
        assert names[-1].endswith(f"-999{os.path.splitext(base)[1]}")
    assert candidate_names("a." + "b" * 30)[1] == "a." + "b" * 30 + "-1"


def test_a_name_too_long_for_the_file_system_is_refused_in_words(tmp_path: Path) -> None:
    name = "é" * 128  # 256 bytes
    with pytest.raises(NameTooLong, match="256 bytes, more than the 255") as caught:
        confined(tmp_path, name)
    assert caught.value.errno == errno.ENAMETOOLONG
    assert isinstance(caught.value, OSError)  # a receiver reports it as an io failure
    assert confined(tmp_path, "é" * 127).parent == tmp_path.resolve()


def test_a_file_system_with_a_smaller_limit_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pathconf", lambda path, what: 143)  # eCryptfs
    with pytest.raises(NameTooLong, match="more than the 143"):
        confined(tmp_path, "x" * 144)
    assert confined(tmp_path, "x" * 143).name == "x" * 143


@settings(max_examples=400, deadline=None)
@given(name=st.text() | st.text(st.characters(min_codepoint=0x80), min_size=60, max_size=400))
@example(name="模" * 200)
@example(name="\U0001d518" * 200 + ".safetensors")  # 4 bytes each
@example(name="é" * 300 + "." + "ü" * 30)
@example(name="../" * 100 + "\\x\x00y" * 50)
@example(name="\ud800" * 10 + "a")
def test_any_name_becomes_a_final_name_a_file_system_takes(name: str) -> None:
    """For any str a peer sends: every final name (the base, a collision's, a container's) is
    1..255 bytes of UTF-8, one component without NUL, and a file can be created under it."""
    # A directory container's final name ends in "/" (saved as a directory of that name).
    names = [safe_basename(name), final_name(name).removesuffix("/")]
    names += [c for base in names for c in (candidate_names(base)[1], candidate_names(base)[-1])]
    with tempfile.TemporaryDirectory() as where:  # not tmp_path: one per example
        dest = Path(where)
        for final in names:
            assert 0 < len(final.encode()) <= NAME_MAX
            assert not {"/", "\\", "\0"} & set(final)
            assert final not in {".", ".."}
            path = confined(dest, final)
            with open(path, "xb"):
                pass
            assert os.listdir(dest).count(final) == 1
            path.unlink()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..", ".", "a/b", "x\x00y", "\n"])
def test_sanitized_names_are_always_confined(tmp_path: Path, name: str) -> None:
    path = confined(tmp_path, safe_basename(name))
    assert path.parent == tmp_path.resolve()


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "."])
def test_confined_refuses_escapes(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="escapes"):
        confined(tmp_path, name)


def test_candidate_names_add_a_numeric_suffix() -> None:
    assert candidate_names("data.bin")[:3] == ["data.bin", "data-1.bin", "data-2.bin"]
    assert candidate_names("README")[:2] == ["README", "README-1"]
    assert candidate_names("a.tar.gz")[1] == "a.tar-1.gz"
