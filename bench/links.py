"""objstream over links that are not loopback: sites behind shaped links, optional latency.

    python bench/links.py --sites 100mbit [--latency-ms 50] [--size 48MiB]
        [--mode broadcast|single] [--without-slow] [--runs 1]
        [--file PATH] [--compress auto|zstd|none]

Needs root (network namespaces), ``ip``, ``tc`` and a local ``rabbitmq-server``. Each site of
``--sites`` (one rate per site, ``tc`` style, or ``none``) gets a network namespace of its own,
joined to the host by a veth pair shaped with ``tbf`` in both directions (bench/shaping.py).
A throwaway RabbitMQ node listens on 127.0.0.1 and on each host-side veth address; each site
runs ``objstream consumer listen`` inside its namespace; the sender runs on the host (the
producer API, in a process of its own: its clock starts once it is connected).

``--latency-ms N`` adds N ms of round trip between each site and the broker: the site connects
to a proxy of the bench's own (bench/delay_proxy.py) that holds every piece of bytes N/2 ms in
each direction. The delay is in the application's path, not in TCP's: the proxy ends one TCP
connection and opens another, as a split-TCP accelerator would, so the objstream window sees
the round trip but each TCP connection's own congestion control does not.

For each site, before the transfer, the raw rate of its link: a plain TCP bulk download of
about 3 s worth (capped at the object size) through the same veth and tbf, and through the same
proxy when latency is added. Then ``--mode broadcast`` sends one file to every site at once
(one ``stream_file`` with every target), ``--mode single`` to each site in turn. The report
gives per site the achieved rate (object size / time from the sender's start to the site's
verified copy, as ``consumer listen --json`` reports it) against the raw rate, and the bytes
the sender uploaded: counted by a pass-through proxy between sender and broker (AMQP bytes
the sender wrote: frames, headers and bodies; TCP/IP headers not included), next to what the
sender itself counted as published bodies, and the broker's peak resident memory.
``--without-slow`` repeats the broadcast to the fastest sites alone and prints the ratio of
their finish times with and without the slower ones.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import delay_proxy, shaping
from bench.delay_proxy import Listener
from bench.shaping import Links, Site
from bench.sides import node_field
from objstream.common.settings import parse_size
from tests.rabbitmq_node import LocalRabbitNode, free_port

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
CTX = mp.get_context("spawn")
NAMESPACE = "links"
RAW_SECONDS = 3.0


# -- pure helpers (unit-tested) -------------------------------------------------------------------


def mbit(bytes_per_second: float) -> float:
    """Mbit/s (10^6 bits) of a rate in bytes per second."""
    return bytes_per_second * 8 / 1e6


def raw_size(rate: int | None, size: int) -> int:
    """Bytes of the raw-rate download: about :data:`RAW_SECONDS` of the link, at least 4 MiB,
    at most the object."""
    if rate is None:
        return size
    return max(min(4 * MiB, size), min(size, int(rate / 8 * RAW_SECONDS)))


@dataclass(frozen=True)
class Row:
    """One site's line of the report."""

    site: str
    link: str
    raw: float  # bytes/s
    achieved: float  # bytes/s
    finished: float  # seconds after the sender's start
    rtt: float  # seconds: one byte asked for and received over the link (and proxy)


def format_rows(rows: list[Row]) -> str:
    """The per-site markdown table."""
    lines = [
        "| site | link | round trip ms | raw MiB/s (Mbit/s) | achieved MiB/s (Mbit/s) "
        "| achieved / raw | finished after s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.site} | {r.link} | {r.rtt * 1000:.1f} | {r.raw / MiB:.1f} ({mbit(r.raw):.0f}) "
            f"| {r.achieved / MiB:.1f} ({mbit(r.achieved):.0f}) | {r.achieved / r.raw:.2f} "
            f"| {r.finished:.2f} |"
        )
    return "\n".join(lines)


# -- cleanup, whatever happens ---------------------------------------------------------------------

_undo: list[Callable[[], None]] = []


def _cleanup() -> None:
    while _undo:
        with contextlib.suppress(Exception):
            _undo.pop()()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(143)


# -- the pieces of a run ---------------------------------------------------------------------------


