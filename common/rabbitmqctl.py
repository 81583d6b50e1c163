"""Running ``rabbitmqctl`` for ``objstream admin``, and reading its JSON output.

:class:`Rabbitmqctl` runs one command on one node (``-n``, or rabbitmqctl's default node: the
one ``RABBITMQ_NODENAME`` or ``rabbitmq-env.conf`` names) and turns a failure into one line.
The readers below it are pure: they take the text ``--formatter json`` printed, so what
RabbitMQ's versions print differently is tested without a broker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from objstream.common.errors import ConfigError, RabbitmqctlFailed
from objstream.common.offthread import off_thread

RABBITMQCTL_TIMEOUT = 120.0
"""Seconds a rabbitmqctl call may take (it waits for an unreachable node on its own too)."""


@dataclass(frozen=True)
class TopicPermission:
    """One topic permission of a user: on ``exchange`` of ``vhost``."""

    vhost: str
    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class Rabbitmqctl:
    """``rabbitmqctl`` on one node: ``node`` (its ``-n``), or None for its default node."""

    exe: str
    node: str | None = None
    meanwhile: Callable[[], None] | None = None
    """Called while a command runs (serving an AMQP connection, so heartbeats go on)."""

    @classmethod
    def find(
        cls,
        node: str | None,
        meanwhile: Callable[[], None] | None = None,
        *,
        needed_by: str = "--apply",
        hint: str = "run this on a broker node, or run the lines printed without --apply there",
    ) -> Rabbitmqctl:
        """The ``rabbitmqctl`` on PATH (``needed_by`` and ``hint`` word the error).

        Raises:
            ConfigError: there is none.
        """
        exe = shutil.which("rabbitmqctl")
        if exe is None:
            raise ConfigError(f"{needed_by} needs rabbitmqctl on PATH ({hint})")
        return cls(exe, node, meanwhile)

    @property
    def target(self) -> str:
        """The node in words, for messages."""
        return f"rabbitmqctl's node {self.node!r}" if self.node else "rabbitmqctl's default node"

    def run(self, *args: str, stdin: str = "") -> str:
        """Run ``rabbitmqctl [-n NODE] ARGS``; returns its standard output.

        ``stdin`` is how a password goes in: never on a command line, where ``ps`` shows it and
        Debian's ``rabbitmqctl`` wrapper (run as root) expands a ``$`` or a backquote in it.

        Raises:
            RabbitmqctlFailed: it failed or gave no answer within :data:`RABBITMQCTL_TIMEOUT`.
        """
        argv = [self.exe, *(["-n", self.node] if self.node else []), *args]
        if self.meanwhile is None:
            result = _run(argv, stdin)
        else:
            result = off_thread(lambda: _run(argv, stdin), self.meanwhile, "rabbitmqctl")
        if result.returncode != 0:
            raise RabbitmqctlFailed(args[0], result.returncode, failure_reason(result))
        return result.stdout

    def query(self, *args: str) -> Any:
        """Run a listing command with ``--formatter json``; returns what it printed, parsed.

        Raises:
            RabbitmqctlFailed: it failed, or printed no JSON.
        """
        text = self.run(args[0], "-q", "--formatter", "json", *args[1:])
        try:
            return read_json(text)
        except ValueError as e:
            raise RabbitmqctlFailed(args[0], 0, f"no JSON in its output: {e}") from e


def _run(argv: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=RABBITMQCTL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        detail = f"no answer within {RABBITMQCTL_TIMEOUT:g} s"
        return subprocess.CompletedProcess(argv, -1, "", detail)


def failure_reason(result: subprocess.CompletedProcess[str]) -> str:
    """What a failed rabbitmqctl call says went wrong, in one line (never a password: those
    go in on stdin, and rabbitmqctl does not echo them)."""
    # rabbitmqctl says what went wrong first ("Error: unable to perform an operation on node
    # ...", or "Error:" and the reason on the next line), then pages of diagnostics.
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines()]
    reason = next((line for line in lines if line and line != "Error:"), "no output")
    return reason.removeprefix("Error: ")[:300]


# -- reading its output (pure) ------------------------------------------------------------------


def read_json(text: str) -> Any:
    """The JSON value rabbitmqctl printed with ``--formatter json``.

    Starts at the first line that opens a list or an object: some versions print an
    informational line first, even with ``-q``.

    Raises:
        ValueError: there is no JSON value there.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip()[:1] in ("[", "{")), None)
    if start is None:
        raise ValueError(f"expected a JSON list, got {text.strip()[:80]!r}")
    return json.loads("\n".join(lines[start:]))


