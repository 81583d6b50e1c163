"""``objstream job ...``: the example jobs, both sides or one (``--role``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from objstream.common.cli import (
    EXIT_BROKER,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    HelpFormatter,
    size_arg,
)
from objstream.common.console import console
from objstream.common.errors import BrokerRefused, ObjstreamError
from objstream.common.settings import MiB, Settings
from objstream.jobs import clients, dict_streaming, file_streaming, rounds_job
from objstream.jobs.runner import Result, Side, peak_rss_mib

ERROR_EXIT = {
    "TimedOut": EXIT_TIMEOUT,
    "BrokerUnreachable": EXIT_BROKER,
    "AuthenticationRefused": EXIT_BROKER,
}


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    group = commands.add_parser(
        "job",
        parents=[parent],
        epilog="example:\n  objstream job file_streaming --size 256MiB",
        formatter_class=HelpFormatter,
        help="run the example jobs (file_streaming, dict_streaming, rounds)",
        description="The example jobs. Each runs a producer and a consumer as separate "
        "processes against the broker, verifies the result and prints one line (or one JSON "
        "object with --json); it exits 0 only on success. With --role, only one side runs (as "
        "the docker compose workers do).",
    )
    sub = group.add_subparsers(
        dest="command", required=True, metavar="{file_streaming,dict_streaming,rounds,demo}"
    )
    fs = sub.add_parser(
        "file_streaming",
        parents=[parent, _job_options()],
        help="stream a generated file from producer to consumer (no retriever)",
        description="The producer creates a temporary file and streams it straight to the "
        "consumer with the file streamer; the consumer verifies it (SHA-256 of what landed).",
        epilog="example:\n  objstream job file_streaming --size 256MiB",
        formatter_class=HelpFormatter,
    )
    fs.add_argument(
        "--size",
        type=size_arg,
        default=100 * MiB,
        metavar="SIZE",
        help="file size (default 100MiB)",
    )
    fs.add_argument(
        "--chunk-size", type=size_arg, metavar="SIZE", help="bytes per chunk (default 1MiB)"
    )
    _clients_option(fs, "stream the file to N client sites at once (one broadcast)")
    fs.set_defaults(handler=run_file_streaming, settings_overrides=_overrides)

    ds = sub.add_parser(
        "dict_streaming",
        parents=[parent, _job_options()],
        help="retrieve the container 'model' from the producer through the retriever",
        description="The producer registers a container 'model' (entries layer-0, layer-1, ... "
        "of random float32 arrays) with the container retriever; the consumer is given the "
        "task retrieve_dict for 'model', retrieves it and verifies every entry.",
        epilog="example:\n  objstream job dict_streaming --entries 10 --entry-size 16MiB",
        formatter_class=HelpFormatter,
    )
    _dict_options(ds)
    _clients_option(ds, "N client sites retrieve the model at the same moment")
    ds.set_defaults(handler=run_dict_streaming, settings_overrides=_overrides)

    rounds_job.add_command(sub, parent, _job_options())
    sub.choices["rounds"].set_defaults(handler=run_rounds, settings_overrides=rounds_job.overrides)

    demo = sub.add_parser(
        "demo",
        parents=[parent, _job_options()],
        help="file_streaming, then dict_streaming (what docker compose runs)",
        description="Runs file_streaming, then dict_streaming, with their defaults.",
        epilog="example:\n  objstream job demo --role consumer --dest /data",
        formatter_class=HelpFormatter,
    )
    demo.add_argument(
        "--size",
        type=size_arg,
        default=100 * MiB,
        metavar="SIZE",
        help="file_streaming's file size (default 100MiB)",
    )
    demo.add_argument(
        "--chunk-size", type=size_arg, metavar="SIZE", help="bytes per chunk (default 1MiB)"
    )
    _dict_options(demo)
    demo.set_defaults(handler=run_demo, settings_overrides=_overrides, clients=1)


def _job_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("job options")
    group.add_argument(
        "--role",
        choices=["both", "producer", "consumer"],
        default="both",
        help="which side(s) to run here (default both)",
    )
    group.add_argument(
        "--producer-site",
        default="server",
        metavar="SITE",
        help="the producer's site name (default server)",
    )
    group.add_argument(
        "--consumer-site",
        metavar="SITE",
        help="the consumer's site name (default site-1); file_streaming and dict_streaming "
        "with --clients N name their clients SITE-1 ... SITE-N (default site-1 ... site-N)",
    )
    group.add_argument(
        "--dest",
        metavar="DIR",
        help="where the consumer stores what it receives (default a temp dir, removed at the end)",
    )
    group.add_argument(
        "--keep",
        action="store_true",
        help="keep the consumer's temp dir and what arrived in it (named on stderr); without "
        "it the job removes the data it generated and received when it ends (--dest: kept)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    group.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up after this long without progress (default 120)",
    )
    group.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return options


def _clients_option(cmd: argparse.ArgumentParser, what: str) -> None:
    cmd.add_argument(
        "--clients",
        type=_positive,
        default=1,
        metavar="N",
        help=f"{what}; one result line with every client's outcome (default 1)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _dict_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--entries", type=int, default=10, metavar="N", help="entries in the container (default 10)"
    )
    cmd.add_argument(
        "--entry-size",
        type=size_arg,
        default=16 * MiB,
        metavar="SIZE",
        help="bytes per entry (default 16MiB)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout": args.timeout}


# -- running ----------------------------------------------------------------------------------


def _sides(
    args: argparse.Namespace,
    producer: tuple[Any, dict[str, Any]],
    consumer: tuple[Any, dict[str, Any]],
) -> dict[str, Result]:
    """Run the chosen side(s); both: the consumer first, each in its own process."""
    if args.role == "producer":
        return {"producer": {**producer[0](**producer[1]), "peak_rss_mib": peak_rss_mib()}}
    if args.role == "consumer":
        return {"consumer": {**consumer[0](**consumer[1]), "peak_rss_mib": peak_rss_mib()}}
    consumer_side = Side(consumer[0], **consumer[1])
    producer_side = Side(producer[0], **producer[1])
    wait = args.timeout * 4 + 60
    return {"producer": producer_side.result(wait), "consumer": consumer_side.result(wait)}


def check_sites_free(settings: Settings, receivers: list[str], server: str | None) -> None:
    """Refuse to start a job whose sites another process already serves in this namespace (a
    ``listen --site site-1`` or ``serve --site server`` left from the tour): it would take the
    job's objects, and the job would wait for them until its timeout.

    Raises:
        ObjstreamError: a site is in use (one line, exit 1), naming the option that avoids it.
    """
    from objstream.common.amqp import connect
    from objstream.common.topology import Topology

    topology = Topology.from_settings(settings)
    queues = [(site, topology.inbox(site), "--consumer-site") for site in receivers]
    if server is not None:
        queues.append((server, topology.service_queue(server), "--producer-site"))
    connection = connect(settings, "objstream job: are its sites free")
    try:
        for site, queue, option in queues:
            channel = connection.channel()
            try:
                taken = channel.consumer_count(queue)
            except BrokerRefused:  # no such queue: nobody there
                continue
            finally:
                with contextlib.suppress(ObjstreamError):
                    channel.close()
            if taken:
                raise ObjstreamError(
                    f"site {site!r} is already served in namespace {settings.namespace!r} "
                    f"({queue} has {taken} consumer(s): a listen or serve left running?); stop "
                    f"it, or give the job other sites ({option}) or --namespace"
                )
    finally:
        connection.close()


@contextlib.contextmanager
def _job_dest(args: argparse.Namespace) -> Iterator[str]:
    """The consumer's directory: ``--dest`` (the user's: what arrives there stays, as the
    compose workers' volume), else a temp dir removed when the job ends unless ``--keep`` (a
    256 MiB file per run adds up)."""
    if args.dest:
        yield args.dest
        return
    tmp = tempfile.mkdtemp(prefix="objstream-job-")
    try:
        yield tmp
    finally:
        if args.keep:
            console.note(f"kept what arrived in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_file_streaming(args: argparse.Namespace, settings: Settings) -> int:
    with _job_dest(args) as dest:
        return _file_streaming(args, settings, dest)


def _file_streaming(args: argparse.Namespace, settings: Settings, where: str) -> int:
    sites = clients.client_sites(args.consumer_site, args.clients)
    if args.role == "both":  # the pushes go to the sites' inboxes
        check_sites_free(settings, sites, None)
    producer = (
        file_streaming.producer_side,
        {
            "settings": settings,
            "site": args.producer_site,
            "to": sites[0] if args.clients == 1 else sites,
            "size": args.size,
            "chunk_size": args.chunk_size or int(settings.chunk_size),
            "seed": args.seed,
        },
    )
    if args.clients > 1:
        client = (
            file_streaming.consumer_side,
            lambda site, mine: {
                "settings": settings,
                "site": site,
                "dest": str(mine),
                "timeout": args.timeout,
            },
        )
        results = clients.run_clients(args, producer, client, sites, Path(where))
        return clients.report_clients(args, "file_streaming", sites, results)
    sides = _sides(
        args,
        producer,
        (
            file_streaming.consumer_side,
            {
                "settings": settings,
                "site": sites[0],
                "dest": where,
                "timeout": args.timeout,
            },
        ),
    )
    return _report(args, "file_streaming", sides)


def run_dict_streaming(args: argparse.Namespace, settings: Settings) -> int:
    with _job_dest(args) as dest:
        return _dict_streaming(args, settings, dest)


def _dict_streaming(args: argparse.Namespace, settings: Settings, where: str) -> int:
    sites = clients.client_sites(args.consumer_site, args.clients)
    if args.role == "both":  # the requests go to the producer site's service queue
        check_sites_free(settings, [], args.producer_site)
    producer = (
        dict_streaming.producer_side,
        {
            "settings": settings,
            "site": args.producer_site,
            "entries": args.entries,
            "entry_size": args.entry_size,
            "seed": args.seed,
            "count": len(sites),
            "timeout": args.timeout,
        },
    )
    consumer = {
        "settings": settings,
        "owner": args.producer_site,
        "entries": args.entries,
        "entry_size": args.entry_size,
        "seed": args.seed,
        "timeout": args.timeout,
    }
    if len(sites) > 1:
        together = clients.start_barrier(args.role, len(sites))
        client = (
            clients.in_step,
            lambda site, mine: {
                **consumer,
                "site": site,
                "dest": str(mine),
                "side": dict_streaming.consumer_side,
                "barrier": together,
            },
        )
        results = clients.run_clients(args, producer, client, sites, Path(where))
        return clients.report_clients(args, "dict_streaming", sites, results)
    sides = _sides(
        args,
        producer,
        (dict_streaming.consumer_side, {**consumer, "site": sites[0], "dest": where}),
    )
    return _report(args, "dict_streaming", sides)


def run_rounds(args: argparse.Namespace, settings: Settings) -> int:
    if args.role == "both":  # the models go to the clients' inboxes, the updates the server's
        check_sites_free(
            settings,
            [*clients.client_sites(args.consumer_site, args.clients), args.producer_site],
            None,
        )
    with _job_dest(args) as dest:
        return rounds_job.run(args, settings, dest)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    code = run_file_streaming(args, settings)
    if code != EXIT_OK:
        return code
    return run_dict_streaming(args, settings)


def _report(args: argparse.Namespace, job: str, sides: dict[str, Result]) -> int:
    ok = all(side.get("ok") for side in sides.values())
    producer, consumer = sides.get("producer", {}), sides.get("consumer", {})
    size = consumer.get("bytes") or producer.get("bytes") or 0
    seconds = consumer.get("seconds") or producer.get("seconds")
    if job == "file_streaming" and "producer" in sides:
        seconds = producer.get("seconds")
    if job == "file_streaming" and len(sides) == 2 and ok:
        ok = producer.get("sha256") == consumer.get("sha256")
    rate = round(size / MiB / seconds, 1) if size and seconds else None
    summary: dict[str, Any] = {
        "job": job,
        "ok": ok,
        "role": args.role,
        "bytes": size,
        "seconds": seconds,
        "mib_per_s": rate,
        "checksum_verified": ok,
        "peak_rss_mib": {name: side.get("peak_rss_mib") for name, side in sides.items()},
    }
    errors = [f"{name}: {side['error']}" for name, side in sides.items() if side.get("error")]
    if errors:
        summary["errors"] = errors
    if args.json:
        print(json.dumps(summary), flush=True)
    elif ok:
        memory = ", ".join(f"{name} {rss} MiB" for name, rss in summary["peak_rss_mib"].items())
        timing = f" in {seconds:.2f} s ({rate} MiB/s)" if seconds and rate else ""
        print(
            f"{job} ({args.role}): {size} bytes{timing}, checksum verified; peak RSS {memory}",
            flush=True,
        )
    if not ok:
        for line in errors or [f"{job}: verification failed"]:
            console.error(f"{job} {line}")
        kinds = {side.get("error_type") for side in sides.values()}
        return next((ERROR_EXIT[k] for k in kinds if k in ERROR_EXIT), EXIT_FAILED)
    return EXIT_OK
