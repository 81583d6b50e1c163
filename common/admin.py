"""``objstream admin ...``: what a broker administrator runs for objstream.

``objstream admin permissions --site S --user U`` prints the ``rabbitmqctl`` lines that give
site S's broker user U exactly what protocol v2 lets a site do (:func:`topology.permissions`),
shell-quoted, to paste into a shell on a broker node.

With ``--apply`` it does it, on the broker ``--url`` names and nowhere else: connected there as
an administrator, it first makes sure the node ``rabbitmqctl`` manages (``--node``, or its
default node) sees that very connection, so both are the same broker; then it clears what the
user holds beyond the site's grants (user tags, topic permissions on other exchanges), sets the
permissions, and declares what a site may not declare itself: the exchange, the dead-letter
exchange and queue, and the site's inbox and service queue. It prints one line per change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import urllib.parse
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from objstream.common.amqp import Connection, connect
from objstream.common.cli import EXIT_OK, HelpFormatter
from objstream.common.errors import BrokerMismatch, BrokerRefused, ConfigError, RabbitmqctlFailed
from objstream.common.rabbitmqctl import (
    Rabbitmqctl,
    TopicPermission,
    cluster_name,
    connection_names,
    topic_permissions,
    user_permissions,
    user_tags,
)
from objstream.common.settings import Settings, check_site
from objstream.common.topology import Topology, permissions
from objstream.common.urls import split_urls

PASSWORD_ENV = "OBJSTREAM_ADMIN_PASSWORD"
PASSWORD_PLACEHOLDER = "<password>"


@dataclass(frozen=True)
class Grant:
    """The permissions of one site's broker user, as ``rabbitmqctl`` command lines."""

    site: str
    user: str
    namespace: str
    vhost: str = "/"
    node: str | None = None
    """The node ``rabbitmqctl`` talks to (``-n``); None: its default (the local node)."""

    def _ctl(self, *args: str) -> list[str]:
        return ["rabbitmqctl", *(["-n", self.node] if self.node else []), *args]

    def add_user(self) -> list[str]:
        """``rabbitmqctl add_user`` with :data:`PASSWORD_PLACEHOLDER` for the password."""
        return self._ctl("add_user", self.user, PASSWORD_PLACEHOLDER)

    def clear_tags(self) -> list[str]:
        """``rabbitmqctl set_user_tags U`` with no tags: a site's user needs none, and some
        defeat least privilege (``administrator``; ``impersonator`` publishes any user_id)."""
        return self._ctl(*self.clear_tags_args())

    def clear_tags_args(self) -> list[str]:
        return ["set_user_tags", self.user]

    def grants(self) -> list[list[str]]:
        """``set_permissions`` and ``set_topic_permissions`` for the site's user."""
        return [self._ctl(*args) for args in self.grant_args()]

    def grant_args(self) -> list[list[str]]:
        """:meth:`grants` as rabbitmqctl's arguments, without ``rabbitmqctl`` and ``-n``."""
        p = permissions(self.namespace, self.site)
        return [
            ["set_permissions", "-p", self.vhost, self.user, p.configure, p.write, p.read],
            [
                "set_topic_permissions",
                "-p",
                self.vhost,
                self.user,
                self.namespace,
                p.topic_write,
                p.topic_read,
            ],
        ]

    def script(self, *, existing_user: bool = False) -> list[str]:
        """The lines to print: comments, then the shell-quoted commands."""
        header = [
            f"# objstream v2: least privilege of site {self.site!r} for user {self.user!r}",
            f"# (namespace {self.namespace!r}, vhost {self.vhost!r}). An administrator declares",
            "# the exchanges and the site's inbox and service queue: this command with --apply.",
        ]
        if existing_user:
            add = [f"# user {self.user!r} exists already (or logs in by EXTERNAL): no add_user"]
        else:
            add = [
                f"# replace {PASSWORD_PLACEHOLDER} (or leave add_user out if the user exists)",
                shlex.join(self.add_user()),
            ]
        leftovers = [
            "# a user made before may hold more: clear its tags, and clear its topic permissions",
            f"# on any exchange but {self.namespace!r} (list_user_topic_permissions, then "
            "clear_topic_permissions)",
            shlex.join(self.clear_tags()),
        ]
        return header + add + leftovers + [shlex.join(argv) for argv in self.grants()]


