"""How long the ``objstream`` command takes to start, and to send a small file end to end.

    python bench/startup.py [--runs 5] [--objstream PATH]

Against the broker at OBJSTREAM_URL (default amqp://guest:guest@localhost:5672/%2F) it times,
as a user's shell would run them (a new process each time, wall clock):

- ``python -c pass`` with the same interpreter: the floor every command pays (interpreter and
  ``site``, whose ``.pth`` files are the environment's, not objstream's);
- ``objstream --version``;
- ``objstream producer send-file`` of a 1 KiB file to a ``listen`` already running, from the
  start of the process to its exit (connect, declare, offer, chunk, verdict).

Each figure is the median of ``--runs`` runs (plus one warm-up run, not counted): wall clock,
and the process's CPU time, which a busy machine's wall clock hides. ``bench/run.py`` calls
:func:`rows` for its table; run alone, this prints the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

URL = os.environ.get("OBJSTREAM_URL", "amqp://guest:guest@localhost:5672/%2F")


def objstream_command() -> str:
    """The ``objstream`` next to this interpreter (a venv's), else the one on PATH."""
    here = Path(sys.executable).with_name("objstream")
    return str(here) if here.exists() else shutil.which("objstream") or "objstream"


def timed(
    command: list[str], runs: int, env: dict[str, str] | None = None
) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (user + system) seconds of ``command`` (which must succeed), ``runs``
    times after a warm-up. The CPU figure is what a busy machine's wall clock hides."""
    wall: list[float] = []
    cpu: list[float] = []
    for i in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)  # fmt: skip
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if i:  # the first run warms the page cache and the broker's declarations
            wall.append(seconds)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


@contextlib.contextmanager
def listening(objstream: str, env: dict[str, str], site: str, dest: Path) -> Iterator[None]:
    """``objstream consumer listen`` for ``site`` in the background, ready when this yields."""
    listener = subprocess.Popen(
        [objstream, "consumer", "listen", "--site", site, "--dest", str(dest)],
        env={**env, "OBJSTREAM_LOG_LEVEL": "info"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert listener.stderr is not None
        for line in listener.stderr:  # "listening for site ..." once its inbox is consumed
            if "listening for site" in line:
                break
        else:
            raise RuntimeError(f"listen exited with {listener.wait()}")
        yield
    finally:
        listener.terminate()
        listener.wait(30)


def rows(runs: int = 5, objstream: str | None = None) -> list[tuple[str, str]]:
    """The start-up rows: (benchmark, result) pairs, medians of ``runs``."""
    command = objstream or objstream_command()
    namespace = f"bench-startup-{uuid.uuid4().hex[:8]}"
    # As installed, a package has its bytecode compiled; a checkout gets it on first import,
    # unless PYTHONDONTWRITEBYTECODE says no: then every start compiles objstream again.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env = {**base, "OBJSTREAM_URL": URL, "OBJSTREAM_NAMESPACE": namespace,
           "OBJSTREAM_LOG_LEVEL": "warning"}  # fmt: skip

    def show(figures: tuple[list[float], list[float]]) -> str:
        wall, cpu = figures
        each = ", ".join(f"{s:.3f}" for s in wall)
        return f"{statistics.median(wall):.3f} s (runs: {each}); CPU {statistics.median(cpu):.3f} s"

    floor = timed([sys.executable, "-c", "pass"], runs, base)
    result = [
        ("python -c pass (the interpreter's floor)", show(floor)),
        ("objstream --version", show(timed([command, "--version"], runs, base))),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        small = Path(tmp) / "small.bin"
        small.write_bytes(os.urandom(1024))
        with listening(command, env, "bench-in", Path(tmp) / "in"):
            send = [command, "producer", "send-file", "--site", "bench-out", "--to", "bench-in",
                    str(small)]  # fmt: skip
            sent = timed(send, runs, env)
            result.append(("send-file of 1 KiB, end to end (a new process)", show(sent)))
    _cleanup(namespace)
    return result


def _cleanup(namespace: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        channel = connection.channel()
        for queue in (f"{namespace}.dead", f"{namespace}.site.bench-in"):
            channel.queue_delete(queue)
        channel.exchange_delete(f"{namespace}.dead")
        channel.exchange_delete(namespace)
    finally:
        connection.close()


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--objstream", help="the objstream command (default: the venv's)")
    args = parser.parse_args(argv)
    out("| benchmark | result |\n|---|---|")
    for name, text in rows(args.runs, args.objstream):
        out(f"| {name} | {text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
