"""Regions through RabbitMQ's federation plugin: what a broker administrator sets on each broker.

A central broker and regional brokers; each site connects to its region's broker. The
namespace's topic exchange is federated both ways between the central broker and every region:
each regional broker has the central one as its upstream, and the central broker has every
region as an upstream. Federation propagates the binding keys of a downstream's queues to its
upstream, so a message published on the central broker crosses to a region only when a queue
there is bound to its key, and crosses **once**, however many queues of that region take it;
the region's broker makes the copies. Replies, verdicts and retrieval requests come back the
same way. ``max-hops`` 1 (the default) stops a message that crossed once from crossing again:
central to regions and back, which is what a server at the centre needs; 2 lets a site of one
region reach a site of another through the centre (the plugin never sends a message back to a
broker it has visited).

``trust-user-id`` is set on every link: objstream's receivers require the publisher's
``user_id`` (RabbitMQ's proof of who published), and the plugin clears it on a link without
that setting. So each broker trusts its upstreams to have checked ``user_id`` when the message
was published there: a site's user name must be unique over all the brokers, and each broker's
administrator must not create another site's user. See docs/architecture.md, "Regions".

This module builds the ``rabbitmqctl`` argument lists (no I/O); ``objstream admin federation``
prints them and the test helpers run them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from objstream.common.errors import ConfigError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_MAX_HOPS = 1
DEFAULT_LINK_QUEUE_MAX = 1024**3
"""Bytes a broker holds for one downstream link (its ``federation: NS -> ...`` queue) before
it drops the oldest: what piles up for a region whose broker is down or too slow. A stream
missing what was dropped asks for it again, or times out; no broker fills its disk."""
ROUTE_SETTLE = 1.0
"""Seconds a receiver waits before its first contact when the offer crossed a federation
link (``OBJSTREAM_ROUTE_SETTLE``), and a server before it answers such a request: the plugin
propagates the new bindings to the other broker asynchronously, and a chunk published there
before they arrive would not reach this region (the receiver would find the gap and ask
again, and the sender would upload those chunks a second time)."""
RECEIVED_FROM = "x-received-from"
"""The header the federation plugin adds to a message it republished on a downstream broker."""


@dataclass(frozen=True)
class FederationLink:
    """One upstream of a broker: a name of the administrator's choosing and the AMQP URI the
    link connects to (with the user the link logs in as there)."""

    name: str
    uri: str

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ConfigError(
                f"upstream name {self.name!r}: 1-64 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        if not self.uri.startswith(("amqp://", "amqps://")):
            raise ConfigError(f"upstream {self.name!r}: the URI must start amqp:// or amqps://")

    @classmethod
    def parse(cls, text: str) -> FederationLink:
        """``NAME=URI``, as ``--upstream`` takes it."""
        name, sep, uri = text.partition("=")
        if not sep:
            raise ConfigError(f"--upstream {text.split('://')[0]!r}...: expected NAME=URI")
        return cls(name, uri)


def arrival_link(headers: Mapping[str, Any] | None) -> str | None:
    """The federation link a message came by: the upstream URI (no credentials) that this
    broker's link named in the last ``x-received-from`` entry; None for a message published
    on this broker. With ``max-hops`` 1 a message that crossed has exactly that one entry,
    added by this broker (the plugin does not forward one that already has an entry), so no
    publisher upstream can choose it."""
    entries = headers.get(RECEIVED_FROM) if headers else None
    if not isinstance(entries, list) or not entries:
        return None
    last = entries[-1]
    uri = last.get("uri") if isinstance(last, Mapping) else None
    if isinstance(uri, bytes):
        uri = uri.decode("utf-8", "replace")
    return uri if isinstance(uri, str) else "an unnamed link"


def route_settle(headers: Mapping[str, Any] | None, settle: float = ROUTE_SETTLE) -> float:
    """How long a receiver waits before its first contact for an offer with ``headers`` (a
    server before it answers such a request): ``settle`` if it crossed a federation link,
    else 0."""
    return settle if headers and RECEIVED_FROM in headers else 0.0


def upstream_name(namespace: str, link: FederationLink) -> str:
    return f"objstream-{namespace}-{link.name}"


def upstream_set_name(namespace: str) -> str:
    return f"objstream-{namespace}"


def policy_name(namespace: str) -> str:
    return f"objstream-federation-{namespace}"


def federation_commands(
    namespace: str,
    links: list[FederationLink],
    *,
    max_hops: int = DEFAULT_MAX_HOPS,
    link_queue_max: int = DEFAULT_LINK_QUEUE_MAX,
    vhost: str = "/",
    node: str | None = None,
) -> list[list[str]]:
    """The ``rabbitmqctl`` argument lists that federate the exchange ``namespace`` of one
    broker with ``links`` as its upstreams: one ``federation-upstream`` parameter per link,
    an upstream set holding them, a policy applying the set to that exchange alone, and one
    bounding the queues this broker keeps for its downstreams' links (``link_queue_max``
    bytes each: the plugin names them ``federation: NS -> ...``)."""
    if not links:
        raise ConfigError("at least one --upstream NAME=URI")
    if len({link.name for link in links}) != len(links):
        raise ConfigError("two upstreams with one name")
    if not 1 <= max_hops <= 8:
        raise ConfigError(f"--max-hops {max_hops}: 1 to 8")
    if link_queue_max < 1:
        raise ConfigError(f"--link-queue-max {link_queue_max}: at least 1 byte")
    ctl = ["rabbitmqctl", *(["-n", node] if node else [])]
    argvs = []
    for link in links:
        definition = {
            "uri": link.uri,
            "trust-user-id": True,
            "max-hops": max_hops,
            "ack-mode": "on-confirm",
        }
        argvs.append(
            [
                *ctl,
                "set_parameter",
                "-p",
                vhost,
                "federation-upstream",
                upstream_name(namespace, link),
                json.dumps(definition),
            ]
        )
    members = [{"upstream": upstream_name(namespace, link)} for link in links]
    argvs.append(
        [
            *ctl,
            "set_parameter",
            "-p",
            vhost,
            "federation-upstream-set",
            upstream_set_name(namespace),
            json.dumps(members),
        ]
    )
    argvs.append(
        [
            *ctl,
            "set_policy",
            "-p",
            vhost,
            "--apply-to",
            "exchanges",
            policy_name(namespace),
            f"^{re.escape(namespace)}$",
            json.dumps({"federation-upstream-set": upstream_set_name(namespace)}),
        ]
    )
    argvs.append(
        [
            *ctl,
            "set_policy",
            "-p",
            vhost,
            "--apply-to",
            "queues",
            f"{policy_name(namespace)}-links",
            f"^federation: {re.escape(namespace)} -> ",
            json.dumps({"max-length-bytes": link_queue_max}),
        ]
    )
    return argvs


def link_permissions(
    namespace: str, user: str, *, vhost: str = "/", node: str | None = None
) -> list[str]:
    """``set_permissions`` for ``user``, the user a downstream broker's link logs in as on this
    broker: the link declares an exchange and a queue of its own here (their names begin
    ``federation: ``), binds its exchange to the exchange ``namespace`` (read there) and
    consumes its queue; nothing else."""
    ctl = ["rabbitmqctl", *(["-n", node] if node else [])]
    own = "^federation: "
    return [*ctl, "set_permissions", "-p", vhost, user, own, own, f"^{re.escape(namespace)}$|{own}"]
