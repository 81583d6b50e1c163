"""The receive session without a broker: messages and ticks in, actions out."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any

import pytest

from objstream.common.errors import FailureCode, ProtocolError
from objstream.common.protocol import (
    Abort,
    Chunk,
    End,
    Envelope,
    Inline,
    Offer,
    new_stream_id,
    to_headers,
)
from objstream.common.reassembly import Reassembler, State
from objstream.common.receive_actions import (
    LINGER,
    MAX_LINGERING,
    RETIRE_AFTER,
    Ack,
    Action,
    Checkpoint,
    Commit,
    DeadLetter,
    DeleteQueue,
    Discard,
    Finished,
    LeaveOnDisk,
    Reconsume,
    RemoveCheckpoint,
    Retire,
    SendProgress,
    SendVerdict,
    Terms,
    Write,
)
from objstream.common.receive_end import crowded_out
from objstream.common.receive_session import ReceiveSession

CHUNK = 10


class Driver:
    """Carries the actions out in memory, the way the pika driver does against a broker."""

    def __init__(self, data: bytes, *, window: int = 8, checkpoints: bool = True,
                 keeps_prefix: bool = True, fail_commit: bool = False) -> None:  # fmt: skip
        self.data = data
        self.sid = new_stream_id()
        self.pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        self.offer = Offer(stream_id=self.sid, kind="file", name="x", size=len(data),
                           chunk_size=CHUNK, chunk_count=len(self.pieces), window=window,
                           sender="a", target="b")  # fmt: skip
        self.end = End(stream_id=self.sid, chunk_count=len(self.pieces), size=len(data),
                       sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
        reassembler = Reassembler(self.offer)
        reassembler.accept()
        terms = Terms(5.0, window, checkpoints=checkpoints, keeps_prefix=keeps_prefix)
        self.session = ReceiveSession(reassembler, "b", terms, now=0.0)
        self.disk = bytearray(len(data))
        self.fail_commit = fail_commit
        self.log: list[Action] = []
        self.tag = 0
        self.acked = 0
        self.checkpoint: tuple[int, int] | None = None

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            self.log.append(action)
            if isinstance(action, Write):
                self.disk[action.offset : action.offset + len(action.body)] = action.body
            elif isinstance(action, Ack):
                assert action.tag > self.acked  # acks only go forward
                self.acked = action.tag
            elif isinstance(action, Checkpoint):
                # Recorded before the ack, and only what is written.
                assert bytes(self.disk[: action.stored_bytes]) == self.data[: action.stored_bytes]
                self.checkpoint = (action.stored, action.stored_bytes)
            elif isinstance(action, Commit):
                if self.fail_commit:
                    self.run(self.session.commit_failed(FailureCode.IO, "disk full"))
                else:
                    self.run(self.session.committed(Path("/in/x")))
                return  # what followed the commit is void: the commit's outcome takes over

    def chunk(self, seq: int, now: float = 0.0, crc: int | None = None) -> None:
        body = self.pieces[seq]
        crc = zlib.crc32(body) if crc is None else crc
        self.tag += 1
        message = Chunk(stream_id=self.sid, seq=seq, crc32=crc)
        self.run(self.session.receive(self.tag, message, body, now))

    def send_end(self, now: float = 0.0) -> None:
        self.tag += 1
        self.run(self.session.receive(self.tag, self.end, b"", now))

    def of(self, kind: type[Any]) -> list[Any]:
        return [a for a in self.log if isinstance(a, kind)]

    @property
    def verdict(self) -> SendVerdict:
        (verdict,) = self.of(SendVerdict)
        return verdict  # type: ignore[no-any-return]


def test_in_order_transfer_commits_then_sends_ok() -> None:
    d = Driver(bytes(range(95)))
    d.run(d.session.start())
    for seq in range(len(d.pieces)):
        d.chunk(seq)
    d.send_end()
    assert bytes(d.disk) == d.data
    assert d.session.state is State.DONE
    kinds = [type(a) for a in d.log]
    # The verdict only after the commit, and the state file goes before it.
    assert kinds.index(Commit) < kinds.index(RemoveCheckpoint) < kinds.index(SendVerdict)
    assert d.verdict.done.ok
    assert d.verdict.done.stored_as == "x"
    assert d.acked == d.tag  # everything delivered is acked
    finished = d.of(Finished)[-1]
    assert finished.ok
    assert finished.path == Path("/in/x")


def test_progress_every_quarter_window() -> None:
    d = Driver(bytes(200), window=8)
    for seq in range(10):
        d.chunk(seq)
    stored = [p.stored for p in d.of(SendProgress)]
    assert stored == [2, 4, 6, 8, 10]
    assert d.checkpoint == (10, 100)


def test_slow_chunks_are_acked_every_flush_but_reported_every_progress_interval() -> None:
    # One chunk every 0.06 s, a tick after each: the broker gets an ack at every tick (the
    # prefetch must move), the sender a progress only every 0.25 s (it handles one message per
    # progress per target; a broadcast to 8 slow targets must not cost it 8 replies a tick).
    d = Driver(bytes(200), window=16)  # a quarter window: 4 chunks
    now = 0.0
    for seq in range(6):
        now += 0.06
        d.chunk(seq, now)
        d.run(d.session.tick(now + 0.055))
    assert [a.tag for a in d.of(Ack)] == [1, 2, 3, 4, 5, 6]
    assert [p.stored for p in d.of(SendProgress)] == [4]  # the quarter window, at 0.24 s
    d.run(d.session.tick(0.45))
    assert [p.stored for p in d.of(SendProgress)] == [4]  # 0.21 s after the last report
    d.run(d.session.tick(0.5))  # nothing left to ack, but the sender hears of chunks 5 and 6
    assert [p.stored for p in d.of(SendProgress)] == [4, 6]
    assert d.checkpoint == (6, 60)  # recorded before it was reported


def test_a_resend_of_what_is_stored_is_answered_with_a_progress_again() -> None:
    """The sender resends what is stored when it missed a report: without a new one it would
    resend for ever (found by test_session_link's lossy link)."""
    d = Driver(bytes(200), window=8)
    for seq in range(4):
        d.chunk(seq, 0.1)
    assert [p.stored for p in d.of(SendProgress)] == [2, 4]
    d.run(d.session.tick(1.0))
    assert [p.stored for p in d.of(SendProgress)] == [2, 4]  # nothing new: nothing to say
    d.chunk(2, 1.1)  # resent: the report of 4 was lost on the way
    d.chunk(3, 1.1)
    d.run(d.session.tick(1.2))
    assert [p.stored for p in d.of(SendProgress)] == [2, 4, 4]  # once, not per duplicate
    d.run(d.session.tick(2.0))
    assert [p.stored for p in d.of(SendProgress)] == [2, 4, 4]


def test_a_resend_after_the_verdict_gets_the_verdict_again() -> None:
    """The data queue is still consumed a while after the verdict: a resend there means the
    sender missed the verdict, which goes again, at most once a second."""
    d = Driver(bytes(30), window=8)
    for seq in range(3):
        d.chunk(seq, 0.1)
    d.send_end(0.1)
    first = d.verdict.done
    assert first.ok
    d.chunk(2, 1.2)  # the sender resends: it missed the verdict
    d.chunk(2, 1.5)  # 0.3 s later: not again yet
    assert [v.done for v in d.of(SendVerdict)] == [first, first]
    d.chunk(2, 2.3)
    assert [v.done for v in d.of(SendVerdict)] == [first, first, first]
    assert d.acked == d.tag  # the late ones are acked with each verdict


def test_a_window_resent_just_after_a_lost_verdict_is_acked_and_answered() -> None:
    """The verdict went out on a channel that routed nothing (a reconnect on a cluster) and the
    sender resent a whole window within the second after it: every resend is acked at once (a
    full prefetch would deliver nothing more, and the sender would time out waiting) and the
    verdict goes again at the first tick once a second has passed."""
    d = Driver(bytes(30), window=3)
    for seq in range(3):
        d.chunk(seq, 0.1)
    d.send_end(0.1)
    first = d.verdict.done
    for seq in range(3):
        d.chunk(seq, 0.5)
    assert d.acked == d.tag  # the prefetch is free for the next resend
    assert [v.done for v in d.of(SendVerdict)] == [first]
    d.run(d.session.tick(0.9))
    assert [v.done for v in d.of(SendVerdict)] == [first]  # not yet a second
    d.run(d.session.tick(1.2))
    assert [v.done for v in d.of(SendVerdict)] == [first, first]
    d.run(d.session.tick(3.0))
    assert [v.done for v in d.of(SendVerdict)] == [first, first]  # owed once, said once


def test_gap_asks_for_resend_once() -> None:
    d = Driver(bytes(100))
    d.chunk(0)
    d.chunk(2)
    d.chunk(3)
    assert [p.resend_from for p in d.of(SendProgress)] == [1]
    d.chunk(1)
    d.chunk(2)
    assert d.session.stored == 3


def test_corrupt_chunk_dead_lettered_and_resend_asked() -> None:
    d = Driver(bytes(100))
    d.chunk(0)
    d.chunk(1, crc=123)
    (dead,) = d.of(DeadLetter)
    assert dead.tag == 2
    assert "crc32" in dead.reason
    assert d.of(SendProgress)[-1].resend_from == 1


def test_wrong_stream_and_bad_end_dead_lettered() -> None:
    d = Driver(bytes(100))
    d.tag += 1
    other = Chunk(stream_id=new_stream_id(), seq=0, crc32=0)
    d.run(d.session.receive(d.tag, other, b"", 0.0))
    d.tag += 1
    bad_end = d.end.model_copy(update={"size": 5})
    d.run(d.session.receive(d.tag, bad_end, b"", 0.0))
    assert len(d.of(DeadLetter)) == 2
    assert d.session.state is State.RECEIVING


def test_malformed_is_dead_lettered_and_never_acked() -> None:
    """A dead-lettered delivery is rejected: the broker forgets its tag, and an ack naming it
    (multiple=true up to it) would close the channel. Later acks name only what came after."""
    d = Driver(bytes(10))
    d.run(d.session.malformed(7, "garbage", 0.0))
    assert d.of(DeadLetter) == [DeadLetter(7, "garbage")]
    assert d.session.unacked_tag == 0
    d.chunk(0)  # tag 1 of a new batch... tags only grow on one channel:
    d.run(d.session.malformed(9, "more garbage", 0.0))
    assert d.session.unacked_tag == d.tag  # the chunk's tag, not the rejected 9


def test_checksum_mismatch_fails_and_discards() -> None:
    d = Driver(bytes(30))
    d.end = d.end.model_copy(update={"sha256": "0" * 64})
    for seq in range(3):
        d.chunk(seq)
    d.send_end()
    assert d.session.state is State.FAILED
    assert not d.of(Commit)
    assert d.of(Discard)
    assert d.verdict.done.code == FailureCode.CHECKSUM


def test_timeout_keeps_verified_prefix() -> None:
    d = Driver(bytes(100))
    for seq in range(4):
        d.chunk(seq, now=1.0)
    d.run(d.session.tick(3.0))  # flushes
    assert d.acked == 4
    d.run(d.session.tick(5.5))
    assert not d.of(SendVerdict)
    d.run(d.session.tick(6.5))
    assert d.of(LeaveOnDisk) == [LeaveOnDisk(4, 40, ended=True)]
    done = d.verdict.done
    assert not done.ok
    assert done.code == FailureCode.TIMEOUT
    assert "40 bytes received are kept" in done.detail
    assert d.session.tick(100.0) == []


def test_timeout_without_prefix_discards() -> None:
    d = Driver(bytes(100), keeps_prefix=False)
    d.chunk(0)
    d.run(d.session.tick(10.0))
    assert d.of(Discard)
    assert not d.of(LeaveOnDisk)


def test_abort_keeps_prefix_and_acks() -> None:
    d = Driver(bytes(100))
    d.chunk(0)
    d.chunk(1)
    d.tag += 1
    d.run(d.session.receive(d.tag, Abort(stream_id=d.sid, reason="bye"), b"", 0.0))
    assert d.of(LeaveOnDisk) == [LeaveOnDisk(2, 20, ended=True)]
    assert d.acked == d.tag
    assert d.verdict.done.code == FailureCode.ABORTED
    # A late message is acked at once; the verdict, just said, is not said again at once.
    d.chunk(2)
    assert d.acked == d.tag
    assert len(d.of(SendVerdict)) == 1


def test_commit_failure_turns_into_failed_verdict() -> None:
    d = Driver(bytes(25), fail_commit=True)
    for seq in range(3):
        d.chunk(seq)
    d.send_end()
    assert d.session.state is State.FAILED
    done = d.verdict.done
    assert not done.ok
    assert done.code == FailureCode.IO
    assert done.detail == "disk full"
    assert d.of(Discard)
    assert not d.of(RemoveCheckpoint)


def test_an_interruption_during_the_commit_leaves_the_commit_to_decide() -> None:
    """A retrieval cancelled (or a stream withdrawn) once every byte is in: the commit is
    under way and ends the stream; before, it failed the session under the commit, which
    then could not be told it had succeeded."""
    d = Driver(bytes(10))
    d.chunk(0)
    d.session.receive(2, d.end, b"", 0.0)
    assert d.session.interrupted("site-1 was interrupted") == []
    assert d.session.state is State.VERIFYING
    d.run(d.session.committed())
    assert d.verdict.done.ok


def test_an_interruption_while_receiving_fails_the_stream_aborted() -> None:
    d = Driver(bytes(100))
    d.chunk(0)
    d.run(d.session.interrupted("site-1 was interrupted"))
    assert d.verdict.done.code == FailureCode.ABORTED
    assert "interrupted" in d.verdict.done.detail


def test_committing_never_times_out_and_tells_the_sender_it_is_alive() -> None:
    d = Driver(bytes(10))
    d.chunk(0)
    actions = d.session.receive(2, d.end, b"", 0.0)
    # Checkpointed, acked and reported before the commit: the sender stops resending.
    assert actions == [Checkpoint(1, 10), Ack(2), SendProgress(1, 10, None), Commit()]
    assert d.session.state is State.VERIFYING
    # A save can take minutes: no timeout, and a progress every commit_heartbeat (the sender
    # would otherwise resend after its resend_after and fail the target after its timeout).
    assert d.session.tick(0.5) == []
    assert d.session.tick(1000.0) == [SendProgress(1, 10, None)]
    assert d.session.tick(1000.5) == []
    assert d.session.tick(1001.0) == [SendProgress(1, 10, None)]
    assert d.session.receive(3, d.end, b"", 1000.0) == []  # late messages: only acked
    out = d.session.committed({"a": 1})
    assert isinstance(out[-1], Finished)
    assert out[-1].value == {"a": 1}
    assert Ack(3) in out


def test_write_failure_fails_with_its_code() -> None:
    d = Driver(bytes(30))
    actions = d.session.receive(1, Chunk(stream_id=d.sid, seq=0, crc32=zlib.crc32(bytes(10))),
                                bytes(10), 0.0)  # fmt: skip
    assert isinstance(actions[0], Write)
    d.run(d.session.fail(FailureCode.IO, "no space"))
    assert d.verdict.done.code == FailureCode.IO
    assert d.of(Discard)


def test_suspend_checkpoints_and_leaves_on_disk() -> None:
    d = Driver(bytes(100))
    d.chunk(0)
    d.chunk(1)
    d.run(d.session.suspend(0.1))
    assert d.checkpoint == (2, 20)
    assert d.acked == 2
    assert d.of(LeaveOnDisk) == [LeaveOnDisk(2, 20)]
    assert d.session.state is State.SUSPENDED
    assert not d.of(SendVerdict)


def test_suspend_without_checkpoints_aborts() -> None:
    d = Driver(bytes(100), checkpoints=False)
    d.chunk(0)
    d.run(d.session.suspend(0.1))
    assert d.verdict.done.code == FailureCode.ABORTED


def test_reconnect_asks_from_stored() -> None:
    d = Driver(bytes(100))
    d.chunk(0)
    actions = d.session.reconnected(1.0)
    assert actions == [SendProgress(1, 10, resend_from=1)]
    assert d.session.unacked_tag == 0


def test_a_stream_silent_after_a_reconnect_consumes_its_queue_again_until_data_comes() -> None:
    d = Driver(bytes(100))
    d.session.reconsume_after = 2.0
    d.chunk(0, 0.0)
    d.chunk(1, 0.0)
    assert d.session.reconnected(10.0) == [SendProgress(2, 20, resend_from=2)]
    assert d.session.tick(11.9) == []
    assert d.session.tick(12.1) == [Reconsume()]  # the first consume brought nothing
    assert d.session.unacked_tag == 0  # the old channel's tags are not acked on the new one
    assert d.session.tick(13.0) == []
    assert d.session.tick(14.2) == [Reconsume()]  # and again while nothing comes
    d.chunk(2, 14.5)  # data: the consume works
    assert Reconsume() not in d.session.tick(17.0)
    # Without a reconnect, silence is only silence (the sender resends; the timeout fails it).
    quiet = Driver(bytes(100))
    quiet.session.reconsume_after = 2.0
    quiet.chunk(0, 0.0)
    assert Reconsume() not in quiet.session.tick(4.0)


def test_inline_commits_at_once() -> None:
    data = b"hello"
    d = Driver(data)
    inline = Inline(crc32=zlib.crc32(data), sha256=hashlib.sha256(data).hexdigest())
    actions = d.session.inline(inline, data)
    assert [type(a) for a in actions] == [Write, Commit]
    bad = Driver(data)
    actions = bad.session.inline(Inline(crc32=1, sha256=inline.sha256), data)
    assert isinstance(actions[-1], Finished)
    assert actions[-1].code == FailureCode.CHECKSUM


def test_chunk_beyond_count_is_a_protocol_error() -> None:
    d = Driver(bytes(10))
    d.chunk(0)
    d.tag += 1
    actions = d.session.receive(d.tag, Chunk(stream_id=d.sid, seq=5, crc32=0), b"", 0.0)
    assert isinstance(actions[0], DeadLetter)


def test_illegal_event_raises() -> None:
    d = Driver(bytes(10))
    d.run(d.session.fail(FailureCode.ABORTED, "x"))
    with pytest.raises(ProtocolError, match="can't handle"):
        d.session.reassembler.mark_done()


# -- what the broker vouches for, first contact, and the end of an ended stream ------------------


def test_data_from_another_user_or_with_another_key_is_dead_lettered() -> None:
    """The offer's user published the stream's data, with one of its two keys: anything else
    on the data queue (a peer that learned the stream id, a publish to the default exchange)
    is dead-lettered, and the stream goes on."""
    d = Driver(bytes(40))
    d.session.user = "a"
    chunk = Chunk(stream_id=d.sid, seq=0, crc32=zlib.crc32(d.pieces[0]))
    headers = to_headers(chunk)
    key = f"data:{d.sid}:a"
    forged = d.session.delivery(1, "chunk", headers, d.pieces[0], envelope=Envelope(key, "b"),
                                now=0.0)  # fmt: skip
    assert forged == [DeadLetter(1, "chunk from user 'b', the offer came from user 'a'")]
    direct = Envelope(f"objstream.data.b.{d.sid}", "a")
    [dead] = d.session.delivery(2, "chunk", headers, d.pieces[0], envelope=direct, now=0.0)
    assert isinstance(dead, DeadLetter)
    assert "with key" in dead.reason
    good = d.session.delivery(3, "chunk", headers, d.pieces[0], envelope=Envelope(key, "a"),
                              now=0.0)  # fmt: skip
    assert any(isinstance(a, Write) for a in good)
    assert d.session.unacked_tag == 3  # the rejected tags are never acked
    unicast = Envelope(f"{key}:b", "a")
    chunk1 = Chunk(stream_id=d.sid, seq=1, crc32=zlib.crc32(d.pieces[1]))
    again = d.session.delivery(4, "chunk", to_headers(chunk1), d.pieces[1], envelope=unicast,
                               now=0.0)  # fmt: skip
    assert any(isinstance(a, Write) for a in again)


def test_a_slot_whose_sender_sends_nothing_is_let_go_after_the_contact_timeout() -> None:
    d = Driver(bytes(40))
    terms = Terms(60.0, 8, checkpoints=True, keeps_prefix=True, contact_timeout=10.0)
    reassembler = Reassembler(d.offer)
    reassembler.accept()
    session = ReceiveSession(reassembler, "b", terms, now=0.0, user="a")
    assert session.tick(9.0) == []
    actions = session.tick(10.5)
    finished = [a for a in actions if isinstance(a, Finished)]
    assert finished[0].code is FailureCode.TIMEOUT
    assert "sent nothing within 10 s" in finished[0].detail
    # A sender that sent something is held to the usual timeout only.
    reassembler = Reassembler(d.offer)
    reassembler.accept()
    session = ReceiveSession(reassembler, "b", terms, now=0.0, user="a")
    session.receive(1, Chunk(stream_id=d.sid, seq=0, crc32=zlib.crc32(d.pieces[0])),
                    d.pieces[0], 1.0)  # fmt: skip
    assert not [a for a in session.tick(30.0) if isinstance(a, Finished)]


def test_an_ended_stream_lingers_then_unbinds_then_deletes_its_queue() -> None:
    d = Driver(bytes(20))
    for seq in range(len(d.pieces)):
        d.chunk(seq)
    d.send_end()
    session = d.session
    assert session.finished
    assert session.tick(1.0) == []  # lingers: a resend now gets the verdict again
    assert session.tick(1.0 + LINGER) == [Retire()]
    assert session.tick(1.0 + LINGER + 1.0) == []
    assert session.tick(1.0 + LINGER + RETIRE_AFTER) == [DeleteQueue()]
    assert session.gone
    assert session.tick(100.0) == []


def test_at_most_max_lingering_streams_linger() -> None:
    sessions = []
    for n in range(MAX_LINGERING + 3):
        d = Driver(bytes(4))
        d.chunk(0)
        d.send_end()
        d.session.tick(float(n))  # ended at n
        sessions.append(d.session)
    ends = {id(s.end) for s in sessions}
    assert len(ends) == len(sessions)
    crowded = [
        s for s in sessions if id(s.end) in {id(e) for e in crowded_out([s.end for s in sessions])}
    ]
    assert crowded == sessions[:3]  # the oldest go first
    assert [crowded[0].retire(50.0)] == [[Retire()]]
    closing = sessions[-1].close_out(51.0)
    assert closing == [Retire(), DeleteQueue()]
