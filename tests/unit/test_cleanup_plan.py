"""What ``objstream admin cleanup`` decides to delete, from what rabbitmqctl lists."""

from __future__ import annotations

import json

from objstream.common.cleanup import Decision, plan, queue_site
from objstream.common.rabbitmqctl import (
    BindingRow,
    QueueRow,
    binding_rows,
    exchange_rows,
    queue_rows,
    read_json,
)

NS = "fl"
ID = "0123456789abcdef" * 2


def q(name: str, consumers: int = 0, messages: int = 0, **kw: object) -> QueueRow:
    return QueueRow(name, str(kw.get("type", "classic")), consumers, messages, kw.get("x") is True)


def inbox(site: str, ns: str = NS) -> list[BindingRow]:
    return [BindingRow(ns, f"{ns}.site.{site}", "queue")]


def dead(site: str, ns: str = NS) -> list[BindingRow]:
    return [BindingRow(f"{ns}.dead.{site}", f"{ns}.dead.{site}", "queue")]


def verdicts(decisions: list[Decision]) -> dict[str, bool]:
    return {d.name: d.delete for d in decisions}


EXCHANGES = {NS: "topic", "fl.dead.a": "fanout", "fl.dead.b": "fanout", "amq.topic": "topic"}


def test_idle_empty_queues_go_and_the_others_stay_with_their_reason() -> None:
    queues = [
        q("fl.site.a"),  # a site that stopped
        q("fl.dead.a"),
        q("fl.site.typo"),  # a typo'd target, never declared its dead letters
        q("fl.site.b", consumers=1),
        q("fl.dead.b"),  # stays with b's inbox
        q("fl.site.full", messages=3),
        q(f"fl.reply.b.{ID}", x=True),
        q(f"fl.data.a.{ID}"),
        q("other.site.a"),  # another namespace
        q("fl.site"),  # not a name of ours
        q("flx.site.a"),
    ]
    bindings = [*inbox("a"), *dead("a"), *inbox("typo"), *inbox("b"), *dead("b"), *inbox("full")]
    decisions = plan(NS, queues, EXCHANGES, bindings)
    queue_verdicts = {d.name: d.delete for d in decisions if d.what == "queue"}
    assert queue_verdicts == {
        "fl.site.a": True,
        "fl.dead.a": True,
        "fl.site.typo": True,
        f"fl.data.a.{ID}": True,
        "fl.site.b": False,
        "fl.dead.b": False,
        "fl.site.full": False,
        f"fl.reply.b.{ID}": False,
    }
    reasons = {d.name: d.reason for d in decisions if d.what == "queue"}
    assert reasons["fl.site.b"] == "1 consumer"
    assert reasons["fl.site.full"] == "3 messages nobody took (--include-nonempty deletes it)"
    assert reasons[f"fl.reply.b.{ID}"] == "exclusive to a live connection"
    assert "site 'b'" in reasons["fl.dead.b"]
    exchanges = {d.name: d.delete for d in decisions if d.what == "exchange"}
    assert exchanges == {"fl.dead.a": True, "fl.dead.b": False, NS: False}
    # Dead letters after the site's other queues, exchanges after queues, NS last.
    names = [d.name for d in decisions]
    assert names.index("fl.site.a") < names.index("fl.dead.a") < names.index(NS)
    assert names[-1] == NS


def test_include_nonempty_takes_idle_queues_with_messages_and_then_the_exchange() -> None:
    queues = [q("fl.site.full", messages=3), q("fl.dead.full", messages=1)]
    bindings = [*inbox("full"), *dead("full")]
    exchanges = {NS: "topic", "fl.dead.full": "fanout"}
    assert not any(d.delete for d in plan(NS, queues, exchanges, bindings))
    decisions = plan(NS, queues, exchanges, bindings, include_nonempty=True)
    assert all(d.delete for d in decisions)
    assert [d.name for d in decisions] == ["fl.site.full", "fl.dead.full", "fl.dead.full", NS]


def test_a_queue_bound_elsewhere_or_of_a_longer_namespace_is_not_ours() -> None:
    """Site names may hold dots: ``fl.site.x.site.b`` is namespace ``fl.site.x``'s inbox of
    ``b`` when that namespace exists, whatever it reads as under ``fl``."""
    queues = [q("fl.site.x.site.b"), q("fl.site.c"), q("fl.dead.x.dead.b")]
    exchanges = {NS: "topic", "fl.site.x": "topic", "fl.site.x.dead.b": "fanout"}
    bindings = [BindingRow("fl.site.x", "fl.site.x.site.b", "queue"), *inbox("c")]
    bindings.append(BindingRow("amq.topic", "fl.site.c", "queue"))
    decisions = {d.name: d for d in plan(NS, queues, exchanges, bindings)}
    assert "fl.site.x.site.b" not in decisions
    assert not decisions["fl.site.c"].delete
    assert "'amq.topic'" in decisions["fl.site.c"].reason
    assert decisions["fl.dead.x.dead.b"].delete  # no namespace "fl.dead.x": it is fl's
    assert not decisions[NS].delete  # fl.site.c stays bound to it


def test_sites_limit_the_cleanup_and_leave_the_exchange() -> None:
    queues = [q("fl.site.a"), q("fl.site.typo"), q("fl.dead.typo")]
    bindings = [*inbox("a"), *inbox("typo"), *dead("typo")]
    exchanges = {NS: "topic", "fl.dead.typo": "fanout"}
    decisions = plan(NS, queues, exchanges, bindings, sites={"typo"})
    assert verdicts(decisions) == {"fl.site.typo": True, "fl.dead.typo": True}
    assert [d.what for d in decisions] == ["queue", "queue", "exchange"]


def test_unknown_counts_and_other_queue_types_stay() -> None:
    queues = [q("fl.site.a", consumers=-1, messages=-1), q("fl.site.s", type="stream")]
    decisions = {d.name: d for d in plan(NS, queues, {}, [])}
    assert not decisions["fl.site.a"].delete
    assert not decisions["fl.site.s"].delete
    assert decisions["fl.site.s"].reason.startswith("a stream queue")


def test_quorum_queues_are_marked() -> None:
    [decision] = plan(NS, [q("fl.site.a", type="quorum")], {}, [])
    assert decision.delete
    assert decision.quorum


def test_queue_names() -> None:
    assert queue_site(NS, "fl.site.a.b") == "a.b"
    assert queue_site(NS, f"fl.data.a.{ID}") == "a"
    assert queue_site(NS, "fl.data.a") is None
    assert queue_site(NS, "fl.site.") is None
    assert queue_site(NS, "flsite.a") is None
    assert queue_site("f.l", "fxl.site.a") is None  # the namespace is matched literally


def test_rabbitmqctl_rows() -> None:
    text = "Listing queues ...\n" + json.dumps([
        {"name": "fl.site.a", "type": "quorum", "consumers": 2, "messages": 5, "exclusive": False},
        {"name": "fl.site.b", "type": "classic", "consumers": "", "messages": "",
         "exclusive": True},
        {"nope": 1},
    ])  # fmt: skip
    assert queue_rows(read_json(text)) == [
        QueueRow("fl.site.a", "quorum", 2, 5, False),
        QueueRow("fl.site.b", "classic", -1, -1, True),
    ]
    bindings = [{"source_name": "fl", "destination_name": "q", "destination_kind": "queue"}]
    assert binding_rows(bindings) == [BindingRow("fl", "q", "queue")]
    assert exchange_rows([{"name": "fl", "type": "topic"}, {"type": "x"}]) == {"fl": "topic"}
