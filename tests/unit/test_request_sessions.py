"""Both sides of retrieval requests, without a broker: the requester's
:class:`RequestSession` (what counts as an answer, early offers, asking again, timeouts) and the
owner's :class:`ServeSession` (validation, refusals, fair shares, joining a shared upload)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from objstream.common.admission import Kept
from objstream.common.errors import FailureCode, Refused, TimedOut, TransferFailed
from objstream.common.protocol import (
    TYPES,
    Abort,
    Envelope,
    Offer,
    Reply,
    Request,
    new_stream_id,
    to_headers,
)
from objstream.common.request_session import (
    MAX_ASKS,
    MAX_EARLY,
    Ack,
    DropHeld,
    HoldOffer,
    PublishRequest,
    Reject,
    RequestSession,
    TakeOffer,
)
from objstream.common.serve_session import (
    Absent,
    Found,
    Join,
    LookUp,
    Missing,
    SendReply,
    ServeSession,
    Start,
)
from objstream.common.serve_session import Reject as ServeReject
from objstream.common.slots import Slots

QID = "b" * 32


def _ids() -> Any:
    counter = itertools.count()
    return lambda: f"{next(counter):032x}"


def _from(owner: str, message: Any) -> tuple[str, dict[str, Any], Envelope]:
    """``message`` as it reaches site-1's private queue from ``owner``."""
    key = f"reply:site-1:{QID}:{owner}"
    return TYPES[type(message)].value, to_headers(message), Envelope(key, owner)


def _offer(stream_id: str, sender: str = "server") -> Offer:
    return Offer(
        stream_id=stream_id,
        kind="container",
        name="m",
        size=3,
        chunk_size=4,
        chunk_count=1,
        window=4,
        sender=sender,
        target="site-1",
    )


# -- the requester ----------------------------------------------------------------------------


def _asked(session: RequestSession, owner: str = "server", **kw: Any) -> tuple[str, Request]:
    handle, actions = session.ask("container", "m", owner, timeout=10.0, now=0.0, **kw)
    [publish] = actions
    assert isinstance(publish, PublishRequest)
    assert (publish.owner, publish.expiration_s) == (owner, 10.0)
    return handle, publish.request


def test_a_reply_then_its_offer_start_the_stream() -> None:
    session = RequestSession("site-1", new_id=_ids())
    handle, request = _asked(session)
    sid = new_stream_id()
    reply = Reply(request_id=request.request_id, ok=True, stream_id=sid, entries=1)
    assert session.receive(*_from("server", reply), 1.0) == [Ack()]
    assert session.state(handle).stream_id == sid
    [take] = session.receive(*_from("server", _offer(sid)), 1.0)
    assert isinstance(take, TakeOffer)
    assert (take.stream_id, take.asked.owner, take.held, take.handle) == (
        sid,
        "server",
        False,
        handle,
    )


def test_an_offer_that_overtakes_its_reply_is_held_then_taken() -> None:
    session = RequestSession("site-1", new_id=_ids())
    _handle, request = _asked(session)
    sid = new_stream_id()
    assert session.receive(*_from("server", _offer(sid)), 1.0) == [HoldOffer(sid)]
    reply = Reply(request_id=request.request_id, ok=True, stream_id=sid)
    ack, take = session.receive(*_from("server", reply), 1.0)
    assert ack == Ack()
    assert isinstance(take, TakeOffer)
    assert take.held


def test_held_offers_are_bounded_and_dropped_when_nobody_can_claim_them() -> None:
    session = RequestSession("site-1", new_id=_ids())
    handle, _ = _asked(session)
    held = [new_stream_id() for _ in range(MAX_EARLY)]
    for sid in held:
        assert session.receive(*_from("server", _offer(sid)), 1.0) == [HoldOffer(sid)]
    [too_many] = session.receive(*_from("server", _offer(new_stream_id())), 1.0)
    assert isinstance(too_many, Reject)
    dropped = session.finish(handle)
    assert [d.stream_id for d in dropped if isinstance(d, DropHeld)] == held


def test_only_the_owner_asked_can_answer() -> None:
    """site-2 (which may publish only keys naming itself) sends a reply, an offer and an abort
    for site-1's request to the server: none counts, and the real reply still does."""
    session = RequestSession("site-1", new_id=_ids())
    handle, request = _asked(session)
    sid = new_stream_id()
    forged_reply = Reply(request_id=request.request_id, ok=False, code=FailureCode.NOT_FOUND)
    [reject] = session.receive(*_from("site-2", forged_reply), 1.0)
    assert isinstance(reject, Reject)
    assert "came with key" in reject.reason
    [reject] = session.receive(*_from("site-2", _offer(sid, sender="site-2")), 1.0)
    assert isinstance(reject, Reject)
    # The right key but another user (no topic permissions, per-site users): forged too.
    typ, headers, env = _from("server", forged_reply)
    [reject] = session.receive(typ, headers, Envelope(env.routing_key, "site-2"), 1.0)
    assert isinstance(reject, Reject)
    assert session.state(handle).error is None
    reply = Reply(request_id=request.request_id, ok=True, stream_id=sid)
    assert session.receive(*_from("server", reply), 1.0) == [Ack()]
    [reject] = session.receive(*_from("site-2", Abort(stream_id=sid, reason="x")), 1.0)
    assert isinstance(reject, Reject)
    assert session.state(handle).error is None


