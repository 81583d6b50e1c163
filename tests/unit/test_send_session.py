"""The pure send session (protocol v2): one stream id, a broadcast with riders, unicast catch-up,
windows, resends, timeouts, verdicts, cancel; no broker, no source."""

from __future__ import annotations

import pytest

from objstream.common.errors import FailureCode, ProtocolError, TimedOut
from objstream.common.identity import Forged
from objstream.common.protocol import Done, End, Inline, Message, Progress, new_stream_id
from objstream.common.send_session import SendSession
from objstream.common.send_table import (
    TRANSITIONS,
    Action,
    NewChannel,
    Pacing,
    Plan,
    PublishAbort,
    PublishChunk,
    PublishEnd,
    PublishOffer,
    ReleaseBefore,
    ReportProgress,
    SourceFacts,
    TargetEvent,
    TargetFinished,
    TargetState,
    fits_inline,
)

SHA = "0" * 64
QID = "1" * 32


def _facts(
    count: int | None = 10, random_access: bool = True, size: int | None = None
) -> SourceFacts:
    if size is None and count is not None:
        size = count * 100
    return SourceFacts("file" if random_access else "records", "x", 100, size, count,
                       random_access)  # fmt: skip


def _session(
    sites: tuple[str, ...] = ("a",),
    facts: SourceFacts | None = None,
    window: int = 4,
    timeout: float = 30.0,
    resend_after: float = 5.0,
    start: int = 0,
    inline: Inline | None = None,
) -> tuple[SendSession, str, list[Action]]:
    sid = new_stream_id()
    session = SendSession.create(
        facts or _facts(),
        sites,
        stream_id=sid,
        sender="me",
        pacing=Pacing(window, timeout, resend_after),
        plan=Plan(start, inline),
        now=0.0,
    )
    return session, sid, session.start_actions()


def _target(session: SendSession, site: str) -> TargetState:
    return next(t.state for t in session.targets if t.site == site)


def _chunks(actions: list[Action], to: str | None = None) -> list[int]:
    """Seqs of the chunks published to ``to`` (None: broadcast)."""
    return [a.seq for a in actions if isinstance(a, PublishChunk) and a.to == to]


def _drain(session: SendSession, rounds: int = 100) -> list[Action]:
    """Call next_publications until nothing more goes out."""
    out: list[Action] = []
    for _ in range(rounds):
        step = session.next_publications()
        if not step:
            break
        out += step
    return out


def _progress(
    session: SendSession,
    site: str,
    stored: int,
    now: float,
    resend_from: int | None = None,
) -> list[Action]:
    message = Progress(stream_id=session.stream_id, site=site, stored=stored,
                       resend_from=resend_from)  # fmt: skip
    return _answer(session, message, now)


def _answer(session: SendSession, message: Message, now: float) -> list[Action]:
    """``message`` as it arrives from the site it names: with the key only that site's user may
    publish (``reply:me:QID:SITE``), from the user of that site."""
    site = getattr(message, "site", "x")
    key = f"reply:me:{QID}:{site}"
    return session.receive(message, now, key=key, user=site)


def _done(sid: str, ok: bool = True, site: str = "a", **kw: object) -> Done:
    return Done(stream_id=sid, site=site, ok=ok, **kw)


def test_one_stream_id_one_offer_per_target_and_nothing_before_contact() -> None:
    session, sid, actions = _session(("a", "b"))
    assert [type(a) for a in actions] == [PublishOffer, PublishOffer]
    offers = [a.offer for a in actions if isinstance(a, PublishOffer)]
    assert [o.stream_id for o in offers] == [sid, sid]
    assert [o.target for o in offers] == ["a", "b"]
    assert offers[0].sender == "me"
    assert offers[0].window == 4
    assert actions[0].expiration_ms == 30000  # type: ignore[union-attr]
    assert _drain(session) == []  # nobody made contact: their queues may not exist yet
    _progress(session, "a", 0, 1.0)
    assert _drain(session) == []  # b may still come: wait for it (up to resend_after)
    _progress(session, "b", 0, 1.5)
    assert _chunks(_drain(session)) == [0, 1, 2, 3]  # one broadcast, both ride