# -- the command --------------------------------------------------------------------------------


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    side = commands.add_parser(
        "admin",
        parents=[parent],
        help="broker administration for objstream (users and permissions, cleanup, regions)",
        description="What a broker administrator runs for objstream.",
        epilog="examples:\n  objstream admin permissions --site site-1 --user site-1\n"
        "  objstream admin cleanup --namespace fl --dry-run\n"
        "  objstream admin federation --namespace fl --upstream central=amqps://link:...@c/%2F",
        formatter_class=HelpFormatter,
    )
    sub = side.add_subparsers(
        dest="command", required=True, metavar="{permissions,cleanup,federation}"
    )
    cmd = sub.add_parser(
        "permissions",
        parents=[parent],
        help="the rabbitmqctl lines that give a site's user least privilege",
        description="Print the rabbitmqctl lines (add_user, set_permissions, "
        "set_topic_permissions on the exchange NAMESPACE, set_user_tags with no tags) that let "
        "USER do exactly what site SITE needs: its own inbox, service queue, data and reply "
        "queues; publishing with keys that name SITE as the publisher. With --apply, do it on "
        "the broker of --url (connected as an administrator): only once the node rabbitmqctl "
        "manages (--node, or its default node) is seen to be that broker's; clear USER's tags "
        "and its topic permissions on other exchanges, set its permissions, and declare the "
        "exchange, the dead-letter exchange and queue, and SITE's inbox and service queue; one "
        "line per change. Exit codes: 0 ok, 2 usage, no rabbitmqctl, or rabbitmqctl manages "
        "another broker (nothing changed), 3 rabbitmqctl failed or the broker refused.",
        epilog="examples:\n"
        "  objstream admin permissions --site site-1 --user site-1 --namespace fl\n"
        "  OBJSTREAM_ADMIN_PASSWORD=... objstream admin permissions --site site-1 "
        "--user site-1 --apply --url amqp://admin:...@localhost/%2F",
        formatter_class=HelpFormatter,
    )
    cmd.add_argument("--site", required=True, help="the site's name")
    cmd.add_argument("--user", required=True, help="the site's broker user")
    cmd.add_argument("--vhost", help="the virtual host (default: the one of --url, usually /)")
    cmd.add_argument("--node", help="the RabbitMQ node rabbitmqctl manages (its -n option)")
    cmd.add_argument(
        "--existing-user",
        action="store_true",
        help="the user exists (or logs in by EXTERNAL): no add_user",
    )
    cmd.add_argument("--apply", action="store_true", help="run the lines, declare the queues")
    cmd.add_argument(
        "--password",
        help=f"with --apply: the new user's password (default: env {PASSWORD_ENV}; without "
        "either, the user must exist). Prefer the variable: arguments show in `ps`.",
    )
    cmd.set_defaults(handler=permissions_cmd, settings_overrides=lambda args: {})
    from objstream.common import admin_cleanup  # it builds on this module

    admin_cleanup.add_command(sub, parent)
    from objstream.common import admin_federation

    admin_federation.add_command(sub, parent)


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names (as pika reads it: none or ``/`` is ``/``)."""
    path = urllib.parse.urlsplit(split_urls(url)[0]).path
    return "/" if path in ("", "/") else urllib.parse.unquote(path[1:])


def permissions_cmd(args: argparse.Namespace, settings: Settings) -> int:
    check_site(args.site)
    if not args.user:
        raise ConfigError("--user must not be empty")
    grant = Grant(
        args.site, args.user, settings.namespace, args.vhost or vhost_of(settings.url), args.node
    )
    if args.password is not None and not args.apply:
        raise ConfigError(
            "--password is used only with --apply (the script prints '<password>' to fill in)"
        )
    if not args.apply:
        for line in grant.script(existing_user=args.existing_user):
            print(line)
        return EXIT_OK
    if grant.vhost != vhost_of(settings.url):
        # The queues are declared in the URL's vhost: permissions elsewhere would not fit them.
        raise ConfigError(
            f"--vhost {grant.vhost!r} is not the vhost of --url ({vhost_of(settings.url)!r}): "
            "with --apply, give the vhost in the URL"
        )
    password = None if args.existing_user else args.password or os.environ.get(PASSWORD_ENV)
    changed = apply(grant, settings, password)
    what = f"user {args.user!r} has exactly the permissions of site {args.site!r}"
    if changed:
        print(f"{what} in vhost {grant.vhost!r}")
    else:
        print(f"nothing changed: {what}, and the site's queues exist")
    return EXIT_OK


# -- --apply --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserState:
    """What the broker holds for a site's user before ``--apply`` changes anything."""

    exists: bool
    tags: tuple[str, ...] = ()
    permissions: tuple[str, str, str] | None = None
    """``(configure, write, read)`` in the grant's vhost; None: none there."""
    topic_permissions: tuple[TopicPermission, ...] = ()
    """In every vhost (only the grant's vhost is changed)."""


