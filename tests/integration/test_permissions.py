"""Least privilege, enforced by a real RabbitMQ: one broker user per site on a throwaway node.

Users ``site-1``, ``site-2``, ``server`` and ``a.b`` (a dotted site name) get exactly the
permissions ``objstream admin permissions --apply`` gives them, and each test tries, as
``site-1``, what its role needs (allowed) and what would read or forge another site's traffic
(ACCESS_REFUSED, or PRECONDITION_FAILED for a forged user_id). What RabbitMQ 3.10 enforces:

- vhost ``read`` on a queue: consume/get; ``configure``: declare (not passive), delete, purge;
  ``write`` on the queue plus ``read`` on the exchange: bind.
- topic permissions on the exchange: ``write`` is matched against a published routing key;
  ``read`` against the *text* of a binding key when a queue is bound (a pattern such as
  ``data:ID:a.#`` is matched as text, not for what it would route).
- a passive declare (queue or exchange) needs no permission: a site can learn that another
  site's queue exists and how many messages wait in it, never read them.
- ``user_id`` must be the connection's user (406 PRECONDITION_FAILED otherwise).
- consume isn't checked by topic permissions: what a queue receives is settled when it is bound.

These tests never touch the shared broker: the node is started here and stopped at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from objstream.common.amqp import Channel, Connection, Delivery, connect
from objstream.common.cli import EXIT_OK, main
from objstream.common.errors import ACCESS_REFUSED, PRECONDITION_FAILED, BrokerRefused
from objstream.common.protocol import Properties
from objstream.common.settings import Settings
from objstream.common.topology import Topology
from objstream.common.urls import mask_url
from tests.integration.conftest import apply_site as apply_site_user
from tests.rabbitmq_node import LocalRabbitNode

pytestmark = pytest.mark.integration

SITES = ("site-1", "site-2", "server", "a.b")
PASSWORDS = {site: f"pw-{site}$HOME`x`" for site in SITES}  # survives rabbitmqctl's wrapper?
NAMESPACE = f"perm-{uuid.uuid4().hex[:8]}"
ID = uuid.uuid4().hex  # a stream id
QID = uuid.uuid4().hex  # a reply-queue id
T = Topology(NAMESPACE, 120_000)
BACKLOG = 64 << 20  # a data queue's bound, as a receiver declares it


@pytest.fixture(scope="module")
def node(local_nodes: None) -> Iterator[LocalRabbitNode]:
    node = LocalRabbitNode()
    node.start()
    try:
        # A rabbitmqctl run without -n (by a test, or by the code under test) talks to this
        # node, never to the machine's default one.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RABBITMQ_NODENAME", node.nodename)
            yield node
    finally:
        node.cleanup()


def admin_settings(node: LocalRabbitNode) -> Settings:
    return Settings(url=node.url, namespace=NAMESPACE, timeout=20, resend_after=2)


def site_url(node: LocalRabbitNode, site: str) -> str:
    from urllib.parse import quote

    return f"amqp://{quote(site)}:{quote(PASSWORDS[site], safe='')}@127.0.0.1:{node.port}/%2F"


def site_settings(node: LocalRabbitNode, site: str) -> Settings:
    return Settings(url=site_url(node, site), namespace=NAMESPACE, timeout=20, resend_after=2)


def apply_site(node: LocalRabbitNode, site: str, namespace: str = NAMESPACE) -> None:
    """``site``'s user (password ``PASSWORDS[site]``), as ``admin permissions --apply`` makes it."""
    apply_site_user(node, site, PASSWORDS[site], namespace)


@pytest.fixture(scope="module")
def users(node: LocalRabbitNode) -> dict[str, Settings]:
    """Every site's user, made by ``objstream admin permissions --apply``; then, as admin, a data
    queue and a reply queue of site-2 to try to read."""
    for site in SITES:
        apply_site(node, site)
    with Session(admin_settings(node)) as admin:
        channel = admin.channel()
        T.declare_data_queue(channel, "site-2", ID, "server", BACKLOG)
        T.declare_reply_queue(channel, "site-2", QID, exclusive=False, ttl_ms=120_000)
        T.bind_reply(channel, "site-2", QID, "server")
    return {site: site_settings(node, site) for site in SITES}


