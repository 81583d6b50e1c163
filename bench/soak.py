"""Soak: objstream under concurrency, every role killed at random, the broker restarted.

    python bench/soak.py --minutes M [--seed S] [--keep DIR]

On a throwaway RabbitMQ node (tests/rabbitmq_node.py, never the broker at OBJSTREAM_URL) it runs,
each as an ``objstream`` process of its own: 4 listening sites (``consumer listen --json``), 2
senders pushing files of 1 KiB to 64 MiB to one site or several at once (``producer send-file
--json``), an owner serving the same files (``producer serve``) and 3 retrievers asking it for
them (``consumer retrieve-file --json``), often for the same file at the same time (a shared
upload). Every 10-30 s a fault: SIGKILL of a listener, a sender, a retriever or the owner (a
killed listener or owner is started again at once, on the same directory, as a user would), or
SIGINT / SIGTERM of a sender or a retriever; a fault waits up to 15 s for a listener, sender or
retriever in the middle of a stream (one under way in its destination) and takes any if none
comes. Twice per run the broker is SIGKILLed and started again on the same ports and data.
Every process has OBJSTREAM_TIMEOUT=15 and OBJSTREAM_CONNECT_WAIT=30; a send's ``--window`` is
8 or 32, so that the largest files exceed the backlog limit of a target's data queue (2
windows).
It counts pushes, retrievals and their outcomes, faults, take-overs (what became of the
streams a killed listener left), resumed retrievals, and what the listeners recorded for the
streams of senders stopped by SIGINT / SIGTERM, and how long after the signal.

Then the faults stop, what runs finishes, everything settles for 30 s, and the invariants are
checked:

1. nothing lost: every object a sender, a listener or a retrieval reported stored is in its
   destination with the SHA-256 of its source;
2. nothing wrongly verified: every file under a final name in any destination (and every record
   of one) has the SHA-256 of the source it is named after;
3. nothing hung: every sender and retriever ended within its time limit, every listener and the
   owner within 30 s of SIGTERM at the end (a process past its limit gets SIGABRT, which makes
   Python dump every thread's stack into its log, then SIGKILL);
4. bounded memory: the peak RSS (``ru_maxrss`` of each process, its VmHWM) of every role is at
   most 256 MiB;
5. what the broker holds: no data queue ever held more ready bytes than its backlog limit (the
   queue's ``x-max-length-bytes``; sampled every 10 s), and what is left after settling, by
   kind of queue.

It prints two markdown tables (counts, invariants) and exits 1 if an invariant is broken.
``--keep DIR`` runs in DIR and keeps everything there: the sources, what arrived, each
process's stderr (``logs/``), the node's logs, ``runs.jsonl`` (every process: command, exit,
output, peak RSS), ``broker.json`` (the queues sampled, the faults, the streams dead listeners
left) and ``report.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from objstream.jobs.data import write_random_file
from tests.rabbitmq_node import LocalRabbitNode

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB

SITES = ["site-1", "site-2", "site-3", "site-4"]  # each runs `listen`
SENDERS = 2  # loops of `send-file --site server`
RETRIEVER_SITES = ["site-1", "site-2", "site-3"]  # each a loop of `retrieve-file`
OWNER = "owner"  # runs `serve`
POOL_FILES = 24
SMALLEST, LARGEST = KiB, 64 * MiB
WINDOWS = (8, 32)  # a send's --window, at random: 2 windows of 8 MiB are below the largest file

TIMEOUT = 15.0  # OBJSTREAM_TIMEOUT of every process
CONNECT_WAIT = 30.0  # OBJSTREAM_CONNECT_WAIT
SLOWEST_RATE = 1 * MiB  # bytes/s below which a sender or retriever counts as hung
FAULT_EVERY = (10.0, 30.0)  # seconds between two faults
BROKER_RESTARTS = 2
SETTLE = 30.0  # seconds between the last transfer's end and the final checks
STOP_GRACE = 30.0  # seconds a listener or the owner may take to exit on SIGTERM
HOT_FILE_EVERY = 8.0  # seconds between two changes of the file most retrievers ask for
SAMPLE_EVERY = 10.0  # seconds between two looks at the broker's queues
RSS_LIMIT_MIB = 256.0  # peak RSS above which a process breaks invariant 4
AIM_WITHIN = 15.0  # seconds a fault waits for a victim in the middle of a transfer

Role = Literal["listener", "sender", "retriever", "owner"]
ROLES: tuple[Role, ...] = ("listener", "sender", "retriever", "owner")
TRANSFERS: tuple[Role, ...] = ("sender", "retriever")  # the roles that come and go
FAULTS = (
    "SIGKILL listener",
    "SIGKILL owner",
    *(f"{sig} {role}" for sig in ("SIGKILL", "SIGINT", "SIGTERM") for role in TRANSFERS),
)
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
COPY_SUFFIX = re.compile(r"^(?P<stem>.+?)(?:-\d+)?(?P<ext>\.bin)$")


def log(t0: float, message: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f} s] {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            sha.update(block)
    return sha.hexdigest()


def objstream_command() -> list[str]:
    """The ``objstream`` script of this interpreter (not a shim in front of it), else PATH's."""
    here = Path(sys.executable).with_name("objstream")
    if here.exists():
        return [str(here)]
    found = shutil.which("objstream")
    return [found] if found else [sys.executable, "-m", "objstream"]


# -- the sources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str
    size: int
    sha256: str
    path: Path


