"""Configuration an attacker on the network path would like: a TLS downgrade, and a poison
message that is redelivered forever.

A list of broker URLs that mixes ``amqps://`` and ``amqp://`` would fail over from a TLS node to
a plain one without a word (the password and every object in the clear): it is a usage error.
With quorum queues, a message that kills its consumer every time is dead-lettered by the broker
after :data:`DELIVERY_LIMIT` deliveries, so it cannot crash-loop a worker for ever.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pika
import pytest

from objstream.common.amqp import connect
from objstream.common.settings import Settings
from objstream.common.topology import DELIVERY_LIMIT, Topology
from tests.adversarial.conftest import NAMESPACE
from tests.rabbitmq_node import LocalRabbitNode


@pytest.mark.parametrize("schemes", [("amqps", "amqp"), ("amqp", "amqps")])
def test_a_url_list_mixing_tls_and_plain_is_a_usage_error(
    tmp_path: Path, schemes: tuple[str, str]
) -> None:
    objstream = shutil.which("objstream")
    assert objstream is not None, "objstream is not on PATH (run with the venv's bin first)"
    first, second = schemes
    url = f"{first}://u:s3cret@127.0.0.1:5671/%2F,{second}://u:s3cret@127.0.0.2:5672/%2F"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBJSTREAM_")}
    result = subprocess.run(
        [objstream, "consumer", "listen", "--site", "site-1", "--dest", str(tmp_path / "in"),
         "--url", url],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("objstream: error: ")
    assert "mixes amqps:// and amqp:// nodes: a failover would drop TLS" in line
    assert "s3cret" not in result.stdout + result.stderr
    assert not (tmp_path / "in").exists()  # refused before anything was done


def test_quorum_inboxes_dead_letter_what_is_never_settled(node: LocalRabbitNode) -> None:
    """The inbox and service queue of a quorum deployment carry ``x-delivery-limit``; a message
    returned every time it is delivered ends in the site's dead letters."""
    topology = Topology(f"{NAMESPACE}-quorum", 120_000, queue_type="quorum")
    admin = Settings(url=node.url, namespace=topology.namespace)
    connection = connect(admin, "test_quorum_inboxes_dead_letter_what_is_never_settled")
    try:
        topology.declare_base(connection, "site-1")
        channel = connection.channel()
        inbox = topology.declare_inbox(channel, "site-1")
        service = topology.declare_service_queue(channel, "site-1")
    finally:
        connection.close()

    listed = node.ctl("list_queues", "-q", "--formatter", "json", "name", "arguments")
    assert listed.returncode == 0, listed.stderr
    # rabbitmqctl lists each argument as [name, AMQP type, value]
    arguments = {
        row["name"]: {name: value for name, _, value in row["arguments"]}
        for row in json.loads(listed.stdout)
    }
    for queue in (inbox, service):
        assert arguments[queue]["x-queue-type"] == "quorum", arguments[queue]
        assert arguments[queue]["x-delivery-limit"] == DELIVERY_LIMIT, arguments[queue]

    raw = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = raw.channel()
        props = pika.BasicProperties(type="offer", message_id="crash-loop", delivery_mode=2)
        channel.basic_publish(topology.exchange, topology.offer_key("site-1"), b"", props)
        deliveries = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            method, _, _ = channel.basic_get(inbox)
            if method is None:
                dead, dead_props, _ = channel.basic_get(topology.dead("site-1"), auto_ack=True)
                if dead is not None:
                    break
                time.sleep(0.05)
                continue
            deliveries += 1
            channel.basic_nack(method.delivery_tag, requeue=True)  # a consumer that dies on it
        else:
            pytest.fail(f"delivered {deliveries} times and never dead-lettered")
    finally:
        raw.close()
    assert dead_props.message_id == "crash-loop"
    [death] = dead_props.headers["x-death"]
    assert (death["reason"], death["queue"]) == ("delivery_limit", inbox)
    assert deliveries == DELIVERY_LIMIT + 1
