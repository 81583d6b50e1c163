"""Identity: a site pushes, or asks, in another site's name.

site-2 may publish offers to site-1 (``offer:site-1``) and requests to the server
(``serve:server``), and an offer's ``sender`` or a request's ``requester`` is free text. What
the broker vouches for is the ``user_id``, and site-2's user does not speak for the site it
claims: the message is refused ``forbidden`` (if it can be answered) or dead-lettered (if its
``reply_to`` does not even name the site it claims), and nothing is stored as "from server".
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

from objstream.common.errors import FailureCode
from objstream.common.protocol import Done, Inline, Offer, Reply, Request, new_stream_id, parse
from objstream.common.settings import Settings
from objstream.consumer import Received, Retriever
from objstream.producer import FileStreamer
from tests.adversarial.conftest import (
    StartReceiver,
    StartServer,
    T,
    arrived,
    assert_stored,
    dead_by_id,
    random_bytes,
    served,
)
from tests.adversarial.hostile import Hostile, marked

BODY = b"not from the server"


def in_the_name_of_server() -> Offer:
    """A complete object in its offer (it would be stored at once), claiming the server sent it."""
    inline = Inline(crc32=zlib.crc32(BODY), sha256=hashlib.sha256(BODY).hexdigest())
    return Offer(
        stream_id=new_stream_id(),
        kind="file",
        name="from-server.bin",
        size=len(BODY),
        chunk_size=len(BODY),
        chunk_count=1,
        window=1,
        sender="server",
        target="site-1",
        inline=inline,
    )


def test_an_offer_in_another_sites_name_is_refused_and_nothing_is_stored(
    users: dict[str, Settings], start_receiver: StartReceiver, tmp_path: Path
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    # The server's real user holds a reply queue, to see what site-1 answers in its direction.
    with Hostile(users["server"], "server") as server, Hostile(users["site-2"], "site-2") as site2:
        queue, server_reply_to = server.reply_queue("site-1")
        claim = in_the_name_of_server()
        site2.send(T.offer_key("site-1"), claim, reply_to=server_reply_to, body=BODY)
        got = server.get(queue, timeout=10)
        assert got is not None, "site-1 answered nothing"
        verdict = parse(got[0].type, got[0].headers)
        assert isinstance(verdict, Done)
        assert (verdict.stream_id, verdict.site, verdict.ok) == (claim.stream_id, "site-1", False)
        assert verdict.code == FailureCode.FORBIDDEN
        assert "claims site 'server' but was published by broker user 'site-2'" in verdict.detail

        # With a reply_to of its own, the claim cannot even be answered: dead-lettered.
        unanswerable = marked("own-reply-to")
        other = in_the_name_of_server()
        site2.send(T.offer_key("site-1"), other, reply_to=site2.unbound_reply_to(), body=BODY,
                   message_id=unanswerable)  # fmt: skip
        dead = dead_by_id(users["site-1"], "site-1", {unanswerable})
        assert dead[unanswerable].user_id == "site-2"

    # Real pushes, each named by its real user.
    for sender in ("server", "site-2"):
        source = tmp_path / f"real-from-{sender}.bin"
        data = random_bytes(source, 100_000)
        with FileStreamer(sender, users[sender]) as streamer:
            [result] = streamer.stream_file("site-1", source)
        assert result.ok
        received = arrived(receiver, source.name)
        assert_stored(received, data)
        assert (received.sender, received.sender_user) == (sender, sender)

    assert not (dest / "from-server.bin").exists()
    names = [o.name for o in receiver.outcomes if isinstance(o, Received)]
    assert names == ["real-from-server.bin", "real-from-site-2.bin"]


def test_a_request_in_another_sites_name_is_refused(
    users: dict[str, Settings], start_server: StartServer, tmp_path: Path
) -> None:
    """site-2 asks the server for a file as if it were site-1: with site-1's reply queue as
    ``reply_to``, refused ``forbidden`` there; with its own, dead-lettered (it cannot be
    answered). The server streams nothing for either, and site-1's own request is served."""
    source_dir = tmp_path / "served"
    source_dir.mkdir()
    data = random_bytes(source_dir / "weights.bin", 300_000)
    server = start_server(source_dir)
    with Hostile(users["site-1"], "site-1") as site1, Hostile(users["site-2"], "site-2") as site2:
        queue, site1_reply_to = site1.reply_queue("server")
        claim = Request(
            request_id=new_stream_id(), kind="file", name="weights.bin", requester="site-1"
        )
        site2.send(T.service_key("server"), claim, reply_to=site1_reply_to)
        got = site1.get(queue, timeout=10)
        assert got is not None, "the server answered nothing"
        reply = parse(got[0].type, got[0].headers)
        assert isinstance(reply, Reply)
        assert (reply.request_id, reply.ok, reply.code) == (
            claim.request_id,
            False,
            FailureCode.FORBIDDEN,
        )
        assert "claims site 'site-1' but was published by broker user 'site-2'" in reply.detail

        unanswerable = marked("own-reply-to")
        other = claim.model_copy(update={"request_id": new_stream_id()})
        site2.send(T.service_key("server"), other, reply_to=site2.unbound_reply_to(),
                   message_id=unanswerable)  # fmt: skip
        dead = dead_by_id(users["server"], "server", {unanswerable})
        assert dead[unanswerable].user_id == "site-2"
        assert site1.get(queue, timeout=0.5) is None  # no offer followed the refusal
    assert (served(server).accepted, served(server).refused) == (0, 1)

    with Retriever("site-1", tmp_path / "in", users["site-1"]) as retriever:
        received = retriever.retrieve("file", "server", "weights.bin", timeout=8)
    assert_stored(received, data)
    assert received.sender_user == "server"
