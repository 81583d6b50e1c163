"""Jobs with many clients (``--clients N``, as the FLARE simulator's ``-n N``): one server, N
client sites, each client in a process of its own; one result line with every client's outcome.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path
from typing import Any

from objstream.common.cli import EXIT_BROKER, EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from objstream.common.console import console
from objstream.common.settings import MiB
from objstream.jobs.runner import Result, Side

ERROR_EXIT = {
    "TimedOut": EXIT_TIMEOUT,
    "BrokerUnreachable": EXIT_BROKER,
    "AuthenticationRefused": EXIT_BROKER,
    "BrokerRefused": EXIT_BROKER,
}

ClientKwargs = Callable[[str, Path], dict[str, Any]]
"""The keyword arguments of a client side, given its site name and its own directory."""


def client_sites(consumer_site: str | None, clients: int, default: str = "site-1") -> list[str]:
    """The clients' site names: ``site-1`` ... ``site-N``, or ``SITE-1`` ... ``SITE-N`` when a
    consumer site is given (one client: that site, or ``site-1``)."""
    if clients == 1:
        return [consumer_site or default]
    prefix = consumer_site or "site"
    return [f"{prefix}-{i}" for i in range(1, clients + 1)]


def start_barrier(role: str, clients: int) -> Any:
    """A barrier the clients pass together (after connecting), so that they ask at the same
    moment; None where only one client or no client runs here."""
    if role == "producer" or clients == 1:
        return None
    return mp.get_context("spawn").Barrier(clients)


def in_step(side: Callable[..., Result], barrier: Any, **kwargs: Any) -> Result:
    """Run ``side(**kwargs)`` once every client passed ``barrier`` (their processes start
    seconds apart: importing numpy and pika; a connection takes milliseconds), waiting at most
    ``kwargs["timeout"]`` for the others."""
    if barrier is not None:
        barrier.wait(kwargs.get("timeout", 120.0))
    return side(**kwargs)


def run_clients(
    args: argparse.Namespace,
    producer: tuple[Callable[..., Result], dict[str, Any]],
    client: tuple[Callable[..., Result], ClientKwargs],
    sites: list[str],
    dest: Path,
) -> dict[str, Result]:
    """Run the server and the clients (``args.role`` says which run here), each in its own
    process; the clients first. Returns the results by side: ``producer`` and each site."""
    sides: dict[str, Side] = {}
    if args.role != "producer":
        for site in sites:
            sides[site] = Side(client[0], **client[1](site, dest / site))
    if args.role != "consumer":
        sides["producer"] = Side(producer[0], **producer[1])
    wait = args.timeout * 4 + 60
    return {name: side.result(wait) for name, side in sides.items()}


def report_clients(
    args: argparse.Namespace, job: str, sites: list[str], results: dict[str, Result]
) -> int:
    """Print one line (or one JSON object) with every client's outcome; return the exit code."""
    producer = results.get("producer")
    clients = {site: results[site] for site in sites if site in results}
    if producer is not None and args.role == "producer":
        # Only the server runs here: its own per-target account is all there is.
        clients = {site: producer.get("targets", {}).get(site, {}) for site in sites}
    ok = all(r.get("ok") for r in results.values()) and all(r.get("ok") for r in clients.values())
    # A push takes as long as the sender's send; retrievals as long as the slowest client.
    slowest = max((r.get("seconds") or 0 for r in clients.values()), default=0)
    seconds = (producer or {}).get("seconds") if job == "file_streaming" else None
    seconds = seconds or slowest
    size = max((r.get("bytes") or 0 for r in clients.values()), default=0)
    delivered = sum(r.get("bytes") or 0 for r in clients.values() if r.get("ok"))
    summary: dict[str, Any] = {
        "job": job,
        "ok": ok,
        "role": args.role,
        "clients": len(sites),
        "bytes": size,
        "seconds": seconds,
        "aggregate_mib_per_s": round(delivered / MiB / seconds, 1) if seconds else None,
        "outcomes": {site: _outcome(r) for site, r in clients.items()},
        "peak_rss_mib": {name: r.get("peak_rss_mib") for name, r in results.items()},
    }
    if producer is not None and not producer.get("ok"):
        summary["producer_error"] = producer.get("error", "failed")
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(_line(summary), flush=True)
    if ok:
        return EXIT_OK
    for name, r in results.items():
        if r.get("error"):
            console.error(f"{job} {name}: {r['error']}")
    kinds = {r.get("error_type") for r in results.values()}
    return next((ERROR_EXIT[k] for k in kinds if k in ERROR_EXIT), EXIT_FAILED)


def _outcome(result: Result) -> dict[str, Any]:
    keep = ("ok", "bytes", "seconds", "stored_as", "entries", "error")
    return {k: result[k] for k in keep if result.get(k) is not None}


def _line(summary: dict[str, Any]) -> str:
    outcomes: dict[str, dict[str, Any]] = summary["outcomes"]
    good = [site for site, o in outcomes.items() if o.get("ok")]
    bad = [
        f"{site} ({o.get('error', 'no result')})" for site, o in outcomes.items() if not o.get("ok")
    ]
    head = f"{summary['job']} ({summary['role']}, {summary['clients']} clients): "
    timing = ""
    if summary["seconds"]:
        timing = f" in {summary['seconds']:.2f} s ({summary['aggregate_mib_per_s']} MiB/s in all)"
    verdict = f"{len(good)} of {len(outcomes)} verified"
    if bad:
        verdict += "; failed: " + ", ".join(bad)
    memory = ", ".join(f"{n} {rss} MiB" for n, rss in summary["peak_rss_mib"].items() if rss)
    return f"{head}{summary['bytes']} bytes each{timing}, {verdict}; peak RSS {memory}"
