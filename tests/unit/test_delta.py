"""Delta transfer without a broker: the manifest and the holds bitmap (their wire forms, hostile
ones included), and both sessions: what a sender skips, what a receiver copies, asks again for
and refuses."""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import pytest

from objstream.common.delta import (
    DELTA_INFO,
    ENTRY,
    MAX_DELTA_CHUNKS,
    Holds,
    Manifest,
    ManifestBuilder,
    asks_delta,
    offers_delta,
)
from objstream.common.errors import ProtocolError
from objstream.common.protocol import Chunk, End, Offer, Progress, new_stream_id
from objstream.common.protocol import Manifest as ManifestMessage
from objstream.common.reassembly import Reassembler
from objstream.common.receive_actions import (
    Action,
    Commit,
    DeadLetter,
    FillHeld,
    FindHeld,
    SendProgress,
    Terms,
    Write,
)
from objstream.common.receive_session import ReceiveSession
from objstream.common.send_session import SendSession
from objstream.common.send_table import (
    Pacing,
    Plan,
    PublishChunk,
    PublishEnd,
    PublishManifest,
    PublishOffer,
    SourceFacts,
)

CHUNK = 4096
QID = "1" * 32


# -- the bitmap -----------------------------------------------------------------------------------


def test_holds_round_trip_and_runs() -> None:
    holds = Holds.of(20, [0, 1, 2, 7, 19])
    assert list(holds) == [0, 1, 2, 7, 19]
    assert len(holds) == 5
    again = Holds.decode(holds.encode(), 20)
    assert list(again) == [0, 1, 2, 7, 19]
    assert holds.run_from(0, 20) == 3
    assert holds.run_from(3, 20) == 3  # not held: an empty run
    assert holds.run_from(7, 20) == 8
    assert holds.run_from(0, 2) == 2  # bounded
    assert 19 in holds
    assert 20 not in holds
    assert -1 not in holds
    assert "x" not in holds
    holds.drop_from(2)
    assert list(holds) == [0, 1]
    with pytest.raises(ValueError, match="chunk 20 of 20"):
        holds.add(20)