def test_the_broadcast_goes_at_the_pace_of_the_slowest_rider() -> None:
    session, _sid, _ = _session(("a", "b"), window=4)
    _progress(session, "a", 0, 0.1)
    _progress(session, "b", 0, 0.1)
    assert _chunks(_drain(session)) == [0, 1, 2, 3]
    _progress(session, "a", 4, 0.2)
    assert _drain(session) == []
    _progress(session, "b", 2, 0.2)
    assert _chunks(_drain(session)) == [4, 5]
    _progress(session, "a", 10, 0.3)
    _progress(session, "b", 10, 0.3)
    sent = _drain(session)
    assert _chunks(sent) == [6, 7, 8, 9]
    assert sent[-1] == PublishEnd()  # the end, broadcast to the riders
    assert _target(session, "a") is _target(session, "b") is TargetState.ENDED


def test_a_silent_target_delays_the_start_by_resend_after_and_fails_alone() -> None:
    session, sid, _ = _session(("a", "b"), window=2, timeout=30.0, resend_after=5.0)
    _progress(session, "a", 0, 1.0)
    assert session.tick(4.0) == []
    assert _drain(session) == []
    session.tick(5.5)  # b had its resend_after: a goes on alone
    assert _chunks(_drain(session)) == [0, 1]
    actions: list[Action] = []
    for t in range(6, 40):
        _progress(session, "a", min(10, 2 * (t - 5)), float(t))
        actions = session.tick(float(t))
        assert not any(a for a in _drain(session) if getattr(a, "to", None) == "b")
        if actions:
            break
    assert t == 31
    [finished] = actions  # never made contact: no queue, nothing to abort
    assert isinstance(finished, TargetFinished)
    assert isinstance(finished.error, TimedOut)
    assert "never took the offer" in finished.error.detail
    assert _target(session, "a") is not TargetState.FAILED
    assert _target(session, "b") is TargetState.FAILED
    _answer(session, _done(sid, site="a"), 32.0)
    assert session.finished


def test_a_late_target_catches_up_by_unicast_then_rides() -> None:
    session, _sid, _ = _session(("a", "b"), window=3, resend_after=5.0)
    _progress(session, "a", 0, 1.0)
    session.tick(6.0)
    assert _chunks(_drain(session)) == [0, 1, 2]
    _progress(session, "a", 3, 6.1)
    assert _chunks(_drain(session)) == [3, 4, 5]
    _progress(session, "b", 0, 6.2)  # b comes late
    sent = _drain(session)
    assert _chunks(sent, "b") == [0, 1, 2]  # its own window, from its own position
    assert _chunks(sent) == []  # a's window is full
    _progress(session, "b", 3, 6.3)
    _progress(session, "a", 6, 6.3)
    sent = _drain(session)
    assert _chunks(sent, "b") == [3, 4, 5]  # up to the broadcast cursor, never beyond
    assert _chunks(sent) == []  # the broadcast waits for b to catch up
    b = next(t for t in session.targets if t.site == "b")
    assert not b.riding  # not before its window has room again
    _progress(session, "b", 6, 6.35)
    assert _chunks(_drain(session)) == [6, 7, 8]  # b rides from 6
    assert b.riding
    _progress(session, "a", 9, 6.4)
    _progress(session, "b", 9, 6.4)
    sent = _drain(session)
    assert _chunks(sent) == [9]
    assert sent[-1] == PublishEnd()
    assert not any(isinstance(a, PublishChunk | PublishEnd) and a.to for a in sent)


def test_a_resend_request_takes_a_rider_off_the_ride_until_it_catches_up() -> None:
    session, _sid, _ = _session(("a", "b"), window=4)
    _progress(session, "a", 0, 0.1)
    _progress(session, "b", 0, 0.1)
    assert _chunks(_drain(session)) == [0, 1, 2, 3]
    _progress(session, "a", 4, 0.2)
    _progress(session, "b", 1, 0.2, resend_from=1)  # b lost chunk 1
    sent = _drain(session)
    assert _chunks(sent, "b") == [1, 2, 3]  # to b alone: a does not get them again
    assert _chunks(sent) == [4]  # b caught up with the broadcast (which waited) and rides
    _progress(session, "b", 4, 0.3)
    sent = _drain(session)
    assert _chunks(sent, "b") == []
    assert _chunks(sent) == [5, 6, 7]
    _progress(session, "b", 8, 0.4)
    _progress(session, "a", 8, 0.4)
    sent = _drain(session)
    assert _chunks(sent) == [8, 9]
    assert sent[-1] == PublishEnd()


