"""Asking a serving site what it offers, both sides without a broker: the owner's
:class:`ServeSession` lists only what the requester's user may retrieve, bounded; the
requester's :class:`RequestSession` takes only a valid listing from the owner it asked, and
turns every other answer into one line."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from objstream.common.errors import FailureCode, ListingFailed, TimedOut
from objstream.common.listing import (
    MAX_LISTED,
    MAX_LISTING_BYTES,
    ListedObject,
    decode_listing,
)
from objstream.common.protocol import (
    TYPES,
    Envelope,
    Offer,
    Reply,
    Request,
    new_stream_id,
    parse,
    to_headers,
)
from objstream.common.request_session import Ack, PublishRequest, Reject, RequestSession
from objstream.common.serve_session import (
    Catalogue,
    Listed,
    SendReply,
    ServeSession,
    Shelf,
)
from objstream.common.slots import Slots

QID = "b" * 32


# -- the owner ------------------------------------------------------------------------------------


def _serve(max_object_size: int = 1000) -> ServeSession:
    return ServeSession("server", Slots(4, 0.5), max_object_size)


def _list_request(
    requester: str = "site-1", user: str | None = None, **fields: Any
) -> tuple[str, dict[str, Any], Envelope]:
    request = Request(
        request_id=new_stream_id(),
        kind="list",
        name=fields.pop("name", ""),
        requester=requester,
        **fields,
    )
    env = Envelope("serve:server", user or requester, f"reply:{requester}:{QID}")
    return "request", to_headers(request), env


def _listing(
    session: ServeSession, shelves: list[Shelf], **request: Any
) -> tuple[Reply, list[ListedObject]]:
    [catalogue] = session.request(*_list_request(**request))
    assert isinstance(catalogue, Catalogue)
    [answer] = session.catalogued(catalogue, shelves)
    assert isinstance(answer, SendReply)
    reply = answer.reply
    assert reply.listed is not None
    return reply, list(decode_listing(answer.body, reply.listed))


def _shelves() -> list[Shelf]:
    return [
        Shelf(None, [Listed("container", "model", 90, 2)]),
        Shelf(frozenset({"alice"}), [Listed("container", "secret", 10, 1)]),
        Shelf(
            None,
            [Listed("file", "a.bin", 5), Listed("file", "big.bin", 1001), Listed("file", "d/c", 0)],
        ),
    ]


def test_a_listing_holds_what_the_user_may_retrieve_and_nothing_else() -> None:
    reply, objects = _listing(_serve(), _shelves())
    assert reply.ok
    assert reply.stream_id is None
    assert reply.truncated is False
    assert [(o.kind, o.name, o.size, o.entries) for o in objects] == [
        ("container", "model", 90, 2),
        ("file", "a.bin", 5, None),
        ("file", "d/c", 0, None),
    ]  # not "secret" (alice's only), not big.bin (over max_object_size: refused too_large)
    _, objects = _listing(_serve(), _shelves(), requester="alice")
    assert "secret" in [o.name for o in objects]


def test_a_listing_is_of_one_kind_and_a_prefix_when_asked() -> None:
    _, files = _listing(_serve(), _shelves(), of="file")
    assert [o.name for o in files] == ["a.bin", "d/c"]
    _, containers = _listing(_serve(), _shelves(), of="container")
    assert [o.name for o in containers] == ["model"]
    _, under = _listing(_serve(), _shelves(), name="d/")
    assert [o.name for o in under] == ["d/c"]


def test_a_user_that_does_not_speak_for_the_requester_is_refused_not_listed() -> None:
    [refusal] = _serve().request(*_list_request("site-1", user="mallory"))
    assert isinstance(refusal, SendReply)
    assert refusal.reply.code == FailureCode.FORBIDDEN
    assert refusal.body == b""
    assert refusal.reply.listed is None


def _counted(objects: Iterator[Listed], seen: list[int]) -> Iterator[Listed]:
    for obj in objects:
        seen[0] += 1
        yield obj


def test_a_catalog_of_100000_names_gives_a_bounded_truncated_listing() -> None:
    many = (Listed("file", f"f{i:06d}", i) for i in range(100_000))
    seen = [0]
    reply, objects = _listing(_serve(10**9), [Shelf(None, _counted(many, seen))])
    assert reply.truncated is True
    assert reply.listed == len(objects) == MAX_LISTED
    assert seen[0] == MAX_LISTED + 1  # read only as far as the listing needs
    assert objects[0].name == "f000000"


def test_long_names_are_cut_at_the_byte_bound() -> None:
    many = [Listed("file", f"{i:05d}" + "é" * 1000, 7) for i in range(2000)]
    [catalogue] = _serve().request(*_list_request())
    assert isinstance(catalogue, Catalogue)
    [answer] = _serve().catalogued(catalogue, [Shelf(None, many)])
    assert isinstance(answer, SendReply)
    assert len(answer.body) <= MAX_LISTING_BYTES
    assert answer.reply.truncated is True
    assert answer.reply.listed == len(json.loads(answer.body)) < 2000


def test_a_forbidden_shelf_is_not_even_read() -> None:
    seen = [0]
    hidden = Shelf(frozenset({"alice"}), _counted(iter([Listed("file", "x", 1)] * 10), seen))
    reply, objects = _listing(_serve(), [hidden])
    assert (reply.listed, reply.truncated, objects, seen[0]) == (0, False, [], 0)


def test_what_cannot_be_looked_at_is_bounded_too() -> None:
    # Nothing matches the prefix: the owner still stops after MAX_EXAMINED and says truncated.
    seen = [0]
    many = _counted((Listed("file", f"f{i}", 1) for i in range(10**6)), seen)
    reply, objects = _listing(_serve(), [Shelf(None, many)], name="zzz")
    assert reply.truncated is True
    assert objects == []
    assert seen[0] < 10**6


def test_names_no_request_could_carry_are_left_out() -> None:
    bad = [Listed("file", "caf\udce9", 1), Listed("file", "x" * 1025, 1), Listed("file", "ok", 1)]
    _, objects = _listing(_serve(), [Shelf(None, bad)])
    assert [o.name for o in objects] == ["ok"]


def test_list_requests_do_not_resume_and_others_need_a_name() -> None:
    with pytest.raises(ValueError, match="does not resume"):
        Request(
            request_id=new_stream_id(),
            kind="list",
            name="",
            requester="r",
            resume_from=1,
            chunk_size=4096,
            prefix_sha256="0" * 64,
        )
    with pytest.raises(ValueError, match="needs a name"):
        Request(request_id=new_stream_id(), kind="file", name="", requester="r")
    with pytest.raises(ValueError, match="only a list request"):
        Request(request_id=new_stream_id(), kind="file", name="x", of="file", requester="r")


def test_replies_to_other_requests_carry_no_listing_fields() -> None:
    """An older requester's Reply model forbids unknown fields: they never reach it."""
    reply = Reply(request_id=new_stream_id(), ok=True, stream_id=new_stream_id(), size=3)
    assert not {"listed", "truncated"} & set(to_headers(reply))
    refusal = Reply(request_id=new_stream_id(), ok=False, code=FailureCode.NOT_FOUND)
    assert not {"listed", "truncated"} & set(to_headers(refusal))
    with pytest.raises(ValueError, match="a listing says listed"):
        Reply(request_id=new_stream_id(), ok=True, stream_id=new_stream_id(), listed=1)


