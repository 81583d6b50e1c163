"""Offer admission, identities and fair shares of slots: every refusal a receiving site gives an
offer, decided in one place without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from objstream.common.admission import (
    Accept,
    Admission,
    Asked,
    Hold,
    Ignore,
    Kept,
    Refuse,
    Reject,
    continues,
)
from objstream.common.errors import FailureCode
from objstream.common.identity import Forged, Identities, answer_publisher
from objstream.common.protocol import Envelope, Offer, new_stream_id, to_headers
from objstream.common.slots import Room, Slots

QID = "a" * 32
KEY = "offer:site-1"


def _offer(**fields: Any) -> Offer:
    values: dict[str, Any] = {
        "stream_id": new_stream_id(),
        "kind": "file",
        "name": "f.bin",
        "size": 10,
        "chunk_size": 4,
        "chunk_count": 3,
        "window": 4,
        "sender": "server",
        "target": "site-1",
    }
    return Offer(**{**values, **fields})


def _envelope(
    user: str | None = "server", reply_to: str | None = f"reply:server:{QID}", key: str = KEY
) -> Envelope:
    return Envelope(key, user, reply_to, 0)


def _admission(**options: Any) -> Admission:
    values: dict[str, Any] = {
        "site": "site-1",
        "kinds": frozenset({"file", "container"}),
        "max_object_size": 1000,
    }
    return Admission(**{**values, **options})


def _push(admission: Admission, offer: Offer, envelope: Envelope, **options: Any) -> Any:
    options.setdefault("known", lambda sid: False)
    return admission.push("offer", to_headers(offer), envelope, **options)


def test_a_good_offer_is_accepted_with_its_reply_to_and_user() -> None:
    offer = _offer()
    decision = _push(_admission(), offer, _envelope())
    assert decision == Accept(offer, f"reply:server:{QID}", "server", holder="")


@pytest.mark.parametrize(
    ("envelope", "why"),
    [
        (_envelope(key="offer:site-2"), "with key 'offer:site-2' in an inbox"),
        (_envelope(reply_to=None), "without reply_to"),
        (_envelope(reply_to="amq.rabbitmq.reply-to"), "not reply:SITE:QID"),
        (_envelope(reply_to=f"reply:site-2:{QID}"), "with reply_to 'reply:site-2:"),
        (_envelope(user=None), "without user_id"),
        (Envelope(KEY, "server", f"reply:server:{QID}", 5), "5-byte body"),
    ],
)
def test_an_offer_that_cannot_be_answered_safely_is_dead_lettered(
    envelope: Envelope, why: str
) -> None:
    decision = _push(_admission(), _offer(), envelope)
    assert isinstance(decision, Reject)
    assert why in decision.reason


def test_an_offer_for_another_site_is_dead_lettered() -> None:
    decision = _push(_admission(), _offer(target="site-2"), _envelope())
    assert isinstance(decision, Reject)
    assert "offer for site 'site-2' reached site 'site-1'" in decision.reason


def test_no_message_at_all_is_dead_lettered_with_the_parse_error() -> None:
    decision = _admission().push("offer", {"objstream": 1}, _envelope(), known=lambda s: False)
    assert isinstance(decision, Reject)
    assert "unsupported_version" in decision.reason


def test_a_user_claiming_another_site_is_refused_forbidden() -> None:
    """site-2's user claims to be the server: refused, so nothing is ever recorded as the
    server's; the refusal names both."""
    decision = _push(_admission(), _offer(), _envelope(user="site-2"))
    assert isinstance(decision, Refuse)
    assert decision.code is FailureCode.FORBIDDEN
    assert "claims site 'server' but was published by broker user 'site-2'" in decision.detail
    assert decision.verdict("site-1").code is FailureCode.FORBIDDEN


def test_mapped_and_shared_users_speak_for_their_sites() -> None:
    identities = Identities.of({"server": "srv"}, shared_users=("ops",))
    admission = _admission(identities=identities)
    assert isinstance(_push(admission, _offer(), _envelope(user="srv")), Accept)
    assert isinstance(_push(admission, _offer(), _envelope(user="ops")), Accept)
    assert isinstance(_push(admission, _offer(), _envelope(user="server")), Refuse)


