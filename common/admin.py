"""``objstream admin ...``: what a broker administrator runs for objstream.

``objstream admin permissions --site S --user U`` prints the ``rabbitmqctl`` lines that give
site S's broker user U exactly what protocol v2 lets a site do (:func:`topology.permissions`),
shell-quoted, to paste into a shell on a broker node. With ``--apply`` it runs them with the
local ``rabbitmqctl`` and, connected with ``--url`` as an administrator, declares what a site
under least privilege may not declare itself: the exchange, the dead-letter exchange and queue,
and the site's inbox and service queue.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from objstream.common.amqp import connect
from objstream.common.cli import EXIT_BROKER, EXIT_OK, EXIT_USAGE
from objstream.common.errors import ConfigError
from objstream.common.settings import Settings, check_site, split_urls
from objstream.common.topology import Topology, permissions

PASSWORD_ENV = "OBJSTREAM_ADMIN_PASSWORD"
PASSWORD_PLACEHOLDER = "<password>"
VERBS = ("add_user", "set_permissions", "set_topic_permissions")
RABBITMQCTL_TIMEOUT = 120.0
"""Seconds a rabbitmqctl call may take (it waits for an unreachable node on its own too)."""


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

    def grants(self) -> list[list[str]]:
        """``set_permissions`` and ``set_topic_permissions`` for the site's user."""
        p = permissions(self.namespace, self.site)
        return [
            self._ctl("set_permissions", "-p", self.vhost, self.user, p.configure, p.write, p.read),
            self._ctl(
                "set_topic_permissions",
                "-p",
                self.vhost,
                self.user,
                self.namespace,
                p.topic_write,
                p.topic_read,
            ),
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
        return header + add + [shlex.join(argv) for argv in self.grants()]


# -- the command --------------------------------------------------------------------------------


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    side = commands.add_parser(
        "admin",
        parents=[parent],
        help="broker administration for objstream (users and permissions)",
        description="What a broker administrator runs for objstream.",
        epilog="example:\n  objstream admin permissions --site site-1 --user site-1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = side.add_subparsers(dest="command", required=True, metavar="{permissions}")
    cmd = sub.add_parser(
        "permissions",
        parents=[parent],
        help="the rabbitmqctl lines that give a site's user least privilege",
        description="Print the rabbitmqctl lines (add_user, set_permissions, "
        "set_topic_permissions on the exchange NAMESPACE) that let USER do exactly what site "
        "SITE needs: its own inbox, service queue, data and reply queues; publishing with keys "
        "that name SITE as the publisher. With --apply, run them with the local rabbitmqctl, "
        "then declare (connected with --url as an administrator) the exchange, the dead-letter "
        "exchange and queue, and SITE's inbox and service queue. Exit codes: 0 ok, 2 usage or "
        "no rabbitmqctl, 3 rabbitmqctl failed or the broker refused.",
        epilog="examples:\n"
        "  objstream admin permissions --site site-1 --user site-1 --namespace fl\n"
        "  OBJSTREAM_ADMIN_PASSWORD=... objstream admin permissions --site site-1 "
        "--user site-1 --apply --url amqp://admin:...@localhost/%2F",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    if not args.apply:
        for line in grant.script(existing_user=args.existing_user):
            print(line)
        return EXIT_OK
    password = None if args.existing_user else args.password or os.environ.get(PASSWORD_ENV)
    code = apply(grant, password)
    if code != EXIT_OK:
        return code
    declare_for(settings, args.site)
    print(f"site {args.site!r}: permissions of user {args.user!r} set, queues declared")
    return EXIT_OK


def apply(grant: Grant, password: str | None) -> int:
    """Run the grant's lines with the local rabbitmqctl, printing each; returns an exit code.

    The password goes on rabbitmqctl's standard input, never on a command line: arguments show
    in ``ps``, and Debian's ``rabbitmqctl`` wrapper (run as root) passes them through ``sh -c``
    inside double quotes, which expands a ``$`` or a backquote in them (measured: a password
    ``a$HOME`` given as an argument did not log in; the same read from stdin did).
    """
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        print(
            "objstream: error: --apply needs rabbitmqctl on PATH (run this on a broker node, "
            "or run the lines printed without --apply there)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if password is None:
        print(f"# no password given: user {grant.user!r} must exist already")
    else:
        argv = grant.add_user()[:-1]  # without the placeholder: rabbitmqctl reads stdin
        print(f"{shlex.join(argv)}  # password read from stdin", flush=True)
        result = _run([exe, *argv[1:]], stdin=password + "\n")
        if result.returncode != 0 and "already exists" in result.stderr + result.stdout:
            print(f"# user {grant.user!r} exists already: its password is unchanged")
        elif result.returncode != 0:
            return _failed(argv, result)
    for argv in grant.grants():
        print(shlex.join(argv), flush=True)
        result = _run([exe, *argv[1:]])
        if result.returncode != 0:
            return _failed(argv, result)
    return EXIT_OK


def _run(argv: Sequence[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=RABBITMQCTL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        detail = f"no answer within {RABBITMQCTL_TIMEOUT:g} s"
        return subprocess.CompletedProcess(list(argv), -1, "", detail)


def _failed(argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> int:
    """Report a failed rabbitmqctl call in one line: its own words (never a password)."""
    verb = next(a for a in argv if a in VERBS)
    # rabbitmqctl says what went wrong first ("Error: unable to perform an operation on node
    # ...", or "Error:" and the reason on the next line), then pages of diagnostics.
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines()]
    reason = next((line for line in lines if line and line != "Error:"), "no output")
    reason = reason.removeprefix("Error: ")[:300]
    print(
        f"objstream: error: rabbitmqctl {verb} failed (exit {result.returncode}): {reason}",
        file=sys.stderr,
    )
    return EXIT_BROKER


def declare_for(settings: Settings, site: str) -> None:
    """Declare, as the administrator of ``settings.url``, what ``site`` may not declare itself:
    the exchange, the dead-letter exchange and queue, the site's inbox and service queue."""
    topology = Topology.from_settings(settings)
    connection = connect(settings, f"objstream admin {site}")
    try:
        topology.declare_base(connection, site)
        channel = connection.channel()
        try:
            topology.declare_inbox(channel, site)
            topology.declare_service_queue(channel, site)
        finally:
            channel.close()
    finally:
        connection.close()
