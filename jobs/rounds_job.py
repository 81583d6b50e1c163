"""``objstream job rounds``: its options, its processes (the server and each client in one of
its own), and what it prints: a line (or a JSON object) per round as the round ends, then a
summary."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Any

from objstream.common.cli import EXIT_FAILED, EXIT_OK, HelpFormatter, count_arg, size_arg
from objstream.common.console import console
from objstream.common.errors import ConfigError
from objstream.common.settings import MiB, Settings
from objstream.jobs import clients
from objstream.jobs.rounds import PICKS, ROW, Plan, client_side, server_side
from objstream.jobs.runner import Result, Side


def add_command(sub: Any, parent: argparse.ArgumentParser, job: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser(
        "rounds",
        parents=[parent, job],
        help="federated learning: a global model out to N clients, their updates back, R times",
        description="Each round the server broadcasts the global model (bfloat16 tensors, "
        "saved as .safetensors) to every client in one send; each client changes a fraction "
        "of the tensors and sends its update back; the server checks the updates, averages "
        "them and goes on. Every side stores what it receives, so from round 2 on only the "
        "changed tensors move (a delta; --full: everything). One line per round: bytes moved "
        "down (server to clients) and up, bytes reused, seconds; then a summary.",
        epilog="example:\n  objstream job rounds --clients 4 --rounds 5 --size 64MiB --change 0.05",
        formatter_class=HelpFormatter,
    )
    cmd.add_argument(
        "--clients", type=count_arg, default=2, metavar="N", help="client sites (default 2)"
    )
    cmd.add_argument("--rounds", type=count_arg, default=3, metavar="R", help="rounds (default 3)")
    cmd.add_argument(
        "--size",
        type=size_arg,
        default=64 * MiB,
        metavar="SIZE",
        help="bytes of the model, about (default 64MiB)",
    )
    cmd.add_argument(
        "--tensors", type=count_arg, default=40, metavar="N", help="tensors in it (default 40)"
    )
    cmd.add_argument(
        "--change",
        type=_fraction,
        default=0.05,
        metavar="FRACTION",
        help="the fraction of the tensors each client changes in a round, at least one "
        "(default 0.05)",
    )
    cmd.add_argument(
        "--pick",
        choices=PICKS,
        default="same",
        help="which tensors change: the same ones every round (default: the layers being "
        "fine-tuned) or others each round (rotate: the tensors the last round changed move "
        "up again, as the aggregate)",
    )
    cmd.add_argument(
        "--full",
        action="store_true",
        help="send every transfer whole, even to a site that holds most of it (no delta)",
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout": args.timeout, "delta": False if args.full else None}


def plan_of(args: argparse.Namespace) -> Plan:
    """The job's plan, its options checked.

    Raises:
        ConfigError: a model too small for its tensors (exit 2).
    """
    if args.size < args.tensors * ROW * 2:
        raise ConfigError(
            f"--size {args.size} is too small for {args.tensors} tensors of {ROW} bfloat16 "
            f"values at least: give at least {args.tensors * ROW * 2} bytes, or fewer --tensors"
        )
    return Plan(
        size=args.size,
        tensors=args.tensors,
        change=args.change,
        seed=args.seed,
        clients=args.clients,
        rounds=args.rounds,
        pick=args.pick,
        full=args.full,
    )


def run(args: argparse.Namespace, settings: Settings, where: str) -> int:
    """Run the job's sides (``--role``) with their data under ``where``; print; exit code."""
    plan = plan_of(args)
    sites = clients.client_sites(args.consumer_site, args.clients)
    if args.producer_site in sites:
        raise ConfigError(f"the server and a client are both site {args.producer_site!r}")
    reports = mp.get_context("spawn").Queue()
    common = {"settings": settings, "plan": plan, "timeout": args.timeout}
    sides: dict[str, Side] = {}
    if args.role != "producer":
        for number, site in enumerate(sites, 1):
            sides[site] = Side(
                client_side,
                site=site,
                client=number,
                server=args.producer_site,
                dest=str(Path(where) / site),
                reports=reports,
                **common,
            )
    if args.role != "consumer":
        sides[args.producer_site] = Side(
            server_side,
            site=args.producer_site,
            sites=sites,
            dest=str(Path(where) / args.producer_site),
            reports=reports,
            **common,
        )
    rows, results = _follow(args, plan, sites, sides, reports)
    return _summary(args, plan, sites, rows, results)