def test_a_duplicate_is_ignored_after_the_identity_check() -> None:
    offer = _offer()
    decision = _push(_admission(), offer, _envelope(), known=lambda sid: sid == offer.stream_id)
    assert isinstance(decision, Ignore)


def test_accept_from_refuses_other_users() -> None:
    admission = _admission(accept_from=("alice",), identities=Identities.of({"server": "bob"}))
    decision = _push(admission, _offer(), _envelope(user="bob"))
    assert isinstance(decision, Refuse)
    assert decision.code is FailureCode.FORBIDDEN
    assert "takes pushes only from broker users alice, not from 'bob'" in decision.detail
    assert admission.take_over(_offer(), "bob", pushed=True) == decision.detail
    assert admission.take_over(_offer(), "bob", pushed=False) is None  # a retrieval of ours


def test_too_large_and_unknown_kinds_are_refused() -> None:
    big = _push(_admission(), _offer(size=2000, chunk_count=500), _envelope())
    assert isinstance(big, Refuse)
    assert big.code is FailureCode.TOO_LARGE
    odd = _push(_admission(), _offer(kind="records", size=None, chunk_count=None), _envelope())
    assert isinstance(odd, Refuse)
    assert odd.code is FailureCode.REFUSED


def test_a_push_that_resumes_what_is_not_kept_is_refused_protocol() -> None:
    decision = _push(_admission(), _offer(resume_from=1), _envelope())
    assert isinstance(decision, Refuse)
    assert decision.code is FailureCode.PROTOCOL


def test_a_retrieval_offer_must_come_from_the_owner_asked() -> None:
    admission = _admission()
    offer = _offer()
    answer = Envelope(f"reply:site-1:{QID}:server", "server", f"reply:server:{QID}", 0)
    asked = Asked("server")
    assert isinstance(admission.retrieval(offer, answer, asked, known=lambda s: False), Accept)
    by_site2 = Envelope(f"reply:site-1:{QID}:site-2", "site-2", f"reply:server:{QID}", 0)
    decision = admission.retrieval(offer, by_site2, asked, known=lambda s: False)
    assert isinstance(decision, Reject)
    assert "came with key" in decision.reason


def test_a_resumed_offer_must_continue_exactly_what_is_kept() -> None:
    kept = Kept("server", chunk_size=4, stored=2, stored_bytes=8)
    admission = _admission()
    answer = Envelope(f"reply:site-1:{QID}:server", "server", f"reply:server:{QID}", 0)
    good = _offer(resume_from=2)
    assert continues(kept, good)
    decision = admission.retrieval(good, answer, Asked("server", kept), known=lambda s: False)
    assert isinstance(decision, Accept)
    assert not decision.drop_kept
    whole = admission.retrieval(_offer(), answer, Asked("server", kept), known=lambda s: False)
    assert isinstance(whole, Accept)
    assert whole.drop_kept  # it comes whole: the prefix is no use
    other = _offer(resume_from=1)
    refused = admission.retrieval(other, answer, Asked("server", kept), known=lambda s: False)
    assert isinstance(refused, Refuse)
    assert refused.code is FailureCode.PROTOCOL


def test_storage_failures_are_classified() -> None:
    admission = _admission()
    offer = _offer()
    io = admission.storage_failed(offer, "r", "u", OSError(28, "No space left on device"))
    assert (io.code, "No space left" in io.detail) == (FailureCode.IO, True)
    other = admission.storage_failed(offer, "r", "u", RuntimeError("x"))
    assert other.code is FailureCode.REFUSED


# -- identities -----------------------------------------------------------------------------------


def test_an_answer_counts_only_with_the_key_and_user_of_its_site() -> None:
    identities = Identities()
    identities.check_answer("done", "site-1", f"reply:server:{QID}:site-1", "site-1")
    with pytest.raises(Forged, match="came with key"):
        identities.check_answer("done", "site-1", f"reply:server:{QID}:site-2", "site-2")
    with pytest.raises(Forged, match="published by broker user 'site-2'"):
        identities.check_answer("done", "site-1", f"reply:server:{QID}:site-1", "site-2")
    identities.check_answer("done", "site-1", f"reply:server:{QID}:site-1", "guest")  # shared
    assert answer_publisher(f"reply:server:{QID}:a.b") == "a.b"
    assert answer_publisher("data:x:y") is None


