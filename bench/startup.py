"""How long the ``objstream`` command takes to start, and to send a small file end to end.

    python bench/startup.py [--runs 5] [--objstream PATH] [--clean-venv [--venv-dir DIR]]

Against the broker at OBJSTREAM_URL (default amqp://guest:guest@localhost:5672/%2F) it times,
as a user's shell would run them (a new process each time, wall clock):

- ``python -c pass`` with the same interpreter: the floor every command pays (interpreter and
  ``site``, whose ``.pth`` files are the environment's, not objstream's);
- the dependencies' floor: the same interpreter importing pika and pydantic and validating one
  small pydantic model, the least any sender pays that validates its headers with pydantic and
  talks AMQP with pika (what objstream adds is the difference to the next rows);
- ``objstream --version``;
- ``objstream producer send-file`` of a 1 KiB file to a ``listen`` already running, from the
  start of the process to its exit (connect, declare, offer, chunk, verdict).

``--clean-venv`` measures these rows a second time the way a user runs objstream: in a new venv
(no system site packages, no pip) with a regular, non-editable install of this checkout and its
dependencies from the package index (about a minute to build), so the figures hold no
``.pth`` files of the development environment (an editable install's finder, whatever the
machine's ``site-packages`` adds). Those are the rows the start-up targets of
docs/performance.md are measured by. The venv is thrown away after, unless ``--venv-dir DIR``
names where to keep it (a later run reinstalls the checkout into it without its
dependencies: a few seconds). Both tables are printed, the clean venv's first.

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
import venv
from collections.abc import Callable, Iterator
from pathlib import Path

URL = os.environ.get("OBJSTREAM_URL", "amqp://guest:guest@localhost:5672/%2F")
REPO = Path(__file__).resolve().parent.parent

DEPENDENCIES_FLOOR = (
    "import pika\n"
    "from pydantic import BaseModel\n"
    "class Header(BaseModel):\n"
    "    seq: int\n"
    "Header.model_validate({'seq': 1})\n"
)
"""What every sender pays that talks AMQP with pika and validates a header with pydantic."""


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


def rows(
    runs: int = 5, objstream: str | None = None, python: str | None = None
) -> list[tuple[str, str]]:
    """The start-up rows: (benchmark, result) pairs, medians of ``runs``; ``python`` is the
    interpreter of the floors (default: the ``python`` next to the ``objstream`` command, else
    this one)."""
    command = objstream or objstream_command()
    beside = Path(command).with_name("python")
    python = python or (str(beside) if beside.exists() else sys.executable)
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

    floor = timed([python, "-c", "pass"], runs, base)
    dependencies = timed([python, "-c", DEPENDENCIES_FLOOR], runs, base)
    result = [
        ("python -c pass (the interpreter's floor)", show(floor)),
        ("import pika and pydantic, validate one model (the dependencies' floor)",
         show(dependencies)),
        ("objstream --version", show(timed([command, "--version"], runs, base))),
    ]  # fmt: skip
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
        sites = ("bench-in", "bench-out")
        for queue in (f"{namespace}.site.bench-in", *(f"{namespace}.dead.{s}" for s in sites)):
            channel.queue_delete(queue)
        for site in sites:  # each site's own dead letters
            channel.exchange_delete(f"{namespace}.dead.{site}")
        channel.exchange_delete(namespace)
    finally:
        connection.close()


def clean_venv(directory: Path) -> Path:
    """``directory`` as a venv without system site packages (created if it is not one) holding
    a regular install of this checkout; returns its ``bin``."""
    bin_dir = directory / "bin"
    fresh = not (bin_dir / "python").exists()
    if fresh:
        venv.EnvBuilder(with_pip=False, clear=True).create(directory)
    # A wheel built from the checkout, its bytecode compiled, as `pip install objstream` does;
    # a reused venv keeps its dependencies and gets the checkout as it is now.
    again = [] if fresh else ["--force-reinstall", "--no-deps"]
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--quiet",
         "--disable-pip-version-check", *again, str(REPO)],
        check=True, cwd=directory, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return bin_dir


def _table(found: list[tuple[str, str]], out: Callable[[str], None]) -> None:
    out("| benchmark | result |\n|---|---|")
    for name, text in found:
        out(f"| {name} | {text} |")


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    parser.add_argument(
        "--objstream", help="the objstream command (default: this venv's); the floors use the "
        "python beside it",
    )  # fmt: skip
    parser.add_argument(
        "--clean-venv", action="store_true",
        help="also measure a regular install of this checkout in a new venv (the target's rows)",
    )  # fmt: skip
    parser.add_argument("--venv-dir", type=Path, help="keep (and reuse) that venv here")
    args = parser.parse_args(argv)
    if args.clean_venv:
        with contextlib.ExitStack() as stack:
            where = args.venv_dir or Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="objstream-venv-")))  # fmt: skip
            bin_dir = clean_venv(where.resolve())
            out(f"A regular install in a clean venv ({where}): what a user runs\n")
            _table(rows(args.runs, str(bin_dir / "objstream"), str(bin_dir / "python")), out)
        out(f"\nThis environment ({sys.executable}; its site-packages and .pth files)\n")
    _table(rows(args.runs, args.objstream), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