def _rows(value: Any) -> list[Mapping[str, Any]]:
    """The rows of a listing (a JSON list of objects); anything else is no rows."""
    if not isinstance(value, list):
        return []
    return [row for row in value if isinstance(row, Mapping)]


def connection_names(listing: Any) -> set[str]:
    """The ``connection_name`` client property of each connection of ``list_connections
    client_properties``.

    RabbitMQ 3.x prints a connection's client properties as AMQP table entries, ``[name, type,
    value]`` triples; an object of name to value is read too.
    """
    names: set[str] = set()
    for row in _rows(listing):
        properties = row.get("client_properties")
        if isinstance(properties, Mapping):
            entries = list(properties.items())
        elif isinstance(properties, list):
            entries = [(e[0], e[-1]) for e in properties if isinstance(e, list) and len(e) >= 2]
        else:
            continue
        names.update(v for k, v in entries if k == "connection_name" and isinstance(v, str))
    return names


def user_tags(listing: Any, user: str) -> tuple[str, ...] | None:
    """The tags of ``user`` in ``list_users``, or None if there is no such user.

    Tags are a JSON list in RabbitMQ 3.10; text such as ``[administrator, management]`` or
    ``administrator,management`` is read too.
    """
    for row in _rows(listing):
        if row.get("user") != user:
            continue
        tags = row.get("tags", [])
        if isinstance(tags, str):
            tags = tags.strip("[]").replace(",", " ").split()
        return tuple(str(tag) for tag in tags if str(tag))
    return None


def user_permissions(listing: Any, vhost: str) -> tuple[str, str, str] | None:
    """``(configure, write, read)`` of ``list_user_permissions U`` in ``vhost``, or None."""
    for row in _rows(listing):
        if row.get("vhost") == vhost:
            return (str(row.get("configure")), str(row.get("write")), str(row.get("read")))
    return None


def topic_permissions(listing: Any) -> list[TopicPermission]:
    """The rows of ``list_user_topic_permissions U`` (every vhost)."""
    return [
        TopicPermission(
            str(row.get("vhost")),
            str(row.get("exchange")),
            str(row.get("write")),
            str(row.get("read")),
        )
        for row in _rows(listing)
    ]


def cluster_name(status: Any) -> str | None:
    """The cluster name in ``cluster_status``, or None if it says none."""
    name = status.get("cluster_name") if isinstance(status, Mapping) else None
    return name if isinstance(name, str) and name else None


@dataclass(frozen=True)
class QueueRow:
    """One queue of ``list_queues name type consumers messages exclusive``."""

    name: str
    type: str
    consumers: int
    messages: int
    exclusive: bool


@dataclass(frozen=True)
class BindingRow:
    """One binding of ``list_bindings source_name destination_name destination_kind``."""

    source: str
    destination: str
    destination_kind: str


QUEUE_COLUMNS = ("name", "type", "consumers", "messages", "exclusive")
BINDING_COLUMNS = ("source_name", "destination_name", "destination_kind")
EXCHANGE_COLUMNS = ("name", "type")


def _int(value: Any) -> int:
    """A count as rabbitmqctl prints it (a number; an empty string for a queue whose process
    is not answering, which counts as unknown: -1)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def queue_rows(listing: Any) -> list[QueueRow]:
    """The queues of ``list_queues`` with :data:`QUEUE_COLUMNS`."""
    return [
        QueueRow(
            str(row.get("name")),
            str(row.get("type") or "classic"),
            _int(row.get("consumers")),
            _int(row.get("messages")),
            row.get("exclusive") is True,
        )
        for row in _rows(listing)
        if isinstance(row.get("name"), str)
    ]


def binding_rows(listing: Any) -> list[BindingRow]:
    """The bindings of ``list_bindings`` with :data:`BINDING_COLUMNS`."""
    return [
        BindingRow(
            str(row.get("source_name")),
            str(row.get("destination_name")),
            str(row.get("destination_kind")),
        )
        for row in _rows(listing)
    ]


def exchange_rows(listing: Any) -> dict[str, str]:
    """Name to type of the exchanges of ``list_exchanges`` with :data:`EXCHANGE_COLUMNS`."""
    return {
        str(row.get("name")): str(row.get("type"))
        for row in _rows(listing)
        if isinstance(row.get("name"), str)
    }