def test_a_rider_that_holds_the_others_back_leaves_the_ride() -> None:
    session, _sid, _ = _session(("a", "b"), window=2, resend_after=5.0, timeout=60.0)
    _progress(session, "a", 0, 0.0)
    _progress(session, "b", 0, 0.0)
    assert _chunks(_drain(session)) == [0, 1]
    t = 0.0
    for t in (1.0, 3.0, 5.0, 5.9):
        _progress(session, "a", 2, t)  # a would take more; b stays at 0 (alive: it reports)
        _progress(session, "b", 0, t)
        session.tick(t)
        assert _drain(session) == []
    _progress(session, "b", 0, 6.5)
    session.tick(6.5)  # b held a back for more than resend_after
    sent = _drain(session)
    assert _chunks(sent) == [2, 3]
    b = next(t for t in session.targets if t.site == "b")
    assert not b.riding
    assert b.next_seq == 2  # chunks 0 and 1 are in its queue already
    _progress(session, "a", 10, 7.0)
    assert _drain(session)[-1] == PublishEnd()  # a finishes at its own pace
    _progress(session, "b", 2, 7.5)
    assert _chunks(_drain(session), "b") == [2, 3]  # b goes on by unicast


def _lagging_session(
    window: int = 4, backlog: int = 8, count: int = 40
) -> tuple[SendSession, list[Action]]:
    sid = new_stream_id()
    session = SendSession.create(
        _facts(count=count),
        ("fast", "slow"),
        stream_id=sid,
        sender="me",
        pacing=Pacing(window, timeout=60.0, resend_after=5.0, backlog=backlog),
        plan=Plan(0, None),
        now=0.0,
    )
    return session, session.start_actions()


def test_a_slower_rider_lags_in_its_queue_instead_of_holding_the_others() -> None:
    session, _ = _lagging_session(window=4, backlog=8)
    _progress(session, "fast", 0, 0.0)
    _progress(session, "slow", 0, 0.0)
    assert _chunks(_drain(session)) == [0, 1, 2, 3]
    _progress(session, "fast", 4, 0.5)  # slow took nothing yet: its queue holds 0-3
    assert _chunks(_drain(session)) == [4, 5, 6, 7]  # fast's window, once, for both
    _progress(session, "fast", 8, 1.0)
    assert _chunks(_drain(session)) == []  # slow is 8 behind: what its queue holds
    _progress(session, "slow", 2, 1.5)
    assert _chunks(_drain(session)) == [8, 9]  # the broadcast follows fast, slow 8 behind
    assert all(t.riding for t in session.targets)  # nobody was dropped to unicast


def test_without_a_backlog_the_broadcast_goes_at_the_slowest_riders_pace() -> None:
    session, _ = _lagging_session(window=4, backlog=0)
    _progress(session, "fast", 0, 0.0)
    _progress(session, "slow", 0, 0.0)
    assert _chunks(_drain(session)) == [0, 1, 2, 3]
    _progress(session, "fast", 4, 0.5)
    assert _drain(session) == []


def test_a_steadily_slow_rider_beyond_its_lag_sets_the_pace_and_stays_on_the_ride() -> None:
    """It takes a chunk every quarter second: slow, not stuck. Dropping it to unicast would
    upload its part again and send the slow link duplicates of what its queue holds."""
    session, _ = _lagging_session(window=4, backlog=8, count=1000)
    _progress(session, "fast", 0, 0.0)
    _progress(session, "slow", 0, 0.0)
    published = _chunks(_drain(session))
    slow, t = 0, 0.0
    while t < 20.0:
        t += 0.25
        slow += 1
        _progress(session, "slow", slow, t)
        _progress(session, "fast", session.cursor, t)  # fast stores what it gets at once
        session.tick(t)
        published += _chunks(_drain(session))
        assert session.cursor <= slow + 8  # never beyond what slow's queue holds
    assert all(x.riding for x in session.targets)
    assert published == list(range(len(published)))  # every chunk once, by broadcast