class Node(LocalRabbitNode):
    """A throwaway node that also listens on the host-side veth addresses and lets guest log in
    from them (by default guest may only connect from loopback)."""

    def __init__(self, host_ips: list[str]) -> None:
        super().__init__()
        self.config_lines += ["loopback_users = none"]
        self.config_lines += [
            f"listeners.tcp.site{i} = {ip}:{self.port}" for i, ip in enumerate(host_ips, 1)
        ]

    def rss_mib(self) -> float:
        return node_field(self, "status", "VmRSS:") / 1024


def _send(url: str, targets: list[str], path: str, out: Any, compress: str) -> None:
    """The sender (a spawned process): one stream_file to ``targets``."""
    try:
        from objstream.common.settings import Settings
        from objstream.producer import FileStreamer

        settings = Settings(url=url, namespace=NAMESPACE, stream_ttl=600, compress=compress)
        with FileStreamer("server", settings) as streamer:
            start = time.monotonic()
            results = streamer.stream_file(targets, path)
            end = time.monotonic()
            published = streamer.bytes_published
        bad = [f"{r.site}: {r}" for r in results if not r.ok]
        out.put({"start": start, "end": end, "published": published, "bad": bad})
    except BaseException as e:  # the parent reports it
        out.put({"error": f"{type(e).__name__}: {e}"})


