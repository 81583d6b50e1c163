"""``objstream producer ...``: the sending side's commands."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from objstream.common import monitoring, progress
from objstream.common.cli import (
    HelpFormatter,
    StopFlag,
    count_arg,
    error_code,
    error_words,
    size_arg,
)
from objstream.common.compression import MODES
from objstream.common.console import console, plural, printable
from objstream.common.errors import ConfigError, SendFailed

if TYPE_CHECKING:
    from objstream.common.settings import Settings
    from objstream.producer.sender import TargetResult

Sent = Callable[[list["TargetResult"]], None]
"""What a send calls with its results, as soon as it has them (see :func:`_send`)."""

# Each command imports what it runs: the container files and the serving side need numpy and
# the codec, which `send-file` never does (start-up time is import time; docs/performance.md).


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    side = commands.add_parser(
        "producer",
        parents=[parent],
        epilog="example:\n  objstream producer send-file --site server --to site-1 big.bin",
        formatter_class=HelpFormatter,
        help="send objects to other sites",
        description="The sending side.",
    )
    sub = side.add_subparsers(
        dest="command", required=True, metavar="{send-file,send-container,serve}"
    )
    send = sub.add_parser(
        "send-file",
        parents=[parent],
        help="stream files (a tree with -r, standard input with -) to one or more sites",
        description="Stream each PATH to one or more sites, one after another; each returns once "
        "every target stored and verified it. -r sends a directory as a tree (received as the "
        "same tree; symlinks leading out of it are skipped); - sends standard input as --name "
        "(it cannot be resumed). Exit codes (the worst of all the objects): 0 ok, 1 transfer "
        "failed, 2 usage, 3 broker unreachable, authentication or an operation refused by the "
        "broker, 4 timed out, 130 Ctrl-C, 143 SIGTERM "
        "(every target told `aborted`).",
        epilog="examples:\n  objstream producer send-file --site server --to site-1,site-2 big.bin"
        "\n  objstream producer send-file --site server --to site-1 a.bin -r ckpt/"
        "\n  tar c data | objstream producer send-file --site server --to site-1 \\"
        "\n      - --name data.tar",
        formatter_class=HelpFormatter,
    )
    send.add_argument(
        "path", metavar="PATH", nargs="+", help="file(s) to send; - for standard input"
    )
    send.add_argument(
        "-r", "--recursive", action="store_true", help="send directories as trees of files"
    )
    send.add_argument("--name", metavar="NAME", help="the name standard input (-) is sent as")
    _common_send_options(send)
    send.set_defaults(handler=send_file, settings_overrides=_overrides)
    _add_container_command(sub, parent)
    _add_serve_command(sub, parent)


def _common_send_options(send: argparse.ArgumentParser) -> None:
    send.add_argument("--site", required=True, help="this site's name")
    send.add_argument(
        "--to",
        required=True,
        type=_sites,
        metavar="TARGET[,TARGET...]",
        help="receiving site(s), comma-separated",
    )
    send.add_argument(
        "--chunk-size",
        type=size_arg,
        metavar="SIZE",
        help="bytes per chunk, e.g. 256KiB, 4MiB (default 1MiB)",
    )
    send.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="chunks in flight beyond what a receiver stored (default 32)",
    )
    send.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="fail a target after this long without progress (default 60)",
    )
    _rate_option(send, "this send publishes, whatever the number of targets")
    _compress_option(send)
    _full_option(send, "send")
    send.add_argument(
        "--min-targets",
        type=count_arg,
        metavar="K",
        help="succeed as soon as K targets verified; the others (stragglers) go on until they "
        "end, each reported as it does (default: every target)",
    )
    send.add_argument(
        "--stragglers",
        choices=("wait", "cancel"),
        default="wait",
        help="with --min-targets: wait for the other targets (default), or tell them to stop",
    )
    send.add_argument("--json", action="store_true", help="print the result as one JSON object")
    progress.add_option(send)


def _rate_option(command: argparse.ArgumentParser, what: str) -> None:
    # Parsed by the settings (as OBJSTREAM_RATE_LIMIT is): a bad value is one line, exit 2.
    command.add_argument(
        "--rate-limit",
        metavar="RATE",
        help=f"most bytes a second {what}, resends included: bytes as 10MiB (or 10M), "
        "bits as 80mbit, 1gbit (default: no limit)",
    )


def _full_option(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument(
        "--full",
        action="store_true",
        help=f"{what} every chunk, even to a target that holds some already from an earlier "
        "version (default: only what it lacks, a delta)",
    )


def _compress_option(command: argparse.ArgumentParser) -> None:
    # None: the settings' (OBJSTREAM_COMPRESS, default none).
    command.add_argument(
        "--compress",
        choices=MODES,
        help="compress chunks for targets that decode them: auto (only while it pays: a slow "
        "link, weights that shrink), zstd (always) or none (default: none)",
    )


def _add_container_command(sub: Any, parent: argparse.ArgumentParser) -> None:
    container = sub.add_parser(
        "send-container",
        parents=[parent],
        help="stream a container (.npz, .safetensors, .json, .pt/.bin, a checkpoint directory)",
        description="Stream the dict (or list) stored in PATH entry by entry; big arrays are "
        "chunked. The container's name is the file's base name, and `objstream consumer listen` "
        "saves it under that name in the same format. A .safetensors is read by its header and "
        "streamed from the file (any dtype, bfloat16 and float8 included; __metadata__ kept). "
        "A directory (a sharded checkpoint with model.safetensors.index.json) is sent as one "
        "container named DIR/ and saved as the same directory. A .pt/.bin PyTorch state dict "
        "is loaded only with torch.load(weights_only=True) (needs objstream[torch]); a file "
        "that needs full unpickling is refused, and it is saved as .safetensors. "
        "Exit codes as for send-file.",
        epilog="examples:\n  objstream producer send-container --site server --to site-1 model.npz"
        "\n  objstream producer send-container --site server --to site-1 checkpoints/llama/",
        formatter_class=HelpFormatter,
    )
    container.add_argument(
        "path", metavar="PATH", help=".npz, .safetensors, .json, .pt/.bin file, or a directory"
    )
    _common_send_options(container)
    container.set_defaults(handler=send_container, settings_overrides=_overrides)


def _add_serve_command(sub: Any, parent: argparse.ArgumentParser) -> None:
    serve = sub.add_parser(
        "serve",
        parents=[parent],
        help="serve files and containers to sites that retrieve them",
        description="Answer retrieval requests for this site until SIGINT/SIGTERM: files from "
        "--source-dir (names resolved inside it; '..', absolute paths and symlinks out are "
        "refused) and containers loaded from .npz/.safetensors/.json files. With --allow, only "
        "those broker users (as authenticated by RabbitMQ) may retrieve anything.",
        epilog="example:\n  objstream producer serve --site server --source-dir data "
        "--container model=model.npz",
        formatter_class=HelpFormatter,
    )
    serve.add_argument("--site", required=True, help="this site's name")
    serve.add_argument("--source-dir", metavar="DIR", help="serve the files under DIR")
    serve.add_argument(
        "--container",
        action="append",
        default=[],
        type=_named_path,
        metavar="NAME=PATH",
        help="serve the container in PATH (.npz, .safetensors, .json, .pt/.bin state dict, or a "
        "checkpoint directory, retrieved as a directory) as NAME; repeatable",
    )
    serve.add_argument(
        "--allow",
        action="append",
        metavar="USER",
        help="broker user allowed to retrieve (repeatable; default: any authenticated user)",
    )
    _rate_option(serve, "each served stream publishes")
    _compress_option(serve)
    _full_option(serve, "serve")
    monitoring.add_metrics_options(serve)
    serve.set_defaults(
        handler=serve_cmd,
        settings_overrides=lambda args: {
            "rate_limit": args.rate_limit,
            "compress": args.compress,
            "delta": False if args.full else None,
        },
    )


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def _sites(text: str) -> list[str]:
    sites = [s.strip() for s in text.split(",") if s.strip()]
    if not sites:
        raise argparse.ArgumentTypeError("no site given")
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"site given twice: {', '.join(repeated)}")
    return sites


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "chunk_size": args.chunk_size,
        "window": args.window,
        "timeout": args.timeout,
        "rate_limit": args.rate_limit,
        "compress": args.compress,
        "delta": False if args.full else None,
    }


def _target(result: TargetResult) -> dict[str, Any]:
    record: dict[str, Any] = {"site": result.site, "ok": result.ok, "stream_id": result.stream_id}
    if result.ok:
        record["stored_as"] = result.stored_as
    elif result.error is not None:
        record.update(code=str(result.error.code), error=str(result.error))
    record["bytes_reused"] = result.bytes_reused
    return record


def _json_outcome(
    args: argparse.Namespace,
    results: list[TargetResult],
    seconds: float,
    error: BaseException | None = None,
    *,
    enough: bool = False,
) -> dict[str, Any]:
    """The one JSON object ``--json`` prints, whatever happened: every target's outcome.
    ``enough``: a send with ``--min-targets`` succeeded, whatever the other targets did."""
    size = results[0].size if results else None
    ok = enough or (error is None and bool(results) and all(r.ok for r in results))
    # A rate and a digest only of what was sent and verified: a failed send has neither.
    rate = size / (1024 * 1024) / seconds if ok and size is not None and seconds > 0 else 0.0
    targets = [_target(r) for r in results]
    if not results:  # nothing was sent (a missing file, no broker...): no target got it
        message = error_words(error) if error is not None else "failed"
        targets = [{"site": site, "ok": False, "error": message} for site in args.to]
    outcome: dict[str, Any] = {
        "ok": ok,
        "name": args.path,
        "bytes": size,
        "seconds": round(seconds, 3),
        "mib_per_s": round(rate, 1),
        "bytes_published": max((r.bytes_published for r in results), default=0),
        "bytes_reused": sum(r.bytes_reused for r in results),
        "sha256": (results[0].sha256 or None) if results else None,
        "targets": targets,
    }
    if error is not None:
        outcome["code"] = error_code(error)
        outcome["error"] = error_words(error)
    return outcome


def _send(args: argparse.Namespace, what: str, send: Callable[[StopFlag, Sent], None]) -> int:
    """Run ``send`` and report: one line per target, or with ``--json`` one JSON object on
    success, partial failure and failure alike (the error line and exit code as usual).

    ``send`` calls ``sent`` with the results as soon as it has them (with ``--min-targets``,
    before it waits for the stragglers, which are reported as each ends)."""
    from objstream.producer.sender import TargetResult

    started = time.monotonic()
    stop = StopFlag()

    def sent(results: list[TargetResult]) -> None:
        seconds = time.monotonic() - started
        if args.json:
            outcome = _json_outcome(args, results, seconds, enough=args.min_targets is not None)
            ended = {r.site for r in results}
            pending = [{"site": t, "pending": True} for t in args.to if t not in ended]
            outcome["targets"] += pending
            print(json.dumps(outcome), flush=True)
            return
        print_sent(f"{what} {args.path}", [r for r in results if r.ok], seconds)
        for failed in (r for r in results if r.error is not None):  # k of N: it failed first
            console.warn(f"{failed.site}: {failed.error}")

    try:
        send(stop, sent)
    except BaseException as e:
        # A send a signal cancelled (its targets told `aborted`) is an interruption (exit 130, 143),
        # not the targets' failures.
        error = stop.interrupted() if isinstance(e, SendFailed) and stop else e
        done = [r for r in getattr(e, "results", []) if isinstance(r, TargetResult)]
        if args.json:
            outcome = _json_outcome(args, done, time.monotonic() - started, error)
            print(json.dumps(outcome), flush=True)
        elif stored := [r for r in done if r.ok]:  # they, then the error line of the others
            print_sent(f"{what} {args.path}", stored, time.monotonic() - started)
        if error is not e:
            raise error from e
        raise
    if stop:  # while stragglers went on: they were told to stop
        raise stop.interrupted()
    return 0


def _stragglers_of(args: argparse.Namespace, what: str) -> Callable[[TargetResult], None]:
    """How a straggler of a send with ``--min-targets`` is reported as it ends (after the
    send's own report): a JSON object of its own, or its line (on stderr if it failed)."""
    started = time.monotonic()

    def report(result: TargetResult) -> None:
        if args.json:
            record = {"straggler": True, "name": args.path, **_target(result)}
            print(json.dumps(record), flush=True)
        elif result.ok:
            print_sent(f"{what} {args.path}", [result], time.monotonic() - started)
        else:
            console.warn(f"{result.site}: {result.error}")

    return report


def _quorum(args: argparse.Namespace) -> dict[str, Any]:
    """The Python keywords of ``--min-targets`` and ``--stragglers``."""
    if args.min_targets is None:
        return {}
    if args.min_targets > len(args.to):
        raise ConfigError(
            f"--min-targets {args.min_targets} is more than the {len(args.to)} targets of --to"
        )
    return {"min_targets": args.min_targets, "stragglers": args.stragglers}


def print_sent(label: str, results: list[TargetResult], seconds: float) -> None:
    """A line per target that stored and verified the object ``label`` names (``file
    big.bin``)."""
    size = results[0].size
    rate = size / (1024 * 1024) / seconds if seconds > 0 else 0.0
    for r in results:
        where = f" as {r.stored_as}" if r.stored_as else ""
        print(
            printable(
                f"sent {label} to {r.site}{where}: {plural(size, 'byte')} in "
                f"{seconds:.2f} s ({rate:.2f} MiB/s), sha256 {r.sha256} verified"
            ),
            flush=True,
        )


def send_file(args: argparse.Namespace, settings: Settings) -> int:
    from objstream.producer.send_many import check_usage, is_many, send_many
    from objstream.producer.streamer import FileStreamer

    check_usage(args)
    if is_many(args):  # several paths, a tree, standard input: each object in turn
        return send_many(args, settings)
    args.path = args.path[0]

    quorum = _quorum(args)

    def send(stop: StopFlag, sent: Sent) -> None:
        bars = progress.display(args.progress)
        stop.install()
        report = _stragglers_of(args, "file")
        with FileStreamer(
            args.site, settings, progress=bars, cancel=stop.event, on_straggler=report
        ) as streamer:
            sent(streamer.stream_file(args.to, args.path, **quorum))
            streamer.stragglers()  # each reported as it ends
        bars.close()

    return _send(args, "file", send)


def send_container(args: argparse.Namespace, settings: Settings) -> int:
    from objstream.producer.container_files import (
        compressed_size,
        container_name,
        load_container,
    )
    from objstream.producer.streamer import ContainerStreamer

    quorum = _quorum(args)

    def send(stop: StopFlag, sent: Sent) -> None:
        path = Path(args.path)
        container = load_container(path)
        sizes = compressed_size(path)
        if sizes is not None:
            console.note(
                f"{path} is compressed: {plural(sizes[0], 'byte')} in the file, "
                f"{plural(sizes[1], 'byte')} of arrays, which is what moves and what the "
                "receiver stores (uncompressed); send-file moves the file as it is"
            )
        bars = progress.display(args.progress)
        stop.install()  # from here a signal aborts the stream at every target
        report = _stragglers_of(args, "container")
        with ContainerStreamer(
            args.site, settings, progress=bars, cancel=stop.event, on_straggler=report
        ) as streamer:
            sent(streamer.stream_container(args.to, container, container_name(path), **quorum))
            streamer.stragglers()  # each reported as it ends
        bars.close()

    return _send(args, "container", send)


def serve_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from objstream.producer.container_files import load_container
    from objstream.producer.serving import ContainerRetriever, FileRetriever, RetrievalServer

    if not args.source_dir and not args.container:
        raise ConfigError("nothing to serve: give --source-dir and/or --container NAME=PATH")
    watch = monitoring.watch(args, "server")  # a port in use fails here, before connecting
    stop = StopFlag()
    stop.install()
    server = RetrievalServer(args.site, settings, progress=watch.progress, on_outcome=watch.ended)
    with watch, server:
        watch.server(server)
        if args.source_dir:
            FileRetriever(server, source_dir=args.source_dir, allow=args.allow)
        for name, path in args.container:
            ContainerRetriever(server).add_container(name, load_container(path), allow=args.allow)
        console.note(
            f"serving site {args.site} on {settings.masked_url} (namespace {settings.namespace});"
            " stop with Ctrl-C"
        )
        server.serve(stop=lambda: bool(stop))
    return 0
