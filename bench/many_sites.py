"""Many sites, each with a broker user of its own: a broadcast to N sites and N retrievals at once.

    python bench/many_sites.py [--sites 1,8,64] [--size 64MiB] [--mode broadcast,retrieve]
                               [--processes 8] [--profile DIR]

A throwaway RabbitMQ node of its own (``tests/rabbitmq_node.py``), never the broker at
OBJSTREAM_URL. Every site (``server``, ``site-1`` ... ``site-N``) has a broker user named like
it with exactly the least privilege objstream computes (``common/topology.py: permissions``,
what ``objstream admin permissions`` grants), all loaded in one ``rabbitmqctl
import_definitions``; an administrator (guest) declares each site's exchanges, inbox and
service queue as ``objstream admin permissions --apply`` does (``common/admin.py:
declare_for``).

``broadcast``: the sender ("server", a process of its own) sends one file of ``--size`` to the
N sites in one ``FileStreamer.stream_file`` (one upload, the broker copies to each site's own
data queue). ``retrieve``: the server serves a float32 container of ``--size`` (8 entries) as
"model" (``RetrievalServer``, ``max_streams`` 64) and N sites ask for it at the same moment.
The receiving sites are light: up to ``--processes`` processes, each with a thread per site and
a ``Receiver`` / ``Retriever`` per thread (its own connection, its own user); received files
go to a tmpfs directory and are deleted once verified (objstream checks every chunk's CRC-32
and the whole SHA-256 before it hands an object out), retrieved containers are dropped.

One markdown row per (mode, N): wall time from the sender's start (the broadcast) or the
requests (retrieval) until the last site had its object verified; the sender's CPU seconds
(user + system, every thread, from connected to done); the broker's CPU seconds and its peak
resident memory (VmHWM of the Erlang VM, reset to its current size before each row); the bytes
the sender published (message bodies, ``bytes_published``); the per-site rate (size over the
time until that site was done: the slowest site's and the median). ``--profile DIR`` writes
cProfile stats of the sender's call (``DIR/MODE-N.prof``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sides import cpu_seconds, node_field, nodes_cpu_seconds
from objstream.common.settings import Settings, parse_size
from tests.rabbitmq_node import LocalRabbitNode

MiB = 1024 * 1024
CTX = mp.get_context("spawn")
NAMESPACE = "many"
SERVER = "server"


def site_names(n: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n + 1)]


def password(user: str) -> str:
    return f"pw-{user}"


def settings_of(node_url: str, site: str, **extra: Any) -> Settings:
    """The settings a site's process uses: its own broker user."""
    return Settings(url=node_url, user=site, password=password(site), namespace=NAMESPACE,
                    stream_ttl=600, timeout=300, **extra)  # fmt: skip


# -- users: one per site, objstream's own least privilege ---------------------------------------


def _password_hash(secret: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + secret.encode()).digest()).decode()


