"""objstream's benchmark suite: one run, one table, one plot.

    python bench/run.py [--runs 3] [--large] [--quick] [--out bench/results]

Against the broker at OBJSTREAM_URL (default amqp://guest:guest@localhost:5672/%2F) it measures
the raw pika ceiling (stock pika, 1 MiB transient messages, no confirms, prefetch 64, manual
acks; and persistent with 32 windowed confirms), file streaming (256 MiB, 1 GiB, 4 GiB with
--large), container streaming (10 x 100 MiB float32), many small objects (1,000 files of 10 KiB
pushed; 1,000 retrievals of a 1 KiB container), 4 producers to 4 consumers at once, and a sweep
of chunk sizes and windows, after the start-up rows of ``bench/startup.py`` (``objstream
--version`` and a 1 KiB ``send-file`` end to end, as new processes), and a 256 MiB file over TLS
against plain AMQP on a throwaway node (``--tls-only``: that row alone). Every side is a process
of its own; every figure is the median of --runs runs. It prints a markdown table (with file
streaming's ratio to the raw ceiling), and writes it with a PNG plot of throughput against chunk
size to --out.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika

from bench import sides, startup
from objstream.common.urls import mask_url

MiB = 1024 * 1024
GiB = 1024 * MiB
CTX = mp.get_context("spawn")
URL = os.environ.get("OBJSTREAM_URL", "amqp://guest:guest@localhost:5672/%2F")


# -- running sides in processes ------------------------------------------------------------------


def _child(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any], out: Any) -> None:
    try:
        out.put(fn(**kwargs))
    except BaseException as e:  # the parent reports it
        out.put({"error": f"{type(e).__name__}: {e}"})


class Proc:
    def __init__(self, fn: Callable[..., dict[str, Any]], **kwargs: Any) -> None:
        self.out = CTX.Queue()
        self.process = CTX.Process(target=_child, args=(fn, kwargs, self.out), daemon=True)
        self.process.start()

    def result(self, timeout: float = 600) -> dict[str, Any]:
        result: dict[str, Any] = self.out.get(timeout=timeout)
        self.process.join(30)
        if "error" in result:
            raise RuntimeError(result["error"])
        return result


def _ready(n: int = 1) -> tuple[Any, Callable[[], None]]:
    queue = CTX.Queue()

    def wait() -> None:
        for _ in range(n):
            queue.get(timeout=120)

    return queue, wait


def _namespace() -> str:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    NAMESPACES.append(ns)
    return ns


NAMESPACES: list[str] = []


# -- the benchmarks ------------------------------------------------------------------------------


def raw(count: int, size: int, confirmed: bool) -> dict[str, float]:
    queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    connection.channel().queue_declare(queue, durable=confirmed)
    try:
        ready, wait = _ready()
        consumer = Proc(sides.raw_consume, url=URL, queue=queue, count=count, ready=ready)
        wait()
        if confirmed:
            producer = Proc(sides.raw_publish_confirmed, url=URL, queue=queue, count=count,
                            size=size, window=32)  # fmt: skip
        else:
            producer = Proc(sides.raw_publish, url=URL, queue=queue, count=count, size=size)
        p, c = producer.result(), consumer.result()
    finally:
        connection.channel().queue_delete(queue)
        connection.close()
    gib = count * size / GiB
    return {"mib_s": count * size / MiB / (c["end"] - p["start"]),
            "sender_cpu": p["cpu_s"] / gib, "receiver_cpu": c["cpu_s"] / gib}  # fmt: skip


def file_stream(
    path: Path, chunk_size: int = MiB, window: int = 32, url: str = URL,
    settings: dict[str, Any] | None = None,
) -> dict[str, float]:  # fmt: skip
    ns = _namespace()
    with tempfile.TemporaryDirectory(prefix="bench-in-") as dest:
        ready, wait = _ready()
        consumer = Proc(sides.receive, url=url, namespace=ns, site="site-1", dest=dest, count=1,
                        ready=ready, settings=settings)  # fmt: skip
        wait()
        producer = Proc(sides.send_file, url=url, namespace=ns, targets=["site-1"],
                        path=str(path), chunk_size=chunk_size, window=window,
                        settings=settings)  # fmt: skip
        p, c = producer.result(), consumer.result()
    gib = p["bytes"] / GiB
    return {"mib_s": p["bytes"] / MiB / (p["end"] - p["start"]),
            "sender_rss": p["peak_rss_mib"], "receiver_rss": c["peak_rss_mib"],
            "sender_cpu": p["cpu_s"] / gib, "receiver_cpu": c["cpu_s"] / gib}  # fmt: skip


def container_stream(entries: int, entry_size: int) -> dict[str, float]:
    ns = _namespace()
    ready, wait = _ready()
    consumer = Proc(sides.receive, url=URL, namespace=ns, site="site-1", dest="/tmp", count=1,
                    ready=ready, keep=True)  # fmt: skip
    wait()
    producer = Proc(sides.send_container, url=URL, namespace=ns, entries=entries,
                    entry_size=entry_size)  # fmt: skip
    p, c = producer.result(), consumer.result()
    total = entries * entry_size / MiB
    return {"mib_s": total / (p["end"] - p["start"]),
            "sender_rss": p["peak_rss_mib"], "receiver_rss": c["peak_rss_mib"],
            "container_mib": total}  # fmt: skip


def _latency_figures(result: dict[str, Any], count: int) -> dict[str, float]:
    latencies = sorted(result["latencies"])
    return {
        "objects_s": count / (result["end"] - result["start"]),
        "median_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def small_files(directory: Path, count: int) -> dict[str, float]:
    ns = _namespace()
    with tempfile.TemporaryDirectory(prefix="bench-in-") as dest:
        ready, wait = _ready()
        consumer = Proc(sides.receive, url=URL, namespace=ns, site="site-1", dest=dest,
                        count=count, ready=ready)  # fmt: skip
        wait()
        producer = Proc(sides.send_small_files, url=URL, namespace=ns,
                        directory=str(directory), count=count)  # fmt: skip
        p = producer.result()
        consumer.result()
    return _latency_figures(p, count)


def small_retrievals(count: int) -> dict[str, float]:
    ns = _namespace()
    ready, wait = _ready()
    stop = CTX.Event()
    server = Proc(sides.serve_container, url=URL, namespace=ns, size=1024, ready=ready, stop=stop)
    wait()
    requester = Proc(sides.retrieve_many, url=URL, namespace=ns, count=count)
    r = requester.result()
    stop.set()
    server.result()
    return _latency_figures(r, count)


def concurrent(path: Path, pairs: int) -> dict[str, float]:
    ns = _namespace()
    with tempfile.TemporaryDirectory(prefix="bench-in-") as dest:
        ready, wait = _ready(pairs)
        consumers = [Proc(sides.receive, url=URL, namespace=ns, site=f"site-{i}",
                          dest=f"{dest}/{i}", count=1, ready=ready)
                     for i in range(pairs)]  # fmt: skip
        wait()
        producers = [Proc(sides.send_file, url=URL, namespace=ns, targets=[f"site-{i}"],
                          path=str(path), chunk_size=MiB, window=32)
                     for i in range(pairs)]  # fmt: skip
        results = [p.result() for p in producers]
        for c in consumers:
            c.result()
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"mib_s": sum(r["bytes"] for r in results) / MiB / span}


def broadcast(path: Path, targets: int) -> dict[str, float]:
    """One file to ``targets`` sites, each receiver a process (protocol v2: one broadcast)."""
    ns = _namespace()
    with tempfile.TemporaryDirectory(prefix="bench-in-") as dest:
        ready, wait = _ready(targets)
        consumers = [Proc(sides.receive, url=URL, namespace=ns, site=f"site-{i}",
                          dest=f"{dest}/{i}", count=1, ready=ready)
                     for i in range(targets)]  # fmt: skip
        wait()
        sites = [f"site-{i}" for i in range(targets)]
        p = Proc(sides.send_file, url=URL, namespace=ns, targets=sites, path=str(path),
                 chunk_size=MiB, window=32).result()  # fmt: skip
        for c in consumers:
            c.result()
    seconds = p["end"] - p["start"]
    return {
        "seconds": seconds,
        "sender_cpu": p["cpu_s"],
        "published_mib": p["published"] / MiB,
        "aggregate_mib_s": targets * p["bytes"] / MiB / seconds,
    }


def shared_retrieval(size: int, requesters: int) -> dict[str, float]:
    """``requesters`` sites ask for one container of ``size`` bytes at the same moment."""
    ns = _namespace()
    ready, wait = _ready()
    stop, go = CTX.Event(), CTX.Event()
    server = Proc(sides.serve_model, url=URL, namespace=ns, size=size, ready=ready, stop=stop)
    wait()
    ready, wait = _ready(requesters)
    retrievers = [Proc(sides.retrieve_model, url=URL, namespace=ns, site=f"site-{i}",
                       ready=ready, go=go)
                  for i in range(requesters)]  # fmt: skip
    wait()
    go.set()
    results = [r.result() for r in retrievers]
    stop.set()
    s = server.result()
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "seconds": seconds,
        "published_mib": s["published"] / MiB,
        "joined": s["joined"],
        "owner_cpu": s["cpu_s"],
        "aggregate_mib_s": sum(r["bytes"] for r in results) / MiB / seconds,
    }


# -- reporting -----------------------------------------------------------------------------------


def median_of(runs: int, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    samples = [fn() for _ in range(runs)]
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def make_file(directory: Path, size: int) -> Path:
    path = directory / f"data-{size}.bin"
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(len(block), left)
            f.write(block[:n])
            left -= n
    return path


def cleanup() -> None:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        channel = connection.channel()
        for ns in NAMESPACES:
            sites = ["server", *(f"site-{i}" for i in range(8))]
            for queue in [f"{ns}.serve.server", *(f"{ns}.site.site-{i}" for i in range(8))]:
                channel.queue_delete(queue)
            for site in sites:  # each site's own dead letters
                channel.queue_delete(f"{ns}.dead.{site}")
                channel.exchange_delete(f"{ns}.dead.{site}")
            channel.exchange_delete(ns)
    finally:
        connection.close()


def plot(sweep: dict[tuple[int, int], float], ceiling: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    chunks = sorted({c for c, _ in sweep})
    for window in sorted({w for _, w in sweep}):
        ax.plot([c / 1024 for c in chunks], [sweep[(c, window)] for c in chunks], marker="o",
                label=f"objstream, window {window}")  # fmt: skip
    ax.axhline(ceiling, color="grey", linestyle="--", label="raw pika ceiling (1 MiB, transient)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([c / 1024 for c in chunks], [f"{c // 1024} KiB" for c in chunks])
    ax.set_xlabel("chunk size")
    ax.set_ylabel("MiB/s (file to file, verified)")
    ax.set_ylim(bottom=0)
    ax.set_title("File streaming, 256 MiB, loopback")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def broadcast_rows(runs: int, path: Path, row: Callable[[str, str], None]) -> None:
    """Rows for one file broadcast to 1, 2, 4 and 8 sites."""
    size_mib = path.stat().st_size / MiB
    one: dict[str, float] = {}
    for targets in (1, 2, 4, 8):
        b = median_of(runs, functools.partial(broadcast, path, targets))
        one = one or b
        row(f"broadcast {size_mib:.0f} MiB to {targets} site{'s' if targets > 1 else ''}",
            f"{b['seconds']:.2f} s; sender CPU {b['sender_cpu']:.2f} s "
            f"({b['sender_cpu'] / one['sender_cpu']:.2f} x one site); sender published "
            f"{b['published_mib']:.0f} MiB ({b['published_mib'] / size_mib:.2f} x the file); "
            f"{b['aggregate_mib_s']:.0f} MiB/s delivered in all "
            f"({b['aggregate_mib_s'] / one['aggregate_mib_s']:.2f} x one site)")  # fmt: skip


def tls_row(runs: int, path: Path, row: Callable[[str, str], None]) -> None:
    """One file over TLS and over plain AMQP, on one throwaway node (it has both listeners),
    runs interleaved; skipped without a ``rabbitmq-server`` binary."""
    name = f"file streaming {path.stat().st_size // MiB} MiB, TLS vs plain (throwaway node)"
    try:
        from tests.tls import TlsRabbitNode, make_pki
    except ImportError as e:  # the test extra (cryptography) is not installed
        row(name, f"skipped: {e}")
        return
    if not TlsRabbitNode.available():
        row(name, "skipped: no rabbitmq-server binary")
        return
    plain: list[dict[str, float]] = []
    tls: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-pki-") as tmp:
        pki = make_pki(Path(tmp))
        node = TlsRabbitNode(pki)
        node.start()
        try:
            for _ in range(runs):
                plain.append(file_stream(path, url=node.url))
                tls.append(file_stream(path, url=node.tls_url(),
                                       settings={"tls_ca": str(pki.ca.pem)}))  # fmt: skip
        finally:
            node.cleanup()
    p, t = (
        {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        for samples in (plain, tls)
    )
    row(name, f"TLS {t['mib_s']:.0f} MiB/s, plain {p['mib_s']:.0f} MiB/s "
              f"({t['mib_s'] / p['mib_s']:.0%}); CPU per GiB sender {t['sender_cpu']:.2f} s vs "
              f"{p['sender_cpu']:.2f} s, receiver {t['receiver_cpu']:.2f} s vs "
              f"{p['receiver_cpu']:.2f} s; peak RSS sender {t['sender_rss']:.0f} vs "
              f"{p['sender_rss']:.0f} MiB, receiver {t['receiver_rss']:.0f} vs "
              f"{p['receiver_rss']:.0f} MiB")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--large", action="store_true", help="also stream a 4 GiB file")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--tls-only", action="store_true", help="only the TLS vs plain row (a throwaway node)"
    )
    args = parser.parse_args()
    plotting = importlib.util.find_spec("matplotlib") is not None
    if not plotting and not args.tls_only:
        print(
            "bench/run.py: matplotlib is not installed (pip install -e '.[bench]'): the table "
            "is written, the plot is not",
            file=sys.stderr,
        )
    if args.tls_only:
        print("| benchmark | result |\n|---|---|")
        with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
            size = 32 * MiB if args.quick else 256 * MiB
            tls_row(args.runs, make_file(Path(tmp), size), lambda n, t: print(f"| {n} | {t} |"))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    started = time.monotonic()
    rows: list[tuple[str, str]] = []

    def row(name: str, text: str) -> None:
        rows.append((name, text))
        print(f"| {name} | {text} |", flush=True)

    print(f"# objstream benchmarks against {mask_url(URL)} ({args.runs} runs, median)\n")
    print("| benchmark | result |\n|---|---|")
    # Start-up first, while nothing else of the bench runs: medians of 5 (bench/startup.py).
    for name, text in startup.rows(5):
        row(name, text)
    raw_count = 128 if quick else 1024
    # The ceiling varies more from run to run than the rest (the broker buffers up to the whole
    # GiB): more runs, and every one shown.
    samples = [raw(raw_count, MiB, confirmed=False) for _ in range(max(args.runs, 5))]
    bare = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    ceiling = bare["mib_s"]
    each = ", ".join(f"{s['mib_s']:.0f}" for s in samples)
    row(f"raw pika, {raw_count} x 1 MiB transient, no confirms",
        f"{ceiling:.0f} MiB/s (runs: {each}); "
        f"CPU per GiB publisher {bare['sender_cpu']:.2f} s, "
        f"consumer {bare['receiver_cpu']:.2f} s")  # fmt: skip
    confirmed = median_of(args.runs, lambda: raw(raw_count, MiB, confirmed=True))["mib_s"]
    row(f"raw pika, {raw_count} x 1 MiB persistent, 32 windowed confirms",
        f"{confirmed:.0f} MiB/s")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = Path(tmp)
        sizes = [32 * MiB] if quick else [256 * MiB, GiB] + ([4 * GiB] if args.large else [])
        files = {size: make_file(data, size) for size in sizes}
        file_figures: dict[int, dict[str, float]] = {}
        for size, path in files.items():
            f = file_figures[size] = median_of(args.runs, functools.partial(file_stream, path))
            row(
                f"file streaming {size // MiB} MiB (1 MiB chunks, window 32)",
                f"{f['mib_s']:.0f} MiB/s = {f['mib_s'] / ceiling:.0%} of the raw ceiling; "
                f"peak RSS sender {f['sender_rss']:.0f} MiB, receiver {f['receiver_rss']:.0f} MiB; "
                f"CPU per GiB sender {f['sender_cpu']:.2f} s, receiver {f['receiver_cpu']:.2f} s",
            )

        entries, entry_size = (4, 16 * MiB) if quick else (10, 100 * MiB)
        c = median_of(args.runs, lambda: container_stream(entries, entry_size))
        row(f"container {entries} x {entry_size // MiB} MiB float32",
            f"{c['mib_s']:.0f} MiB/s; peak RSS sender {c['sender_rss']:.0f} MiB "
            f"(container + {c['sender_rss'] - c['container_mib']:.0f}), receiver "
            f"{c['receiver_rss']:.0f} MiB (container + "
            f"{c['receiver_rss'] - c['container_mib']:.0f})")  # fmt: skip

        count = 100 if quick else 1000
        small = data / "small"
        small.mkdir()
        for i in range(count):
            (small / f"f{i:04d}.bin").write_bytes(os.urandom(10 * 1024))
        s = median_of(args.runs, lambda: small_files(small, count))
        row(f"{count} files of 10 KiB pushed",
            f"{s['objects_s']:.0f} objects/s; latency median {s['median_ms']:.1f} ms, "
            f"p99 {s['p99_ms']:.1f} ms")  # fmt: skip
        r = median_of(args.runs, lambda: small_retrievals(count))
        row(f"{count} retrievals of a 1 KiB container",
            f"{r['objects_s']:.0f} objects/s; round trip median {r['median_ms']:.1f} ms, "
            f"p99 {r['p99_ms']:.1f} ms")  # fmt: skip

        sweep_file = files[min(sizes, key=lambda s: abs(s - 256 * MiB))]
        cc = median_of(args.runs, lambda: concurrent(sweep_file, 4))
        row(f"4 producers -> 4 consumers, {sweep_file.stat().st_size // MiB} MiB each",
            f"{cc['mib_s']:.0f} MiB/s aggregate")  # fmt: skip

        broadcast_rows(args.runs, sweep_file, row)
        tls_row(args.runs, sweep_file, row)
        model_size = 32 * MiB if quick else 256 * MiB
        sr = median_of(args.runs, lambda: shared_retrieval(model_size, 8))
        row(f"8 sites retrieve one {model_size // MiB} MiB container at once",
            f"{sr['seconds']:.2f} s; owner published {sr['published_mib']:.0f} MiB "
            f"({sr['published_mib'] * MiB / model_size:.2f} x), {sr['joined']:.0f} requests "
            f"joined one stream; owner CPU {sr['owner_cpu']:.2f} s; "
            f"{sr['aggregate_mib_s']:.0f} MiB/s delivered in all")  # fmt: skip

        sweep: dict[tuple[int, int], float] = {}
        for chunk in (256 * 1024, MiB, 4 * MiB):
            for window in (8, 32, 128):
                sweep[(chunk, window)] = median_of(
                    args.runs, functools.partial(file_stream, sweep_file, chunk, window)
                )["mib_s"]
        cells = " ".join(f"{c // 1024}K/w{w}: {v:.0f};" for (c, w), v in sorted(sweep.items()))
        row("sweep, MiB/s (chunk/window)", cells.rstrip(";"))
    cleanup()

    seconds = time.monotonic() - started
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    table = "\n".join(
        [f"Benchmarks, {time.strftime('%Y-%m-%d')}, {machine}; {args.runs} runs per figure "
         f"(median); took {seconds:.0f} s.\n", "| benchmark | result |", "|---|---|",
         *(f"| {name} | {text} |" for name, text in rows)]
    )  # fmt: skip
    (args.out / "results.md").write_text(table + "\n")
    written = [args.out / "results.md"]
    if plotting:
        plot(sweep, ceiling, args.out / "throughput.png")
        written.append(args.out / "throughput.png")
    print(f"\nwrote {' and '.join(map(str, written))} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