def test_a_rider_stuck_at_its_lag_leaves_the_ride_after_resend_after() -> None:
    session, _ = _lagging_session(window=4, backlog=8, count=1000)
    _progress(session, "fast", 0, 0.0)
    _progress(session, "slow", 0, 0.0)
    _drain(session)
    for t in (0.5, 1.0):
        _progress(session, "fast", session.cursor, t)
        _drain(session)
    assert session.cursor == 8  # slow's lag
    for t in (2.0, 4.0, 6.0, 7.5):  # held since 2.0: more than resend_after at 7.5
        _progress(session, "slow", 0, t)  # alive, takes nothing
        _progress(session, "fast", session.cursor, t)
        session.tick(t)
        _drain(session)
    slow_row = next(x for x in session.targets if x.site == "slow")
    assert not slow_row.riding
    _progress(session, "fast", session.cursor, 8.0)
    assert len(_chunks(_drain(session))) == 4  # fast goes at its own pace


def test_a_target_that_spoke_and_went_silent_gets_a_unicast_abort() -> None:
    session, _sid, _ = _session(("a", "b"), timeout=10.0, resend_after=100.0)
    _progress(session, "a", 0, 1.0)
    _progress(session, "b", 0, 1.0)
    _drain(session)
    _progress(session, "a", 4, 10.0)
    actions = session.tick(11.5)
    [abort, finished] = actions
    assert isinstance(abort, PublishAbort)
    assert abort.to == "b"
    assert "timed out" in abort.reason
    assert isinstance(finished, TargetFinished)
    assert finished.error is not None
    assert finished.error.code is FailureCode.TIMEOUT
    assert "never" not in finished.error.detail
    assert _target(session, "a") is TargetState.SENDING


def test_resend_on_silence_only_after_contact() -> None:
    session, _sid, _ = _session(window=4, resend_after=5.0, timeout=30.0)
    assert session.tick(10.0) == []  # never spoke: nothing to resend
    _progress(session, "a", 0, 11.0)
    assert _chunks(_drain(session)) == [0, 1, 2, 3]
    _progress(session, "a", 1, 11.0)
    assert _chunks(_drain(session)) == [4]
    session.tick(15.0)
    assert _drain(session) == []  # 4 s quiet: not yet
    session.tick(16.5)
    assert _chunks(_drain(session), "a") == [1, 2, 3, 4]  # by unicast: it left the ride
    session.tick(17.0)
    assert _drain(session) == []  # resent 0.5 s ago: not again so soon


def test_a_target_that_stored_all_it_was_sent_is_not_silent_while_the_sender_holds_back() -> None:
    """A rate limit (or a slow source) can keep the sender from publishing for longer than
    resend_after, even the timeout: the target, owed nothing, is neither resent to nor timed
    out; its silence counts again from the next publication."""
    session, _sid, _ = _session(window=4, resend_after=5.0, timeout=30.0)
    _progress(session, "a", 0, 1.0)
    assert _chunks(session.next_publications()) == [0]  # one chunk, then the driver waits
    _progress(session, "a", 1, 2.0)  # stored all it got
    assert session.tick(40.0) == []  # 38 s later: no resend, no timeout
    assert _target(session, "a") is TargetState.SENDING
    assert _chunks(session.next_publications()) == [1]  # published at 40.0, never stored
    assert session.tick(44.0) == []
    session.tick(45.5)
    assert _chunks(_drain(session), "a") == [1]  # silent 5.5 s since: resent


def test_a_target_silent_through_two_resends_gets_a_new_publishing_channel() -> None:
    """A resend that brought nothing back: publish on a new channel (a channel opened during a
    quorum queue's leader election could route nothing more to it), at most every 2 resends."""
    session, _sid, _ = _session(("a", "b"), window=4, resend_after=5.0, timeout=60.0)
    _progress(session, "a", 0, 1.0)
    _progress(session, "b", 0, 1.0)
    _drain(session)
    _progress(session, "b", 4, 6.5)  # b talks, a is silent from 1.0
    assert not [a for a in session.tick(6.5) if isinstance(a, NewChannel)]  # first resend
    _drain(session)
    _progress(session, "b", 4, 11.6)
    assert [a for a in session.tick(11.6) if isinstance(a, NewChannel)] == [NewChannel("a")]
    _drain(session)
    _progress(session, "b", 4, 16.7)
    assert not [a for a in session.tick(16.7) if isinstance(a, NewChannel)]  # 5 s after: no
    _drain(session)
    _progress(session, "b", 4, 21.8)
    assert [a for a in session.tick(21.8) if isinstance(a, NewChannel)] == [NewChannel("a")]
    _progress(session, "a", 4, 22.0)  # a talks again: its silence is over
    _drain(session)
    assert not [a for a in session.tick(28.0) if isinstance(a, NewChannel)]  # one resend