class Session:
    """One connection as one user; ``attempt`` runs an operation on a fresh channel."""

    def __init__(self, settings: Settings, name: str = "test_permissions") -> None:
        self.connection: Connection = connect(settings, name)

    def channel(self) -> Channel:
        return self.connection.channel()

    def attempt(self, operation: Callable[[Channel], object]) -> BrokerRefused | None:
        """None if the broker allowed ``operation``, else its refusal. A publish is refused
        after the fact: a passive declare after it (allowed to anyone) collects the answer."""
        channel = self.connection.channel()
        try:
            operation(channel)
            channel.declare_exchange(T.exchange, "topic", passive=True)
        except BrokerRefused as e:
            return e
        finally:
            channel.close()
        return None

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def site1(users: dict[str, Settings]) -> Iterator[Session]:
    with Session(users["site-1"]) as session:
        yield session


def props(user_id: str | None = "site-1") -> Properties:
    return Properties(type="offer", user_id=user_id)


def publish(key: str, user_id: str | None = "site-1") -> Callable[[Channel], None]:
    return lambda ch: ch.publish(T.exchange, key, b"{}", props(user_id))


def assert_access_refused(refusal: BrokerRefused | None, what: str) -> None:
    assert refusal is not None, f"the broker allowed {what}"
    assert refusal.reply_code == ACCESS_REFUSED, refusal
    assert "ACCESS_REFUSED" in str(refusal)


# -- reading another site's traffic -------------------------------------------------------------

SITE2_QUEUES = {
    "inbox": T.inbox("site-2"),
    "service queue": T.service_queue("site-2"),
    "data queue": T.data_queue("site-2", ID),
    "reply queue": T.reply_queue("site-2", QID),
    "dead-letter queue": T.dead("site-2"),
}


@pytest.mark.parametrize("what", SITE2_QUEUES)
def test_site1_cannot_consume_site2s_queues(site1: Session, what: str) -> None:
    queue = SITE2_QUEUES[what]
    refusal = site1.attempt(lambda ch: ch.consume(queue, lambda d: None))
    assert_access_refused(refusal, f"site-1 to consume {what} {queue}")
    assert f"access to queue '{queue}'" in str(refusal)
    assert "refused for user 'site-1'" in str(refusal)


@pytest.mark.parametrize("what", ["inbox", "service queue", "data queue", "reply queue"])
def test_site1_cannot_declare_delete_or_bind_site2s_queues(site1: Session, what: str) -> None:
    queue = SITE2_QUEUES[what]
    assert_access_refused(
        site1.attempt(lambda ch: ch.declare_queue(queue, durable=True)), "declare"
    )
    assert_access_refused(site1.attempt(lambda ch: ch.delete_queue(queue)), "delete")
    bind = site1.attempt(lambda ch: ch.bind_queue(queue, T.exchange, T.offer_key("site-1")))
    assert_access_refused(bind, "bind")


def test_a_passive_declare_needs_no_permission(site1: Session) -> None:
    """RabbitMQ 3.10 checks nothing for passive declares: site-1 may learn that site-2's
    inbox exists (and its message count); it still cannot read it (tests above)."""
    assert site1.attempt(lambda ch: ch.declare_queue(T.inbox("site-2"), passive=True)) is None


def test_site1_cannot_bind_keys_addressed_to_site2(site1: Session) -> None:
    """Topic read: a binding key must be one addressed to the binding site."""
    own_data = T.data_queue("site-1", ID)
    own_reply = T.reply_queue("site-1", QID)
    assert (
        site1.attempt(lambda ch: T.declare_data_queue(ch, "site-1", ID, "server", BACKLOG)) is None
    )
    assert site1.attempt(lambda ch: ch.declare_queue(own_reply, durable=True)) is None
    for queue, key in [
        (T.inbox("site-1"), T.offer_key("site-2")),
        (T.inbox("site-1"), "site.site-2"),
        (T.service_queue("site-1"), T.service_key("site-2")),
        (own_data, T.data_key(ID, "server", "site-2")),
        (own_reply, T.reply_key(T.reply_to("site-2", QID), "server")),
        (own_data, "#"),
        (own_data, f"data:{ID}:*"),
    ]:
        refusal = site1.attempt(binding(queue, key))
        assert_access_refused(refusal, f"site-1 to bind {queue} with {key}")
        assert f"access to topic '{key}'" in str(refusal)