def make_pool(where: Path, rng: random.Random, count: int) -> dict[str, Source]:
    """``count`` files of random bytes, log-uniform in size from 1 KiB to 64 MiB (both ends
    included), named ``oNN.bin``: a received ``oNN-3.bin`` is a copy of ``oNN.bin``."""
    where.mkdir(parents=True)
    pool: dict[str, Source] = {}
    for index in range(count):
        if index < 2:
            size = (SMALLEST, LARGEST)[index]
        else:
            size = int(math.exp(rng.uniform(math.log(SMALLEST), math.log(LARGEST))))
        name = f"o{index:02d}.bin"
        digest = write_random_file(where / name, size, seed=rng.getrandbits(63))
        pool[name] = Source(name, size, digest, where / name)
    return pool


def source_of(file_name: str) -> str:
    """The pool name a stored file is a copy of (``o07-2.bin`` -> ``o07.bin``)."""
    match = COPY_SUFFIX.match(file_name)
    return file_name if match is None else match["stem"] + match["ext"]


# -- processes ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Run:
    """One objstream process: what it was asked, its output lines with their times, its end."""

    role: Role
    label: str
    argv: list[str]
    stderr: Path
    started: float
    deadline: float | None = None  # senders and retrievers: past it, the process hangs
    name: str | None = None  # the object sent or retrieved
    site: str | None = None  # a listener's or retriever's site
    targets: list[str] = field(default_factory=list)  # a sender's
    window: int | None = None  # a sender's
    lines: list[tuple[float, str]] = field(default_factory=list)
    signals: list[tuple[float, str]] = field(default_factory=list)  # what the bench sent
    status: int | None = None  # exit code, or -N for a death by signal N
    ended: float | None = None
    maxrss_kib: int = 0
    hung: bool = False
    expected_end: bool = False  # the bench stopped it (a fault, the end of the run)
    pid: int = 0
    pidfd: int = -1
    done: threading.Event = field(default_factory=threading.Event)

    def records(self) -> Iterator[tuple[float, dict[str, Any]]]:
        """The JSON objects it printed, with the time each line arrived."""
        for at, line in self.lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    yield at, record

    def outcome(self) -> dict[str, Any] | None:
        """The last JSON object it printed (a send's or a retrieval's result)."""
        found = [record for _, record in self.records()]
        return found[-1] if found else None

    def stderr_tail(self, lines: int = 6) -> str:
        try:
            text = self.stderr.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " / ".join(text[-lines:])

    def summary(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "label": self.label,
            "argv": self.argv,
            "pid": self.pid,
            "started": round(self.started, 3),
            "ended": self.ended and round(self.ended, 3),
            "status": self.status,
            "maxrss_mib": round(self.maxrss_kib / 1024, 1),
            "hung": self.hung,
            "signals": self.signals,
            "stderr": str(self.stderr),
            "output": [[round(at, 3), line] for at, line in self.lines],
        }


class Processes:
    """Starts objstream processes, reaps each with ``wait4`` (its exit and peak RSS) and
    signals them through a pidfd (never a recycled pid)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.command = objstream_command()
        self.lock = threading.Lock()
        self.runs: list[Run] = []
        self.numbers = itertools.count()

    def start(self, role: Role, label: str, args: list[str], **fields: Any) -> Run:
        with self.lock:
            number = next(self.numbers)
        stderr_path = self.logs / f"{number:05d}-{label.replace(' ', '_')}.stderr"
        argv = [*self.command, *args]
        with open(stderr_path, "wb") as stderr:
            popen = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C of the bench reaches the bench only
            )
        run = Run(role, label, argv, stderr_path, time.monotonic(), pid=popen.pid, **fields)
        run.pidfd = os.pidfd_open(popen.pid)
        with self.lock:
            self.runs.append(run)
        assert popen.stdout is not None
        reader = threading.Thread(target=self._read, args=(run, popen.stdout), daemon=True)
        reader.start()
        threading.Thread(target=self._reap, args=(run, popen, reader), daemon=True).start()
        return run

    @staticmethod
    def _read(run: Run, stdout: Any) -> None:
        for raw in stdout:
            run.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
        stdout.close()

    def _reap(self, run: Run, popen: subprocess.Popen[bytes], reader: threading.Thread) -> None:
        _, status, usage = os.wait4(run.pid, 0)
        ended = time.monotonic()
        popen.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        reader.join(30)
        with self.lock:
            run.status, run.ended, run.maxrss_kib = popen.returncode, ended, usage.ru_maxrss
            os.close(run.pidfd)
            run.pidfd = -1
        run.done.set()

    def signal(self, run: Run, sig: signal.Signals, note: str | None = None) -> bool:
        """Send ``sig`` to ``run`` if it has not been reaped yet; returns whether it was sent."""
        with self.lock:
            if run.pidfd < 0:
                return False
            try:
                signal.pidfd_send_signal(run.pidfd, sig)
            except ProcessLookupError:  # it exited, and is about to be reaped
                return False
            run.signals.append((time.monotonic(), note or sig.name))
            return True

    def running(self, role: Role, older_than: float = 0.0) -> list[Run]:
        now = time.monotonic()
        with self.lock:
            return [
                r
                for r in self.runs
                if r.role == role and r.pidfd >= 0 and now - r.started >= older_than
            ]

    def kill_all(self) -> None:
        for _ in range(2):  # again for what a loop started meanwhile
            with self.lock:
                alive = [r for r in self.runs if r.pidfd >= 0]
            for run in alive:
                run.expected_end = True
                self.signal(run, signal.SIGKILL, "SIGKILL (bench ending)")
            for run in alive:
                run.done.wait(10)
            time.sleep(0.5)


def unsignalled(runs: list[Run]) -> list[Run]:
    """The runs the bench has not signalled yet: one signal per process (a second SIGINT would
    mean "stop at once")."""
    return [r for r in runs if not r.signals]


# -- the broker's queues ------------------------------------------------------------------------


@dataclass(frozen=True)
class Queue:
    name: str
    kind: str  # data, inbox, service, reply, dead
    messages: int
    ready: int
    bytes: int
    ready_bytes: int
    consumers: int
    limit_bytes: int | None  # x-max-length-bytes


KINDS = {"data": "data", "site": "inbox", "serve": "service", "reply": "reply", "dead": "dead"}


def list_queues(node: LocalRabbitNode, namespace: str) -> list[Queue] | None:
    """The namespace's queues, or None if the node does not answer (it is restarting)."""
    try:
        done = node.ctl(
            "-q",
            "list_queues",
            "--formatter",
            "json",
            "name",
            "messages",
            "messages_ready",
            "message_bytes",
            "message_bytes_ready",
            "consumers",
            "arguments",
            timeout=30,
        )
        rows = json.loads(done.stdout) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError):
        return None
    if not isinstance(rows, list):
        return None
    queues = []
    for row in rows:
        name = str(row["name"])
        if not name.startswith(namespace + "."):
            continue
        kind = KINDS.get(name[len(namespace) + 1 :].split(".", 1)[0], "other")
        limits = [a[2] for a in row.get("arguments", []) if a[0] == "x-max-length-bytes"]
        queues.append(
            Queue(
                name,
                kind,
                int(row["messages"]),
                int(row["messages_ready"]),
                int(row["message_bytes"]),
                int(row["message_bytes_ready"]),
                int(row["consumers"]),
                int(limits[0]) if limits else None,
            )
        )
    return queues


