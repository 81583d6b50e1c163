"""The pure send session: windows, resends, timeouts, verdicts, cancel; no broker, no source."""

from __future__ import annotations

import hashlib
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objstream.common.errors import FailureCode, ProtocolError, TimedOut
from objstream.common.protocol import Done, End, Inline, Progress, new_stream_id
from objstream.common.reassembly import ChunkVerdict, Reassembler
from objstream.common.reassembly import State as RState
from objstream.common.send_session import (
    TRANSITIONS,
    Action,
    DeclareDataQueue,
    DeleteDataQueue,
    Pacing,
    PublishAbort,
    PublishChunk,
    PublishEnd,
    PublishOffer,
    ReleaseBefore,
    ReportProgress,
    SendSession,
    SourceFacts,
    TargetEvent,
    TargetFinished,
    TargetState,
    fits_inline,
)

SHA = "0" * 64


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
) -> tuple[SendSession, dict[str, str], list[Action]]:
    ids = {site: new_stream_id() for site in sites}
    session = SendSession.create(
        facts or _facts(),
        list(ids.items()),
        sender="me",
        pacing=Pacing(window, timeout, resend_after),
        start=start,
        inline=inline,
        now=0.0,
    )
    return session, ids, session.start_actions()


def _state(session: SendSession, index: int = 0) -> TargetState:
    return session.targets[index].state


def _chunks(actions: list[Action], site: str | None = None) -> list[int]:
    return [a.seq for a in actions if isinstance(a, PublishChunk) and site in (None, a.site)]


def _drain(session: SendSession, rounds: int = 100) -> list[Action]:
    """Call next_publications until nothing more goes out."""
    out: list[Action] = []
    for _ in range(rounds):
        step = session.next_publications()
        if not step:
            break
        out += step
    return out


def _progress(sid: str, stored: int, resend_from: int | None = None, site: str = "a") -> Progress:
    return Progress(stream_id=sid, site=site, stored=stored, resend_from=resend_from)


def _done(sid: str, ok: bool = True, site: str = "a", **kw: object) -> Done:
    return Done(stream_id=sid, site=site, ok=ok, **kw)


def test_start_declares_queues_and_offers() -> None:
    session, ids, actions = _session(("a", "b"), start=0)
    assert actions[0] == DeclareDataQueue(ids["a"])
    offer = actions[1]
    assert isinstance(offer, PublishOffer)
    assert offer.site == "a"
    assert offer.offer.stream_id == ids["a"]
    assert offer.expiration_ms == 30000
    assert offer.offer.window == 4
    assert offer.offer.sender == "me"
    assert offer.offer.target == "a"
    assert [t.state for t in session.targets] == [TargetState.OFFERED] * 2


def test_the_window_bounds_what_is_in_flight() -> None:
    session, ids, _ = _session(window=4)
    assert _chunks(_drain(session)) == [0, 1, 2, 3]
    session.receive(_progress(ids["a"], 2), now=1.0)
    assert _chunks(_drain(session)) == [4, 5]
    session.receive(_progress(ids["a"], 8), now=2.0)
    sent = _drain(session)
    assert _chunks(sent) == [6, 7, 8, 9]
    assert sent[-1] == PublishEnd("a", ids["a"])
    assert _state(session, 0) is TargetState.ENDED
    assert _drain(session) == []


def test_progress_is_reported_once_per_advance() -> None:
    session, ids, _ = _session()
    assert session.receive(_progress(ids["a"], 3), 1.0) == [ReportProgress("a", ids["a"], 3)]
    assert session.receive(_progress(ids["a"], 3), 1.5) == []


def test_done_ok_finishes_the_target() -> None:
    session, ids, _ = _session()
    _drain(session)
    actions = session.receive(_done(ids["a"], stored_as="x"), 3.0)
    assert actions == [
        ReportProgress("a", ids["a"], 0, complete=True),
        TargetFinished("a", ids["a"], None, "x"),
    ]
    assert session.finished
    assert _state(session, 0) is TargetState.DONE
    # A late reply is not an error: replies outlive their stream.
    assert session.receive(_progress(ids["a"], 10), 4.0) == []


