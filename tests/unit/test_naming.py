from __future__ import annotations

from pathlib import Path

import pytest

from objstream.common.naming import FALLBACK_NAME, candidate_names, confined, safe_basename


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
    ],
)
def test_safe_basename(name: str, expected: str) -> None:
    assert safe_basename(name) == expected


def test_very_long_names_are_cut() -> None:
    assert len(safe_basename("x" * 5000 + ".bin").encode()) <= 255


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