def binding(queue: str, key: str) -> Callable[[Channel], None]:
    return lambda ch: ch.bind_queue(queue, T.exchange, key)


def test_no_wildcard_binding_reaches_a_dotted_senders_unicast(
    site1: Session, users: dict[str, Settings]
) -> None:
    """``data:ID:a.#`` would route sender ``a.b``'s unicast ``data:ID:a.b:site-2`` to site-1:
    RabbitMQ matches the binding key's text against the regex, so the regex allows no ``#``."""
    sid = uuid.uuid4().hex
    queue = T.declare_data_queue(site1.channel(), "site-1", sid, "a.b", BACKLOG)
    refusal = site1.attempt(lambda ch: ch.bind_queue(queue, T.exchange, f"data:{sid}:a.#"))
    assert_access_refused(refusal, "a wildcard binding")
    with Session(users["a.b"]) as sender:
        to_site2 = publish(T.data_key(sid, "a.b", "site-2"), user_id="a.b")
        assert sender.attempt(to_site2) is None
        assert sender.attempt(publish(T.data_key(sid, "a.b"), user_id="a.b")) is None
    got = drain(site1, queue)
    assert [d.props.user_id for d in got] == ["a.b"]  # the broadcast only, not the unicast


# -- writing as someone else ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [T.data_key(ID, "server"), T.data_key(ID, "server", "site-2"),
     T.reply_key(T.reply_to("site-2", QID), "server"), "site.site-2", "serve.server"],
)  # fmt: skip
def test_site1_cannot_publish_keys_naming_another_publisher(site1: Session, key: str) -> None:
    """Topic write: chunks of another sender's stream, answers signed by another site, and
    v1 keys (a v1 peer cannot publish into a v2 namespace under these permissions)."""
    refusal = site1.attempt(publish(key))
    assert_access_refused(refusal, f"site-1 to publish {key}")
    assert f"access to topic '{key}'" in str(refusal)


def test_site1_cannot_publish_to_the_default_exchange(site1: Session) -> None:
    refusal = site1.attempt(lambda ch: ch.publish("", T.inbox("site-2"), b"{}", props()))
    assert_access_refused(refusal, "the default exchange")
    assert "amq.default" in str(refusal)


@pytest.mark.parametrize("other", ["site-2", "server"])
def test_site1_cannot_publish_with_another_users_user_id(site1: Session, other: str) -> None:
    refusal = site1.attempt(publish(T.offer_key("site-2"), user_id=other))
    assert refusal is not None
    assert refusal.reply_code == PRECONDITION_FAILED
    assert f"user_id property set to '{other}' but authenticated user was 'site-1'" in str(refusal)


def test_site1_cannot_declare_the_exchanges(site1: Session) -> None:
    refusal = site1.attempt(lambda ch: ch.declare_exchange(T.exchange, "topic"))
    assert_access_refused(refusal, "declaring the exchange")


# -- what a site's role needs --------------------------------------------------------------------


def drain(session: Session, queue: str, expect: int = 1, within: float = 10) -> list[Delivery]:
    """What arrives in ``queue`` (consumed as ``session``'s user) until ``expect`` messages."""
    import time

    got: list[Delivery] = []
    channel = session.channel()
    channel.consume(queue, got.append, auto_ack=True)
    deadline = time.monotonic() + within
    while len(got) < expect and time.monotonic() < deadline:
        session.connection.process_events(0.1)
    session.connection.process_events(0.3)  # anything beyond what was expected
    channel.close()
    return got


