"""``objstream admin cleanup`` on a real broker: a namespace with an inbox a transfer used, the
empty inbox a typo'd target left, an inbox holding an offer nobody took, one a live receiver
consumes, and quorum queues of both kinds; exactly the idle, empty ones go.

It needs ``rabbitmqctl`` managing the broker: the session's broker if ``rabbitmqctl``'s default
node is that broker's (this machine's shared one), else a throwaway local node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from objstream.common.amqp import connect
from objstream.common.cleanup import Decision
from objstream.common.cli import EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, main
from objstream.common.settings import Settings
from objstream.common.topology import Topology
from objstream.producer import FileStreamer
from tests.integration.conftest import Declared, StartReceiver
from tests.integration.test_cli import _env, _objstream
from tests.rabbitmq_node import LocalRabbitNode, require_local_nodes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ctl_broker(broker_url: str) -> Iterator[str]:
    """A broker URL whose node ``rabbitmqctl`` (without ``-n``) manages."""
    probe = ["admin", "cleanup", "--namespace", f"probe-{uuid.uuid4().hex[:8]}", "--dry-run"]
    if shutil.which("rabbitmqctl") and main([*probe, "--url", broker_url]) == EXIT_OK:
        yield broker_url
        return
    require_local_nodes()
    node = LocalRabbitNode()
    node.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RABBITMQ_NODENAME", node.nodename)
            yield node.url
    finally:
        node.cleanup()


@pytest.fixture
def settings(ctl_broker: str, namespace: str) -> Settings:
    return Settings(url=ctl_broker, namespace=namespace, timeout=20, resend_after=2, stream_ttl=120)


def _names(settings: Settings) -> set[str]:
    """The namespace's queues and exchanges as rabbitmqctl lists them (``q:`` / ``x:``)."""
    ns = settings.namespace
    queues = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    exchanges = subprocess.run(
        ["rabbitmqctl", "list_exchanges", "-q", "--no-table-headers", "name"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return {f"q:{n}" for n in queues if n.startswith(ns + ".")} | {
        f"x:{n}" for n in exchanges if n == ns or n.startswith(ns + ".")
    }


def _cleanup(settings: Settings, *extra: str) -> tuple[int, list[str]]:
    done = _objstream(
        "admin", "cleanup", "--namespace", settings.namespace, *extra, env=_env(settings)
    )
    assert done.stderr == "", done.stderr
    return done.returncode, done.stdout.splitlines()


def _declare_inbox(settings: Settings, site: str, *, quorum: bool = False) -> Topology:
    kind = "quorum" if quorum else "classic"
    topology = Topology.from_settings(settings.model_copy(update={"queue_type": kind}))
    connection = connect(settings, "test_admin_cleanup declare")
    try:
        topology.declare_base(connection, site)
        channel = connection.channel()
        topology.declare_inbox(channel, site)
        channel.close()
    finally:
        connection.close()
    return topology


def _publish_offer_to(settings: Settings, site: str) -> None:
    """A message in ``site``'s inbox that nobody takes (nothing reads that site)."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        connection.channel().basic_publish(
            settings.namespace,
            f"offer:{site}",
            b"",
            pika.BasicProperties(delivery_mode=2, type="offer"),
        )
    finally:
        connection.close()


def test_only_idle_empty_queues_go(
    tmp_path: Path, settings: Settings, declared: Declared, start_receiver: StartReceiver
) -> None:
    ns = settings.namespace
    declared.sites.update({"site-1", "sitte-1", "site-2", "site-3", "q-1", "q-2"})
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(100_000))
    # A used inbox: site-1 took a file, then stopped.
    receiver = start_receiver("site-1", tmp_path / "in1")
    with FileStreamer("server", settings) as streamer:
        [result] = streamer.stream_file("site-1", src)
    assert result.ok
    receiver.stop()
    # A typo'd target: the offer went unanswered; its inbox stays, empty.
    done = _objstream("producer", "send-file", "--site", "server", "--to", "sitte-1",
                      "--timeout", "2", str(src), env=_env(settings))  # fmt: skip
    assert done.returncode == EXIT_TIMEOUT, done.stderr
    # An offer nobody took yet; a site with a live receiver; quorum inboxes, one with a message.
    _declare_inbox(settings, "site-2")
    _publish_offer_to(settings, "site-2")
    start_receiver("site-3", tmp_path / "in3")
    _declare_inbox(settings, "q-1", quorum=True)
    _declare_inbox(settings, "q-2", quorum=True)
    _publish_offer_to(settings, "q-2")
    before = _names(settings)
    must_go = {
        f"q:{ns}.site.site-1", f"q:{ns}.dead.site-1", f"x:{ns}.dead.site-1",
        f"q:{ns}.site.sitte-1",
        f"q:{ns}.dead.server", f"x:{ns}.dead.server",
        f"q:{ns}.site.q-1", f"q:{ns}.dead.q-1", f"x:{ns}.dead.q-1",
    }  # fmt: skip
    must_stay = {
        f"q:{ns}.site.site-2", f"q:{ns}.dead.site-2", f"x:{ns}.dead.site-2",
        f"q:{ns}.site.site-3", f"q:{ns}.dead.site-3", f"x:{ns}.dead.site-3",
        f"q:{ns}.site.q-2", f"q:{ns}.dead.q-2", f"x:{ns}.dead.q-2",
        f"x:{ns}",
    }  # fmt: skip
    assert must_go | must_stay <= before, (must_go | must_stay) - before

    code, lines = _cleanup(settings, "--dry-run")
    assert code == EXIT_OK
    assert _names(settings) == before  # a dry run changes nothing
    assert f"would delete queue '{ns}.site.sitte-1': no consumer, no message" in lines
    assert f"would keep queue '{ns}.site.site-3': 1 consumer" in lines
    assert (
        f"would keep queue '{ns}.site.site-2': 1 message nobody took "
        "(--include-nonempty deletes it)"
    ) in lines

    code, lines = _cleanup(settings)
    assert code == EXIT_OK
    after = _names(settings)
    assert after == before - must_go, (before - after, after)
    assert f"deleted queue '{ns}.site.sitte-1': no consumer, no message" in lines
    assert lines[-1].startswith(f"namespace '{ns}' in vhost '/': deleted ")

    # The offer nobody took goes only when asked; site-3's receiver keeps its queues and NS.
    code, lines = _cleanup(settings, "--include-nonempty")
    assert code == EXIT_OK
    assert _names(settings) == {
        f"q:{ns}.site.site-3", f"q:{ns}.dead.site-3", f"x:{ns}.dead.site-3", f"x:{ns}",
    }  # fmt: skip


def test_a_queue_used_meanwhile_stays(settings: Settings, declared: Declared) -> None:
    """Between the listing and the deletion a consumer attaches or a message arrives: the
    broker refuses the deletion (classic: if-unused / if-empty; quorum: the check before)."""
    from objstream.common.admin_cleanup import Deleter

    ns = settings.namespace
    declared.sites.update({"a", "b", "c"})
    _declare_inbox(settings, "a")
    _declare_inbox(settings, "b")
    _declare_inbox(settings, "c", quorum=True)
    # Listed idle and empty a moment ago:
    stale = [
        Decision("queue", f"{ns}.site.a", True, "no consumer, no message"),
        Decision("queue", f"{ns}.site.b", True, "no consumer, no message"),
        Decision("queue", f"{ns}.site.c", True, "no consumer, no message", quorum=True),
        Decision("queue", f"{ns}.dead.a", True, "no consumer, no message"),
    ]
    _publish_offer_to(settings, "b")
    consumer = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        channel = consumer.channel()
        channel.basic_consume(f"{ns}.site.a", lambda *a: None)
        channel.basic_consume(f"{ns}.site.c", lambda *a: None)
        connection = connect(settings, "test_admin_cleanup deleter")
        try:
            deleted = Deleter(connection, ns, include_nonempty=False).run(stale)
        finally:
            connection.close()
    finally:
        consumer.close()
    assert deleted == []  # site a's dead letters stay with its inbox
    assert {f"q:{ns}.site.a", f"q:{ns}.site.b", f"q:{ns}.site.c", f"q:{ns}.dead.a"} <= _names(
        settings
    )


def test_usage_errors_are_one_line(settings: Settings) -> None:
    env = {k: v for k, v in _env(settings).items() if k != "OBJSTREAM_NAMESPACE"}
    done = _objstream("admin", "cleanup", "--dry-run", env=env)
    assert done.returncode == EXIT_USAGE
    assert done.stderr.count("\n") == 1
    assert "needs --namespace" in done.stderr
    done = _objstream("admin", "cleanup", "--namespace", "x", "--site", "a:b", env=env)
    assert done.returncode == EXIT_USAGE
    assert done.stderr == (
        "objstream: error: invalid site name 'a:b' (letters, digits, '_', '.', '-')\n"
    )
