"""A whole transfer between a SendSession and ReceiveSessions, with no broker: an in-memory link
that loses, duplicates, reorders and corrupts data messages (and loses progress reports)."""

from __future__ import annotations

import hashlib
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objstream.common.protocol import Chunk, Done, End, Message, Offer, Progress, new_stream_id
from objstream.common.reassembly import Reassembler, State
from objstream.common.receive_session import (
    Action,
    Commit,
    Finished,
    ReceiveSession,
    SendProgress,
    SendVerdict,
    Terms,
    Write,
)

send = pytest.importorskip("objstream.common.send_session")
table = pytest.importorskip("objstream.common.send_table")

CHUNK = 16


@dataclass(frozen=True)
class Faults:
    lose: float
    duplicate: float
    corrupt: float
    lose_progress: float


@dataclass
class Site:
    """One receiving site: its session, its disk, and the stream's data queue."""

    session: ReceiveSession
    disk: bytearray
    queue: list[tuple[Message, bytes]] = field(default_factory=list)
    tag: int = 0
    outcome: Finished | None = None


class Link:
    """Carries the sender's publications to the sites and their replies back."""

    def __init__(self, data: bytes, sites: list[str], faults: Faults, rng: random.Random) -> None:
        self.data = data
        self.pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        self.faults = faults
        self.rng = rng
        self.now = 0.0
        facts = table.SourceFacts("file", "f.bin", CHUNK, len(data), len(self.pieces), True)
        pacing = table.Pacing(window=4, timeout=1000.0, resend_after=1.0)
        self.stream_id = new_stream_id()
        self.sender = send.SendSession.create(facts, sites, stream_id=self.stream_id,
                                              sender="src", pacing=pacing, now=0.0)  # fmt: skip
        self.sites: dict[str, Site] = {}
        self.replies: list[Message] = []
        self.finished: dict[str, object] = {}

    # -- the sending side -------------------------------------------------------------------------

    def publish(self, actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, table.PublishOffer):
                self._offer(action.offer)
            elif isinstance(action, table.PublishChunk):
                body = self.pieces[action.seq]
                chunk = Chunk(stream_id=self.stream_id, seq=action.seq, crc32=zlib.crc32(body))
                self._carry(action.to, chunk, body)
            elif isinstance(action, table.PublishEnd):
                digest = hashlib.sha256(self.data).hexdigest()
                end = End(stream_id=self.stream_id, chunk_count=len(self.pieces),
                          size=len(self.data), sha256=digest)  # fmt: skip
                self._carry(action.to, end, b"")
            elif isinstance(action, table.TargetFinished):
                self.finished[action.site] = action.error

    def _offer(self, offer: Offer) -> None:
        reassembler = Reassembler(offer)
        reassembler.accept()
        terms = Terms(1000.0, offer.window, checkpoints=True, keeps_prefix=True)
        session = ReceiveSession(reassembler, offer.target, terms, now=self.now)
        site = self.sites[offer.target] = Site(session, bytearray(offer.size or 0))
        # First contact is never lost: the sender publishes nothing for a target before it
        # spoke, so without it a lossy link would just time out.
        for action in session.start():
            assert isinstance(action, SendProgress)
            self.replies.append(self._progress(site, action))

    def _carry(self, to: str | None, message: Message, body: bytes) -> None:
        """To one site's data queue, or (``to`` None, a broadcast) to every queue there is:
        each site's queue is bound to the broadcast key once its receiver took the offer."""
        for site in list(self.sites) if to is None else [to]:
            self._carry_to(site, message, body)

    def _carry_to(self, site: str, message: Message, body: bytes) -> None:
        faults, rng = self.faults, self.rng
        if rng.random() < faults.lose:
            return
        if isinstance(message, Chunk) and rng.random() < faults.corrupt:
            message = message.model_copy(update={"crc32": message.crc32 ^ 0x5A})
        queue = self.sites[site].queue
        queue.append((message, body))
        if rng.random() < faults.duplicate:
            queue.append((message, body))

    # -- the receiving side -----------------------------------------------------------------------

    def deliver(self) -> None:
        for site in self.sites.values():
            batch, site.queue = site.queue, []
            self.rng.shuffle(batch)
            for message, body in batch:
                site.tag += 1
                self.run(site, site.session.receive(site.tag, message, body, self.now))

    def run(self, site: Site, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Write):
                site.disk[action.offset : action.offset + len(action.body)] = action.body
            elif isinstance(action, SendProgress):
                if self.rng.random() >= self.faults.lose_progress:
                    self.replies.append(self._progress(site, action))
            elif isinstance(action, SendVerdict):
                self.replies.append(action.done)  # verdicts are never lost
            elif isinstance(action, Commit):
                self.run(site, site.session.committed(Path("/in/f.bin")))
                return
            elif isinstance(action, Finished):
                site.outcome = action

    @staticmethod
    def _progress(site: Site, action: SendProgress) -> Progress:
        return Progress(stream_id=site.session.offer.stream_id, site=site.session.site,
                        stored=action.stored, resend_from=action.resend_from)  # fmt: skip

    def answer(self) -> None:
        replies, self.replies = self.replies, []
        for reply in replies:
            site = reply.site if isinstance(reply, Progress | Done) else "?"
            key = f"reply:src:{'0' * 32}:{site}"
            self.publish(self.sender.receive(reply, self.now, key=key, user=site))

    def round(self) -> None:
        while publications := self.sender.next_publications():
            self.publish(publications)
        self.deliver()
        self.answer()
        self.now += 0.25
        self.publish(self.sender.tick(self.now))
        for site in self.sites.values():
            self.run(site, site.session.tick(self.now))


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
    lose=st.floats(0, 0.3),
    duplicate=st.floats(0, 0.3),
    corrupt=st.floats(0, 0.2),
    lose_progress=st.floats(0, 0.3),
    targets=st.integers(1, 3),
)
def test_a_transfer_over_a_bad_link_ends_verified_at_every_site(
    size: int,
    seed: int,
    lose: float,
    duplicate: float,
    corrupt: float,
    lose_progress: float,
    targets: int,
) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(size)
    sites = [f"site-{i}" for i in range(targets)]
    link = Link(data, sites, Faults(lose, duplicate, corrupt, lose_progress), rng)
    link.publish(link.sender.start_actions())
    for _ in range(2000):
        if link.sender.finished:
            break
        link.round()
    assert link.sender.finished
    assert link.finished == dict.fromkeys(sites)  # no error at any target
    for name in sites:
        site = link.sites[name]
        assert site.session.state is State.DONE
        assert bytes(site.disk) == data
        assert site.outcome is not None
        assert site.outcome.ok
    assert all(not isinstance(r, Done) or r.ok for r in link.replies)