def test_a_site_can_do_what_its_role_needs(users: dict[str, Settings]) -> None:
    """site-1 as receiver, requester and sender, with nothing but its own permissions."""
    sid, qid = uuid.uuid4().hex, uuid.uuid4().hex
    with Session(users["site-1"]) as s1, Session(users["site-2"]) as s2:
        T.declare_base(s1.connection, "site-1")  # passive check of the exchange; its dead letters
        ch = s1.channel()
        T.declare_inbox(ch, "site-1")  # re-declared as the admin did: allowed, same arguments
        T.declare_service_queue(ch, "site-1")
        T.declare_data_queue(ch, "site-1", sid, "site-2", BACKLOG)
        T.declare_reply_queue(ch, "site-1", qid, exclusive=False, ttl_ms=60_000)
        T.bind_reply(ch, "site-1", qid, "site-2")
        exclusive_qid = uuid.uuid4().hex
        T.declare_reply_queue(ch, "site-1", exclusive_qid, exclusive=True)
        T.bind_reply(ch, "site-1", exclusive_qid, "server")
        ch.qos(8)
        for key in [T.offer_key("site-2"), T.service_key("server"), T.data_key(sid, "site-1"),
                    T.data_key(sid, "site-1", "site-2"),
                    T.reply_key(T.reply_to("site-2", qid), "site-1")]:  # fmt: skip
            assert s1.attempt(publish(key)) is None, key
        own_dead = lambda c: c.publish(T.dead("site-1"), "", b"{}", props())  # noqa: E731
        other_dead = lambda c: c.publish(T.dead("site-2"), "", b"{}", props())  # noqa: E731
        assert s1.attempt(own_dead) is None
        assert_access_refused(s1.attempt(other_dead), "publish to site-2's dead letters")
        # site-2 answers into site-1's reply queue and streams into site-1's data queue
        answer = T.reply_key(T.reply_to("site-1", qid), "site-2")
        assert s2.attempt(publish(answer, user_id="site-2")) is None
        assert s2.attempt(publish(T.data_key(sid, "site-2"), user_id="site-2")) is None
        assert s2.attempt(publish(T.data_key(sid, "site-2", "site-1"), user_id="site-2")) is None
        assert [d.props.user_id for d in drain(s1, T.reply_queue("site-1", qid))] == ["site-2"]
        data = drain(s1, T.data_queue("site-1", sid), expect=2)
        assert [d.props.user_id for d in data] == ["site-2", "site-2"]
        offers = drain(s2, T.inbox("site-2"))
        assert [d.props.user_id for d in offers] == ["site-1"]
        ch.delete_queue(T.data_queue("site-1", sid))  # a receiver deletes its data queue
        ch.delete_queue(T.reply_queue("site-1", qid))
        assert s1.attempt(lambda c: c.consume(T.service_queue("site-1"), lambda d: None)) is None


def test_apply_declared_what_a_site_cannot(
    users: dict[str, Settings], node: LocalRabbitNode
) -> None:
    """The exchanges, the dead-letter queue, every site's inbox and service queue exist; the
    passwords (with ``$`` and a backquote) went through rabbitmqctl intact."""
    listed = node.ctl("list_queues", "-q", "name").stdout.split()
    for site in SITES:
        assert T.inbox(site) in listed
        assert T.service_queue(site) in listed
        assert T.dead(site) in listed
    exchanges = node.ctl("list_exchanges", "-q", "name", "type").stdout
    assert f"{T.exchange}\ttopic" in exchanges
    for site in SITES:
        assert f"{T.dead(site)}\tfanout" in exchanges


# -- the command line ------------------------------------------------------------------------------