def test_a_refusal_and_an_abort_before_the_offer_fail_at_once() -> None:
    session = RequestSession("site-1", new_id=_ids())
    handle, request = _asked(session)
    refusal = Reply(
        request_id=request.request_id,
        ok=False,
        code=FailureCode.NOT_FOUND,
        detail="no container 'm'",
    )
    session.receive(*_from("server", refusal), 1.0)
    error = session.state(handle).error
    assert isinstance(error, Refused)
    assert (error.code, error.site) == (FailureCode.NOT_FOUND, "server")
    handle, request = _asked(session)
    sid = new_stream_id()
    session.receive(
        *_from("server", Reply(request_id=request.request_id, ok=True, stream_id=sid)), 1.0
    )
    session.receive(*_from("server", Abort(stream_id=sid, reason="gone")), 1.0)
    aborted = session.state(handle).error
    assert isinstance(aborted, TransferFailed)
    assert aborted.code is FailureCode.ABORTED


def test_no_reply_and_no_offer_time_out_naming_the_site() -> None:
    session = RequestSession("site-1", new_id=_ids())
    handle, request = _asked(session)
    session.tick(10.5)
    error = session.state(handle).error
    assert isinstance(error, TimedOut)
    assert "site 'server' did not answer the request for 'm'" in str(error)
    handle, request = _asked(session)
    session.receive(
        *_from("server", Reply(request_id=request.request_id, ok=True, stream_id=new_stream_id())),
        1.0,
    )
    session.tick(11.0)
    assert "the accepted stream never started" in str(session.state(handle).error)


def test_a_reconnect_publishes_again_and_asks_again_a_limited_number_of_times() -> None:
    session = RequestSession("site-1", new_id=_ids())
    _unanswered, first = _asked(session)
    promised, second = _asked(session, owner="site-3")
    session.receive(
        *_from("site-3", Reply(request_id=second.request_id, ok=True, stream_id=new_stream_id())),
        1.0,
    )
    again = [a for a in session.reconnected(2.0) if isinstance(a, PublishRequest)]
    assert [(a.owner, a.request.request_id == first.request_id) for a in again] == [
        ("server", True),  # the same request, published again
        ("site-3", False),  # asked again: the offer was on the lost queue
    ]
    for _ in range(MAX_ASKS):
        retrieval = session.state(promised)
        session.receive(
            *_from(
                "site-3",
                Reply(request_id=retrieval.request.request_id, ok=True, stream_id=new_stream_id()),
            ),
            3.0,
        )
        session.reconnected(4.0)
    assert session.state(promised).asks == MAX_ASKS


def test_a_kept_prefix_makes_a_resuming_request() -> None:
    session = RequestSession("site-1", new_id=_ids())
    _, request = _asked(session, kept=Kept("server", 4096, 3, 3 * 4096), prefix_sha256="0" * 64)
    assert request.kind == "container"
    assert request.resume_from == 0  # containers do not resume
    _handle, actions = session.ask(
        "file",
        "f",
        "server",
        timeout=5.0,
        now=0.0,
        kept=Kept("server", 4096, 3, 3 * 4096),
        prefix_sha256="0" * 64,
    )
    [publish] = actions
    assert isinstance(publish, PublishRequest)
    assert (publish.request.resume_from, publish.request.chunk_size) == (3, 4096)


# -- the owner --------------------------------------------------------------------------------


def _serve(**options: Any) -> ServeSession:
    values: dict[str, Any] = {
        "site": "server",
        "slots": Slots(4, 0.5),
        "max_object_size": 1000,
        "new_id": _ids(),
    }
    return ServeSession(**{**values, **options})


def _request(requester: str = "site-1", **fields: Any) -> tuple[str, dict[str, Any], Envelope]:
    user = fields.pop("user", requester)
    request = Request(
        request_id=new_stream_id(),
        kind=fields.pop("kind", "container"),
        name=fields.pop("name", "m"),
        requester=requester,
        **fields,
    )
    env = Envelope("serve:server", user, f"reply:{requester}:{QID}")
    return "request", to_headers(request), env


def _looked_up(session: ServeSession, message: Any, found: Found | Missing) -> list[Any]:
    [lookup] = session.request(*message)
    assert isinstance(lookup, LookUp)
    return session.looked_up(lookup, found)


def test_a_request_is_looked_up_then_started_with_a_reply_naming_the_stream() -> None:
    session = _serve()
    reply, start = _looked_up(session, _request(), Found(3, 1))
    assert isinstance(reply, SendReply)
    assert isinstance(start, Start)
    assert reply.reply.ok
    assert reply.reply.stream_id == start.stream_id
    assert reply.reply_to == f"reply:site-1:{QID}"
    assert start.shared