def test_the_end_goes_by_unicast_to_a_target_off_the_ride() -> None:
    session, _sid, _ = _session(("a", "b"), facts=_facts(count=3), window=8)
    _progress(session, "a", 0, 0.1)
    _progress(session, "b", 0, 0.1)
    sent = _drain(session)
    assert _chunks(sent) == [0, 1, 2]
    assert sent[-1] == PublishEnd()
    _progress(session, "b", 1, 0.2, resend_from=1)
    assert _target(session, "b") is TargetState.SENDING
    sent = _drain(session)
    assert _chunks(sent, "b") == [1, 2]
    assert sent[-1] == PublishEnd("b")
    assert _target(session, "b") is TargetState.ENDED


def test_done_ok_finishes_the_target() -> None:
    session, sid, _ = _session()
    _progress(session, "a", 0, 0.1)
    _drain(session)
    actions = _answer(session, _done(sid, stored_as="x"), 3.0)
    assert actions == [
        ReportProgress("a", sid, 0, complete=True),
        TargetFinished("a", sid, None, "x"),
    ]
    assert session.finished
    assert _progress(session, "a", 10, 4.0) == []  # late replies are not errors
    other = Progress(stream_id=new_stream_id(), site="a", stored=1)
    assert _answer(session, other, 4.0) == []  # another stream's: ignored


def test_a_refusal_fails_the_target_alone() -> None:
    session, sid, _ = _session(("a", "b"))
    actions = _answer(session, _done(sid, ok=False, code=FailureCode.REFUSED, detail="no"), 1.0)
    [finished] = actions  # the receiver deletes its own queue (the sender may not)
    assert isinstance(finished, TargetFinished)
    assert finished.error is not None
    assert finished.error.code is FailureCode.REFUSED
    assert finished.error.detail == "no"
    _progress(session, "b", 0, 1.1)
    assert _chunks(_drain(session)) == [0, 1, 2, 3]  # no need to wait for a anymore


def test_cancel_aborts_the_contacted_by_unicast_and_the_others_where_their_offer_went() -> None:
    """b has not answered: its offer may still wait in its inbox (or its first report be on
    the way), so its abort goes there too, void when the offer would be."""
    session, _sid, _ = _session(("a", "b"), timeout=30.0)
    _progress(session, "a", 0, 1.0)
    actions = session.cancel("site me is shutting down")
    # The reason alone, not "transfer X with site 'a' failed (aborted): ...": the receiver
    # words its own failure around it.
    assert actions[0] == PublishAbort("a", "site me is shutting down")
    [to_b] = [a for a in actions if isinstance(a, PublishAbort) and a.to == "b"]
    assert (to_b.where_offered, to_b.expiration_ms) == (True, 30_000)
    errors = [a.error for a in actions if isinstance(a, TargetFinished)]
    assert [e.code for e in errors if e] == [FailureCode.ABORTED] * 2
    assert session.finished
    assert session.next_publications() == []


def test_a_target_added_mid_stream_gets_it_from_the_start() -> None:
    session, sid, _ = _session(("a",), window=4)
    _progress(session, "a", 0, 0.1)
    _drain(session)
    _progress(session, "a", 4, 0.2)
    _drain(session)
    [offer] = session.add_target("b", 0.3)
    assert isinstance(offer, PublishOffer)
    assert offer.offer.stream_id == sid
    assert offer.offer.target == "b"
    with pytest.raises(ValueError, match="already"):
        session.add_target("b", 0.3)
    _progress(session, "b", 0, 0.4)
    assert _chunks(_drain(session), "b") == [0, 1, 2, 3]
    _progress(session, "b", 4, 0.5)
    _progress(session, "a", 8, 0.5)
    sent = _drain(session)
    assert _chunks(sent, "b") == [4, 5, 6, 7]
    assert _chunks(sent) == []  # the broadcast waits while b catches up
    _progress(session, "b", 8, 0.6)
    sent = _drain(session)
    assert _chunks(sent) == [8, 9]  # b joined at 8
    assert sent[-1] == PublishEnd()
    _answer(session, _done(sid, site="a"), 1.0)
    _answer(session, _done(sid, site="b"), 1.0)
    assert session.finished
    with pytest.raises(ValueError, match="over"):
        session.add_target("c", 2.0)