def _follow(
    args: argparse.Namespace,
    plan: Plan,
    sites: list[str],
    sides: dict[str, Side],
    reports: Any,
) -> tuple[list[dict[str, Any]], dict[str, Result]]:
    """Print each round once every side here reported it; return the rounds and the results.
    When a side fails, the others are stopped (they would wait for it until their timeout)."""
    got: dict[int, dict[str, dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    results: dict[str, Result] = {}
    quiet_for = args.timeout * 4 + 60
    last = time.monotonic()

    def take(wait: float) -> bool:
        try:
            report = reports.get(timeout=wait)
        except queue.Empty:
            return False
        got.setdefault(report["round"], {})[report["side"]] = report
        while set(got.get(len(rows) + 1, {})) >= set(sides):
            rows.append(_round(args.producer_site, sites, got.pop(len(rows) + 1), rows))
            _print_round(args, plan, rows[-1])
        return True

    while len(results) < len(sides):
        if take(0.2):
            last = time.monotonic()
        for name, side in sides.items():
            if name not in results and (result := side.poll()) is not None:
                results[name], last = result, time.monotonic()
        failed = [name for name, result in results.items() if not result.get("ok")]
        if failed or time.monotonic() - last > quiet_for:
            why = f"stopped: {failed[0]} failed" if failed else f"no progress in {quiet_for:g} s"
            for name, side in sides.items():
                results.setdefault(name, side.stop(why))
    while take(0.5):  # what the sides reported last
        pass
    return rows, results


def _round(
    server_site: str,
    sites: list[str],
    reports: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """One round as every side here saw it: what moved, what was reused, and whether each
    receiver's SHA-256 is its sender's (where both run here)."""
    server = reports.get(server_site)
    mine = [reports[site] for site in sites if site in reports]
    if server is not None:
        down = server["down_published"]
        down_reused = sum(server["down_reused"].values())
    else:  # the broadcast published at least what the most lacking client lacked
        down = max(c["model_bytes"] - c["got_reused"] for c in mine)
        down_reused = sum(c["got_reused"] for c in mine)
    if mine:
        up = sum(c["up_published"] for c in mine)
        up_reused = sum(c["up_reused"] for c in mine)
    else:  # what the server received of each update
        assert server is not None
        up = sum(server["up_received"].values())
        up_reused = sum(server["up_reused"].values())
    ok = True
    if server is not None and mine:
        ok = all(
            server["down_sha256"][c["side"]] == c["got_sha256"]
            and server["up_sha256"][c["side"]] == c["up_sha256"]
            for c in mine
        )
    seconds = server["seconds"] if server is not None else max(c["seconds"] for c in mine)
    moved = down + up
    first = rows[0]["moved"] if rows else moved
    return {
        "job": "rounds",
        "round": len(rows) + 1,
        "ok": ok,
        "model_bytes": (server or mine[0])["model_bytes"],
        "down_published": down,
        "up_published": up,
        "moved": moved,
        "down_reused": down_reused,
        "up_reused": up_reused,
        "reused": down_reused + up_reused,
        "of_round_1": round(moved / first, 4) if first else None,
        "seconds": seconds,
        "checksum_verified": ok,
    }


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def _print_round(args: argparse.Namespace, plan: Plan, row: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(row), flush=True)
        return
    share = f" ({100 * row['of_round_1']:.1f} % of round 1)" if row["of_round_1"] else ""
    verdict = "checksum verified" if row["ok"] else "SHA-256 MISMATCH"
    print(
        f"round {row['round']}/{plan.rounds}: moved {_mib(row['moved'])}{share}: down "
        f"{_mib(row['down_published'])}, up {_mib(row['up_published'])}; reused "
        f"{_mib(row['reused'])}; {row['seconds']:.2f} s, {verdict}",
        flush=True,
    )


def _summary(
    args: argparse.Namespace,
    plan: Plan,
    sites: list[str],
    rows: list[dict[str, Any]],
    results: dict[str, Result],
) -> int:
    ok = (
        all(r.get("ok") for r in results.values())
        and len(rows) == plan.rounds
        and all(row["ok"] for row in rows)
    )
    later = rows[1:]
    after = sum(row["moved"] for row in later) / len(later) if later else None
    first = rows[0]["moved"] if rows else 0
    seconds = round(sum(row["seconds"] for row in rows), 3)
    summary: dict[str, Any] = {
        "job": "rounds",
        "ok": ok,
        "role": args.role,
        "clients": len(sites),
        "rounds": len(rows),
        "bytes": rows[0]["model_bytes"] if rows else plan.model_bytes,
        "tensors": plan.tensors,
        "changed": len(plan.changed(1)),
        "delta": not args.full,
        "moved": sum(row["moved"] for row in rows),
        "reused": sum(row["reused"] for row in rows),
        "moved_round_1": first,
        "moved_later_mean": round(after) if after is not None else None,
        "later_of_round_1": round(after / first, 4) if after is not None and first else None,
        "seconds": seconds,
        "checksum_verified": ok,
        "peak_rss_mib": {name: r.get("peak_rss_mib") for name, r in results.items()},
    }
    errors = [f"{name}: {r['error']}" for name, r in results.items() if r.get("error")]
    if len(rows) < plan.rounds and not errors:
        errors.append(f"{len(rows)} of {plan.rounds} rounds ended")
    if any(not row["ok"] for row in rows):
        errors.append("a receiver's SHA-256 is not its sender's")
    if errors:
        summary["errors"] = errors
    if args.json:
        print(json.dumps(summary), flush=True)
    elif ok:
        print(_line(args, plan, summary), flush=True)
    if ok:
        return EXIT_OK
    for line in errors:
        console.error(f"rounds {line}")
    kinds = {r.get("error_type") for r in results.values()}
    return next((clients.ERROR_EXIT[k] for k in kinds if k in clients.ERROR_EXIT), EXIT_FAILED)


def _line(args: argparse.Namespace, plan: Plan, summary: dict[str, Any]) -> str:
    head = f"rounds ({args.role}, {summary['clients']} clients, {summary['rounds']} rounds"
    head += ", full): " if args.full else "): "
    model = (
        f"model {_mib(plan.model_bytes)} ({plan.tensors} tensors, {summary['changed']} "
        "changed a round); "
    )
    moved = f"moved {_mib(summary['moved_round_1'])} in round 1"
    if summary["moved_later_mean"] is not None:
        moved += (
            f", {_mib(summary['moved_later_mean'])} a round after "
            f"({100 * summary['later_of_round_1']:.1f} %)"
        )
    memory = ", ".join(f"{n} {rss} MiB" for n, rss in summary["peak_rss_mib"].items() if rss)
    return (
        f"{head}{model}{moved}, {_mib(summary['reused'])} reused; {summary['seconds']:.2f} s "
        f"in all, checksum verified; peak RSS {memory}"
    )