@dataclass(frozen=True)
class Change:
    """One rabbitmqctl command of ``--apply``, and the line that says what it changed."""

    args: tuple[str, ...]
    """rabbitmqctl's arguments, without ``rabbitmqctl`` and ``-n``."""
    says: str
    stdin: str = field(default="", repr=False)
    """What the command reads on stdin: a new user's password."""


def topic_leftovers(grant: Grant, rows: Iterable[TopicPermission]) -> list[TopicPermission]:
    """The user's topic permissions in the grant's vhost on exchanges other than the
    namespace's: a site publishes and binds only on ``NS``; anything else (``NS.dead``,
    ``amq.topic``...) is an older setup's leftover (a topic permission only narrows the keys
    the vhost permissions allow, so clearing one takes away nothing a site needs)."""
    return [r for r in rows if r.vhost == grant.vhost and r.exchange != grant.namespace]


def plan(grant: Grant, state: UserState, password: str | None) -> list[Change]:
    """The rabbitmqctl commands that bring the user from ``state`` to exactly the site's
    permissions, in order: create it, take away what it must not have, then grant.

    Raises:
        ConfigError: the user does not exist and there is no password to create it with.
    """
    user, vhost = grant.user, grant.vhost
    changes = []
    if not state.exists:
        if password is None:
            raise ConfigError(
                f"user {user!r} does not exist on that broker: give a password to create it "
                f"(env {PASSWORD_ENV} or --password, without --existing-user); nothing changed"
            )
        created = f"created user {user!r} (password read from stdin)"
        changes.append(Change(("add_user", user), created, stdin=password + "\n"))
    if state.tags:
        says = f"cleared tags {', '.join(state.tags)} of user {user!r}"
        changes.append(Change(tuple(grant.clear_tags_args()), says))
    for row in topic_leftovers(grant, state.topic_permissions):
        args = ("clear_topic_permissions", "-p", vhost, user, row.exchange)
        changes.append(
            Change(args, f"cleared topic permissions of {user!r} on exchange {row.exchange!r}")
        )
    set_permissions, set_topic = (tuple(args) for args in grant.grant_args())
    if state.permissions != set_permissions[-3:]:
        was = ""
        if state.permissions is not None:
            configure, write, read = state.permissions
            was = f" (they were configure {configure!r}, write {write!r}, read {read!r})"
        says = f"set permissions of {user!r} in vhost {vhost!r}{was}"
        changes.append(Change(set_permissions, says))
    topic = [
        (r.write, r.read)
        for r in state.topic_permissions
        if r.vhost == vhost and r.exchange == grant.namespace
    ]
    if topic != [set_topic[-2:]]:
        says = f"set topic permissions of {user!r} on exchange {grant.namespace!r}"
        changes.append(Change(set_topic, says))
    return changes


