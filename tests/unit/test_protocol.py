from __future__ import annotations

from typing import Any

import pika
import pytest

from objstream.common.amqp.connection import _from_pika, _to_pika
from objstream.common.errors import ConfigError, FailureCode, ProtocolError
from objstream.common.protocol import (
    PROTOCOL_VERSION,
    Chunk,
    Done,
    End,
    Message,
    MessageType,
    Offer,
    Progress,
    UnsupportedVersion,
    envelope,
    new_stream_id,
    parse,
    to_headers,
)

SID = new_stream_id()


def _offer(**changes: Any) -> dict[str, Any]:
    fields = dict(
        stream_id=SID,
        kind="file",
        name="a.bin",
        size=10,
        chunk_size=4,
        chunk_count=3,
        window=8,
        sender="server",
        target="site-1",
    )
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    "message",
    [
        Offer(**_offer()),
        Chunk(stream_id=SID, seq=3, crc32=0xFFFFFFFF),
        End(stream_id=SID, chunk_count=3, size=10, sha256="a" * 64),
        Progress(stream_id=SID, site="site-1", stored=2),
        Progress(stream_id=SID, site="site-1", stored=2, resend_from=2),
        Done(stream_id=SID, site="site-1", ok=False, code=FailureCode.CHECKSUM, detail="x"),
    ],
)
def test_round_trip_through_amqp_properties(message: Message) -> None:
    props = envelope(message)
    assert props.headers is not None
    assert props.headers["objstream"] == PROTOCOL_VERSION == 2
    # Through the adapter and pika's own wire encoding and back, as the broker would deliver it.
    decoded = pika.BasicProperties()
    decoded.decode(b"".join(_to_pika(props).encode()))
    back = _from_pika(decoded)
    assert back == props
    assert parse(back.type, back.headers) == message


def test_none_fields_are_left_out_of_headers() -> None:
    assert "resend_from" not in to_headers(Progress(stream_id=SID, site="s", stored=0))


def test_chunk_ids_and_persistence() -> None:
    chunk = Chunk(stream_id=SID, seq=7, crc32=1)
    props = envelope(chunk, persistent=False, message_id=f"{SID}:7")
    assert props.type == MessageType.CHUNK.value == "chunk"
    assert props.message_id == f"{SID}:7"
    assert props.correlation_id == SID
    assert _to_pika(props).delivery_mode == pika.DeliveryMode.Transient.value


@pytest.mark.parametrize(
    ("type_", "headers", "words"),
    [
        ("offer", None, "no headers"),
        ("offer", {}, "missing protocol version"),
        ("offer", {"objstream": 1}, "unsupported_version: protocol version 1, this peer speaks 2"),
        ("offer", {"objstream": 3}, "unsupported_version: protocol version 3"),
        ("teleport", {"objstream": 2}, "unknown message type 'teleport'"),
        (None, {"objstream": 2}, "unknown message type None"),
        ("offer", {**_offer(), "objstream": 2, "extra": 1}, "extra"),
        ("offer", {**_offer(size=-1), "objstream": 2}, "size"),
        ("offer", {**_offer(size=2**63), "objstream": 2}, "size"),
        ("offer", {**_offer(chunk_count=2), "objstream": 2}, "chunk_count 2 != ceil"),
        ("offer", {**_offer(chunk_size=0), "objstream": 2}, "chunk_size"),
        ("offer", {**_offer(chunk_size=64 * 2**20), "objstream": 2}, "chunk_size"),
        ("offer", {**_offer(sender="../x"), "objstream": 2}, "sender"),
        ("offer", {**_offer(name=""), "objstream": 2}, "name"),
        ("offer", {**_offer(stream_id="XYZ"), "objstream": 2}, "stream_id"),
        ("chunk", {"objstream": 2, "stream_id": SID, "seq": -1, "crc32": 0}, "seq"),
        ("chunk", {"objstream": 2, "stream_id": SID, "seq": 0, "crc32": 2**32}, "crc32"),
        ("chunk", {"objstream": 2, "stream_id": SID, "seq": 0}, "crc32"),
        (
            "end",
            {"objstream": 2, "stream_id": SID, "chunk_count": 1, "size": 1, "sha256": "xyz"},
            "sha256",
        ),
    ],
)
def test_invalid_messages_are_protocol_errors_with_a_reason(
    type_: str | None, headers: dict[str, Any] | None, words: str
) -> None:
    with pytest.raises(ProtocolError, match=words):
        parse(type_, headers)