def definitions(sites: list[str], namespace: str = NAMESPACE, vhost: str = "/") -> dict[str, Any]:
    """Users and permissions for ``import_definitions``: each site's user gets exactly
    ``topology.permissions(namespace, site)``, the regexes ``objstream admin permissions``
    prints (its ``Grant.grant_args``)."""
    from objstream.common.admin import Grant

    users, perms, topics = [], [], []
    for site in sites:
        users.append(
            {
                "name": site,
                "password_hash": _password_hash(password(site)),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        )
        vhost_args, topic_args = Grant(site, site, namespace, vhost).grant_args()
        configure, write, read = vhost_args[-3:]
        exchange, topic_write, topic_read = topic_args[-3:]
        perms.append({"user": site, "vhost": vhost, "configure": configure, "write": write,
                      "read": read})  # fmt: skip
        topics.append({"user": site, "vhost": vhost, "exchange": exchange, "write": topic_write,
                       "read": topic_read})  # fmt: skip
    return {"users": users, "permissions": perms, "topic_permissions": topics}


def make_users(node: LocalRabbitNode, sites: list[str]) -> None:
    """Create the sites' users on ``node`` and declare, as the administrator, what a site may
    not declare itself (``admin.declare_for``)."""
    from objstream.common.admin import declare_for
    from objstream.common.amqp import connect
    from objstream.common.topology import Topology

    # In the node's own directory: as root, rabbitmqctl runs as the rabbitmq user, who owns it.
    path = node.base / "definitions.json"
    path.write_text(json.dumps(definitions(sites)))
    with contextlib.suppress(OSError):
        shutil.chown(path, *(lambda st: (st.st_uid, st.st_gid))(node.base.stat()))
    done = node.ctl("import_definitions", str(path), timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"import_definitions: {done.stdout}{done.stderr}")
    admin = Settings(url=node.url, namespace=NAMESPACE)
    connection = connect(admin, "many_sites admin")
    try:
        topology = Topology.from_settings(admin)
        for site in sites:
            declare_for(connection, topology, site)
    finally:
        connection.close()


# -- the broker's CPU and memory ---------------------------------------------------------------


def reset_peak(node: LocalRabbitNode) -> None:
    """Reset the Erlang VM's VmHWM to its current RSS (``5 > /proc/PID/clear_refs``)."""
    for pid in node._beam_pids():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")


def peak_mib(node: LocalRabbitNode) -> float:
    return node_field(node, "status", "VmHWM:") / 1024


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


# -- the sides (spawned processes) ---------------------------------------------------------------


def _child(fn: Callable[..., Any], kwargs: dict[str, Any], out: Any) -> None:
    try:
        out.put(fn(**kwargs))
    except BaseException as e:  # the parent reports it
        out.put({"error": f"{type(e).__name__}: {e}"})


class Proc:
    def __init__(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        self.out = CTX.Queue()
        self.process = CTX.Process(target=_child, args=(fn, kwargs, self.out), daemon=True)
        self.process.start()

    def result(self, timeout: float = 900) -> Any:
        result = self.out.get(timeout=timeout)
        self.process.join(30)
        if isinstance(result, dict) and "error" in result:
            raise RuntimeError(result["error"])
        return result

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


def _profiled(profile: str | None, call: Callable[[], Any]) -> Any:
    """``call()``; with ``profile`` (a path), under cProfile (the calling thread only), and the
    sender's INFO log next to it (``.log``): joins, starts, resends."""
    if not profile:
        return call()
    import cProfile
    import logging

    logging.basicConfig(
        filename=profile.removesuffix(".prof") + ".log",
        level=logging.INFO,
        format="%(relativeCreated)8.0f %(threadName)s %(name)s %(message)s",
    )
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(call)
    finally:
        profiler.dump_stats(profile)


def send(url: str, sites: list[str], path: str, profile: str | None) -> dict[str, Any]:
    """The sender: one stream_file to every site."""
    from objstream.producer import FileStreamer

    with FileStreamer(SERVER, settings_of(url, SERVER)) as streamer:
        start, cpu = time.monotonic(), cpu_seconds()
        results = _profiled(profile, lambda: streamer.stream_file(sites, path))
        end, cpu = time.monotonic(), cpu_seconds() - cpu
        published = streamer.bytes_published
    bad = [f"{r.site}: {r}" for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"not verified: {bad[:3]}")
    return {"start": start, "end": end, "cpu_s": cpu, "published": published}


def serve(url: str, size: int, ready: Any, stop: Any, profile: str | None) -> dict[str, Any]:
    """The server: "model", a float32 container of ``size`` bytes in 8 entries."""
    import numpy as np

    from objstream.producer import ContainerRetriever, RetrievalServer

    rng = np.random.default_rng(0)
    model = {f"layer-{i}": rng.standard_normal(size // 8 // 4, dtype=np.float32)
             for i in range(8)}  # fmt: skip
    with RetrievalServer(SERVER, settings_of(url, SERVER, max_streams=64)) as server:
        ContainerRetriever(server).add_container("model", model)
        cpu = cpu_seconds()
        ready.put("ready")
        _profiled(profile, lambda: server.serve(stop=stop.is_set, poll=0.05))
        return {"published": server.bytes_published, "joined": server.joined,
                "cpu_s": cpu_seconds() - cpu}  # fmt: skip


def _threads(sites: list[str], one: Callable[[str], None], here: Any, ends: dict[str, float],
             errors: list[str]) -> dict[str, Any]:  # fmt: skip
    """Run ``one(site)`` on a thread per site; this process's CPU from when every site was
    ready (``here``: each thread put its site there) to the end."""
    threads = [threading.Thread(target=one, args=(site,)) for site in sites]
    for t in threads:
        t.start()
    for _ in sites:
        here.get()
    cpu = cpu_seconds()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return {"ends": ends, "cpu_s": cpu_seconds() - cpu}


def receive_sites(url: str, sites: list[str], dest: str, ready: Any) -> dict[str, Any]:
    """Light receivers: a thread per site, each its own Receiver (connection, user, queues);
    returns when each site's object was verified (monotonic), and deletes the file."""
    from objstream.consumer import Receiver

    ends: dict[str, float] = {}
    errors: list[str] = []
    here: queue.SimpleQueue[str] = queue.SimpleQueue()

    def one(site: str) -> None:
        try:
            with Receiver(site, Path(dest) / site, settings_of(url, site)) as receiver:
                ready.put(site)
                here.put(site)
                item = receiver.receive(timeout=600)
                if item is None:
                    raise RuntimeError("nothing arrived")
                ends[site] = time.monotonic()
                assert item.sender_user == SERVER, item.sender_user  # the users are in effect
                if item.path is not None:
                    item.path.unlink()
        except BaseException as e:
            ready.put(site)  # do not keep the parent waiting
            here.put(site)
            errors.append(f"{site}: {type(e).__name__}: {e}")

    return _threads(sites, one, here, ends, errors)


def retrieve_sites(url: str, sites: list[str], ready: Any, go: Any) -> dict[str, Any]:
    """Light retrievers: a thread per site, each its own Retriever; all ask when ``go`` is set."""
    from objstream.consumer import Retriever

    ends: dict[str, float] = {}
    errors: list[str] = []
    here: queue.SimpleQueue[str] = queue.SimpleQueue()

    def one(site: str) -> None:
        try:
            with Retriever(site, "/dev/shm", settings_of(url, site)) as retriever:
                ready.put(site)
                here.put(site)
                go.wait(120)
                model = retriever.retrieve_container(SERVER, "model", timeout=600)
                ends[site] = time.monotonic()  # verified: retrieve_container checks SHA-256
                del model
        except BaseException as e:
            ready.put(site)
            here.put(site)
            errors.append(f"{site}: {type(e).__name__}: {e}")

    return _threads(sites, one, here, ends, errors)


# -- one row -------------------------------------------------------------------------------------


def _split(sites: list[str], processes: int) -> list[list[str]]:
    n = min(processes, len(sites))
    return [sites[i::n] for i in range(n)]


def _gather(procs: list[Proc]) -> tuple[dict[str, float], float]:
    """Every site's end time, and the CPU seconds the receiving processes spent."""
    ends: dict[str, float] = {}
    cpu = 0.0
    for p in procs:
        result = p.result()
        ends.update(result["ends"])
        cpu += result["cpu_s"]
    return ends, cpu


def _wait_ready(ready: Any, n: int) -> None:
    for _ in range(n):
        ready.get(timeout=300)


def _row(
    node: LocalRabbitNode,
    size: int,
    ends: dict[str, float],
    *,
    start: float,
    sender: dict[str, Any],
    broker_cpu: float,
    sites_cpu: float,
) -> dict[str, Any]:
    times = [end - start for end in ends.values()]
    return {
        "wall": max(times),
        "sites_cpu": sites_cpu,
        "sender_cpu": sender["cpu_s"],
        "broker_cpu": broker_cpu,
        "broker_peak": peak_mib(node),
        "published": sender["published"],
        "slowest": size / MiB / max(times),
        "median": size / MiB / statistics.median(times),
        "joined": sender.get("joined"),
    }


def broadcast(
    node: LocalRabbitNode, n: int, path: Path, *, processes: int, profile: str | None
) -> dict[str, Any]:
    sites = site_names(n)
    dest = Path(tempfile.mkdtemp(prefix="many-sites-", dir="/dev/shm"))
    receivers: list[Proc] = []
    try:
        ready = CTX.Queue()
        receivers = [Proc(receive_sites, url=node.url, sites=group, dest=str(dest), ready=ready)
                     for group in _split(sites, processes)]  # fmt: skip
        _wait_ready(ready, n)
        time.sleep(1)  # the last Receivers' inbox consumers are up
        reset_peak(node)
        cpu = nodes_cpu_seconds([node])
        sender = Proc(send, url=node.url, sites=sites, path=str(path), profile=profile).result()
        ends, sites_cpu = _gather(receivers)
        broker_cpu = nodes_cpu_seconds([node]) - cpu
        return _row(
            node,
            path.stat().st_size,
            ends,
            start=sender["start"],
            sender=sender,
            broker_cpu=broker_cpu,
            sites_cpu=sites_cpu,
        )
    finally:
        for r in receivers:
            r.kill()
        shutil.rmtree(dest, ignore_errors=True)


def retrieve(
    node: LocalRabbitNode, n: int, size: int, *, processes: int, profile: str | None
) -> dict[str, Any]:
    sites = site_names(n)
    stop, go = CTX.Event(), CTX.Event()
    server_ready, ready = CTX.Queue(), CTX.Queue()
    server = Proc(serve, url=node.url, size=size, ready=server_ready, stop=stop, profile=profile)
    retrievers: list[Proc] = []
    try:
        _wait_ready(server_ready, 1)
        retrievers = [Proc(retrieve_sites, url=node.url, sites=group, ready=ready, go=go)
                      for group in _split(sites, processes)]  # fmt: skip
        _wait_ready(ready, n)
        time.sleep(1)
        reset_peak(node)
        pid = server.process.pid
        assert pid is not None
        cpu, server_cpu = nodes_cpu_seconds([node]), process_cpu(pid)
        start = time.monotonic()
        go.set()
        ends, sites_cpu = _gather(retrievers)
        broker_cpu = nodes_cpu_seconds([node]) - cpu
        server_cpu = process_cpu(pid) - server_cpu  # from the requests to done
        stop.set()
        result = server.result()
        return _row(
            node,
            size,
            ends,
            start=start,
            sender={**result, "cpu_s": server_cpu},
            broker_cpu=broker_cpu,
            sites_cpu=sites_cpu,
        )
    finally:
        stop.set()
        for r in [*retrievers, server]:
            r.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="1,8,64")
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--mode", default="broadcast,retrieve")
    parser.add_argument("--processes", type=int, default=8, help="receiving processes, at most")
    parser.add_argument("--profile", help="directory for cProfile stats of the sender")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.sites.split(",")]
    modes = args.mode.split(",")
    size = parse_size(args.size)
    if not LocalRabbitNode.available():
        print("many_sites: needs the rabbitmq-server and rabbitmqctl binaries", file=sys.stderr)
        return 2
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="many-sites-"))
    node = LocalRabbitNode()
    try:
        node.start()
        make_users(node, [SERVER, *site_names(max(counts))])
        path = work / "object.bin"
        with open(path, "wb") as f:
            for _ in range(0, size, MiB):
                f.write(os.urandom(MiB))
            f.truncate(size)
        print(
            f"# {size / MiB:g} MiB; {platform.node()}, {os.cpu_count()} CPUs; "
            f"broker idle {node_field(node, 'status', 'VmRSS:') / 1024:.0f} MiB RSS\n"
        )
        print(
            "| mode | sites | wall | sender CPU | broker CPU | broker peak RSS | sender "
            "published | MiB/s per site (slowest / median) | sites' CPU |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for mode in modes:
            for n in counts:
                profile = args.profile and str(Path(args.profile) / f"{mode}-{n}.prof")
                if mode == "broadcast":
                    r = broadcast(node, n, path, processes=args.processes, profile=profile)
                else:
                    r = retrieve(node, n, size, processes=args.processes, profile=profile)
                joined = f"; {r['joined']} joined" if r["joined"] is not None else ""
                print(
                    f"| {mode} | {n} | {r['wall']:.2f} s | {r['sender_cpu']:.2f} s | "
                    f"{r['broker_cpu']:.2f} s | {r['broker_peak']:.0f} MiB | "
                    f"{r['published'] / MiB:.1f} MiB ({r['published'] / size:.2f} x{joined}) | "
                    f"{r['slowest']:.1f} / {r['median']:.1f} | {r['sites_cpu']:.1f} s |",
                    flush=True,
                )
    finally:
        node.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
