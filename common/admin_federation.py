"""``objstream admin federation``: the ``rabbitmqctl`` lines that put one broker into regions.

Run once on every broker (the central one with ``--upstream`` per region, each region with
``--upstream`` for the central one): :mod:`objstream.common.federation` says what they do and
why. The lines are printed shell-quoted, to paste or to pipe into ``sh`` on a broker node.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from objstream.common.admin import vhost_of
from objstream.common.cli import EXIT_OK, HelpFormatter
from objstream.common.errors import ConfigError
from objstream.common.federation import (
    DEFAULT_MAX_HOPS,
    FederationLink,
    federation_commands,
    link_permissions,
)
from objstream.common.settings import Settings, parse_size


def add_command(sub: Any, parent: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser(
        "federation",
        parents=[parent],
        help="the rabbitmqctl lines that federate a broker with its upstreams (regions)",
        description="Print the rabbitmqctl lines that federate the exchange NAMESPACE of this "
        "broker with each --upstream: a federation-upstream parameter per upstream (with "
        "trust-user-id, so the publisher's user_id survives the link, and --max-hops), an "
        "upstream set, a policy that applies it to that exchange alone, and one that bounds "
        "the queue this broker keeps for each downstream's link (--link-queue-max). Run it on the "
        "central broker with one --upstream per region, and on each regional broker with the "
        "central one as its --upstream; the RabbitMQ federation plugin must be enabled "
        "(rabbitmq-plugins enable rabbitmq_federation). --link-user also prints the "
        "permissions of the user that downstream brokers' links log in as here. Exit codes: "
        "0 ok, 2 usage.",
        epilog="examples:\n"
        "  objstream admin federation --namespace fl "
        "--upstream eu=amqps://link:...@eu.example.org/%2F "
        "--upstream us=amqps://link:...@us.example.org/%2F    # on the central broker\n"
        "  objstream admin federation --namespace fl "
        "--upstream central=amqps://link:...@central.example.org/%2F --link-user link "
        "| sh    # on a regional broker",
        formatter_class=HelpFormatter,
    )
    cmd.add_argument(
        "--upstream",
        action="append",
        required=True,
        metavar="NAME=URI",
        help="an upstream broker: a name of your choice and the AMQP URI its link connects to "
        "(repeatable)",
    )
    cmd.add_argument(
        "--max-hops",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_HOPS,
        help="how many links a message may cross (default 1: centre to regions and back; 2 "
        "lets a site of one region reach a site of another through the centre)",
    )
    cmd.add_argument(
        "--link-queue-max",
        metavar="SIZE",
        default="1GiB",
        help="most bytes this broker holds for one downstream broker's link (a region that is "
        "down or slow) before it drops the oldest (default 1GiB)",
    )
    cmd.add_argument(
        "--link-user",
        metavar="USER",
        help="also print set_permissions for USER, the user downstream links log in as here",
    )
    cmd.add_argument("--vhost", help="the virtual host (default: the one of --url, usually /)")
    cmd.add_argument("--node", help="the RabbitMQ node rabbitmqctl manages (its -n option)")
    cmd.set_defaults(handler=federation_cmd, settings_overrides=lambda args: {})


def federation_cmd(args: argparse.Namespace, settings: Settings) -> int:
    links = [FederationLink.parse(text) for text in args.upstream]
    vhost = args.vhost or vhost_of(settings.url)
    namespace = settings.namespace
    lines = federation_commands(
        namespace,
        links,
        max_hops=args.max_hops,
        link_queue_max=parse_size(args.link_queue_max),
        vhost=vhost,
        node=args.node,
    )
    if args.link_user is not None:
        if not args.link_user:
            raise ConfigError("--link-user must not be empty")
        lines.append(link_permissions(namespace, args.link_user, vhost=vhost, node=args.node))
    print(f"# objstream v2: federate exchange {namespace!r} (vhost {vhost!r}) of this broker")
    print(f"# with {', '.join(link.name for link in links)}; the federation plugin must be on")
    for argv in lines:
        print(shlex.join(argv))
    return EXIT_OK