def test_listen_as_another_site_is_one_line_access_refused_exit_3(
    users: dict[str, Settings], tmp_path: Path
) -> None:
    """``objstream consumer listen --site site-2`` with site-1's credentials."""
    result = subprocess.run(
        [sys.executable, "-m", "objstream", "consumer", "listen", "--site", "site-2",
         "--dest", str(tmp_path), "--count", "1", "--timeout", "5"],
        env={**os.environ, "OBJSTREAM_URL": users["site-1"].url,
             "OBJSTREAM_NAMESPACE": NAMESPACE},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("objstream: error: broker refused")
    assert "ACCESS_REFUSED" in lines[0]
    assert "site-2" in lines[0]
    assert PASSWORDS["site-1"] not in result.stderr


def test_a_non_target_reads_a_broadcast_only_with_its_stream_id(users: dict[str, Settings]) -> None:
    """What a site that is not a target can read of a broadcast: with the stream id (which
    only the offers to the targets carry), it may bind its own data queue with the broadcast
    key ``data:ID:P`` and get the chunks published from then on; never a target's unicast
    ``data:ID:P:T``, never a target's queue, never the offer."""
    sid = uuid.uuid4().hex
    with Session(users["site-2"]) as outsider, Session(users["server"]) as server:
        queue = T.data_queue("site-2", sid)
        assert outsider.attempt(lambda ch: ch.declare_queue(queue, durable=True)) is None
        assert outsider.attempt(binding(queue, T.data_key(sid, "server"))) is None
        assert_access_refused(
            outsider.attempt(binding(queue, T.data_key(sid, "server", "site-1"))), "unicast"
        )
        for key in (T.data_key(sid, "server"), T.data_key(sid, "server", "site-1")):
            assert server.attempt(publish(key, user_id="server")) is None
        got = drain(outsider, queue)
        assert [d.props.user_id for d in got] == ["server"]  # the broadcast chunk only
        outsider.channel().delete_queue(queue)


# -- end to end, with the objstream drivers and nothing but per-site permissions -------------------


def test_a_push_with_per_site_users(
    users: dict[str, Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from objstream.producer import FileStreamer
    from tests.integration.conftest import BackgroundReceiver

    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    receiver = BackgroundReceiver("site-1", tmp_path / "in", users["site-1"])
    try:
        with FileStreamer("server", users["server"]) as streamer:
            [result] = streamer.stream_file("site-1", source, chunk_size=256 * 1024)
        assert result.ok
        [item] = receiver.wait_for(1)
    finally:
        receiver.stop()
    assert not isinstance(item, Exception), item
    assert item.path is not None
    assert item.path.read_bytes() == source.read_bytes()
    # Its own data queue: the site may unbind it when done (and delete it), nothing refused.
    assert "could not unbind" not in caplog.text


def test_a_broadcast_to_two_sites_with_per_site_users(
    users: dict[str, Settings], tmp_path: Path
) -> None:
    from objstream.producer import FileStreamer
    from tests.integration.conftest import BackgroundReceiver

    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    receivers = {
        site: BackgroundReceiver(site, tmp_path / site, users[site])
        for site in ("site-1", "site-2")
    }
    try:
        with FileStreamer("server", users["server"]) as streamer:
            results = streamer.stream_file(["site-1", "site-2"], source, chunk_size=128 * 1024)
        assert [r.ok for r in results] == [True, True]
        assert len({r.stream_id for r in results}) == 1  # one broadcast
        for receiver in receivers.values():
            [item] = receiver.wait_for(1)
            assert not isinstance(item, Exception), item
            assert item.path is not None
            assert item.path.read_bytes() == source.read_bytes()
    finally:
        for receiver in receivers.values():
            receiver.stop()


def test_a_retrieval_with_per_site_users(users: dict[str, Settings], tmp_path: Path) -> None:
    from objstream.consumer import Retriever
    from objstream.producer import FileRetriever
    from tests.integration.conftest import BackgroundServer

    served = tmp_path / "served"
    served.mkdir()
    (served / "weights.bin").write_bytes(os.urandom(1024 * 1024 + 11))
    server = BackgroundServer("server", users["server"], lambda s: FileRetriever(s, served))
    try:
        with Retriever("site-1", tmp_path / "in", users["site-1"]) as retriever:
            path = retriever.retrieve_file("server", "weights.bin", timeout=30)
    finally:
        server.stop()
    assert path.read_bytes() == (served / "weights.bin").read_bytes()


# -- --apply: on the broker of --url, and nothing a user had before defeats it ---------------------


@pytest.fixture(scope="module")
def other_node(node: LocalRabbitNode) -> Iterator[LocalRabbitNode]:
    """A second throwaway node: another broker than ``node``."""
    other = LocalRabbitNode()
    other.start()
    try:
        yield other
    finally:
        other.cleanup()


def users_of(node: LocalRabbitNode) -> dict[str, str]:
    """Each user of ``node`` and its tags, as ``rabbitmqctl list_users`` prints them."""
    result = node.ctl("list_users", "-q", "--formatter", "json")
    assert result.returncode == 0, result.stderr
    return {row["user"]: " ".join(row["tags"]) for row in json.loads(result.stdout)}


@pytest.mark.parametrize("named_by", ["environment", "--node"])
def test_apply_on_another_broker_changes_nothing_on_either(
    node: LocalRabbitNode, other_node: LocalRabbitNode, named_by: str
) -> None:
    """``--url`` names ``node`` while rabbitmqctl manages ``other_node`` (its default node by
    RABBITMQ_NODENAME, or ``--node``): exit 2 in one line, and neither broker changed."""
    site = f"elsewhere-{named_by.strip('-')}"
    argv = [sys.executable, "-m", "objstream", "admin", "permissions", "--site", site,
            "--user", site, "--apply", "--url", node.url, "--namespace", NAMESPACE]  # fmt: skip
    env = {**os.environ, "OBJSTREAM_ADMIN_PASSWORD": "pw"}
    if named_by == "--node":
        argv += ["--node", other_node.nodename]
    else:
        env["RABBITMQ_NODENAME"] = other_node.nodename
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("objstream: error: --apply refused, nothing changed: rabbitmqctl's")
    assert f"does not see this command's connection to {mask_url(node.url)}" in lines[0]
    assert "guest:guest@" not in result.stdout + result.stderr  # the URL's password is masked
    assert site not in users_of(node)
    assert site not in users_of(other_node)
    for broker in (node, other_node):
        assert T.inbox(site) not in broker.ctl("list_queues", "-q", "name").stdout.split()


OLD = "old-site"  # a site whose user was made by hand, long ago, with far too much


def test_apply_takes_away_what_an_old_user_had(
    users: dict[str, Settings], node: LocalRabbitNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tags administrator and impersonator (which lets it publish any user_id) and topic
    permissions on the dead-letter exchange and ``amq.topic``: ``--apply`` clears them, says
    so, and then the user can no longer sign as another site."""
    password = "pw-old"
    assert node.ctl("add_user", OLD, password).returncode == 0
    for args in [("set_user_tags", OLD, "administrator", "impersonator"),
                 ("set_permissions", OLD, ".*", ".*", ".*"),
                 ("set_topic_permissions", OLD, T.dead("site-1"), ".*", ".*"),
                 ("set_topic_permissions", OLD, "amq.topic", ".*", ".*")]:  # fmt: skip
        assert node.ctl(*args).returncode == 0, args
    old = Settings(url=f"amqp://{OLD}:{password}@127.0.0.1:{node.port}/%2F", namespace=NAMESPACE)
    forged = publish(T.offer_key("site-2"), user_id="site-2")
    with Session(old) as session:
        assert session.attempt(forged) is None  # what impersonator allows: the test can fail

    apply = ["admin", "permissions", "--site", OLD, "--user", OLD, "--apply", "--existing-user",
             "--node", node.nodename, "--url", node.url, "--namespace", NAMESPACE]  # fmt: skip
    assert main(apply) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert f"cleared tags administrator, impersonator of user '{OLD}'" in out
    assert f"cleared topic permissions of '{OLD}' on exchange '{T.dead('site-1')}'" in out
    assert f"cleared topic permissions of '{OLD}' on exchange 'amq.topic'" in out
    assert f"declared inbox '{T.inbox(OLD)}'" in out

    assert users_of(node)[OLD] == ""
    topics = node.ctl("list_user_topic_permissions", "-q", "--formatter", "json", OLD)
    assert [row["exchange"] for row in json.loads(topics.stdout)] == [T.exchange]
    with Session(old) as session:
        refusal = session.attempt(forged)
        assert refusal is not None
        assert refusal.reply_code == PRECONDITION_FAILED
        assert session.attempt(publish(T.offer_key("site-2"), user_id=OLD)) is None

    assert main(apply) == EXIT_OK  # again: nothing left to do
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"nothing changed: user '{OLD}' has exactly the permissions of site '{OLD}', and the "
        "site's queues exist"
    ]
