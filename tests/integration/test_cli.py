"""The ``objstream`` command line, run as users run it: separate processes, real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
import pytest

from objstream.common.cli import EXIT_BROKER, EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE
from objstream.common.settings import KiB, MiB, Settings
from objstream.common.topology import Topology
from tests.conftest import random_file, sha256_of
from tests.integration.conftest import Declared, wait_for_partial
from tests.rabbitmq_node import LocalRabbitNode, free_port


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OBJSTREAM_URL=settings.url,
        OBJSTREAM_NAMESPACE=settings.namespace,
        OBJSTREAM_LOG_LEVEL="warning",
        OBJSTREAM_STREAM_TTL="120",  # leftovers of failed tests vanish by themselves
        **extra,
    )
    return env


def _listener(
    env: dict[str, str], site: str, dest: Path | str, *extra: str, quiet: bool = False
) -> subprocess.Popen[str]:
    """``objstream consumer listen`` in a process of its own."""
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        ["objstream", "consumer", "listen", "--site", site, "--dest", str(dest), *extra],
        env=env, stdout=output, stderr=output, text=True,
    )  # fmt: skip


def _objstream(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["objstream", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_listen_and_send_file_as_separate_processes(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    digest = random_file(src, 8 * MiB + 5)
    dest = tmp_path / "in"
    env = _env(settings)
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumer",
            "listen",
            "--site",
            "site-1",
            "--dest",
            str(dest),
            "--count",
            "1",
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sent = _objstream(
            "producer",
            "send-file",
            "--site",
            "server",
            "--to",
            "site-1",
            "--chunk-size",
            "256KiB",
            "--json",
            str(src),
            env=env,
        )
        out, err = listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert sent.returncode == 0, sent.stderr
    assert listener.returncode == 0, err
    result = json.loads(sent.stdout)
    assert result["ok"] is True
    assert result["bytes"] == 8 * MiB + 5
    assert result["sha256"] == digest
    assert result["targets"][0]["stored_as"] == "big.bin"
    received = json.loads(out)
    assert received["sha256"] == digest
    assert received["sender"] == "server"
    assert sha256_of(dest / "big.bin") == digest


def test_python_m_producer_is_objstream_producer(settings: Settings) -> None:
    env = _env(settings)
    a = subprocess.run(
        [sys.executable, "-m", "objstream.producer", "send-file", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    b = _objstream("producer", "send-file", "--help", env=env)
    assert a.returncode == b.returncode == 0
    assert "--chunk-size" in a.stdout
    assert a.stdout == b.stdout


def test_unreachable_broker_is_one_line_with_the_password_masked(
    tmp_path: Path, settings: Settings
) -> None:
    src = tmp_path / "x.bin"
    random_file(src, 10)
    url = f"amqp://alice:s3cret-pw@127.0.0.1:{free_port()}/%2F"

    run = _objstream(
        "producer",
        "send-file",
        "--url",
        url,
        "--site",
        "server",
        "--to",
        "site-1",
        str(src),
        env=_env(settings),
    )

    assert run.returncode == EXIT_BROKER
    assert "s3cret-pw" not in run.stderr + run.stdout
    assert "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("objstream: error: broker unreachable at amqp://alice:***@127.0.0.1:")


def test_wrong_password_is_authentication_refused(tmp_path: Path, settings: Settings) -> None:
    parts = urlsplit(settings.url)
    bad = urlunsplit(parts._replace(netloc=f"guest:wrong-pw@{parts.hostname}:{parts.port}"))

    run = _objstream(
        "consumer",
        "listen",
        "--url",
        bad,
        "--site",
        "site-1",
        "--dest",
        str(tmp_path),
        "--count",
        "1",
        env=_env(settings),
    )

    assert run.returncode == EXIT_BROKER
    assert "wrong-pw" not in run.stderr
    assert "refused the credentials" in run.stderr
    assert "Traceback" not in run.stderr


def test_usage_errors_exit_2(tmp_path: Path, settings: Settings) -> None:
    env = _env(settings)
    bad_size = _objstream(
        "producer", "send-file", "--site", "s", "--to", "t", "--chunk-size", "lots", "x", env=env
    )
    too_big = _objstream(
        "producer",
        "send-file",
        "--site",
        "s",
        "--to",
        "t",
        "--chunk-size",
        "64MiB",
        "x",
        env={**env, "OBJSTREAM_URL": settings.url},
    )
    bad_site = _objstream("consumer", "listen", "--site", "../up", "--dest", str(tmp_path), env=env)
    assert bad_size.returncode == EXIT_USAGE
    assert "not a size" in bad_size.stderr
    assert too_big.returncode == EXIT_USAGE
    assert "chunk size" in too_big.stderr
    assert bad_site.returncode == EXIT_USAGE
    assert "invalid site name" in bad_site.stderr


def test_missing_file_is_one_line_exit_1(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    run = _objstream(
        "producer",
        "send-file",
        "--site",
        "server",
        "--to",
        "site-1",
        str(tmp_path / "nope.bin"),
        env=_env(settings),
    )
    assert run.returncode == EXIT_FAILED
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert "nope.bin" in run.stderr


def test_listen_with_count_gives_up_after_the_timeout(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("quiet")
    run = _objstream(
        "consumer",
        "listen",
        "--site",
        "quiet",
        "--dest",
        str(tmp_path / "d"),
        "--count",
        "1",
        "--timeout",
        "1",
        env=_env(settings),
        timeout=30,
    )
    assert run.returncode == EXIT_TIMEOUT
    assert "nothing arrived" in run.stderr


def test_send_to_absent_site_times_out_with_exit_4(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("absent")
    src = tmp_path / "x.bin"
    random_file(src, KiB)
    run = _objstream(
        "producer",
        "send-file",
        "--site",
        "server",
        "--to",
        "absent",
        "--timeout",
        "1",
        str(src),
        env=_env(settings),
        timeout=30,
    )
    assert run.returncode == EXIT_TIMEOUT
    assert "timed out after 1 s without progress" in run.stderr
    assert "Traceback" not in run.stderr


def test_listen_stops_cleanly_on_sigterm(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    import signal
    import time

    declared.sites.add("site-9")
    listener = _listener({**_env(settings), "OBJSTREAM_LOG_LEVEL": "info"}, "site-9", tmp_path)
    assert listener.stderr is not None
    for line in listener.stderr:  # its SIGTERM handler is in place once it listens
        if "listening for site" in line:
            break
    time.sleep(0.5)
    listener.send_signal(signal.SIGTERM)
    _, err = listener.communicate(timeout=20)
    assert listener.returncode == 0, err
    assert "Traceback" not in err
    assert Path(tmp_path).is_dir()


def test_progress_bar_on_a_terminal_and_quiet_otherwise(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    import os
    import pty

    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    random_file(src, 64 * MiB)
    env = _env(settings)
    args = ["producer", "send-file", "--site", "server", "--to", "site-1", "--chunk-size",
            "32KiB", "--window", "2", str(src)]  # fmt: skip
    outputs = []
    for on_tty in (True, False):
        listener = _listener(env, "site-1", tmp_path / f"in-{on_tty}", "--count", "1", quiet=True)
        if on_tty:
            master, slave = pty.openpty()
            sender = subprocess.Popen(
                ["objstream", *args], env=env, stdout=subprocess.PIPE, stderr=slave
            )
            os.close(slave)
            chunks = []
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other end is closed
                    break
                if not data:
                    break
                chunks.append(data)
            os.close(master)
            sender.wait(60)
            outputs.append(b"".join(chunks).decode(errors="replace"))
        else:
            run = _objstream(*args, env=env)
            outputs.append(run.stderr)
        listener.wait(60)
        assert sender.returncode == 0 if on_tty else run.returncode == 0
    on_terminal, piped = outputs
    assert "%|" in on_terminal
    assert "site-1" in on_terminal
    assert "%|" not in piped


def test_a_broker_refusal_is_one_line_exit_3(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """A queue of the namespace declared otherwise by someone else: no traceback."""
    import pika

    from objstream.common.topology import Topology

    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        connection.channel().queue_declare(Topology.from_settings(settings).dead("site-1"))
    finally:
        connection.close()
    run = _objstream("consumer", "listen", "--site", "site-1", "--dest", str(tmp_path),
                     "--count", "1", env=_env(settings))  # fmt: skip
    assert run.returncode == EXIT_BROKER
    [line] = run.stderr.strip().splitlines()
    assert "refused" in line
    assert "PRECONDITION_FAILED" in line
    assert "guest:guest" not in line


@pytest.mark.usefixtures("local_nodes")
def test_a_worker_started_before_the_broker_waits_for_it(tmp_path: Path) -> None:
    """OBJSTREAM_CONNECT_WAIT: retry with backoff and a clear log line, then work normally."""
    from objstream.common.settings import Settings
    from objstream.producer import FileStreamer

    node = LocalRabbitNode()
    try:
        env = {**os.environ, "OBJSTREAM_URL": node.url, "OBJSTREAM_CONNECT_WAIT": "90",
               "OBJSTREAM_NAMESPACE": "wait-test"}  # fmt: skip
        listener = _listener(env, "site-1", tmp_path / "in", "--count", "1")
        time.sleep(2)
        assert listener.poll() is None, listener.communicate()
        node.start()
        src = tmp_path / "x.bin"
        random_file(src, 100 * KiB)
        settings = Settings(url=node.url, namespace="wait-test", connect_wait=30)
        with FileStreamer("server", settings) as streamer:
            streamer.stream_file("site-1", src)
        _, err = listener.communicate(timeout=60)
        assert listener.returncode == 0, err
        assert "unreachable (Connection refused); retrying in" in err
        assert (tmp_path / "in" / "x.bin").read_bytes() == src.read_bytes()
    finally:
        node.cleanup()


def test_bad_site_names_are_one_line_exit_2_before_anything_is_declared(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 10)
    env = _env(settings)
    runs = [
        _objstream("producer", "send-file", "--site", "server", "--to", "bad site", str(src),
                   env=env),
        _objstream("producer", "send-file", "--site", "my server", "--to", "site-1", str(src),
                   env=env),
        _objstream("consumer", "retrieve-file", "--site", "site-1", "--from", "my server",
                   "f.bin", "--dest", str(tmp_path / "in"), env=env),
    ]  # fmt: skip
    for run in runs:
        assert run.returncode == EXIT_USAGE, run.stderr
        [line] = run.stderr.strip().splitlines()
        assert line.startswith("objstream: error: invalid site name"), line
    topology = Topology.from_settings(settings)
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        for queue in (topology.inbox("bad site"), topology.service_queue("my server")):
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # 404: never declared
                connection.channel().queue_declare(queue, passive=True)
    finally:
        connection.close()


def test_ctrl_c_on_send_file_aborts_the_stream_at_the_receiver_at_once(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    random_file(src, 64 * MiB)
    dest = tmp_path / "in"
    env = _env(settings)
    listener = _listener(env, "site-1", dest, "--count", "1")
    # Python ignores SIGINT in a child that inherits "ignored": give it the default, as a shell.
    sender = subprocess.Popen(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1",
         "--window", "1", "--chunk-size", "64KiB", str(src)],
        env=env, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        wait_for_partial(dest, 2 * MiB, sender)
        sender.send_signal(signal.SIGINT)
        _out, err = sender.communicate(timeout=30)
        interrupted = time.monotonic()
        _lout, lerr = listener.communicate(timeout=10)  # not the 60 s timeout
    finally:
        for process in (sender, listener):
            if process.poll() is None:
                process.kill()
    assert sender.returncode == 130
    assert err.strip().splitlines()[-1] == "objstream: interrupted"
    assert time.monotonic() - interrupted < 10
    assert listener.returncode == EXIT_FAILED
    assert "aborted" in lerr
    assert not (dest / "big.bin").exists()
    assert list(dest.glob(".objstream-*.part"))  # the verified prefix is kept for a resume