def test_a_share_is_counted_per_user_or_per_site_of_a_shared_user() -> None:
    identities = Identities()
    assert identities.principal("site-2", "server") == "site-2"
    assert identities.principal("guest", "server") != identities.principal("guest", "site-2")


# -- slots ----------------------------------------------------------------------------------------


def test_one_user_holds_at_most_its_share_then_waits_then_is_busy() -> None:
    slots = Slots(capacity=8, share=0.5, hold_capacity=8)
    for n in range(4):
        assert slots.room("flood") is Room.TAKE
        slots.take(f"s{n}", "flood")
    assert slots.room("flood") is Room.HOLD  # over its share, with free slots
    for _ in range(4):
        slots.hold("flood")
    assert slots.room("flood") is Room.BUSY  # its share of the waiting room is full too
    assert slots.room("honest") is Room.TAKE  # the others are not held up
    assert "holds 4 of 8 streams" in slots.describe("flood")
    slots.release("s0")
    assert slots.room("flood", waiting=True) is Room.TAKE


def test_a_full_site_holds_offers_and_a_serving_site_refuses() -> None:
    receiving = Slots(capacity=1, share=0.5, hold_capacity=4)
    receiving.take("a", "one")
    assert receiving.full
    assert receiving.room("two") is Room.HOLD
    serving = Slots(capacity=1, share=0.5)
    serving.take("a", "one")
    assert serving.room("two") is Room.BUSY  # no waiting room: busy at once


def test_an_offer_over_its_users_share_is_held_and_refused_beyond() -> None:
    admission = _admission()
    slots = Slots(capacity=2, share=0.5, hold_capacity=2)
    first = _push(admission, _offer(), _envelope(), slots=slots)
    assert isinstance(first, Accept)
    slots.take(first.offer.stream_id, first.holder)
    second = _push(admission, _offer(), _envelope(), slots=slots)
    assert isinstance(second, Hold)
    slots.hold(second.holder)
    third = _push(admission, _offer(), _envelope(), slots=slots)
    assert isinstance(third, Refuse)
    assert third.code is FailureCode.BUSY


def test_an_offer_of_another_version_is_answered_when_it_can_be() -> None:
    """The sender learns at once why (``unsupported_version``) instead of timing out; an
    offer that names no stream id or sender its reply_to agrees with is only dead-lettered."""
    sid = new_stream_id()
    v1 = {"objstream": 1, "stream_id": sid, "sender": "server"}
    decision = _admission().push("offer", v1, _envelope(), known=lambda s: False)
    assert isinstance(decision, Refuse)
    assert (decision.stream_id, decision.code) == (sid, FailureCode.UNSUPPORTED_VERSION)
    assert "protocol version 1, this peer speaks 2" in decision.detail
    unanswerable = _admission().push(
        "offer", {**v1, "sender": "site-9"}, _envelope(), known=lambda s: False
    )
    assert isinstance(unanswerable, Reject)


def test_an_abort_in_the_inbox_withdraws_only_for_the_user_of_the_offer() -> None:
    """A sender that gave up before the receiver answered says so where its offer went; only
    the broker user its offer came from may end a stream that way."""
    from objstream.common.admission import Withdraw
    from objstream.common.protocol import Abort

    sid = _offer().stream_id
    abort = Abort(stream_id=sid, reason="site server was interrupted")
    decision = _admission().push(
        "abort", to_headers(abort), _envelope(user="server"), known=lambda s: False
    )
    assert decision == Withdraw(sid, "server", "site server was interrupted")
    assert Admission.withdraws(decision, "server")
    assert not Admission.withdraws(decision, "site-2")  # another site's offer
    assert not Admission.withdraws(decision, None)
    forged = _admission().push(
        "abort", to_headers(abort), _envelope(key="offer:site-2"), known=lambda s: False
    )
    assert isinstance(forged, Reject)  # not this inbox's key