def test_a_refusal_fails_the_target_and_deletes_its_queue() -> None:
    session, ids, _ = _session()
    actions = session.receive(_done(ids["a"], ok=False, code=FailureCode.REFUSED, detail="no"), 1.0)
    assert actions[0] == DeleteDataQueue(ids["a"])
    finished = actions[1]
    assert isinstance(finished, TargetFinished)
    assert finished.error is not None
    assert finished.error.code is FailureCode.REFUSED
    assert finished.error.detail == "no"
    assert session.finished


def test_resend_on_silence_only_after_contact() -> None:
    session, ids, _ = _session(window=4, resend_after=5.0, timeout=30.0)
    _drain(session)
    assert session.tick(10.0) == []  # never spoke: chunks wait in the queue, no resend
    assert _drain(session) == []
    session.receive(_progress(ids["a"], 1), now=11.0)
    assert _chunks(_drain(session)) == [4]
    session.tick(15.0)
    assert _drain(session) == []  # 4 s quiet: not yet
    session.tick(16.5)
    assert _chunks(_drain(session)) == [1, 2, 3, 4]
    session.tick(17.0)
    assert _drain(session) == []  # resent 0.5 s ago: not again so soon


def test_resend_from_rewinds_an_ended_target() -> None:
    session, ids, _ = _session(facts=_facts(count=3), window=8)
    assert _chunks(_drain(session)) == [0, 1, 2]
    session.receive(_progress(ids["a"], 1), now=1.0)
    assert _state(session, 0) is TargetState.ENDED
    session.receive(_progress(ids["a"], 1, resend_from=1), now=2.0)
    assert _state(session, 0) is TargetState.SENDING
    sent = _drain(session)
    assert _chunks(sent) == [1, 2]
    assert sent[-1] == PublishEnd("a", ids["a"])


def test_a_silent_target_fails_alone_and_does_not_hold_the_others() -> None:
    session, ids, _ = _session(("a", "b"), window=2, timeout=30.0, resend_after=5.0)
    _drain(session)
    for t in range(1, 40):
        session.receive(_progress(ids["a"], min(10, t), site="a"), now=float(t))
        actions = session.tick(float(t))
        actions += _drain(session)
        if any(isinstance(a, TargetFinished) for a in actions):
            break
    assert t == 31
    [abandon, finished] = [a for a in actions if not isinstance(a, PublishChunk | PublishEnd)]
    assert abandon == DeleteDataQueue(ids["b"])  # never took the offer: nobody reads its queue
    assert isinstance(finished, TargetFinished)
    assert isinstance(finished.error, TimedOut)
    assert "never took the offer" in finished.error.detail
    assert _state(session, 0) is not TargetState.FAILED
    assert _state(session, 1) is TargetState.FAILED
    session.receive(_done(ids["a"], site="a"), 32.0)
    assert session.finished


def test_a_target_that_spoke_and_went_silent_gets_an_abort() -> None:
    session, ids, _ = _session(timeout=10.0, resend_after=100.0)
    _drain(session)
    session.receive(_progress(ids["a"], 1), now=1.0)
    actions = session.tick(11.5)
    assert isinstance(actions[0], PublishAbort)
    assert "timed out" in actions[0].reason
    finished = actions[1]
    assert isinstance(finished, TargetFinished)
    assert finished.error is not None
    assert finished.error.code is FailureCode.TIMEOUT
    assert "never" not in finished.error.detail


def test_cancel_aborts_the_contacted_and_deletes_the_others() -> None:
    session, ids, _ = _session(("a", "b"))
    session.receive(_progress(ids["a"], 0, site="a"), now=1.0)
    actions = session.cancel("site me is shutting down")
    assert actions[0] == PublishAbort("a", ids["a"], actions[0].reason)  # type: ignore[union-attr]
    assert DeleteDataQueue(ids["b"]) in actions
    errors = [a.error for a in actions if isinstance(a, TargetFinished)]
    assert [e.code for e in errors if e] == [FailureCode.ABORTED] * 2
    assert session.finished
    assert session.next_publications() == []


