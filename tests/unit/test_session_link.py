"""A whole transfer between a real SendSession and real ReceiveSessions, with no broker: the one
lossy-link harness of the sessions.

The link loses, duplicates, reorders and corrupts data messages, loses progress reports and
verdicts, and carries what an adversary publishes with it: a co-target of the broadcast
(``evil``, a real target with its own broker user) forges progress and verdicts for the honest
targets with the keys it may publish, and messages that are no protocol at all, from the wrong
user or with the wrong key, land on the honest targets' data queues. The sender resends only
what the sessions ask for (``resend_from``, or after silence from what a target stored);
nothing here re-implements a rule of either side.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from objstream.common.errors import ProtocolError
from objstream.common.identity import Forged
from objstream.common.protocol import (
    TYPES,
    Chunk,
    Done,
    End,
    Envelope,
    Message,
    Offer,
    Progress,
    new_stream_id,
    to_headers,
)
from objstream.common.reassembly import Reassembler, State
from objstream.common.receive_actions import (
    Ack,
    Action,
    Commit,
    DeadLetter,
    Finished,
    SendProgress,
    SendVerdict,
    Terms,
    Write,
)
from objstream.common.receive_session import ReceiveSession
from objstream.common.send_session import SendSession
from objstream.common.send_table import (
    Pacing,
    PublishAbort,
    PublishChunk,
    PublishEnd,
    PublishOffer,
    SourceFacts,
    TargetFinished,
    TargetState,
)

CHUNK = 16
SENDER = "src"
QID = "5" * 32
EVIL = "evil"


@dataclass(frozen=True)
class Faults:
    lose: float
    duplicate: float
    corrupt: float
    lose_reply: float
    hostile: bool


@dataclass
class Site:
    """One receiving site: its session, its disk, and the stream's data queue."""

    session: ReceiveSession
    disk: bytearray
    queue: list[tuple[str | None, dict[str, Any] | None, bytes, Envelope]] = field(
        default_factory=list
    )
    tag: int = 0
    acked: int = 0
    rejected: set[int] = field(default_factory=set)
    outcome: Finished | None = None


def _reply_key(site: str) -> str:
    return f"reply:{SENDER}:{QID}:{site}"


