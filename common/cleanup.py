"""What ``objstream admin cleanup`` deletes from a namespace, decided without touching a broker.

Every target name ever used leaves a durable inbox behind (a typo too), and a site that stopped
leaves its queues. :func:`plan` takes what ``rabbitmqctl`` listed (queues, exchanges,
bindings) and decides, queue by queue and exchange by exchange, what goes and what stays, with
the reason either way. The rules:

- A queue is the namespace's when its name has one of the namespace's forms
  (:mod:`objstream.common.topology`: ``NS.site.S``, ``NS.serve.S``, ``NS.dead.S``,
  ``NS.data.S.ID``, ``NS.reply.S.ID``) and it is bound to no exchange but ``NS`` and
  ``NS.dead.S``. Names of a longer namespace that exists (``NS.x``, whose topic exchange is
  listed) are that namespace's: site names may hold dots, so ``NS.site.x.site.b`` reads both
  ways.
- It goes only when idle: no consumer, not exclusive to a connection, and empty (a message
  nobody took is never dropped unless ``include_nonempty``).
- A site's dead-letter queue and exchange (``NS.dead.S``) stay while any other queue of the
  site stays: its rejected messages go there.
- The exchange ``NS`` goes when every queue bound to it goes (and no ``sites`` filter limits
  the cleanup); ``NS.dead.S`` when its queue goes.

The broker has the last word: queues are deleted with ``if-unused`` and ``if-empty`` (quorum
queues, which take neither, are checked just before), exchanges with ``if-unused``, so what is
used meanwhile stays (see :mod:`objstream.common.admin_cleanup`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from objstream.common.rabbitmqctl import BindingRow, QueueRow
from objstream.common.topology import HEX32

SITE = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}"  # settings.NAME_PATTERN, unanchored
DELETABLE_TYPES = ("classic", "quorum")


@dataclass(frozen=True)
class Decision:
    """One queue or exchange: whether it goes, and why (or why not)."""

    what: str
    """``queue`` or ``exchange``."""
    name: str
    delete: bool
    reason: str
    quorum: bool = False
    """A quorum queue (deleted after a check, not with ``if-unused``/``if-empty``)."""

    def line(self, verb: str, reason: str | None = None) -> str:
        """``VERB queue 'NAME': REASON`` (``reason``: instead of the decision's own)."""
        return f"{verb} {self.what} {self.name!r}: {self.reason if reason is None else reason}"


def queue_site(namespace: str, name: str) -> str | None:
    """The site whose queue ``name`` is under ``namespace``, or None if it is not one of the
    namespace's queue names."""
    ns = re.escape(namespace)
    match = re.fullmatch(rf"{ns}\.(?:site|serve|dead)\.({SITE})", name) or re.fullmatch(
        rf"{ns}\.(?:data|reply)\.({SITE})\.{HEX32}", name
    )
    return None if match is None else match.group(1)


def dead_site(namespace: str, name: str) -> str | None:
    """The site whose dead-letter queue (and exchange) ``name`` is, or None."""
    match = re.fullmatch(rf"{re.escape(namespace)}\.dead\.({SITE})", name)
    return None if match is None else match.group(1)


def longer_namespaces(namespace: str, exchanges: Mapping[str, str]) -> list[str]:
    """Other namespaces whose names start with ``namespace.``: their topic exchanges exist."""
    return sorted(
        (n for n, kind in exchanges.items() if n.startswith(namespace + ".") and kind == "topic"),
        key=len,
        reverse=True,
    )


def _of_longer(namespace: str, longer: Iterable[str], name: str) -> str | None:
    for other in longer:
        if queue_site(other, name) is not None:
            return other
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _queue_verdict(queue: QueueRow, include_nonempty: bool) -> tuple[bool, str]:
    if queue.type not in DELETABLE_TYPES:
        return False, f"a {queue.type} queue: cleanup leaves those alone"
    if queue.exclusive:
        return False, "exclusive to a live connection"
    if queue.consumers < 0 or queue.messages < 0:
        return False, "the broker did not say how many consumers and messages it has"
    if queue.consumers:
        return False, f"{_plural(queue.consumers, 'consumer')}"
    if queue.messages and not include_nonempty:
        return False, (
            f"{_plural(queue.messages, 'message')} nobody took (--include-nonempty deletes it)"
        )
    if queue.messages:
        return True, f"no consumer; {_plural(queue.messages, 'message')} nobody took go with it"
    return True, "no consumer, no message"


def plan(
    namespace: str,
    queues: Iterable[QueueRow],
    exchanges: Mapping[str, str],
    bindings: Iterable[BindingRow],
    *,
    include_nonempty: bool = False,
    sites: Collection[str] | None = None,
) -> list[Decision]:
    """What to delete of ``namespace`` and what to keep (see the module's rules): queues
    first, then exchanges (deleted after the queues bound to them), each sorted by name.

    ``exchanges``: name to type; ``sites``: only these sites' queues and dead letters (the
    exchange ``NS`` is then left alone).
    """
    bindings = list(bindings)
    sources: dict[str, set[str]] = {}
    for b in bindings:
        if b.destination_kind == "queue" and b.source:
            sources.setdefault(b.destination, set()).add(b.source)
    longer = longer_namespaces(namespace, exchanges)
    decisions: dict[str, Decision] = {}
    site_of: dict[str, str] = {}
    for queue in sorted(queues, key=lambda q: q.name):
        site = queue_site(namespace, queue.name)
        if site is None or (sites is not None and site not in sites):
            continue
        other = _of_longer(namespace, longer, queue.name)
        if other is not None:
            continue  # namespace OTHER's (cleaned with --namespace OTHER)
        site_of[queue.name] = site
        foreign = sorted(sources.get(queue.name, set()) - {namespace, f"{namespace}.dead.{site}"})
        if foreign:
            reason = f"bound to exchange {foreign[0]!r}, which is not this namespace's"
            decisions[queue.name] = Decision("queue", queue.name, False, reason)
            continue
        delete, reason = _queue_verdict(queue, include_nonempty)
        decisions[queue.name] = Decision(
            "queue", queue.name, delete, reason, quorum=queue.type == "quorum"
        )
    # A site's dead letters stay while any other queue of the site stays.
    kept_sites = {
        site_of[n] for n, d in decisions.items() if not d.delete and dead_site(namespace, n) is None
    }
    for name, decision in list(decisions.items()):
        site = dead_site(namespace, name)
        if decision.delete and site is not None and site in kept_sites:
            reason = f"site {site!r} has queues that stay: their dead letters go there"
            decisions[name] = Decision("queue", name, False, reason)
    going = {n for n, d in decisions.items() if d.delete}
    # A site's dead letters last: they go only once its other queues went.
    queue_decisions = sorted(
        decisions.values(), key=lambda d: (dead_site(namespace, d.name) is not None, d.name)
    )
    return queue_decisions + _exchanges(
        namespace,
        exchanges,
        bindings,
        going=going,
        kept_sites=kept_sites,
        longer=longer,
        sites=sites,
    )


def _exchanges(
    namespace: str,
    exchanges: Mapping[str, str],
    bindings: list[BindingRow],
    *,
    going: set[str],
    kept_sites: set[str],
    longer: list[str],
    sites: Collection[str] | None,
) -> list[Decision]:
    decisions = []
    for name in sorted(exchanges, key=lambda n: (n == namespace, n)):  # NS last
        site = dead_site(namespace, name)
        if name == namespace:
            if sites is not None:
                continue
        elif site is None or (sites is not None and site not in sites):
            continue
        elif any(dead_site(other, name) is not None for other in longer):
            continue  # the dead letters of a site of namespace OTHER
        elif site in kept_sites:
            reason = f"site {site!r} has queues that stay: their dead letters go there"
            decisions.append(Decision("exchange", name, False, reason))
            continue
        staying = sorted(
            {b.destination for b in bindings if b.source == name} - going,
        )
        if staying:
            decisions.append(
                Decision("exchange", name, False, f"{staying[0]!r} is bound to it and stays")
            )
        else:
            decisions.append(Decision("exchange", name, True, "nothing that stays is bound to it"))
    return decisions
