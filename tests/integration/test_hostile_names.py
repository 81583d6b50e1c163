"""Names stay names, end to end: what a peer names an object or a container's entries never
becomes a path the receiver did not choose, nor a name the file system refuses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from objstream.common.errors import FailureCode, SendFailed, TransferFailed
from objstream.common.settings import KiB, Settings
from objstream.producer import ContainerStreamer, FileStreamer
from objstream.producer.sources import FileSource
from tests.integration.conftest import BackgroundReceiver, Declared


def test_a_container_key_that_would_unzip_outside_fails_the_push_and_leaves_nothing(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    dest = tmp_path / "in"
    dest.mkdir()
    receiver = BackgroundReceiver("site-1", dest, settings, store_containers=True)
    hostile = {"w": np.arange(10), "../../etc/x": np.zeros(3)}
    try:
        with (
            ContainerStreamer("server", settings) as streamer,
            pytest.raises(SendFailed) as raised,
        ):
            streamer.stream_container("site-1", hostile, "model", chunk_size=4 * KiB)
        [failure] = raised.value.failures
        # Refused as the entry arrives, before a byte of it is written: the receiver's code
        # for a container it will not store as asked.
        assert failure.code == FailureCode.REFUSED
        assert "'../../etc/x' cannot be saved as .npz" in failure.detail
        [outcome] = receiver.wait_for(1)
        assert isinstance(outcome, TransferFailed)
    finally:
        receiver.stop()
    assert os.listdir(dest) == []
    assert not (tmp_path / "etc").exists()


def test_a_long_non_latin_file_name_is_stored_cut_in_bytes_with_its_extension(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    name = "重みファイル" * 40 + ".safetensors"  # 240 characters, 732 bytes
    # No file system here holds such a name; the sender's name is the peer's choice anyway.
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    receiver = BackgroundReceiver("site-1", tmp_path / "in", settings)
    stem = "重みファイル" * 10 + "重み"  # 62 characters, 186 bytes: 198 with the extension
    try:
        with FileStreamer("server", settings) as streamer:
            for expected in (f"{stem}.safetensors", f"{stem}-1.safetensors"):
                source = FileSource(tmp_path / "w.safetensors")
                source.name = name
                [result] = streamer.stream_object("site-1", source)
                assert result.ok
                assert result.stored_as == expected
                assert (tmp_path / "in" / expected).read_bytes() == b"weights"
    finally:
        receiver.stop()