def test_lockstep_holds_every_target_within_a_window_of_the_slowest() -> None:
    session, ids, _ = _session(("a", "b"), facts=_facts(count=None, random_access=False), window=3)
    assert session.lockstep
    assert _chunks(_drain(session), "a") == [0, 1, 2]
    session.receive(_progress(ids["a"], 3, site="a"), now=1.0)
    assert _drain(session) == []  # b stored nothing: a may not run ahead of it
    session.receive(_progress(ids["b"], 2, site="b"), now=1.0)
    actions = _drain(session)
    assert actions[0] == ReleaseBefore(2)
    assert _chunks(actions, "a") == [3, 4]
    assert _chunks(actions, "b") == [3, 4]


def test_an_iterator_source_ends_when_the_driver_finds_its_end() -> None:
    session, ids, _ = _session(facts=_facts(count=None, random_access=False), window=8)
    first = session.next_publications()
    assert _chunks(first) == [0]
    _chunks(session.next_publications())  # chunk 1: the driver finds no piece 1
    session.source_ended(1)
    assert session.next_publications() == [PublishEnd("a", ids["a"])]
    with pytest.raises(ProtocolError):
        session.source_ended(2)


def test_a_resumed_stream_starts_at_the_kept_prefix() -> None:
    session, ids, actions = _session(facts=_facts(count=10), start=6, window=8)
    offer = actions[1]
    assert isinstance(offer, PublishOffer)
    assert offer.offer.resume_from == 6
    sent = _drain(session)
    assert _chunks(sent) == [6, 7, 8, 9]
    assert sent[-1] == PublishEnd("a", ids["a"])


def test_an_inline_object_is_all_in_the_offer() -> None:
    facts = _facts(count=1, size=5)
    assert fits_inline(facts)
    assert not fits_inline(facts, start=1)
    assert not fits_inline(_facts(count=2, size=5))
    inline = Inline(crc32=1, sha256=SHA)
    session, _ids, actions = _session(facts=facts, inline=inline, timeout=10.0)
    assert len(actions) == 1
    assert isinstance(actions[0], PublishOffer)
    assert actions[0].offer.inline == inline
    assert _drain(session) == []
    assert session.tick(9.0) == []  # no resend: there is nothing to resend
    [finished] = session.tick(10.5)  # no abort, no queue to delete
    assert isinstance(finished, TargetFinished)
    assert finished.error is not None


def test_reconnect_resends_from_what_was_stored_and_resets_silence() -> None:
    session, ids, _ = _session(window=4, timeout=10.0)
    _drain(session)
    session.receive(_progress(ids["a"], 2), now=1.0)
    _drain(session)
    actions = session.reconnected(9.0)
    assert actions == [DeclareDataQueue(ids["a"])]
    assert _chunks(_drain(session)) == [2, 3, 4, 5]
    assert session.tick(15.0) == []  # quiet since the reconnect at 9, not since 1


def test_illegal_transitions_raise() -> None:
    assert (TargetState.DONE, TargetEvent.HEARD) not in TRANSITIONS
    session, ids, _ = _session()
    target = session.targets[0]
    target.state = TargetState.ENDED
    with pytest.raises(ProtocolError, match="can't handle published_all in state ended"):
        target.fire(TargetEvent.PUBLISHED_ALL)
    with pytest.raises(ProtocolError, match="unexpected end"):
        session.receive(End(stream_id=ids["a"], chunk_count=0, size=0, sha256=SHA), 1.0)


# -- a whole transfer over a bad link, against the receiving side's reassembler ------------------

CHUNK = 7
Wire = tuple[str, int, bytes]  # ("chunk", seq, body) or ("end", count, b"")