class Receiver:
    """``objstream consumer listen --count 1 --json`` inside a site's namespace; ``finished``
    is the monotonic time its JSON line arrived."""

    def __init__(self, site: Site, url: str, dest: Path, log: Path) -> None:
        self.name = f"site-{site.index}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        command = [
            *site.exec_prefix(), sys.executable, "-m", "objstream", "consumer", "listen",
            "--url", url, "--namespace", NAMESPACE, "--site", self.name, "--dest", str(dest),
            "--count", "1", "--json", "--progress", "none", "--timeout", "120",
        ]  # fmt: skip
        with open(log, "ab") as errors:  # the child keeps its own copy
            self.process = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True
            )
        self.finished = 0.0
        self.line = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip():
                self.finished = time.monotonic()
                self.line = line.strip()

    def wait(self, timeout: float) -> None:
        self.process.wait(timeout)
        self._reader.join(5)
        if self.process.returncode != 0 or not self.finished:
            raise RuntimeError(f"{self.name}: exit {self.process.returncode}: {self.line}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _wait_listening(url: str, sites: list[str], timeout: float = 60) -> None:
    """Until each site's inbox has a consumer (its receiver is up)."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as connection:
        for site in sites:
            while True:
                channel = connection.channel()
                try:
                    queue = f"{NAMESPACE}.site.{site}"
                    if channel.queue_declare(queue, passive=True).method.consumer_count:
                        channel.close()
                        break
                    channel.close()
                except pika.exceptions.ChannelClosedByBroker:
                    pass  # not declared yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{site}: no receiver listening after {timeout} s")
                time.sleep(0.2)


@dataclass
class Bench:
    links: Links
    node: Node
    counters: Any
    send_port: int
    amqp: dict[int, tuple[str, int]]  # site index -> where its receiver connects
    raw_at: dict[int, tuple[str, int]]  # site index -> its raw source
    work: Path


def _fetch(bench: Bench, site: Site, size: int) -> float:
    """Seconds of a ``size``-byte download from the raw source, inside the site's namespace."""
    host, port = bench.raw_at[site.index]
    out = subprocess.run(
        [*site.exec_prefix(), sys.executable, delay_proxy.__file__, host, str(port), str(size)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return float(json.loads(out.stdout)["seconds"])


def _raw_rate(bench: Bench, site: Site, size: int) -> tuple[float, float]:
    """The link's raw rate (bytes/s) and round trip (s, the best of 3 one-byte fetches)."""
    rtt = min(_fetch(bench, site, 1) for _ in range(3))
    n = raw_size(site.rate, size)
    return n / _fetch(bench, site, n), rtt


def _transfer(
    bench: Bench,
    sites: list[Site],
    path: Path,
    size: int,
    compress: str = "none",
    *,
    keep: bool = False,
) -> dict[str, Any]:
    """One send of ``path`` to ``sites`` (one stream_file with every target); per-site
    finish times, the sender's result, uploaded bytes and the broker's peak RSS. ``keep``:
    the sites keep what they stored (a later send of a new version is then a delta)."""
    receivers = []
    try:
        for site in sites:
            host, port = bench.amqp[site.index]
            dest = bench.work / f"dest-{site.index}"
            dest.mkdir(exist_ok=True)
            url = f"amqp://guest:guest@{host}:{port}/%2F"
            receivers.append(Receiver(site, url, dest, bench.work / f"site-{site.index}.log"))
        _wait_listening(bench.node.url, [r.name for r in receivers])
        peak = [bench.node.rss_mib()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], bench.node.rss_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        uploaded_before = bench.counters[0]
        out = CTX.Queue()
        url = f"amqp://guest:guest@127.0.0.1:{bench.send_port}/%2F"
        targets = [r.name for r in receivers]
        sender = CTX.Process(target=_send, args=(url, targets, str(path), out, compress))
        sender.start()
        _undo.append(lambda: sender.kill())
        result: dict[str, Any] = out.get(timeout=1800)
        sender.join(30)
        done.set()
        sampler.join()
        if "error" in result or result["bad"]:
            raise RuntimeError(f"sender: {result.get('error') or result['bad']}")
        for receiver in receivers:
            receiver.wait(60)
        finished = {r.name: r.finished - result["start"] for r in receivers}
        return {
            "finished": finished,
            "sender_s": result["end"] - result["start"],
            "uploaded": bench.counters[0] - uploaded_before,
            "published": result["published"],
            "broker_rss_mib": peak[0],
        }
    finally:
        for receiver in receivers:
            receiver.kill()
        if not keep:
            for site in sites:
                for file in (bench.work / f"dest-{site.index}").iterdir():  # the index too
                    file.unlink()


def _setup(rates: list[int | None], latency_ms: float) -> Bench:
    links = Links(rates)
    _undo.append(links.cleanup)
    links.create()
    node = Node([s.host_ip for s in links.sites])
    _undo.append(node.cleanup)
    node.start()
    work = Path(tempfile.mkdtemp(prefix="objstream-links-"))
    _undo.append(lambda: shutil.rmtree(work, ignore_errors=True))
    send_port, source_port = free_port(), free_port()
    specs = [
        Listener("127.0.0.1", send_port, ("127.0.0.1", node.port), counter=0),
        Listener("127.0.0.1", source_port),
    ]
    amqp, raw_at = {}, {}
    delay = latency_ms / 2000
    for site in links.sites:
        if latency_ms:
            amqp_port, raw_port = free_port(), free_port()
            specs.append(Listener(site.host_ip, amqp_port, ("127.0.0.1", node.port), delay))
            specs.append(Listener(site.host_ip, raw_port, ("127.0.0.1", source_port), delay))
            amqp[site.index] = (site.host_ip, amqp_port)
            raw_at[site.index] = (site.host_ip, raw_port)
        else:
            specs.append(Listener(site.host_ip, source_port))
            amqp[site.index] = (site.host_ip, node.port)
            raw_at[site.index] = (site.host_ip, source_port)
    counters = CTX.Array("q", 1)
    ready, stop = CTX.Queue(), CTX.Event()
    proxy = CTX.Process(target=delay_proxy.serve, args=(specs, counters, ready, stop), daemon=True)
    proxy.start()

    def end_proxy() -> None:
        stop.set()
        proxy.join(5)
        proxy.kill()

    _undo.append(end_proxy)
    ready.get(timeout=30)
    return Bench(links, node, counters, send_port, amqp, raw_at, work)


def _then(bench: Bench, sites: list[Site], args: argparse.Namespace, path: Path, size: int) -> None:
    """Send ``--then`` (the new version) where the first went, and report it."""
    shutil.copyfile(args.then, path)
    then_size = path.stat().st_size
    if args.mode == "broadcast":
        runs = [_transfer(bench, sites, path, then_size, args.compress)]
    else:
        runs = [_transfer(bench, [s], path, then_size, args.compress) for s in sites]
    finished = {k: v for r in runs for k, v in r["finished"].items()}
    uploaded = sum(r["uploaded"] for r in runs)
    print(
        f"then {args.then.name} ({then_size / MiB:g} MiB): sites finished after "
        + ", ".join(f"{site} {s:.2f} s" for site, s in sorted(finished.items()))
        + f"; uploaded {uploaded / MiB:.2f} MiB in {len(runs)} send(s) ="
        f" {uploaded / then_size / len(runs):.3f}x the object per send",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="100mbit", help="rates, one per site: 1gbit,100mbit")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added round trip")
    parser.add_argument("--size", default="48MiB", help="object size (default 48MiB)")
    parser.add_argument("--mode", choices=("broadcast", "single"), default="broadcast")
    parser.add_argument("--without-slow", action="store_true",
                        help="also broadcast to the fastest sites alone and compare")  # fmt: skip
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--file", type=Path, help="send this file (default: --size random bytes)")
    parser.add_argument("--compress", default="none", help="auto, zstd or none (default none)")
    parser.add_argument(
        "--then",
        type=Path,
        metavar="PATH",
        help="after each run, send this file (a new version of --file) to the same sites, "
        "which kept the first: a delta transfer; its time and upload are reported",
    )
    args = parser.parse_args(argv)
    if args.then and not args.file:
        parser.error("--then needs --file (the first version)")
    try:
        rates = shaping.parse_sites(args.sites)
        size = args.file.stat().st_size if args.file else parse_size(args.size)
    except Exception as e:
        parser.error(str(e))
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        bench = _setup(rates, args.latency_ms)
        path = bench.work / "object.bin"
        if args.file:
            shutil.copyfile(args.file, path)
        else:
            with open(path, "wb") as f:
                for _ in range(0, size, MiB):
                    f.write(os.urandom(MiB))
                f.truncate(size)
        sites = bench.links.sites
        raw = {s.index: _raw_rate(bench, s, size) for s in sites}
        what = args.file.name if args.file else "random bytes"
        print(
            f"# {size / MiB:g} MiB of {what}, {args.mode}, sites {args.sites}, "
            f"added round trip {args.latency_ms:g} ms, compress {args.compress}",
            flush=True,
        )
        for run in range(1, args.runs + 1):
            keep = args.then is not None
            if args.mode == "broadcast":
                runs = [_transfer(bench, sites, path, size, args.compress, keep=keep)]
            else:
                runs = [_transfer(bench, [s], path, size, args.compress, keep=keep) for s in sites]
            finished = {k: v for r in runs for k, v in r["finished"].items()}
            rows = [
                Row(f"site-{s.index}", shaping.format_rate(s.rate), raw[s.index][0],
                    size / finished[f"site-{s.index}"], finished[f"site-{s.index}"],
                    raw[s.index][1])
                for s in sites
            ]  # fmt: skip
            uploaded = sum(r["uploaded"] for r in runs)
            published = sum(r["published"] for r in runs)
            print(f"\nrun {run}:\n{format_rows(rows)}")
            print(
                f"sender: {max(r['sender_s'] for r in runs):.2f} s; uploaded {uploaded / MiB:.1f}"
                f" MiB in {len(runs)} send(s) = {uploaded / size / len(runs):.3f}x the object per"
                f" send ({published / size / len(runs):.3f}x in published bodies);"
                f" broker peak RSS {max(r['broker_rss_mib'] for r in runs):.0f} MiB",
                flush=True,
            )
            if args.then:
                _then(bench, sites, args, path, size)
                shutil.copyfile(args.file, path)  # the next run starts from the first version
            top = max((s.rate or 0) for s in sites)
            fast = [s for s in sites if (s.rate or 0) == top] if args.without_slow else []
            if fast and len(fast) < len(sites):
                alone = _transfer(bench, fast, path, size, args.compress)
                with_slow = max(finished[f"site-{s.index}"] for s in fast)
                without = max(alone["finished"].values())
                print(
                    f"fast sites ({len(fast)}): last finished after {with_slow:.2f} s with the"
                    f" slower sites, {without:.2f} s without: {with_slow / without:.2f}x;"
                    f" uploaded alone {alone['uploaded'] / size:.3f}x",
                    flush=True,
                )
    except KeyboardInterrupt:
        return 130
    finally:
        _cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
