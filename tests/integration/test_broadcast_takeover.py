"""A receiver killed in the middle of a broadcast: the next one takes its stream over, and the
other targets of the same broadcast finish unaffected."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from objstream.common.settings import KiB, MiB, Settings
from objstream.producer import FileStreamer, TargetResult
from tests.conftest import random_file, sha256_of
from tests.integration.conftest import Declared, wait_for_partial
from tests.integration.test_cli import _env, _listener


def test_a_receiver_killed_mid_broadcast_is_taken_over_and_the_others_go_on(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"site-1", "site-2", "site-3"})
    src = tmp_path / "big.bin"
    size = 128 * MiB
    digest = random_file(src, size)
    env = _env(settings)
    dests = {site: tmp_path / site for site in ("site-1", "site-2", "site-3")}
    listeners = {
        site: _listener(env, site, dest, "--count", "1", "--json") for site, dest in dests.items()
    }
    outcome: list[list[TargetResult] | BaseException] = []
    streamer = FileStreamer("server", settings)

    def send() -> None:
        try:
            # Small chunks and window: slow enough that most of the file is still to come.
            outcome.append(
                streamer.stream_file(
                    ["site-1", "site-2", "site-3"], src, chunk_size=64 * KiB, window=8
                )
            )
        except BaseException as e:  # reported below
            outcome.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for_partial(dests["site-2"], size // 4)
        listeners["site-2"].send_signal(signal.SIGKILL)
        listeners["site-2"].wait(10)
        successor = _listener(env, "site-2", dests["site-2"], "--count", "1", "--json")
        for site in ("site-1", "site-3"):
            _out, err = listeners[site].communicate(timeout=180)
            assert listeners[site].returncode == 0, err
        _out, err = successor.communicate(timeout=180)
        assert successor.returncode == 0, err
        sender.join(180)
    finally:
        streamer.close()
        for process in listeners.values():
            if process.poll() is None:
                process.kill()
    assert outcome, "the sender did not return"
    results = outcome[0]
    assert not isinstance(results, BaseException), results
    assert [r.ok for r in results] == [True, True, True]
    assert len({r.stream_id for r in results}) == 1  # one broadcast, one stream id
    for dest in dests.values():
        assert sha256_of(dest / "big.bin") == digest
        assert not list(dest.glob(".objstream-*"))  # no partial or state file left
    # One broadcast for all three, not three copies (protocol v1 published 3 x the size): the
    # killed target's gap is made up by unicast to it alone. How much of the rest it gets by
    # unicast depends on how fast its successor starts: on a quiet machine it rejoins the
    # broadcast (about 1.1 x), on a loaded one it may catch up alone from a quarter (1.75 x).
    assert streamer.bytes_published < 2 * size, streamer.bytes_published