def test_lockstep_starts_without_a_silent_target_and_holds_to_its_window() -> None:
    """An iterator source starts after resend_after too (a receiver lets go of a slot whose
    sender sends nothing soon), but it keeps every piece from the silent target's position,
    and nobody gets beyond one window of it until it makes contact or fails."""
    session, _sid, _ = _session(("a", "b"), facts=_facts(count=None, random_access=False), window=3)
    assert session.lockstep
    _progress(session, "a", 0, 1.0)
    assert _drain(session) == []  # b may still come: wait for it (up to resend_after)
    session.tick(6.0)  # past resend_after: a gets a window, b holds it there
    assert _chunks(_drain(session)) == [0, 1, 2]
    _progress(session, "a", 3, 6.5)
    assert _drain(session) == []  # b stored nothing: nothing beyond its window
    with pytest.raises(ValueError, match="cannot go back"):
        session.add_target("c", 7.0)
    _progress(session, "b", 0, 20.5)  # b at last: it catches up by unicast from 0
    actions = _drain(session)
    assert _chunks(actions, "b") == [0, 1, 2]
    assert ReleaseBefore(3) not in actions  # b stored nothing yet: every piece is kept
    _progress(session, "b", 2, 21.0)
    actions = _drain(session)
    assert actions[0] == ReleaseBefore(2)


def test_lockstep_unicast_never_needs_a_released_piece() -> None:
    session, _sid, _ = _session(("a", "b"), facts=_facts(count=None, random_access=False), window=3)
    _progress(session, "a", 0, 1.0)
    _progress(session, "b", 0, 1.0)
    _drain(session)
    _progress(session, "a", 3, 1.1)
    _progress(session, "b", 1, 1.1, resend_from=1)
    actions = _drain(session)
    assert ReleaseBefore(1) in actions
    assert _chunks(actions, "b") == [1, 2]
    assert _chunks(actions) == [3]  # within a window of b, the slowest


def test_an_iterator_source_ends_when_the_driver_finds_its_end() -> None:
    session, _sid, _ = _session(facts=_facts(count=None, random_access=False), window=8)
    _progress(session, "a", 0, 0.1)
    assert _chunks(session.next_publications()) == [0]
    assert _chunks(session.next_publications()) == [1]  # the driver finds no piece 1
    session.source_ended(1)
    assert session.next_publications() == [PublishEnd()]
    with pytest.raises(ProtocolError):
        session.source_ended(2)


def test_a_resumed_stream_starts_at_the_kept_prefix() -> None:
    session, _sid, actions = _session(facts=_facts(count=10), start=6, window=8)
    [offer] = actions
    assert isinstance(offer, PublishOffer)
    assert offer.offer.resume_from == 6
    _progress(session, "a", 6, 0.1)
    sent = _drain(session)
    assert _chunks(sent) == [6, 7, 8, 9]
    assert sent[-1] == PublishEnd()


def test_an_inline_object_is_all_in_the_offer() -> None:
    facts = _facts(count=1, size=5)
    assert fits_inline(facts)
    assert not fits_inline(facts, start=1)
    assert not fits_inline(_facts(count=2, size=5))
    inline = Inline(crc32=1, sha256=SHA)
    session, _sid, actions = _session(("a", "b"), facts=facts, inline=inline, timeout=10.0)
    assert [a.offer.inline for a in actions if isinstance(a, PublishOffer)] == [inline] * 2
    _progress(session, "a", 0, 1.0)
    assert _drain(session) == []
    assert session.tick(9.0) == []  # no resend: there is nothing to resend
    finished = session.tick(10.5)  # no abort: there is no data queue
    assert all(isinstance(a, TargetFinished) and a.error for a in finished)