@pytest.mark.parametrize(
    ("found", "code"),
    [
        (Missing(Absent.NOT_SERVED, "no container 'm'"), FailureCode.NOT_FOUND),
        (Missing(Absent.OUTSIDE, "'../x' is outside"), FailureCode.OUTSIDE_SOURCE_DIR),
        (Missing(Absent.UNREADABLE, "cannot read: File name too long"), FailureCode.NOT_FOUND),
        (Found(3, 1, allow=frozenset({"alice"})), FailureCode.FORBIDDEN),
        (Found(5000, 1), FailureCode.TOO_LARGE),
    ],
)
def test_refusals_by_what_was_found(found: Found | Missing, code: FailureCode) -> None:
    [reply] = _looked_up(_serve(), _request(), found)
    assert isinstance(reply, SendReply)
    assert (reply.reply.ok, reply.reply.code) == (False, code)


def test_a_requester_claiming_another_site_is_refused_forbidden() -> None:
    [reply] = _serve().request(*_request("site-1", user="site-2"))
    assert isinstance(reply, SendReply)
    assert reply.reply.code is FailureCode.FORBIDDEN


def test_a_reply_to_of_another_site_is_dead_lettered() -> None:
    typ, headers, env = _request()
    forged = Envelope(env.routing_key, env.user_id, f"reply:site-2:{QID}")
    [reject] = _serve().request(typ, headers, forged)
    assert isinstance(reject, ServeReject)


def test_an_unknown_kind_or_version_is_answered_not_left_to_time_out() -> None:
    typ, headers, env = _request()
    [reply] = _serve().request(typ, {**headers, "kind": "table"}, env)
    assert isinstance(reply, SendReply)
    assert reply.reply.code is FailureCode.UNSUPPORTED
    [reply] = _serve().request(typ, {**headers, "objstream": 3}, env)
    assert isinstance(reply, SendReply)
    assert reply.reply.code is FailureCode.UNSUPPORTED_VERSION


def test_resumes_of_containers_or_in_tiny_chunks_are_unsupported() -> None:
    session = _serve()
    [reply] = session.request(*_request(resume_from=1, chunk_size=4096, prefix_sha256="0" * 64))
    assert isinstance(reply, SendReply)
    assert reply.reply.code is FailureCode.UNSUPPORTED
    tiny = _request(kind="file", name="f", resume_from=1, chunk_size=16, prefix_sha256="0" * 64)
    [reply] = session.request(*tiny)
    assert isinstance(reply, SendReply)
    assert reply.reply.code is FailureCode.UNSUPPORTED


def test_one_user_holds_at_most_its_share_of_serving_slots() -> None:
    """4 slots, share 0.5: a flooder gets 2 streams and then busy; another site still gets
    one, at once."""
    session = _serve()
    names = iter(range(100))
    started = [
        _looked_up(session, _request("site-2", name=f"f{next(names)}"), Found(3, 1))
        for _ in range(3)
    ]
    assert [type(a[-1]).__name__ for a in started] == ["Start", "Start", "SendReply"]
    assert started[2][-1].reply.code is FailureCode.BUSY
    assert isinstance(_looked_up(session, _request("site-1", name="g"), Found(3, 1))[-1], Start)
    first = started[0][-1]
    session.ended(first.stream_id)
    assert isinstance(_looked_up(session, _request("site-2", name="h"), Found(3, 1))[-1], Start)


def test_requests_for_one_object_join_its_stream_and_a_failed_join_starts_another() -> None:
    session = _serve()
    _, start = _looked_up(session, _request("site-1"), Found(3, 1))
    [join] = _looked_up(session, _request("site-2"), Found(3, 1))
    assert isinstance(join, Join)
    assert join.stream_id == start.stream_id
    assert join.reply.stream_id == start.stream_id
    assert session.joined == 1
    again = _looked_up(session, _request("site-2"), Found(3, 1))  # site-2 is in it already
    assert isinstance(again[-1], Start)  # on its own
    reply, own = session.join_failed(join)
    assert isinstance(reply, SendReply)
    assert isinstance(own, Start)
    assert own.stream_id != start.stream_id
    assert reply.reply.stream_id == own.stream_id


def test_a_request_for_some_entries_neither_joins_nor_is_joined() -> None:
    """A stream of selected entries carries another container than the whole one: requests
    for the whole container do not share it, nor it theirs."""
    session = _serve()
    _, whole = _looked_up(session, _request("site-1"), Found(3, 2))
    some = _looked_up(session, _request("site-2", keys=["a*"]), Found(2, 1))
    assert isinstance(some[-1], Start)
    assert some[-1].stream_id != whole.stream_id
    session.ended(whole.stream_id)
    _, first = _looked_up(session, _request("site-1", keys=["a*"]), Found(2, 1))
    later = _looked_up(session, _request("site-3"), Found(3, 2))
    assert isinstance(later[-1], Start)
    assert later[-1].stream_id != first.stream_id
    assert session.joined == 0