def check_same_broker(ctl: Rabbitmqctl, connection: Connection) -> None:
    """Make sure ``ctl``'s node belongs to the broker ``connection`` is connected to.

    The connection's name holds a random id; the node lists the connections of its whole
    cluster. Seeing it there settles it, where listener ports or cluster names would not: a
    port can be forwarded or published under another number, and two brokers can have the same
    cluster name (a node name such as ``rabbit@rabbitmq`` is the default in many containers).

    Raises:
        BrokerMismatch: the node does not see the connection (nothing was changed).
        RabbitmqctlFailed: rabbitmqctl could not ask the node.
    """
    if connection.name in connection_names(ctl.query("list_connections", "client_properties")):
        return
    try:
        cluster = cluster_name(ctl.query("cluster_status"))
    except RabbitmqctlFailed:
        cluster = None  # only to word the error
    raise BrokerMismatch(ctl.target, connection.url, cluster)


def read_state(ctl: Rabbitmqctl, grant: Grant) -> UserState:
    """What the broker holds for the grant's user (read only)."""
    tags = user_tags(ctl.query("list_users"), grant.user)
    if tags is None:
        return UserState(exists=False)
    vhost_permissions = ctl.query("list_user_permissions", grant.user)
    topics = ctl.query("list_user_topic_permissions", grant.user)
    return UserState(
        True,
        tags,
        user_permissions(vhost_permissions, grant.vhost),
        tuple(topic_permissions(topics)),
    )


def apply(grant: Grant, settings: Settings, password: str | None) -> int:
    """Give the grant's user exactly the site's permissions on the broker of ``settings.url``,
    and declare what the site may not; print a line per change and return how many there were.

    Nothing is changed anywhere before the node rabbitmqctl manages is known to be one of that
    broker's (:func:`check_same_broker`) and the user's state is read. The connection is served
    while rabbitmqctl runs, so its heartbeats go on.

    Raises:
        ConfigError: no rabbitmqctl; the user is missing and there is no password.
        BrokerMismatch: rabbitmqctl manages another broker.
        RabbitmqctlFailed: a rabbitmqctl command failed (those before it took effect).
        BrokerUnreachable, AuthenticationRefused, BrokerRefused: the broker of ``--url``.
    """
    ctl = Rabbitmqctl.find(grant.node)
    connection = connect(settings, f"objstream admin {grant.site} {uuid.uuid4().hex}")
    try:
        ctl = dataclasses.replace(ctl, meanwhile=lambda: connection.process_events(0.1))
        check_same_broker(ctl, connection)
        print(f"{ctl.target} manages the broker at {connection.url}: it sees this connection")
        state = read_state(ctl, grant)
        changes = plan(grant, state, password)
        if state.exists and password is not None:
            print(f"user {grant.user!r} exists: its password is unchanged")
        for change in changes:
            ctl.run(*change.args, stdin=change.stdin)
            print(change.says, flush=True)
        declared = declare_for(connection, Topology.from_settings(settings), grant.site)
        for what in declared:
            print(f"declared {what}")
    finally:
        connection.close()
    return len(changes) + len(declared)


def declare_for(connection: Connection, topology: Topology, site: str) -> list[str]:
    """Declare, as the administrator connected, what ``site`` may not declare itself (the
    exchange, the site's inbox and service queue) and what it could (its dead-letter exchange
    and queue), so that everything is there before the site first starts.

    Returns what was missing (and is declared now), in words.
    """
    wanted = [
        ("exchange", topology.exchange, "topic"),
        ("dead-letter exchange", topology.dead(site), "fanout"),
        ("dead-letter queue", topology.dead(site), None),
        ("inbox", topology.inbox(site), None),
        ("service queue", topology.service_queue(site), None),
    ]
    missing = [
        f"{what} {name!r}" for what, name, kind in wanted if not _exists(connection, name, kind)
    ]
    topology.declare_base(connection, site)
    channel = connection.channel()
    try:
        topology.declare_inbox(channel, site)
        topology.declare_service_queue(channel, site)
    finally:
        channel.close()
    return missing


def _exists(connection: Connection, name: str, exchange_kind: str | None) -> bool:
    """Whether exchange (with its kind) or queue ``name`` exists: a passive declare, on a
    channel of its own, which a miss closes."""
    channel = connection.channel()
    try:
        if exchange_kind is None:
            channel.declare_queue(name, passive=True)
        else:
            channel.declare_exchange(name, exchange_kind, passive=True)
        return True
    except BrokerRefused as e:
        if not e.not_found:
            raise
        return False
    finally:
        channel.close()