@pytest.mark.parametrize(
    "added",
    [
        {"x-delivery-count": 1},  # a quorum queue's, on every redelivery
        {"x-death": [{"count": 1, "reason": "rejected"}], "x-first-death-reason": "rejected"},
        {"x-received-from": [{"uri": "amqp://elsewhere"}]},  # a shovel's or federation's
    ],
)
def test_headers_a_broker_adds_are_ignored(added: dict[str, Any]) -> None:
    chunk = Chunk(stream_id=SID, seq=3, crc32=7)
    props = envelope(chunk)
    assert props.headers is not None
    assert parse(props.type, {**props.headers, **added}) == chunk


def test_models_are_frozen() -> None:
    chunk = Chunk(stream_id=SID, seq=0, crc32=0)
    with pytest.raises(ValueError, match="frozen"):
        chunk.seq = 1  # type: ignore[misc]


def test_chunk_length_of_the_last_chunk() -> None:
    offer = Offer(**_offer())
    assert [offer.chunk_length(s) for s in range(3)] == [4, 4, 2]


@pytest.mark.parametrize(
    "changes",
    [
        {"size": 70_000, "chunk_size": 70_000, "chunk_count": 1},
        {"size": 10, "chunk_size": 4, "chunk_count": 3},
        {"size": None, "chunk_count": None, "kind": "records"},
    ],
    ids=["too-big", "several-chunks", "unknown-size"],
)
def test_inline_offers_carry_one_small_chunk_only(changes: dict[str, Any]) -> None:
    from objstream.common.protocol import Inline

    inline = Inline(crc32=0, sha256="0" * 64)
    with pytest.raises(ValueError, match="inline offer carries at most one chunk"):
        Offer(**_offer(inline=inline, **changes))


def test_a_resumed_offer_stays_within_its_chunks() -> None:
    assert Offer(**_offer(resume_from=3)).resume_from == 3  # everything kept: only the end
    with pytest.raises(ValueError, match="resume_from 4"):
        Offer(**_offer(resume_from=4))


@pytest.mark.parametrize(
    "changes",
    [{}, {"chunk_size": 4096}, {"prefix_sha256": "0" * 64}],
    ids=["neither", "no-digest", "no-chunk-size"],
)
def test_a_resume_request_says_what_it_has(changes: dict[str, Any]) -> None:
    from objstream.common.protocol import Request

    fields = {"request_id": new_stream_id(), "kind": "file", "name": "f", "requester": "s"}
    with pytest.raises(ValueError, match="resume_from needs chunk_size and prefix_sha256"):
        Request(**fields, resume_from=2, **changes)
    both = {"chunk_size": 4096, "prefix_sha256": "0" * 64}
    assert Request(**fields, resume_from=2, **both).resume_from == 2


def test_only_a_container_request_selects_entries_and_within_bounds() -> None:
    from objstream.common.protocol import Request, to_headers
    from objstream.consumer.retriever import check_keys

    fields = {"request_id": new_stream_id(), "name": "m", "requester": "s"}
    request = Request(**fields, kind="container", keys=["layers.0.*", "lm_head.*"])
    assert parse("request", to_headers(request)) == request  # through AMQP headers and back
    with pytest.raises(ValueError, match="only a container request selects entries"):
        Request(**fields, kind="file", keys=["x"])
    with pytest.raises(ValueError, match="a list request names no entries"):
        Request(**{**fields, "name": ""}, kind="list", keys=["x"])
    for bad in ([], ["x"] * 65, [""], ["x" * 257]):
        with pytest.raises(ProtocolError):
            parse("request", {**to_headers(Request(**fields, kind="container")), "keys": bad})
        with pytest.raises(ConfigError):
            check_keys(bad)
    assert check_keys("a*") == ["a*"]


def test_another_version_is_unsupported_version_with_its_code() -> None:
    with pytest.raises(UnsupportedVersion) as caught:
        parse("offer", {**_offer(), "objstream": 1})
    assert caught.value.code is FailureCode.UNSUPPORTED_VERSION
    assert caught.value.code.value == "unsupported_version"
    assert caught.value.version == 1