# -- the requester --------------------------------------------------------------------------------


def _ids() -> Any:
    counter = itertools.count()
    return lambda: f"{next(counter):032x}"


def _asked(**options: Any) -> tuple[RequestSession, str, Request]:
    session = RequestSession("site-1", new_id=_ids())
    handle, [publish] = session.ask_list(
        "server",
        of=options.pop("of", "file"),
        prefix=options.pop("prefix", ""),
        timeout=10.0,
        now=0.0,
    )
    assert isinstance(publish, PublishRequest)
    assert publish.owner == "server"
    return session, handle, publish.request


def _answer(
    session: RequestSession,
    request: Request,
    body: bytes,
    owner: str = "server",
    **fields: Any,
) -> list[Any]:
    headers = {"objstream": 2, "request_id": request.request_id, "ok": True, **fields}
    env = Envelope(f"reply:site-1:{QID}:{owner}", owner, None, len(body))
    return session.receive("reply", headers, env, 1.0, body)


def test_the_list_request_says_kind_list_the_prefix_and_what_it_lists() -> None:
    _, _, request = _asked(of="container", prefix="mo")
    headers = to_headers(request)
    assert (headers["kind"], headers["name"], headers["of"]) == ("list", "mo", "container")
    assert parse(TYPES[Request].value, headers) == request


def test_a_valid_listing_is_taken() -> None:
    session, handle, request = _asked()
    body = (
        b'[{"kind":"file","name":"a.bin","size":5},'
        b'{"kind":"container","name":"m","size":9,"entries":2}]'
    )
    assert _answer(session, request, body, listed=2, truncated=True) == [Ack()]
    listing = session.state(handle).listing
    assert listing is not None
    assert listing.site == "server"
    assert listing.truncated
    assert [(o.name, o.size, o.entries) for o in listing.objects] == [
        ("a.bin", 5, None),
        ("m", 9, 2),
    ]
    session.tick(100.0)  # answered: it never times out
    assert session.state(handle).error is None