class _BadLink:
    """A SendSession and one Reassembler per site, joined by links that lose, duplicate,
    reorder and corrupt messages both ways."""

    def __init__(
        self, rnd: random.Random, data: bytes, sites: tuple[str, ...], random_access: bool
    ):
        self.rnd, self.data, self.sites = rnd, data, sites
        self.pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        count = len(self.pieces) if random_access else None
        size = len(data) if random_access else None
        facts = SourceFacts("blob", "x", CHUNK, size, count, random_access)
        self.ids = {site: new_stream_id() for site in sites}
        self.session = SendSession.create(facts, list(self.ids.items()), sender="me",
                                          pacing=Pacing(4, 1e6, 1.0), now=0.0)  # fmt: skip
        self.receivers: dict[str, Reassembler] = {}
        self.stored: dict[str, bytearray] = {site: bytearray() for site in sites}
        self.to_site: dict[str, list[Wire]] = {site: [] for site in sites}
        self.replies: list[Progress | Done] = []

    def heard(self, site: str) -> bool:
        # Before a receiver reads the durable data queue, nothing in it is lost; after, a
        # broker restart can lose transient chunks (and replies).
        return self.session.targets[self.sites.index(site)].heard

    def send(self, site: str, message: Wire) -> None:
        rnd = self.rnd
        if self.heard(site) and rnd.random() < 0.1:
            return  # lost
        kind, seq, body = message
        if rnd.random() < 0.05 and kind == "chunk" and body:
            message = (kind, seq, bytes([body[0] ^ 1]) + body[1:])  # corrupt (crc mismatch)
        queue = self.to_site[site]
        queue.insert(rnd.randrange(len(queue) + 1), message)  # reordered
        if rnd.random() < 0.05:
            queue.append(message)  # duplicated

    def act(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, PublishOffer):
                self.receivers[a.site] = Reassembler(a.offer)
                self.receivers[a.site].accept()
            elif isinstance(a, PublishChunk) and a.seq >= len(self.pieces):
                self.session.source_ended(len(self.pieces))  # the driver found no such piece
            elif isinstance(a, PublishChunk):
                self.send(a.site, ("chunk", a.seq, self.pieces[a.seq]))
            elif isinstance(a, PublishEnd):
                self.send(a.site, ("end", len(self.pieces), b""))

    def receive(self, site: str, kind: str, seq: int, body: bytes) -> None:
        r, sid = self.receivers[site], self.ids[site]
        if r.finished:  # a resend after a lost verdict: say it again
            self.replies.append(Done(stream_id=sid, site=site, ok=r.state is RState.DONE))
            return
        if kind == "end":
            sha = hashlib.sha256(self.data).hexdigest()
            r.record_end(End(stream_id=sid, chunk_count=seq, size=len(self.data), sha256=sha))
        else:
            outcome = r.chunk(seq, zlib.crc32(self.pieces[seq]), body)
            if outcome.verdict is ChunkVerdict.WRITE:
                self.stored[site] += body
            self.replies.append(Progress(stream_id=sid, site=site, stored=r.stored,
                                         resend_from=outcome.resend_from))  # fmt: skip
        if r.complete:
            ok = r.verify() is None
            if ok:
                r.mark_done()
            self.replies.append(Done(stream_id=sid, site=site, ok=ok))

    def run(self) -> dict[str, bytes]:
        session, rnd = self.session, self.rnd
        self.act(session.start_actions())
        now = 0.0
        while not session.finished and now < 2000:
            now += 0.1
            self.act(session.next_publications())
            for site in self.sites:
                if self.to_site[site] and rnd.random() < 0.7:
                    self.receive(site, *self.to_site[site].pop(0))
            rnd.shuffle(self.replies)
            while self.replies:
                reply = self.replies.pop()
                if not self.heard(reply.site) or rnd.random() < 0.9:  # replies get lost too
                    self.act(session.receive(reply, now))
            self.act(session.tick(now))
        assert session.finished, (session.targets, session.count, now)
        states = [t.state for t in session.targets]
        assert states == [TargetState.DONE] * len(self.sites)
        return {site: bytes(b) for site, b in self.stored.items()}


@given(
    seed=st.integers(0, 2**32 - 1),
    data=st.binary(min_size=1, max_size=300),
    targets=st.integers(1, 3),
    random_access=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_a_whole_transfer_survives_a_bad_link(
    seed: int, data: bytes, targets: int, random_access: bool
) -> None:
    sites = tuple(f"s{i}" for i in range(targets))
    got = _BadLink(random.Random(seed), data, sites, random_access).run()
    assert got == dict.fromkeys(sites, data)