# -- the soak -----------------------------------------------------------------------------------


@dataclass
class Fault:
    at: float
    kind: str
    target: str
    detail: str = ""


@dataclass
class LeftOver:
    """A stream a SIGKILLed listener left in its directory (a state file not ended)."""

    site: str
    stream_id: str
    at: float


class Soak:
    def __init__(self, minutes: float, seed: int, work: Path) -> None:
        self.minutes = minutes
        self.seed = seed
        self.work = work
        self.namespace = f"soak-{uuid.uuid4().hex[:8]}"
        self.t0 = time.monotonic()
        self.node = LocalRabbitNode()
        self.dests = {site: work / "in" / site for site in SITES}
        self.fetched = {site: work / "retrieved" / site for site in RETRIEVER_SITES}
        self.pool: dict[str, Source] = {}
        self.procs: Processes | None = None
        self.lock = threading.RLock()
        self.listeners: dict[str, Run] = {}
        self.owner: Run | None = None
        self.faults: list[Fault] = []
        self.left_over: list[LeftOver] = []
        self.unexpected: list[Run] = []  # listeners and owners that ended on their own
        self.samples: list[tuple[float, list[Queue]]] = []
        self.settled: list[Queue] | None = None
        self.hot = ""
        self.fatal: str | None = None
        self.stopping = threading.Event()  # no new transfers, no new faults
        self.finished = threading.Event()  # no more samples

    def say(self, message: str) -> None:
        log(self.t0, message)

    @property
    def p(self) -> Processes:
        assert self.procs is not None
        return self.procs

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            OBJSTREAM_URL=self.node.url,
            OBJSTREAM_NAMESPACE=self.namespace,
            OBJSTREAM_LOG_LEVEL="warning",
            OBJSTREAM_CONNECT_WAIT=f"{CONNECT_WAIT:g}",
            OBJSTREAM_TIMEOUT=f"{TIMEOUT:g}",
            PYTHONFAULTHANDLER="1",  # SIGABRT of a hung process dumps its threads' stacks
            XDG_STATE_HOME=str(self.work / "state"),  # the redelivery journal of this run
        )
        return env

    # -- the long-running roles --

    def start_listener(self, site: str) -> Run:
        self.dests[site].mkdir(parents=True, exist_ok=True)
        count = sum(r.site == site for r in self.p.runs if r.role == "listener")
        run = self.p.start(
            "listener",
            f"listener {site} #{count + 1}",
            ["consumer", "listen", "--site", site, "--dest", str(self.dests[site]), "--json"],
            site=site,
        )
        self.listeners[site] = run
        return run

    def start_owner(self) -> Run:
        count = sum(r.role == "owner" for r in self.p.runs)
        self.owner = self.p.start(
            "owner",
            f"owner #{count + 1}",
            ["producer", "serve", "--site", OWNER, "--source-dir", str(self.work / "pool")],
        )
        return self.owner

    def kill_listener(self, site: str) -> str:
        """SIGKILL the listener of ``site`` and start another on the same directory at once."""
        with self.lock:
            run = self.listeners[site]
            run.expected_end = True
            self.p.signal(run, signal.SIGKILL)
            run.done.wait(30)
            left = self.note_left_over(site)
            self.start_listener(site)
        return f"{run.label}, {left} stream(s) left to take over"

    @staticmethod
    def streams_under_way(dest: Path) -> list[str]:
        """The streams in ``dest`` that are not over (a state file, not ``ended``): what a
        successor of its listener takes over."""
        found = []
        for state in dest.glob(".objstream-*.state"):
            try:
                counts = state.read_text(errors="replace").splitlines()[1].split()
            except (OSError, IndexError):
                continue
            if "ended" not in counts:
                found.append(state.name.removeprefix(".objstream-").removesuffix(".state"))
        return found

    def note_left_over(self, site: str) -> int:
        """Record the streams the dead listener of ``site`` was working on."""
        now = time.monotonic()
        found = self.streams_under_way(self.dests[site])
        self.left_over += [LeftOver(site, stream_id, now) for stream_id in found]
        return len(found)

    def kill_owner(self) -> str:
        with self.lock:
            assert self.owner is not None
            run = self.owner
            run.expected_end = True
            self.p.signal(run, signal.SIGKILL)
            run.done.wait(30)
            self.start_owner()
        return run.label

    def supervise(self) -> None:
        """Start again a listener or the owner that ended without being told (as a service
        manager would), and remember it."""
        with self.lock:
            ended = [r for r in [*self.listeners.values(), self.owner] if r and r.done.is_set()]
            for run in ended:
                if run.expected_end:
                    continue
                run.expected_end = True
                self.unexpected.append(run)
                self.say(f"{run.label} ended on its own ({run.status}): {run.stderr_tail(2)}")
                if run.role == "owner":
                    self.start_owner()
                else:
                    assert run.site is not None
                    self.note_left_over(run.site)
                    self.start_listener(run.site)

    # -- the loops --

    def limit(self, size: int) -> float:
        """Seconds a transfer of ``size`` bytes may take, faults included, before it hangs."""
        return 2 * TIMEOUT + CONNECT_WAIT + 60 + size / SLOWEST_RATE

    def sender_loop(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-sender-{index}")
        names = sorted(self.pool)
        sends = 0
        while not self.stopping.is_set():
            source = self.pool[rng.choice(names)]
            count = 1 if rng.random() < 0.5 else rng.randint(2, len(SITES))
            targets = sorted(rng.sample(SITES, count))
            window = rng.choice(WINDOWS)
            sends += 1
            run = self.p.start(
                "sender",
                f"sender-{index} #{sends}",
                [
                    "producer",
                    "send-file",
                    "--site",
                    "server",
                    "--to",
                    ",".join(targets),
                    "--window",
                    str(window),
                    "--json",
                    str(source.path),
                ],
                deadline=time.monotonic() + self.limit(source.size),
                name=source.name,
                targets=targets,
                window=window,
            )
            run.done.wait()
            self.stopping.wait(rng.uniform(0, 1))

    def retriever_loop(self, site: str) -> None:
        """Ask for the hot file (most of the time, so retrievals share uploads) or any other;
        after a failure, ask for the same file again (it resumes) up to 3 times."""
        rng = random.Random(f"{self.seed}-retriever-{site}")
        names = sorted(self.pool)
        retries = 0
        name = ""
        asks = 0
        self.fetched[site].mkdir(parents=True, exist_ok=True)
        while not self.stopping.is_set():
            if not name or retries == 0:
                name = self.hot if rng.random() < 0.6 else rng.choice(names)
            asks += 1
            run = self.p.start(
                "retriever",
                f"retriever {site} #{asks}",
                [
                    "consumer",
                    "retrieve-file",
                    "--site",
                    site,
                    "--from",
                    OWNER,
                    "--dest",
                    str(self.fetched[site]),
                    "--json",
                    name,
                ],
                deadline=time.monotonic() + self.limit(self.pool[name].size),
                name=name,
                site=site,
            )
            run.done.wait()
            retries = retries + 1 if run.status != 0 and retries < 3 else 0
            self.stopping.wait(rng.uniform(0, 1.5))

    def hot_file_loop(self) -> None:
        rng = random.Random(f"{self.seed}-hot")
        names = sorted(self.pool)
        while not self.stopping.is_set():
            self.hot = rng.choice(names)
            self.stopping.wait(HOT_FILE_EVERY)

    def sample_loop(self) -> None:
        while not self.finished.wait(SAMPLE_EVERY):
            queues = list_queues(self.node, self.namespace)
            if queues is not None:
                self.samples.append((time.monotonic(), queues))

    # -- faults --

    def schedule(self) -> list[tuple[float, str]]:
        """When each fault happens (seconds from the start of the transfers)."""
        rng = random.Random(f"{self.seed}-faults")
        duration = self.minutes * 60
        plan = [
            (duration * (i + 1) / (BROKER_RESTARTS + 1), "broker restart")
            for i in range(BROKER_RESTARTS)
        ]
        at = rng.uniform(*FAULT_EVERY)
        while at < duration:
            plan.append((at, rng.choice(FAULTS)))
            at += rng.uniform(*FAULT_EVERY)
        return sorted(plan)

    def fault_loop(self, start: float) -> None:
        rng = random.Random(f"{self.seed}-victims")
        for at, kind in self.schedule():
            if self.stopping.wait(max(0.0, start + at - time.monotonic())):
                return
            try:
                fault = self.apply(kind, rng)
            except Exception as e:  # the node did not come back: the run cannot go on
                self.fatal = f"{kind}: {e}"
                self.stopping.set()
                return
            if fault is not None:
                self.faults.append(fault)
                self.say(f"fault: {fault.kind} {fault.target} {fault.detail}".rstrip())

    def apply(self, kind: str, rng: random.Random) -> Fault | None:
        now = time.monotonic()
        if kind == "broker restart":
            self.node.kill()
            time.sleep(1)
            self.node.start()
            return Fault(now, kind, "node", f"down {time.monotonic() - now:.1f} s")
        if kind == "SIGKILL listener":
            busy = self.aim(lambda: [s for s in SITES if self.streams_under_way(self.dests[s])])
            site = rng.choice(busy or SITES)
            return Fault(time.monotonic(), kind, site, self.kill_listener(site))
        if kind == "SIGKILL owner":
            return Fault(now, kind, self.kill_owner())
        sig, role_name = kind.split()
        role = next(r for r in TRANSFERS if r == role_name)
        victims = (
            self.aim(lambda: unsignalled(self.mid_transfer(role)))
            or unsignalled(self.p.running(role, older_than=1.0))
            or unsignalled(self.p.running(role))
        )
        if not victims:
            return None
        victim = rng.choice(victims)
        now = time.monotonic()
        if not self.p.signal(victim, SIGNALS[sig]):
            return None
        return Fault(now, kind, victim.label, f"({victim.name} after {now - victim.started:.1f} s)")

    def aim(self, find: Callable[[], list[T]]) -> list[T]:
        """What ``find`` finds within :data:`AIM_WITHIN` s (it is asked again and again), so
        that a fault lands in the middle of a transfer; empty if nothing was found."""
        deadline = time.monotonic() + AIM_WITHIN
        while not self.stopping.is_set():
            found = find()
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)
        return []

    def mid_transfer(self, role: Role) -> list[Run]:
        """The senders or retrievers of ``role`` whose object is being written at a
        destination now (for a sender: some stream is under way at one of its targets)."""
        runs = self.p.running(role, older_than=0.5)
        if role == "retriever":
            return [r for r in runs if r.site and self.streams_under_way(self.fetched[r.site])]
        return [
            r
            for r in runs
            if self.pool[str(r.name)].size >= 2 * MiB
            and any(self.streams_under_way(self.dests[t]) for t in r.targets)
        ]

    # -- hangs --

    def watch(self) -> None:
        """Abort senders and retrievers past their limit (SIGABRT dumps their stacks)."""
        now = time.monotonic()
        for role in TRANSFERS:
            for run in self.p.running(role):
                if run.deadline is not None and now > run.deadline and not run.hung:
                    run.hung = True
                    self.say(f"{run.label} hangs ({now - run.started:.0f} s): SIGABRT")
                    self.p.signal(run, signal.SIGABRT)
                    threading.Timer(5, self.p.signal, (run, signal.SIGKILL)).start()

    def tick_until(self, done: threading.Event | None, seconds: float) -> None:
        """Watch for hangs and supervise for ``seconds`` (or until ``done``)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (done is not None and done.is_set()):
            self.watch()
            self.supervise()
            time.sleep(0.5)

    # -- the run --

    def wait_for_consumers(self, timeout: float = 120) -> None:
        """Until every listener consumes its inbox and the owner its service queue."""
        wanted = {f"{self.namespace}.site.{s}" for s in SITES} | {f"{self.namespace}.serve.{OWNER}"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queues = list_queues(self.node, self.namespace) or []
            if wanted <= {q.name for q in queues if q.consumers > 0}:
                return
            self.supervise()
            time.sleep(1)
        raise RuntimeError("the listeners and the owner did not start consuming")

    def run(self) -> None:
        self.say(f"sources: {POOL_FILES} files in {self.work / 'pool'}")
        self.pool = make_pool(self.work / "pool", random.Random(self.seed), POOL_FILES)
        (self.work / "logs").mkdir()
        self.say("starting a throwaway RabbitMQ node")
        self.node.start()
        self.procs = Processes(self.env(), self.work / "logs")
        with self.lock:
            for site in SITES:
                self.start_listener(site)
            self.start_owner()
        self.wait_for_consumers()
        self.hot = sorted(self.pool)[0]
        start = time.monotonic()
        self.say(f"{self.minutes:g} min of transfers and faults, namespace {self.namespace}")
        loops = [threading.Thread(target=self.sender_loop, args=(i + 1,)) for i in range(SENDERS)]
        loops += [threading.Thread(target=self.retriever_loop, args=(s,)) for s in RETRIEVER_SITES]
        loops.append(threading.Thread(target=self.hot_file_loop))
        faults = threading.Thread(target=self.fault_loop, args=(start,))
        sampler = threading.Thread(target=self.sample_loop, daemon=True)
        for thread in [*loops, faults, sampler]:
            thread.start()
        self.tick_until(self.stopping, self.minutes * 60)
        self.say("faults stop; waiting for the transfers under way")
        self.stopping.set()
        faults.join()
        if self.fatal is not None:
            raise RuntimeError(self.fatal)
        for thread in loops:
            while thread.is_alive():
                self.tick_until(None, 1)
        self.say(f"settling for {SETTLE:g} s")
        self.tick_until(None, SETTLE)
        self.settled = list_queues(self.node, self.namespace)
        self.stop_services()
        self.finished.set()

    def stop_services(self) -> None:
        """SIGTERM every listener and the owner; one that is not gone in time hangs."""
        with self.lock:
            services = [*self.listeners.values(), *([self.owner] if self.owner else [])]
            for run in services:
                run.expected_end = True
                self.p.signal(run, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for run in services:
            if not run.done.wait(max(0.0, deadline - time.monotonic())):
                run.hung = True
                self.say(f"{run.label} did not stop within {STOP_GRACE:g} s: SIGABRT")
                self.p.signal(run, signal.SIGABRT)
                if not run.done.wait(5):
                    self.p.signal(run, signal.SIGKILL)
                    run.done.wait(10)

    def save(self) -> None:
        """Write what the run recorded into its directory: every process, the faults, the
        broker's queues (each sample, and after settling)."""
        with open(self.work / "runs.jsonl", "w") as out:
            for run in self.procs.runs if self.procs is not None else []:
                out.write(json.dumps(run.summary()) + "\n")
        broker = {
            "samples": [
                [round(at - self.t0, 1), [asdict(q) for q in qs]] for at, qs in self.samples
            ],
            "settled": None if self.settled is None else [asdict(q) for q in self.settled],
            "faults": [{**asdict(f), "at": round(f.at - self.t0, 1)} for f in self.faults],
            "left_over": [{**asdict(x), "at": round(x.at - self.t0, 1)} for x in self.left_over],
        }
        (self.work / "broker.json").write_text(json.dumps(broker, indent=1) + "\n")

    def shut_down(self, keep: bool) -> None:
        self.stopping.set()
        self.finished.set()
        if self.procs is not None:
            self.procs.kill_all()
        if keep and (self.node.base / "log").exists():
            shutil.copytree(self.node.base / "log", self.work / "node-logs", dirs_exist_ok=True)
        self.node.cleanup()


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Check:
    title: str
    holds: bool
    detail: str


