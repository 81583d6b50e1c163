"""``objstream admin cleanup --namespace NS``: delete a namespace's idle queues.

It talks to the broker the way ``admin permissions --apply`` does: connected to ``--url`` as an
administrator, it first makes sure the node ``rabbitmqctl`` manages (``--node``, or its
default node) sees that very connection; then it lists the vhost's queues, exchanges and
bindings with ``rabbitmqctl``, decides what goes (:func:`objstream.common.cleanup.plan`), and
deletes over AMQP, where the broker checks and deletes in one step: a classic queue with
``if-unused`` and ``if-empty``, an exchange with ``if-unused``. So a consumer that attaches, or
a message that arrives, between the listing and the deletion keeps its queue. Quorum queues
take neither flag (RabbitMQ closes the connection): each is checked with a passive declare
just before it is deleted, which leaves a window of one round trip.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import uuid
from typing import Any

from objstream.common.admin import check_same_broker, vhost_of
from objstream.common.amqp import Channel, Connection, connect
from objstream.common.cleanup import Decision, dead_site, plan, queue_site
from objstream.common.cli import EXIT_OK, HelpFormatter
from objstream.common.errors import BrokerMismatch, BrokerRefused, ConfigError
from objstream.common.rabbitmqctl import (
    BINDING_COLUMNS,
    EXCHANGE_COLUMNS,
    QUEUE_COLUMNS,
    Rabbitmqctl,
    binding_rows,
    exchange_rows,
    queue_rows,
)
from objstream.common.settings import Settings, check_site

NAMESPACE_ENV = "OBJSTREAM_NAMESPACE"


def add_command(sub: Any, parent: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser(
        "cleanup",
        parents=[parent],
        help="delete a namespace's idle queues (typo'd targets' inboxes, stopped sites')",
        description="Delete the queues of namespace NS that nobody uses: no consumer, not "
        "exclusive to a connection, and no message waiting (a queue holding messages stays "
        "unless --include-nonempty: a site has not taken them). A site's dead-letter queue "
        "and exchange go only with its other queues; the exchange NS only once nothing that "
        "stays is bound to it. Every queue and exchange kept is listed with the reason. "
        "Queues are deleted over AMQP with if-unused and if-empty, so one that a consumer "
        "attaches to meanwhile stays. Idle inboxes of sites that are only stopped go too: a "
        "site declares its inbox again when it starts (under least privilege, run `admin "
        "permissions --apply` again so that offers wait for it); --site limits the cleanup. "
        "Runs on a broker node: it lists queues with rabbitmqctl, once the node rabbitmqctl "
        "manages (--node, or its default node) is seen to be the broker of --url. Exit codes: "
        "0 ok (also when some were kept), 2 usage, no rabbitmqctl, or rabbitmqctl manages "
        "another broker (nothing changed), 3 rabbitmqctl failed or the broker refused.",
        epilog="examples:\n"
        "  objstream admin cleanup --namespace fl --dry-run\n"
        "  objstream admin cleanup --namespace fl --site site-l --url amqp://admin:...@host/%2F",
        formatter_class=HelpFormatter,
    )
    cmd.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted; change nothing"
    )
    cmd.add_argument(
        "--include-nonempty",
        action="store_true",
        help="delete idle queues holding messages too (those messages are lost)",
    )
    cmd.add_argument(
        "--site",
        action="append",
        metavar="SITE",
        help="only this site's queues and dead letters (repeatable); the exchange NS stays",
    )
    cmd.add_argument("--node", help="the RabbitMQ node rabbitmqctl manages (its -n option)")
    cmd.set_defaults(handler=cleanup_cmd, settings_overrides=lambda args: {})


def cleanup_cmd(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "namespace", None) is None and not os.environ.get(NAMESPACE_ENV):
        raise ConfigError(
            "admin cleanup needs --namespace NS (or OBJSTREAM_NAMESPACE): it deletes that "
            "namespace's idle queues"
        )
    sites = None if args.site is None else {check_site(site) for site in args.site}
    namespace, vhost = settings.namespace, vhost_of(settings.url)
    ctl = Rabbitmqctl.find(
        args.node,
        needed_by="admin cleanup",
        hint="run it on a broker node: it lists the namespace's queues with rabbitmqctl",
    )
    connection = connect(settings, f"objstream admin cleanup {uuid.uuid4().hex}")
    try:
        ctl = dataclasses.replace(ctl, meanwhile=lambda: connection.process_events(0.1))
        try:
            check_same_broker(ctl, connection)
        except BrokerMismatch as e:
            raise BrokerMismatch(e.node, e.url, e.cluster, what="cleanup") from None
        queues = queue_rows(ctl.query("list_queues", "-p", vhost, *QUEUE_COLUMNS))
        exchanges = exchange_rows(ctl.query("list_exchanges", "-p", vhost, *EXCHANGE_COLUMNS))
        bindings = binding_rows(ctl.query("list_bindings", "-p", vhost, *BINDING_COLUMNS))
        decisions = plan(
            namespace,
            queues,
            exchanges,
            bindings,
            include_nonempty=args.include_nonempty,
            sites=sites,
        )
        where = f"namespace {namespace!r} in vhost {vhost!r}"
        if not decisions:
            print(f"nothing of {where} on this broker")
            return EXIT_OK
        if args.dry_run:
            for decision in decisions:
                print(decision.line("would delete" if decision.delete else "would keep"))
            going = [d for d in decisions if d.delete]
            print(f"dry run, nothing changed: {_count(going)} of {where} would be deleted")
            return EXIT_OK
        deleted = Deleter(connection, namespace, args.include_nonempty).run(decisions)
    finally:
        connection.close()
    print(f"{where}: deleted {_count(deleted)}, kept {_count(decisions, deleted)}")
    return EXIT_OK


def _count(decisions: list[Decision], but: list[Decision] | None = None) -> str:
    left = [d for d in decisions if but is None or d not in but]
    queues = sum(d.what == "queue" for d in left)
    exchanges = len(left) - queues
    return (
        f"{queues} queue{'' if queues == 1 else 's'} and "
        f"{exchanges} exchange{'' if exchanges == 1 else 's'}"
    )


class Deleter:
    """Carries out a plan over one connection, one line per queue and exchange."""

    def __init__(self, connection: Connection, namespace: str, include_nonempty: bool) -> None:
        self._connection = connection
        self._namespace = namespace
        self._include_nonempty = include_nonempty
        self._channel: Channel = connection.channel()
        self._sites_staying: set[str] = set()
        """Sites a queue of which stayed after all (in use meanwhile): their dead letters
        stay too."""

    def run(self, decisions: list[Decision]) -> list[Decision]:
        """Delete what ``decisions`` say goes, in their order; returns what was deleted."""
        deleted = []
        try:
            for decision in decisions:
                if self._delete(decision):
                    deleted.append(decision)
        finally:
            self._channel.close()
        return deleted

    def _delete(self, decision: Decision) -> bool:
        if not decision.delete:
            print(decision.line("kept"), flush=True)
            return False
        site = dead_site(self._namespace, decision.name)
        if site is not None and site in self._sites_staying:
            reason = f"site {site!r} has queues that stay: their dead letters go there"
            print(decision.line("kept", reason), flush=True)
            return False
        try:
            kept = self._attempt(decision)
        except BrokerRefused as e:
            if e.access_refused:
                raise
            self._channel = self._connection.channel()  # the refusal closed the other
            if e.not_found:
                print(decision.line("gone", "deleted by someone else meanwhile"), flush=True)
                return False
            kept = f"in use now ({e.reply_text})"
        if kept is not None:
            if site is None and decision.what == "queue":
                self._sites_staying.add(queue_site(self._namespace, decision.name) or "")
            print(decision.line("kept", kept), flush=True)
            return False
        print(decision.line("deleted"), flush=True)
        return True

    def _attempt(self, decision: Decision) -> str | None:
        """Delete it if it is still unused; None if it went, else why it stays."""
        channel = self._channel
        if decision.what == "exchange":
            channel.delete_exchange(decision.name, if_unused=True)
            return None
        if not decision.quorum:
            channel.delete_queue(decision.name, if_unused=True, if_empty=not self._include_nonempty)
            return None
        messages, consumers = channel.queue_counts(decision.name)
        if consumers:
            return f"in use now ({consumers} consumer{'' if consumers == 1 else 's'})"
        if messages and not self._include_nonempty:
            return f"{messages} message{'' if messages == 1 else 's'} arrived meanwhile"
        channel.delete_queue(decision.name)
        return None