@pytest.mark.parametrize(
    ("body", "fields", "words"),
    [
        (b"not json", {"listed": 0}, "Invalid JSON"),
        (b'{"kind":"file"}', {"listed": 1}, "valid list"),
        (b'[{"kind":"file","name":"a","size":"5"}]', {"listed": 1}, "0.size"),
        (b'[{"kind":"file","name":"a","size":-1}]', {"listed": 1}, "0.size"),
        (b'[{"kind":"dir","name":"a","size":1}]', {"listed": 1}, "0.kind"),
        (b'[{"kind":"file","name":"","size":1}]', {"listed": 1}, "0.name"),
        (b'[{"kind":"file","name":"a","size":1,"evil\\nkey":1}]', {"listed": 1}, "evil?key"),
        (b'[{"kind":"file","name":"a","size":1}]', {"listed": 2}, "the reply says 2"),
        (b"[" + b" " * MAX_LISTING_BYTES + b"]", {"listed": 0}, "at most 1048576"),
        (b"[]", {"listed": MAX_LISTED + 1}, "at most 10000"),
        (b"[]", {"stream_id": "c" * 32}, "without listed"),
    ],
)
def test_an_invalid_listing_fails_at_once_in_one_line(
    body: bytes, fields: dict[str, Any], words: str
) -> None:
    session, handle, request = _asked()
    # Acked: the caller reports it (dead-lettering would log it a second time).
    assert _answer(session, request, body, **fields) == [Ack()]
    error = session.state(handle).error
    assert isinstance(error, ListingFailed)
    assert error.code == FailureCode.PROTOCOL
    text = str(error)
    assert text.startswith("site 'server' sent an invalid listing: ")
    assert words in text
    assert "\n" not in text
    assert len(text) < 400


@pytest.mark.parametrize(
    "fields",
    [
        {"listed": "many"},
        {"listed": 1, "truncated": "maybe"},
        {"listed": 1, "rows": [1, 2]},
        {"listed": -1},
    ],
)
def test_a_reply_that_does_not_even_parse_fails_the_listing_at_once(
    fields: dict[str, Any],
) -> None:
    session, handle, request = _asked()
    assert _answer(session, request, b"[]", **fields) == [Ack()]
    error = session.state(handle).error
    assert isinstance(error, ListingFailed)
    assert str(error).startswith("site 'server' sent an invalid listing: invalid reply headers")


def test_only_the_owner_asked_can_answer_a_list_request() -> None:
    session, handle, request = _asked()
    body = b'[{"kind":"file","name":"planted","size":1}]'
    [reject] = _answer(session, request, body, owner="site-2", listed=1)
    assert isinstance(reject, Reject)
    assert "server" in reject.reason
    [reject] = _answer(session, request, b"junk", owner="site-2", listed="x")
    assert isinstance(reject, Reject)
    state = session.state(handle)
    assert state.listing is None
    assert state.error is None


def test_an_older_owner_says_unsupported_and_that_reads_as_no_listing() -> None:
    session, handle, request = _asked()
    detail = "invalid request headers: kind: Input should be 'file' or 'container'"
    _answer(session, request, b"", ok=False, code="unsupported", detail=detail)
    error = session.state(handle).error
    assert isinstance(error, ListingFailed)
    assert error.code == FailureCode.UNSUPPORTED
    assert str(error).startswith("site 'server' does not support listing")


def test_a_refusal_is_one_line_whatever_its_detail() -> None:
    session, handle, request = _asked()
    _answer(session, request, b"", ok=False, code="forbidden", detail="no\nway\x1b[31m")
    error = session.state(handle).error
    assert isinstance(error, ListingFailed)
    assert str(error) == "site 'server' refused to list what it serves: forbidden: no?way?[31m"


def test_no_answer_times_out_naming_the_site() -> None:
    session, handle, _ = _asked()
    session.tick(5.0)
    assert session.state(handle).error is None
    session.tick(10.5)
    error = session.state(handle).error
    assert isinstance(error, TimedOut)
    assert "site 'server' did not answer the list request" in str(error)


def test_an_unanswered_list_request_is_published_again_after_a_reconnect() -> None:
    session, _, request = _asked()
    [again] = session.reconnected(1.0)
    assert isinstance(again, PublishRequest)
    assert again.request == request


def test_a_listing_reply_to_a_file_request_is_refused() -> None:
    session = RequestSession("site-1", new_id=_ids())
    handle, [publish] = session.ask("file", "a.bin", "server", timeout=10.0, now=0.0)
    assert isinstance(publish, PublishRequest)
    [reject] = _answer(session, publish.request, b"[]", listed=0)
    assert isinstance(reject, Reject)
    assert session.state(handle).stream_id is None


def test_no_offer_can_pass_for_the_answer_to_a_list_request() -> None:
    """An offer from an owner only asked for a listing is not held as an early offer."""
    session, handle, _ = _asked()
    offer = Offer(
        stream_id=new_stream_id(),
        kind="file",
        name="planted",
        size=3,
        chunk_size=4,
        chunk_count=1,
        window=4,
        sender="server",
        target="site-1",
    )
    env = Envelope(f"reply:site-1:{QID}:server", "server")
    [reject] = session.receive("offer", to_headers(offer), env, 1.0)
    assert isinstance(reject, Reject)
    assert session.state(handle).error is None