@dataclass
class Report:
    rows: list[tuple[str, str]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def row(self, what: str, value: object) -> None:
        self.rows.append((what, str(value)))

    def check(self, title: str, problems: list[str], detail: str) -> None:
        shown = "; ".join(problems[:5]) + (
            f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        self.checks.append(Check(title, not problems, shown if problems else detail))

    def markdown(self) -> str:
        lines = ["| what | count |", "|---|---|"]
        lines += [f"| {what} | {value} |" for what, value in self.rows]
        lines += ["", "| invariant | holds | detail |", "|---|---|---|"]
        lines += [
            f"| {c.title} | {'yes' if c.holds else '**NO**'} | {c.detail} |" for c in self.checks
        ]
        return "\n".join(lines)


def tally(values: Iterable[object]) -> str:
    """``value: count, ...``; a negative exit status is named as the signal that ended it."""
    counts = Counter(
        f"died of {signal.Signals(-v).name}" if isinstance(v, int) and v < 0 else str(v)
        for v in values
    )
    return ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "none"


def seconds(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.1f} s, max {max(values):.1f} s"


class Analysis:
    """Everything the runs and the directories say, turned into counts and invariants."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.runs = soak.p.runs
        self.pool = soak.pool
        self.report = Report()
        self.digests: dict[Path, str] = {}

    def of(self, role: Role) -> list[Run]:
        return [r for r in self.runs if r.role == role]

    def digest(self, path: Path) -> str | None:
        if path not in self.digests:
            try:
                self.digests[path] = sha256_of(path)
            except OSError:
                return None
        return self.digests[path]

    def listener_records(self) -> list[tuple[Run, float, dict[str, Any]]]:
        return [(r, at, rec) for r in self.of("listener") for at, rec in r.records()]

    def run(self) -> Report:
        self.describe()
        self.pushes()
        self.retrievals()
        self.listened()
        self.fault_counts()
        self.take_overs()
        self.signalled_senders()
        self.lost()
        self.wrongly_verified()
        self.hangs()
        self.memory()
        self.broker()
        return self.report

    def describe(self) -> None:
        s = self.soak
        sizes = sorted(src.size for src in self.pool.values())
        self.report.row("command", f"`python {' '.join(sys.argv)}`")
        self.report.row(
            "run", f"{s.minutes:g} min, seed {s.seed}, timeout {TIMEOUT:g} s, {os.cpu_count()} CPUs"
        )
        self.report.row(
            "sources",
            f"{len(sizes)} files, {sizes[0]} B to {sizes[-1] / MiB:.0f} "
            f"MiB, {sum(sizes) / MiB:.0f} MiB in all",
        )

    def pushes(self) -> None:
        senders = self.of("sender")
        broadcast = sum(len(r.targets) > 1 for r in senders)
        self.report.row("pushes (send-file runs)", f"{len(senders)} ({broadcast} broadcasts)")
        self.report.row("pushes by exit code", tally(r.status for r in senders))
        targets = [t for r in senders for t in (r.outcome() or {}).get("targets", [])]
        self.report.row("push targets reported ok", sum(bool(t.get("ok")) for t in targets))
        failed = [t.get("code", "no code") for t in targets if not t.get("ok")]
        self.report.row("push targets reported failed, by code", tally(failed))
        quiet = sum(r.outcome() is None for r in senders)
        self.report.row("pushes that printed no result (SIGKILLed...)", quiet)
        stored = {
            (r.site, rec.get("stream_id")) for r, _, rec in self.listener_records() if rec.get("ok")
        }
        wrong = [
            f"{r.label} -> {t['site']} ({t.get('code')})"
            for r in senders
            for t in (r.outcome() or {}).get("targets", [])
            if not t.get("ok") and (t["site"], t.get("stream_id")) in stored
        ]
        self.report.row(
            "push targets reported failed that their listener stored",
            f"{len(wrong)}" + (f": {', '.join(wrong[:4])}" if wrong else ""),
        )
        unheard = sum(
            bool(t.get("ok")) and (t["site"], t.get("stream_id")) not in stored for t in targets
        )
        self.report.row("push targets reported ok with no listener record", unheard)

    def retrievals(self) -> None:
        fetches = self.of("retriever")
        self.report.row("retrievals (retrieve-file runs)", len(fetches))
        self.report.row("retrievals by exit code", tally(r.status for r in fetches))
        resumed = [
            o["resumed_bytes"]
            for r in fetches
            if (o := r.outcome()) and o.get("ok") and o.get("resumed_bytes")
        ]
        self.report.row(
            "retrievals resumed (resumed_bytes > 0)",
            f"{len(resumed)} ({sum(resumed) / MiB:.1f} MiB kept)",
        )
        shared = 0
        for run in fetches:
            end = run.ended or time.monotonic()
            shared += any(
                o is not run
                and o.name == run.name
                and o.site != run.site
                and o.started < end
                and (o.ended or end) > run.started
                for o in fetches
            )
        self.report.row("retrievals overlapping another site's of the same file", shared)

    def listened(self) -> None:
        records = [rec for _, _, rec in self.listener_records()]
        self.report.row("listener records ok", sum(bool(r.get("ok")) for r in records))
        failed = [
            ("sender_gone" if r.get("sender_gone") else r.get("code"))
            for r in records
            if not r.get("ok")
        ]
        self.report.row("listener records failed, by code", tally(failed))
        listeners = self.of("listener")
        self.report.row("listener processes (started again after a kill)", len(listeners))
        self.report.row(
            "listeners / owners that ended on their own",
            tally(f"{r.role} {r.status}" for r in self.soak.unexpected),
        )
        self.report.row(
            "listeners / owner at the final SIGTERM, by exit code",
            tally(
                r.status
                for r in self.runs
                if r.role in ("listener", "owner") and r.signals and r.signals[-1][1] == "SIGTERM"
            ),
        )
        dead = sum(self.grep("dead-lettering"))
        traces = sum(self.grep("Traceback (most recent call last)", skip_hung=True))
        # A SIGINT while the command still imports (before it handles signals): Python's own.
        early = sum(self.grep("\nKeyboardInterrupt\n", skip_hung=True))
        self.report.row(
            "'dead-lettering' log lines / tracebacks in stderr (of which SIGINT while starting)",
            f"{dead} / {traces} ({early})",
        )

    def grep(self, text: str, *, skip_hung: bool = False) -> Iterator[int]:
        for run in self.runs:
            if skip_hung and run.hung:
                continue
            with contextlib.suppress(OSError):
                yield run.stderr.read_text(errors="replace").count(text)

    def fault_counts(self) -> None:
        faults = self.soak.faults
        self.report.row("faults", f"{len(faults)}: " + tally(f.kind for f in faults))
        downs = [f.detail for f in faults if f.kind == "broker restart"]
        self.report.row("broker restarts", ", ".join(downs) or "none")

    def take_overs(self) -> None:
        """What became of the streams the killed listeners left."""
        outcomes = []
        for left in self.soak.left_over:
            found = [
                rec
                for run, at, rec in self.listener_records()
                if run.site == left.site and at > left.at and rec.get("stream_id") == left.stream_id
            ]
            if not found:
                outcomes.append("no record")
            elif found[0].get("ok"):
                outcomes.append("stored")
            else:
                gone = found[0].get("sender_gone")
                outcomes.append("sender_gone" if gone else str(found[0].get("code")))
        self.report.row(
            "take-overs: streams left by dead listeners, by outcome",
            f"{len(outcomes)} ({tally(outcomes)})",
        )
        kept = [
            rec
            for _, _, rec in self.listener_records()
            if rec.get("ok") and rec.get("resumed_bytes")
        ]
        self.report.row("listener records stored with resumed_bytes > 0", len(kept))

    def signalled_senders(self) -> None:
        """For each sender stopped by SIGINT/SIGTERM: its targets' listener records and how
        long after the signal they came."""
        records = self.listener_records()
        codes: list[str] = []
        delays: list[float] = []
        runs = [
            r for r in self.of("sender") if r.signals and r.signals[0][1] in ("SIGINT", "SIGTERM")
        ]
        for run in runs:
            at_signal = run.signals[0][0]
            for target in (run.outcome() or {}).get("targets", []):
                sid = target.get("stream_id")
                found = [
                    (at, rec)
                    for r, at, rec in records
                    if r.site == target["site"] and rec.get("stream_id") == sid
                ]
                if target.get("ok"):
                    codes.append("stored before the signal")
                elif not found:
                    codes.append("no listener record")
                else:
                    at, rec = found[0]
                    codes.append("stored" if rec.get("ok") else str(rec.get("code")))
                    delays.append(at - at_signal)
        self.report.row(
            "senders stopped by SIGINT / SIGTERM, by exit code",
            f"{len(runs)} ({tally(r.status for r in runs)})",
        )
        self.report.row("their targets' listener records", tally(codes))
        self.report.row("their listener records, time after the signal", seconds(delays))

    # -- invariants --

    def lost(self) -> None:
        problems: list[str] = []
        checked = 0
        for run in self.of("sender"):
            for target in (run.outcome() or {}).get("targets", []):
                if not target.get("ok"):
                    continue
                checked += 1
                path = self.soak.dests[target["site"]] / str(target.get("stored_as"))
                problems += self.mismatch(path, run.name, f"{run.label} -> {target['site']}")
        for listener, _, rec in self.listener_records():
            if rec.get("ok"):
                checked += 1
                problems += self.mismatch(Path(rec["path"]), rec.get("name"), listener.label)
        for fetch in self.of("retriever"):
            out = fetch.outcome()
            if out and out.get("ok"):
                checked += 1
                problems += self.mismatch(Path(out["path"]), fetch.name, fetch.label)
        self.report.check(
            "1. nothing lost (reported stored: in its dest, right SHA-256)",
            problems,
            f"{checked} reports checked",
        )

    def mismatch(self, path: Path, name: str | None, who: str) -> list[str]:
        source = self.pool.get(str(name))
        if source is None:
            return [f"{who}: {path} claims unknown source {name!r}"]
        digest = self.digest(path)
        if digest is None:
            return [f"{who}: {path} ({name}) missing"]
        if digest != source.sha256:
            return [f"{who}: {path} has sha256 {digest[:12]}, {name} is {source.sha256[:12]}"]
        return []

    def wrongly_verified(self) -> None:
        problems: list[str] = []
        files = 0
        dirs = [*self.soak.dests.values(), *self.soak.fetched.values()]
        for path in (p for d in dirs if d.exists() for p in sorted(d.iterdir())):
            if path.name.startswith(".objstream-"):
                continue
            files += 1
            problems += self.mismatch(path, source_of(path.name), "final file")
        for listener, _, rec in self.listener_records():
            source = self.pool.get(str(rec.get("name")))
            if rec.get("ok") and source is not None and rec.get("sha256") != source.sha256:
                problems.append(
                    f"{listener.label}: record of {rec['name']} says {str(rec.get('sha256'))[:12]}"
                )
        partials = sum(1 for d in dirs if d.exists() for _ in d.glob(".objstream-*.part"))
        reported = self.reported_paths()
        unreported = sum(
            1
            for d in dirs
            if d.exists()
            for p in d.iterdir()
            if not p.name.startswith(".objstream-") and p not in reported
        )
        self.report.row(
            "final files in the dest dirs / reported by nobody / kept partials",
            f"{files} / {unreported} / {partials}",
        )
        self.report.check(
            "2. nothing wrongly verified (every final file = its source)",
            problems,
            f"{files} files hashed",
        )

    def reported_paths(self) -> set[Path]:
        paths = {Path(rec["path"]) for _, _, rec in self.listener_records() if rec.get("ok")}
        for run in self.runs:
            out = run.outcome() if run.role in ("sender", "retriever") else None
            if out and run.role == "retriever" and out.get("ok"):
                paths.add(Path(out["path"]))
            for t in (out or {}).get("targets", []) if run.role == "sender" else []:
                if t.get("ok"):
                    paths.add(self.soak.dests[t["site"]] / str(t.get("stored_as")))
        return paths

    def hangs(self) -> None:
        problems = [
            f"{r.label} ({r.name or ''}, {(r.ended or 0) - r.started:.0f} s): {r.stderr_tail(3)}"
            for r in self.runs
            if r.hung
        ]
        longest = {
            role: max(((r.ended or r.started) - r.started for r in self.of(role)), default=0.0)
            for role in TRANSFERS
        }
        self.report.check(
            "3. nothing hung",
            problems,
            f"longest send {longest['sender']:.0f} s, retrieval {longest['retriever']:.0f} s "
            f"(limit {self.soak.limit(0):.0f} s + 1 s/MiB); services stopped within "
            f"{STOP_GRACE:g} s",
        )

    def memory(self) -> None:
        parts = []
        problems = []
        for role in ROLES:
            runs = [r for r in self.of(role) if r.maxrss_kib]
            if not runs:
                continue
            top = max(runs, key=lambda r: r.maxrss_kib)
            parts.append(
                f"{role} {top.maxrss_kib / 1024:.0f} MiB ({top.label}, median "
                f"{statistics.median(r.maxrss_kib for r in runs) / 1024:.0f})"
            )
            problems += [
                f"{r.label} {r.maxrss_kib / 1024:.0f} MiB"
                for r in runs
                if r.maxrss_kib / 1024 > RSS_LIMIT_MIB
            ]
        self.report.row("peak RSS by role (max, median)", "; ".join(parts))
        self.report.check(
            f"4. bounded memory (peak RSS <= {RSS_LIMIT_MIB:g} MiB)", problems, "; ".join(parts)
        )

    def broker(self) -> None:
        problems = []
        peak_total = 0
        peak_data: tuple[tuple[int, int], str] = ((0, 0), "")
        for at, queues in self.soak.samples:
            peak_total = max(peak_total, sum(q.bytes for q in queues))
            for q in queues:
                if q.kind == "data" and (q.ready_bytes, q.bytes) > peak_data[0]:
                    peak_data = (
                        (q.ready_bytes, q.bytes),
                        f"{q.bytes / MiB:.1f} MiB, {q.ready_bytes / MiB:.1f} MiB ready of its "
                        f"{(q.limit_bytes or 0) / MiB:.0f} MiB limit",
                    )
                if q.limit_bytes is not None and q.ready_bytes > q.limit_bytes:
                    problems.append(
                        f"{q.name} at {at - self.soak.t0:.0f} s: {q.ready_bytes} "
                        f"ready bytes > {q.limit_bytes}"
                    )
        self.report.row(
            "broker samples (every 10 s): peak bytes in all queues / fullest data queue",
            f"{len(self.soak.samples)}: {peak_total / MiB:.1f} MiB / {peak_data[1] or 'none'}",
        )
        settled = self.soak.settled
        if settled is None:
            problems.append("the node did not list its queues after settling")
            left = "not listed"
        else:
            left = "; ".join(
                f"{kind} {len(qs)} queues ({sum(q.consumers > 0 for q in qs)} consumed), "
                f"{sum(q.messages for q in qs)} msgs, {sum(q.bytes for q in qs) / MiB:.1f} MiB"
                for kind in ("data", "inbox", "service", "reply", "dead", "other")
                if (qs := [q for q in settled if q.kind == kind])
            )
        self.report.row("left on the broker after settling", left)
        self.report.check(
            "5. broker: no data queue past its backlog limit", problems, f"after settling: {left}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long the faults go on")
    parser.add_argument("--seed", type=int, default=1, help="sources, choices and faults")
    parser.add_argument("--keep", metavar="DIR", type=Path, help="run in DIR and keep it")
    args = parser.parse_args(argv)
    if not LocalRabbitNode.available():
        parser.error("needs the rabbitmq-server and rabbitmqctl binaries on PATH")
    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep}: not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="objstream-soak-"))

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    soak = Soak(args.minutes, args.seed, work)
    try:
        soak.run()
        soak.say("checking")
        report = Analysis(soak).run()
    except KeyboardInterrupt:
        soak.say("interrupted")
        return 130
    finally:
        soak.shut_down(keep=args.keep is not None)
        if args.keep is not None:
            soak.save()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    text = report.markdown()
    print(text)
    if args.keep is not None:
        (work / "report.md").write_text(text + "\n")
    return 0 if all(c.holds for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