class Link:
    """Carries the sender's publications to the sites and their replies back."""

    def __init__(self, data: bytes, sites: list[str], faults: Faults, rng: random.Random) -> None:
        self.data = data
        self.pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        self.faults = faults
        self.rng = rng
        self.now = 0.0
        self.honest = sites
        targets = [*sites, EVIL] if faults.hostile else sites
        random_access = rng.random() < 0.7
        count = len(self.pieces) if random_access else None
        size = len(data) if random_access else None
        facts = SourceFacts("blob", "f.bin", CHUNK, size, count, random_access)
        # Riders may lag behind the broadcast by their window, or by 2 or 3 windows.
        backlog = rng.choice([0, 8, 12])
        pacing = Pacing(window=4, timeout=1000.0, resend_after=1.0, backlog=backlog)
        self.stream_id = new_stream_id()
        self.sender = SendSession.create(
            facts, targets, stream_id=self.stream_id, sender=SENDER, pacing=pacing, now=0.0
        )
        self.sites: dict[str, Site] = {}
        self.replies: list[tuple[Message, Envelope]] = []
        self.finished: dict[str, object] = {}
        self.forged_rejected = 0
        self.end_sent = False

    # -- the sending side -------------------------------------------------------------------------

    def publish(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, PublishOffer):
                self._offer(action.offer)
            elif isinstance(action, PublishChunk):
                if action.seq >= len(self.pieces):  # an iterator ran out
                    self.sender.source_ended(len(self.pieces))
                    continue
                body = self.pieces[action.seq]
                chunk = Chunk(stream_id=self.stream_id, seq=action.seq, crc32=zlib.crc32(body))
                self._carry(action.to, chunk, body)
            elif isinstance(action, PublishEnd):
                digest = hashlib.sha256(self.data).hexdigest()
                end = End(stream_id=self.stream_id, chunk_count=len(self.pieces),
                          size=len(self.data), sha256=digest)  # fmt: skip
                self._carry(action.to, end, b"")
            elif isinstance(action, TargetFinished):
                if action.error is None and action.site in self.sites:
                    # The sender reports a site stored: it must really be so (never forged).
                    assert self.sites[action.site].session.state is State.DONE, action.site
                self.finished[action.site] = action.error
            else:
                assert not isinstance(action, PublishAbort), action  # nobody times out here

    def _offer(self, offer: Offer) -> None:
        reassembler = Reassembler(offer)
        reassembler.accept()
        terms = Terms(1000.0, offer.window, checkpoints=True, keeps_prefix=True)
        session = ReceiveSession(reassembler, offer.target, terms, now=self.now, user=SENDER)
        site = self.sites[offer.target] = Site(session, bytearray(offer.size or len(self.data)))
        # First contact is never lost: the sender publishes nothing for a target before it
        # spoke, so without it a lossy link would just time out.
        for action in session.start():
            assert isinstance(action, SendProgress)
            self._reply(site, self._progress(site, action))

    def _carry(self, to: str | None, message: Message, body: bytes) -> None:
        """To one site's data queue, or (``to`` None, a broadcast) to every queue there is:
        each site's queue is bound to the broadcast key once its receiver took the offer."""
        key = f"data:{self.stream_id}:{SENDER}"
        for site in list(self.sites) if to is None else [to]:
            self._carry_to(site, message, body, key if to is None else f"{key}:{site}")

    def _carry_to(self, site: str, message: Message, body: bytes, key: str) -> None:
        faults, rng = self.faults, self.rng
        if rng.random() < faults.lose:
            return
        if isinstance(message, Chunk) and rng.random() < faults.corrupt:
            message = message.model_copy(update={"crc32": message.crc32 ^ 0x5A})
        queue = self.sites[site].queue
        item = (TYPES[type(message)].value, to_headers(message), body, Envelope(key, SENDER))
        queue.insert(rng.randrange(len(queue) + 1), item)
        if rng.random() < faults.duplicate:
            queue.append(item)
        if faults.hostile and site != EVIL and rng.random() < 0.1:
            self._poison(site, message, body, key)

    def _poison(self, site: str, message: Message, body: bytes, key: str) -> None:
        """What a hostile peer gets onto a data queue: a copy from another user, with another
        key, with garbage headers, or none."""
        queue = self.sites[site].queue
        headers = to_headers(message)
        kind = TYPES[type(message)].value
        poison = self.rng.choice([
            (kind, headers, body, Envelope(key, EVIL)),  # right key, wrong user
            (kind, headers, body, Envelope(f"{key}x", SENDER)),  # wrong key
            (kind, {"objstream": 2, "stream_id": 7}, b"junk", Envelope(key, SENDER)),
            ("chunk", None, body, Envelope(key, SENDER)),
            ("chunk", {"objstream": 1}, body, Envelope(key, SENDER)),
        ])  # fmt: skip
        queue.insert(self.rng.randrange(len(queue) + 1), poison)

    # -- the receiving side -----------------------------------------------------------------------

    def deliver(self) -> None:
        for site in self.sites.values():
            batch, site.queue = site.queue, []
            for message_type, headers, body, envelope in batch:
                site.tag += 1
                actions = site.session.delivery(site.tag, message_type, headers, body,
                                                envelope=envelope, now=self.now)  # fmt: skip
                self.run(site, actions)

    def run(self, site: Site, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Write):
                site.disk[action.offset : action.offset + len(action.body)] = action.body
            elif isinstance(action, SendProgress):
                if self.rng.random() >= self.faults.lose_reply:
                    self._reply(site, self._progress(site, action))
            elif isinstance(action, SendVerdict):
                if self.rng.random() >= self.faults.lose_reply:
                    self._reply(site, action.done)
            elif isinstance(action, Ack):
                assert action.tag > site.acked  # acks only go forward...
                assert action.tag not in site.rejected  # ...and never name a rejected tag
                site.acked = action.tag
            elif isinstance(action, DeadLetter):
                site.rejected.add(action.tag)
            elif isinstance(action, Commit):
                self.run(site, site.session.committed(Path("/in/f.bin")))
                return
            elif isinstance(action, Finished):
                site.outcome = action

    def _reply(self, site: Site, message: Progress | Done) -> None:
        self.replies.append((message, Envelope(_reply_key(site.session.site), site.session.site)))
        if self.faults.hostile and site.session.site == EVIL:
            self._forge()

    def _forge(self) -> None:
        """evil reports for an honest target: a verdict or progress claiming its site, on the
        key it may publish (its own), or on the honest site's key but as its own user."""
        victim = self.rng.choice(self.honest)
        choices: list[Progress | Done] = [
            Done(stream_id=self.stream_id, site=victim, ok=True),
            Done(stream_id=self.stream_id, site=victim, ok=False),
            Progress(stream_id=self.stream_id, site=victim, stored=len(self.pieces)),
        ]
        forged = self.rng.choice(choices)
        key = self.rng.choice([_reply_key(EVIL), _reply_key(victim)])
        self.replies.append((forged, Envelope(key, EVIL)))

    @staticmethod
    def _progress(site: Site, action: SendProgress) -> Progress:
        return Progress(stream_id=site.session.offer.stream_id, site=site.session.site,
                        stored=action.stored, resend_from=action.resend_from)  # fmt: skip

    def answer(self) -> None:
        replies, self.replies = self.replies, []
        self.rng.shuffle(replies)
        for message, envelope in replies:
            try:
                actions = self.sender.receive(
                    message, self.now, key=envelope.routing_key, user=envelope.user_id
                )
            except Forged:
                self.forged_rejected += 1
                continue
            except ProtocolError as e:  # pragma: no cover - nothing else is malformed here
                raise AssertionError(e) from e
            self.publish(actions)

    def round(self) -> None:
        while publications := self.sender.next_publications():
            self.publish(publications)
        self.deliver()
        self.answer()
        self.now += 0.25
        self.publish(self.sender.tick(self.now))
        for site in self.sites.values():
            self.run(site, site.session.tick(self.now))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
    lose=st.floats(0, 0.3),
    duplicate=st.floats(0, 0.3),
    corrupt=st.floats(0, 0.2),
    lose_reply=st.floats(0, 0.3),
    targets=st.integers(1, 3),
    hostile=st.booleans(),
)
def test_a_transfer_over_a_bad_link_ends_verified_at_every_honest_site(
    size: int,
    seed: int,
    lose: float,
    duplicate: float,
    corrupt: float,
    lose_reply: float,
    targets: int,
    hostile: bool,
) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(size)
    sites = [f"site-{i}" for i in range(targets)]
    link = Link(data, sites, Faults(lose, duplicate, corrupt, lose_reply, hostile), rng)
    link.publish(link.sender.start_actions())
    for _ in range(4000):
        if link.sender.finished:
            break
        link.round()
    assert link.sender.finished
    for name in sites:
        assert link.finished[name] is None  # no error at any honest target
        site = link.sites[name]
        assert site.session.state is State.DONE
        assert bytes(site.disk[: len(data)]) == data
        assert site.outcome is not None
        assert site.outcome.ok
    states = {t.site: t.state for t in link.sender.targets}
    assert all(states[name] is TargetState.DONE for name in sites)
