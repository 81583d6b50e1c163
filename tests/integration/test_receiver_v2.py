"""What protocol v2 asks of a receiver, checked with a raw peer: the offer's envelope, the data
queue the target declares (and deletes), answers through the exchange, ``user_id``, one
broadcast feeding several targets, and v1 messages named as such."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import pika
import pytest

from objstream.common.errors import TransferFailed
from objstream.common.protocol import Chunk, Offer
from objstream.consumer.streams import Received
from tests.conftest import stored_path
from tests.integration.conftest import DeadReasons, MakeRawPeer, StartReceiver
from tests.integration.rawpeer import RawPeer, declare_bound, properties

BODY = b"abcdefgh"
DIGEST = hashlib.sha256(BODY).hexdigest()


def _offer(peer: RawPeer, target: str | None = None) -> Offer:
    return Offer(stream_id=peer.stream_id, kind="file", name="v2.bin", size=len(BODY),
                 chunk_size=4, chunk_count=2, window=4, sender=peer.sender,
                 target=target or peer.target)  # fmt: skip


def _queue_exists(peer: RawPeer, queue: str) -> bool:
    return _messages_in(peer, queue) is not None


def _messages_in(peer: RawPeer, queue: str) -> int | None:
    """How many messages ``queue`` holds (None: there is no such queue)."""
    channel = peer.connection.channel()
    try:
        declared = channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != 404:
            raise
        return None
    channel.close()
    return int(declared.method.message_count)


def test_a_v1_offer_is_dead_lettered_as_unsupported_version(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer, dead_reasons: DeadReasons
) -> None:
    """A v1 sender publishes to the v1 key ``site.SITE`` with version 1: not lost, not silent."""
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    props = properties(_offer(peer), reply_to="amq.gen-v1-reply")
    props.headers["objstream"] = 1
    peer.channel.basic_publish(peer.namespace, "site.site-1", b"", props)

    peer.stream("after.bin", [b"abcd"])  # the receiver goes on
    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    reasons = dead_reasons()
    assert any(
        r.startswith("unsupported_version: protocol version 1, this peer speaks 2") for r in reasons
    ), reasons


@pytest.mark.parametrize(
    ("reply_to", "user_id", "reason"),
    [
        (None, "guest", "offer without reply_to"),
        ("amq.gen-xyz", "guest", "not reply:SITE:QID"),
        ("reply:site-9:" + "0" * 32, "guest", "with reply_to 'reply:site-9:"),
        ("ok", None, "offer without user_id"),
    ],
    ids=["no-reply-to", "v1-reply-to", "another-site", "no-user"],
)
def test_an_offer_that_cannot_be_answered_is_dead_lettered(
    tmp_path: Path,
    start_receiver: StartReceiver,
    raw_peer: MakeRawPeer,
    dead_reasons: DeadReasons,
    reply_to: str | None,
    user_id: str | None,
    reason: str,
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    peer = raw_peer("site-1")
    user = peer.user if user_id else None
    props = properties(_offer(peer), reply_to=peer.reply_to if reply_to == "ok" else reply_to,
                       user_id=user)  # fmt: skip
    peer.publish_inbox(b"", props)

    other = raw_peer("site-1")
    other.stream("after.bin", [b"abcd"])  # the receiver goes on
    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert any(reason in r for r in dead_reasons()), dead_reasons()
    assert not _queue_exists(peer, peer.data_queue)  # the bad offer made no data queue


def test_the_target_declares_its_data_queue_answers_through_the_exchange_and_cleans_up(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    peer.offer("v2.bin", size=len(BODY), chunk_size=4)  # waits for the first progress
    assert _queue_exists(peer, peer.data_queue)  # NS.data.site-1.ID, there before it
    # A duplicate offer (same stream id) is ignored: no second stream, no second answer.
    peer.publish_inbox(b"", properties(_offer(peer), reply_to=peer.reply_to, user_id=peer.user))
    peer.chunk(0, BODY[:4])
    peer.chunk(1, BODY[4:])
    peer.end(2, len(BODY), DIGEST)

    answers = peer.replies("done")
    assert answers[0] == ("progress", answers[0][1])
    assert answers[0][1]["stored"] == 0
    assert answers[0][1]["site"] == "site-1"
    assert answers[-1][1]["ok"] is True
    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert stored_path(received).read_bytes() == BODY
    assert [t for t, _ in answers].count("done") == 1
    # A resend after the verdict means the sender missed it: the verdict comes again (the
    # data queue is still consumed for a while after it).
    peer.connection.sleep(1.1)  # at most one verdict a second
    peer.chunk(1, BODY[4:])
    [(_, again)] = peer.replies("done", timeout=10)
    assert again["ok"] is True
    assert again["stream_id"] == peer.stream_id
    assert _messages_in(peer, peer.data_queue) == 0  # taken, not left there
    receiver.stop()  # and then the receiver deletes its own (unbound first)
    assert not _queue_exists(peer, peer.data_queue)
    assert len(receiver.outcomes) == 1


def test_data_from_another_user_than_the_offer_is_dead_lettered(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer, dead_reasons: DeadReasons
) -> None:
    """RabbitMQ vouches for user_id (it refuses another user's); a message without one, or
    with another user's, is not the offer's sender's data."""
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    peer.offer("v2.bin", size=len(BODY), chunk_size=4)
    forged = properties(_chunk(peer, 0, b"EVIL"), persistent=False)  # no user_id
    peer.publish_data(b"EVIL", forged)
    peer.chunk(0, BODY[:4])
    peer.chunk(1, BODY[4:])
    peer.end(2, len(BODY), DIGEST)

    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert stored_path(received).read_bytes() == BODY
    reasons = dead_reasons()
    assert "chunk from user None, the offer came from user 'guest'" in reasons, reasons


def _chunk(peer: RawPeer, seq: int, body: bytes) -> Chunk:
    return Chunk(stream_id=peer.stream_id, seq=seq, crc32=zlib.crc32(body))


def test_one_broadcast_feeds_every_target_and_a_unicast_only_its_own(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    """One stream id for two targets: each binds the sender's broadcast key, so one publish
    reaches both; a unicast (``data:ID:SENDER:TARGET``) reaches only that target."""
    first = start_receiver("site-1", tmp_path / "one")
    second = start_receiver("site-2", tmp_path / "two")
    peer = raw_peer("site-1")
    peer.channel.queue_bind(peer.reply, peer.namespace, routing_key=f"{peer.reply_to}:site-2")
    declare_bound(peer.channel, peer.topology, peer.topology.inbox("site-2"), "offer:site-2")
    peer.waits_for_contact = False
    peer.offer("v2.bin", size=len(BODY), chunk_size=4)
    props = properties(_offer(peer, "site-2"), reply_to=peer.reply_to, user_id=peer.user)
    peer.channel.basic_publish(peer.namespace, "offer:site-2", b"", props)
    contacts = {peer.first_contact()[1]["site"], peer.first_contact()[1]["site"]}
    assert contacts == {"site-1", "site-2"}

    peer.chunk(0, BODY[:4])  # broadcast: both
    # Chunk 1 to site-1 alone; site-2 gets it on its own key.
    chunk1 = properties(_chunk(peer, 1, BODY[4:]), persistent=False, user_id=peer.user)
    peer.publish_data(BODY[4:], chunk1, unicast=True)
    key2 = f"data:{peer.stream_id}:{peer.sender}:site-2"
    peer.channel.basic_publish(peer.namespace, key2, BODY[4:], chunk1)
    peer.end(2, len(BODY), DIGEST)  # broadcast

    for receiver in (first, second):
        [received] = receiver.wait_for(1)
        assert isinstance(received, Received), received
        assert stored_path(received).read_bytes() == BODY
    verdicts = [h for t, h in peer.replies("done") + peer.replies("done") if t == "done"]
    assert sorted(v["site"] for v in verdicts) == ["site-1", "site-2"]
    assert all(v["ok"] for v in verdicts)
    assert not [o for o in first.outcomes + second.outcomes if isinstance(o, TransferFailed)]


def test_a_successor_takes_the_stream_over_on_the_same_data_queue(
    tmp_path: Path,
    start_receiver: StartReceiver,
    raw_peer: MakeRawPeer,
    dead_reasons: DeadReasons,
) -> None:
    """A receiver that stops leaves the stream on disk; the next one of the site re-consumes
    ``NS.data.SITE.ID`` (what was published meanwhile waits there) and checks the data's user
    against the offer's, remembered in the state file."""
    dest = tmp_path / "in"
    first = start_receiver("site-1", dest)
    peer = raw_peer("site-1")
    parts = [b"aaaa", b"bbbb", b"cccc"]
    whole = b"".join(parts)
    peer.offer("over.bin", size=len(whole), chunk_size=4, window=1)  # report every chunk
    peer.chunk(0, parts[0])
    assert any(h.get("stored") == 1 for _, h in peer.replies("progress") + peer.replies("progress"))
    first.stop()  # checkpoints: the stream is left for the next receiver
    assert list(dest.glob(".objstream-*.state"))
    peer.chunk(1, parts[1])  # waits in the data queue
    peer.publish_data(b"EVIL", properties(_chunk(peer, 2, b"EVIL"), persistent=False))

    second = start_receiver("site-1", dest)
    progress = peer.replies("progress")[-1][1]
    assert progress["stored"] >= 1  # first contact of the successor: it goes on from there
    peer.chunk(2, parts[2])
    peer.end(3, len(whole), hashlib.sha256(whole).hexdigest())
    [received] = second.wait_for(1)
    assert isinstance(received, Received), received
    assert stored_path(received).read_bytes() == whole
    assert peer.verdict()["ok"] is True
    assert "chunk from user None, the offer came from user 'guest'" in dead_reasons()