def test_reconnect_rewinds_the_broadcast_to_the_slowest_rider() -> None:
    session, _sid, _ = _session(("a", "b"), window=4, timeout=10.0)
    _progress(session, "a", 0, 0.1)
    _progress(session, "b", 0, 0.1)
    _drain(session)
    _progress(session, "a", 3, 1.0)
    _progress(session, "b", 2, 1.0)
    _drain(session)
    assert session.reconnected(9.0) == []
    assert _chunks(_drain(session)) == [2, 3, 4, 5]
    assert session.tick(15.0) == []  # quiet since the reconnect at 9, not since 1


def test_illegal_transitions_raise() -> None:
    assert (TargetState.DONE, TargetEvent.HEARD) not in TRANSITIONS
    assert (TargetState.OFFERED, TargetEvent.PUBLISHED_ALL) not in TRANSITIONS
    session, sid, _ = _session()
    target = session.targets[0]
    target.state = TargetState.ENDED
    with pytest.raises(ProtocolError, match="can't handle published_all in state ended"):
        target.fire(TargetEvent.PUBLISHED_ALL)
    with pytest.raises(ProtocolError, match="unexpected end"):
        _answer(session, End(stream_id=sid, chunk_count=0, size=0, sha256=SHA), 1.0)


# -- what counts as a reply ---------------------------------------------------------------------


def test_a_co_target_cannot_report_for_another_target() -> None:
    """b, a co-target of the broadcast, publishes a verdict and progress claiming a: with its
    own key (all least privilege lets it publish) or with a's key as its own user. Neither
    counts; a's own verdict does."""
    session, sid, _ = _session(("a", "b"))
    for key in (f"reply:me:{QID}:b", f"reply:me:{QID}:a"):
        with pytest.raises(Forged):
            session.receive(_done(sid, site="a"), 1.0, key=key, user="b")
        with pytest.raises(Forged):
            session.receive(Progress(stream_id=sid, site="a", stored=10), 1.0, key=key, user="b")
    assert _target(session, "a") is TargetState.OFFERED
    _answer(session, _done(sid, site="a"), 1.0)
    assert _target(session, "a") is TargetState.DONE


def test_a_shared_user_speaks_for_any_site_with_the_sites_key() -> None:
    session, sid, _ = _session(("a",))
    session.receive(_done(sid, site="a"), 1.0, key=f"reply:me:{QID}:a", user="guest")
    assert _target(session, "a") is TargetState.DONE


def test_a_served_target_that_never_takes_its_offer_lets_go_after_the_contact_timeout() -> None:
    sid = new_stream_id()
    pacing = Pacing(4, timeout=60.0, resend_after=5.0, contact_timeout=10.0)
    session = SendSession.create(_facts(), ["a"], stream_id=sid, sender="me", pacing=pacing,
                                 now=0.0)  # fmt: skip
    session.start_actions()
    assert session.tick(9.0) == []
    [finished] = [a for a in session.tick(10.5) if isinstance(a, TargetFinished)]
    assert isinstance(finished.error, TimedOut)
    assert "never took the offer" in str(finished.error)


def test_a_quorum_is_reached_when_enough_targets_verified_and_lost_when_too_many_failed() -> None:
    """k of N: two of three verified is enough, whatever the third does; with two of three
    required, two failures leave too few, and the one left is told to stop."""
    session, sid, _ = _session(("a", "b", "c"))
    assert session.quorum(2) is None  # nobody verified, everybody still can
    _answer(session, _done(sid, site="a"), 1.0)
    assert session.verified == 1
    assert session.quorum(1) is True
    assert session.quorum(2) is None
    _answer(session, _done(sid, site="b"), 1.0)
    assert session.quorum(2) is True
    assert _target(session, "c") is TargetState.OFFERED  # a straggler, still going

    session, sid, _ = _session(("a", "b", "c"))
    for site in ("a", "b"):
        assert session.quorum(2) is None  # enough of them may still verify
        _answer(session, _done(sid, False, site, code=FailureCode.REFUSED, detail="no"), 1.0)
    assert session.quorum(2) is False
    actions = session.quorum_lost(2)
    [finished] = [a for a in actions if isinstance(a, TargetFinished)]
    assert finished.site == "c"
    assert finished.error is not None
    assert finished.error.code is FailureCode.ABORTED
    assert "2 of 3 targets failed: fewer than the 2 required can still verify" in str(
        finished.error
    )
    assert session.finished