@pytest.mark.parametrize(
    ("text", "count", "words"),
    [
        ("!!!!", 8, "not base64"),
        ("AAA", 8, "not base64"),  # unpadded
        ("AAAA", 8, "3 bytes for 8 chunks"),
        ("AA==", 16, "1 bytes for 16 chunks"),
        ("gA==", 7, "past the last of 7"),  # bit 7 of a 7-chunk bitmap
        ("é", 8, "not base64"),
    ],
)
def test_a_hostile_holds_field_is_refused(text: str, count: int, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        Holds.decode(text, count)


# -- the manifest ---------------------------------------------------------------------------------


def _container_pieces() -> list[tuple[bytes, dict[str, Any]]]:
    """Three entries: 2 chunks (safetensors header announced), 1 chunk, 3 chunks."""
    return [
        (b"a" * CHUNK, {"entry": 0, "head": 10, "size": 2 * CHUNK, "safetensors_header": 64}),
        (b"b" * CHUNK, {"entry": 0, "part": 1}),
        (b"c" * 100, {"entry": 1, "head": 5, "size": 100}),
        (b"a" * CHUNK, {"entry": 2, "head": 10, "size": 2 * CHUNK + 1}),
        (b"b" * CHUNK, {"entry": 2, "part": 1}),
        (b"d", {"entry": 2, "part": 2}),
    ]


def test_a_container_manifest_round_trips_and_says_each_chunks_meta() -> None:
    builder = ManifestBuilder()
    pieces = _container_pieces()
    for data, meta in pieces:
        builder.add(data, meta)
    manifest = builder.build()
    assert manifest.chunk_count == 6
    assert [(e.first, e.parts) for e in manifest.entries] == [(0, 2), (2, 1), (3, 3)]
    assert manifest.digest(2) == hashlib.sha256(b"c" * 100).digest()
    size = sum(len(d) for d, _ in pieces)
    parsed = Manifest.parse(manifest.body(), chunk_count=6, entries=3, chunk_size=CHUNK, size=size)
    assert parsed == manifest
    # What a receiver gives a copied chunk is what the sender would have sent with it.
    for seq, (_, meta) in enumerate(pieces):
        index = next(i for i, e in enumerate(parsed.entries) if e.first <= seq < e.first + e.parts)
        assert parsed.entries[index].meta(index, seq) == meta
    # Entry 2 starts with entry 0's bytes but is longer: another entry, another key.
    assert parsed.entry_key(0) != parsed.entry_key(2)


def test_the_same_entry_at_another_place_has_the_same_key() -> None:
    first, second = ManifestBuilder(), ManifestBuilder()
    first.add(b"x" * 10, {"entry": 0, "head": 2, "size": 10})
    first.add(b"y" * 20, {"entry": 1, "head": 3, "size": 20})
    second.add(b"y" * 20, {"entry": 0, "head": 3, "size": 20})
    assert first.build().entry_key(1) == second.build().entry_key(0)
    third = ManifestBuilder()
    third.add(b"y" * 20, {"entry": 0, "head": 4, "size": 20})  # another structure length
    assert third.build().entry_key(0) != second.build().entry_key(0)


def test_a_hostile_manifest_is_refused() -> None:
    digests = bytes(32 * 3)
    with pytest.raises(ProtocolError, match="manifest of 95 bytes for 3 chunks"):
        Manifest.parse(digests[:-1], chunk_count=3, entries=0, chunk_size=CHUNK, size=3)
    entry = ENTRY.pack(0, CHUNK, 0)
    with pytest.raises(ProtocolError, match="cover 1 chunks and 4096 bytes, the offer 3"):
        Manifest.parse(digests + entry, chunk_count=3, entries=1, chunk_size=CHUNK, size=9)
    with pytest.raises(ProtocolError, match="head 9 > size 8"):
        Manifest.parse(
            digests + ENTRY.pack(9, 8, 0), chunk_count=3, entries=1, chunk_size=CHUNK, size=8
        )


def test_only_a_source_that_reads_any_chunk_again_goes_as_a_delta() -> None:
    assert offers_delta(random_access=True, chunk_size=CHUNK, chunk_count=10)
    assert not offers_delta(random_access=False, chunk_size=CHUNK, chunk_count=10)
    assert not offers_delta(random_access=True, chunk_size=CHUNK, chunk_count=None)
    assert not offers_delta(random_access=True, chunk_size=CHUNK, chunk_count=0)
    assert not offers_delta(random_access=True, chunk_size=1024, chunk_count=10)
    assert not offers_delta(random_access=True, chunk_size=CHUNK, chunk_count=MAX_DELTA_CHUNKS + 1)
    assert asks_delta({DELTA_INFO: "sha256"})
    assert not asks_delta({DELTA_INFO: "md5"})
    assert not asks_delta(None)


# -- the sending session --------------------------------------------------------------------------


def _sender(sites: tuple[str, ...], count: int = 10) -> SendSession:
    facts = SourceFacts("file", "x", CHUNK, count * CHUNK, count, True)
    session = SendSession.create(
        facts,
        sites,
        stream_id=new_stream_id(),
        sender="me",
        pacing=Pacing(window=64, timeout=30.0, resend_after=5.0),
        plan=Plan(delta=True),
        now=0.0,
    )
    offers = session.start_actions()
    assert all(isinstance(a, PublishOffer) for a in offers)
    assert all(a.offer.info == {DELTA_INFO: "sha256"} for a in offers)  # type: ignore[union-attr]
    return session


def _report(session: SendSession, site: str, now: float, **fields: Any) -> list[Any]:
    progress = Progress(stream_id=session.stream_id, site=site, **fields)
    return session.receive(progress, now, key=f"reply:me:{QID}:{site}", user=site)


def _published(session: SendSession) -> list[Any]:
    out: list[Any] = []
    while step := session.next_publications():
        out += step
    return out


def test_the_broadcast_skips_what_every_rider_holds_and_nothing_goes_before_the_answers() -> None:
    session = _sender(("a", "b"))
    assert _report(session, "a", 0.1, stored=0, delta=True) == [PublishManifest("a")]
    assert _report(session, "a", 0.2, stored=0, delta=True) == []  # one manifest each
    _report(session, "b", 0.2, stored=0)  # an older receiver: no delta
    assert _published(session) == []  # a's answer decides what the broadcast skips
    session.tick(3.0)  # a is finding what it holds: nothing yet, and no resend to a
    assert _published(session) == []
    _report(session, "a", 3.5, stored=0, holds=Holds.of(10, range(10)).encode())
    # b holds nothing: every chunk goes, once, by broadcast (a drops what it has).
    assert [a.seq for a in _published(session) if isinstance(a, PublishChunk)] == list(range(10))


def test_each_target_gets_only_what_it_lacks() -> None:
    session = _sender(("a", "b"))
    _report(session, "a", 0.1, stored=0, delta=True)
    _report(session, "b", 0.1, stored=0, delta=True)
    _report(session, "a", 0.2, stored=0, holds=Holds.of(10, [0, 1, 2, 3, 5, 7, 8, 9]).encode())
    _report(session, "b", 0.2, stored=0, holds=Holds.of(10, [0, 1, 2, 3, 4, 7, 8]).encode())
    sent = _published(session)
    assert [a.seq for a in sent if isinstance(a, PublishChunk)] == [4, 5, 6, 9]
    assert sent[-1] == PublishEnd()


def test_a_target_that_holds_everything_gets_only_the_end() -> None:
    session = _sender(("a",))
    _report(session, "a", 0.1, stored=0, delta=True)
    _report(session, "a", 0.2, stored=0, holds=Holds.of(10, range(10)).encode())
    assert _published(session) == [PublishEnd()]


def test_a_resend_request_for_a_held_chunk_takes_back_what_it_held_from_there() -> None:
    session = _sender(("a",))
    _report(session, "a", 0.1, stored=0, delta=True)
    _report(session, "a", 0.2, stored=0, holds=Holds.of(10, [0, 1, 2, 6, 7]).encode())
    sent = _published(session)
    assert [a.seq for a in sent if isinstance(a, PublishChunk)] == [3, 4, 5, 8, 9]
    # Its copy of chunk 1 turned out changed (or a receiver took the stream over).
    _report(session, "a", 0.3, stored=1, resend_from=1)
    resent = _published(session)
    assert [a.seq for a in resent if isinstance(a, PublishChunk)] == list(range(1, 10))


def test_an_answer_that_does_not_parse_counts_as_holding_nothing() -> None:
    session = _sender(("a",), count=4)
    _report(session, "a", 0.1, stored=0, delta=True)
    _report(session, "a", 0.2, stored=0, holds="////")  # 3 bytes for 4 chunks
    assert [a.seq for a in _published(session) if isinstance(a, PublishChunk)] == [0, 1, 2, 3]


def test_a_sender_without_delta_never_sends_a_manifest() -> None:
    facts = SourceFacts("file", "x", CHUNK, 4 * CHUNK, 4, True)
    session = SendSession.create(
        facts,
        ("a",),
        stream_id=new_stream_id(),
        sender="me",
        pacing=Pacing(64, 30.0, 5.0),
        now=0.0,
    )
    (offer,) = session.start_actions()
    assert offer.offer.info is None  # type: ignore[union-attr]
    assert _report(session, "a", 0.1, stored=0, delta=True) == []
    assert len(_published(session)) == 5


# -- the receiving session ------------------------------------------------------------------------


class Receiver:
    """Carries a delta-asking receive session's actions out in memory; ``held`` is what this
    receiver has of the object (by seq), ``changed`` what no longer matches its digest."""

    def __init__(self, data: bytes, held: set[int], *, changed: frozenset[int] = frozenset()):
        self.pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        self.sid = new_stream_id()
        self.offer = Offer(
            stream_id=self.sid,
            kind="file",
            name="x",
            size=len(data),
            chunk_size=CHUNK,
            chunk_count=len(self.pieces),
            window=8,
            sender="a",
            target="b",
            info={DELTA_INFO: "sha256"},
        )
        self.end = End(
            stream_id=self.sid,
            chunk_count=len(self.pieces),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        reassembler = Reassembler(self.offer)
        reassembler.accept()
        self.session = ReceiveSession(reassembler, "b", Terms(5.0, 8, delta=True), now=0.0)
        self.held, self.changed = held, changed
        self.disk = bytearray(len(data))
        self.log: list[Action] = []
        self.tag = 0
        builder = ManifestBuilder()
        for piece in self.pieces:
            builder.add(piece, None)
        self.manifest = builder.build()

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            self.log.append(action)
            if isinstance(action, Write):
                self.disk[action.offset : action.offset + len(action.body)] = action.body
            elif isinstance(action, FindHeld):
                holds = Holds.of(len(self.pieces), self.held)
                self.run(self.session.holds_found(holds))
            elif isinstance(action, FillHeld):
                follow: list[Action] = []
                for seq in range(action.start, action.stop):
                    if seq in self.changed:
                        follow += self.session.held_lost(seq)
                        break
                    follow += self.session.held(seq, self.pieces[seq])
                else:
                    follow += self.session.filled(action.retake)
                self.run(follow)
            elif isinstance(action, Commit):
                self.run(self.session.committed(None))
                return

    def deliver(self, message: Any, body: bytes = b"") -> None:
        self.tag += 1
        self.run(self.session.receive(self.tag, message, body, 0.0))

    def chunk(self, seq: int) -> None:
        body = self.pieces[seq]
        self.deliver(Chunk(stream_id=self.sid, seq=seq, crc32=zlib.crc32(body)), body)

    def send_manifest(self, body: bytes | None = None, count: int | None = None) -> None:
        header = ManifestMessage(
            stream_id=self.sid, chunk_count=len(self.pieces) if count is None else count
        )
        self.deliver(header, self.manifest.body() if body is None else body)

    def of(self, kind: type[Any]) -> list[Any]:
        return [a for a in self.log if isinstance(a, kind)]


DATA = bytes(range(256)) * (10 * CHUNK // 256)


def test_a_receiver_asks_copies_what_it_holds_and_verifies_the_whole() -> None:
    r = Receiver(DATA, {0, 1, 2, 5, 6, 9})
    (first,) = r.session.start()
    assert isinstance(first, SendProgress)
    assert first.delta
    r.send_manifest()
    answer = next(p for p in r.of(SendProgress) if p.holds is not None)
    assert list(Holds.decode(answer.holds, 10)) == [0, 1, 2, 5, 6, 9]
    assert r.session.stored == 3  # copied at once: 0, 1, 2
    for seq in (3, 4, 7, 8):  # what the sender sends: the rest
        r.chunk(seq)
    r.deliver(r.end)
    assert bytes(r.disk) == DATA
    assert r.of(Commit)
    assert not r.of(DeadLetter)
    assert all(not p.delta for p in r.of(SendProgress)[1:])  # asked until the manifest came


def test_a_chunk_after_held_ones_waits_for_them_not_a_gap() -> None:
    r = Receiver(DATA, {3, 4, 5, 6})
    r.send_manifest()
    r.chunk(0)
    r.chunk(1)
    r.chunk(2)  # then 3..6 are copied
    assert r.session.stored == 7
    r.chunk(7)
    r.chunk(8)
    r.chunk(9)
    r.deliver(r.end)
    assert bytes(r.disk) == DATA
    assert all(p.resend_from is None for p in r.of(SendProgress))


def test_held_chunks_at_the_end_are_copied_once_the_end_is_known() -> None:
    r = Receiver(DATA, {8, 9})
    r.send_manifest()
    for seq in range(8):
        r.chunk(seq)
    assert not r.of(Commit)
    r.deliver(r.end)
    assert bytes(r.disk) == DATA
    assert r.of(Commit)


def test_a_held_chunk_that_changed_is_asked_for_again() -> None:
    r = Receiver(DATA, {0, 1, 2, 3}, changed=frozenset({2}))
    r.send_manifest()
    assert r.session.stored == 2
    asked = [p.resend_from for p in r.of(SendProgress) if p.resend_from is not None]
    assert asked == [2]
    for seq in range(2, 10):  # the sender sends everything from there
        r.chunk(seq)
    r.deliver(r.end)
    assert bytes(r.disk) == DATA


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("unasked", "did not ask"),
        ("count", "manifest of 9 chunks, the offer says 10"),
        ("short", "manifest of 319 bytes"),
        ("second", "a second manifest"),
    ],
)
def test_a_hostile_manifest_is_dead_lettered_and_the_stream_goes_on(
    change: str, words: str
) -> None:
    r = Receiver(DATA, set())
    if change == "unasked":
        r.session.delta.asked = False
        r.send_manifest()
    elif change == "count":
        r.send_manifest(count=9)
    elif change == "short":
        r.send_manifest(body=r.manifest.body()[:-1])
    else:
        r.send_manifest()
        r.send_manifest()  # the same again: fine
        assert not r.of(DeadLetter)
        r.send_manifest(body=bytes(len(r.manifest.body())))
    (dead,) = r.of(DeadLetter)
    assert words in dead.reason
    for seq in range(10):
        r.chunk(seq)
    r.deliver(r.end)
    assert bytes(r.disk) == DATA
    assert r.of(Commit)


def test_a_long_held_run_is_copied_a_burst_at_a_time_between_ticks() -> None:
    """The connection's thread is never held for a whole copy: a burst per message or tick."""
    data = bytes(range(256)) * (40 * CHUNK // 256)
    r = Receiver(data, set(range(39)))
    assert r.session.delta.burst == 65536  # 256 MiB of 4 KiB chunks
    r.session.delta.burst = 8
    r.send_manifest()
    assert r.session.stored == 8  # one burst
    r.run(r.session.tick(0.01))
    assert r.session.stored == 16
    for n in range(2, 6):
        r.run(r.session.tick(0.01 * n))
    assert r.session.stored == 39
    r.chunk(39)
    r.deliver(r.end)
    assert bytes(r.disk) == data
    assert r.of(Commit)


def test_a_target_silent_after_asking_holds_the_broadcast_no_longer_than_resend_after() -> None:
    session = _sender(("a", "b"), count=4)
    _report(session, "a", 0.1, stored=0, delta=True)
    _report(session, "b", 0.1, stored=0)
    session.tick(3.0)
    assert _published(session) == []  # a may be finding what it holds
    _report(session, "a", 4.0, stored=0, delta=True)  # it is: its heartbeat
    session.tick(8.0)
    assert _published(session) == []
    session.tick(9.5)  # a silent for 5.5 s: b goes on alone
    assert [x.seq for x in _published(session) if isinstance(x, PublishChunk)] == [0, 1, 2, 3]
    _report(session, "a", 10.0, stored=0, holds=Holds.of(4, [0, 1]).encode())
    late = _published(session)
    assert [(x.seq, x.to) for x in late if isinstance(x, PublishChunk)] == [(2, "a"), (3, "a")]


def test_a_receiver_finding_what_it_holds_says_it_is_alive() -> None:
    r = Receiver(DATA, {1})
    r.run(r.session.start())
    header = ManifestMessage(stream_id=r.sid, chunk_count=10)
    actions = r.session.receive(1, header, r.manifest.body(), 0.0)
    assert [type(a) for a in actions] == [FindHeld]  # the driver finds, on the disk thread
    beats = [a for n in range(1, 30) for a in r.session.tick(n / 10) if isinstance(a, SendProgress)]
    assert len(beats) == 2  # at 1.0 s and 2.0 s
    assert all(b.holds is None for b in beats)
