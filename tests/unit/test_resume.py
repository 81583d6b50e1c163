"""The state kept next to a partial file, and who may take a stream over."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from objstream.common.naming import partial_name
from objstream.common.protocol import Offer, new_stream_id
from objstream.common.reassembly import Reassembler
from objstream.consumer.resume import StreamState, adopt, find_kept, find_resumable


def _offer(size: int = 10, chunk_size: int = 4) -> Offer:
    return Offer(stream_id=new_stream_id(), kind="file", name="f.bin", size=size,
                 chunk_size=chunk_size, chunk_count=-(-size // chunk_size), window=4,
                 sender="server", target="site-1")  # fmt: skip


def test_a_stream_whose_owner_lives_is_not_taken_over(tmp_path: Path) -> None:
    offer = _offer()
    (tmp_path / partial_name(offer.stream_id)).write_bytes(b"abcdefgh")
    state = StreamState.create(tmp_path, offer, "amq.gen-reply")
    state.save(2, 8)
    assert find_resumable(tmp_path) == ([], [])  # locked by its (living) owner
    state.remove()
    assert not state.path.exists()


def test_a_dead_owners_stream_is_found_with_its_counts(tmp_path: Path) -> None:
    offer = _offer()
    (tmp_path / partial_name(offer.stream_id)).write_bytes(b"abcdefgh")
    reply_to = "reply:server:" + "a" * 32
    state = StreamState.create(tmp_path, offer, reply_to, user_id="server-user")
    state.save(1, 4)
    state.save(2, 8)
    os.close(state._fd)  # the process died: the lock goes with it
    [item], [] = find_resumable(tmp_path)
    assert (item.offer, item.reply_to, item.stored, item.stored_bytes, item.user_id) == (
        offer,
        reply_to,
        2,
        8,
        "server-user",  # the successor checks the stream's data against it
    )
    assert item.prefix_sha256().hexdigest() == hashlib.sha256(b"abcdefgh").hexdigest()
    assert find_resumable(tmp_path) == ([], [])  # now ours


def test_inconsistent_or_garbled_state_is_left_alone(tmp_path: Path) -> None:
    offer = _offer()
    (tmp_path / partial_name(offer.stream_id)).write_bytes(b"ab")  # shorter than the state says
    state = StreamState.create(tmp_path, offer, "q")
    state.save(2, 8)
    os.close(state._fd)
    (tmp_path / ".objstream-garbage.state").write_text("not json\n1 2\n")
    assert find_resumable(tmp_path) == ([], [])


def test_a_resumed_reassembler_goes_on_from_the_stored_prefix() -> None:
    import zlib

    offer = _offer(size=10, chunk_size=4)
    data = b"abcdefghij"
    sha = hashlib.sha256(data[:8])
    r = Reassembler.resumed(offer, stored=2, stored_bytes=8, prefix_sha=sha)
    assert r.chunk(1, zlib.crc32(b"efgh"), b"efgh").verdict.value == "duplicate"
    outcome = r.chunk(2, zlib.crc32(b"ij"), b"ij")
    assert outcome.offset == 8
    assert r.sha256 == hashlib.sha256(data).hexdigest()


def test_abandoned_partials_older_than_the_ttl_are_removed(tmp_path: Path) -> None:
    import time

    from objstream.consumer.resume import remove_abandoned

    old, fresh, held = _offer(), _offer(), _offer()
    for offer in (old, fresh, held):
        (tmp_path / partial_name(offer.stream_id)).write_bytes(b"x")
    state_old = StreamState.create(tmp_path, old, "q")
    os.close(state_old._fd)
    state_held = StreamState.create(tmp_path, held, "q")  # a live receiver keeps it locked
    past = time.time() - 7200
    for offer in (old, held):
        for path in tmp_path.glob(f"*{offer.stream_id}*"):
            os.utime(path, (past, past))
    removed = remove_abandoned(tmp_path, ttl=3600)
    assert [p.name for p in removed] == [partial_name(old.stream_id)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [partial_name(fresh.stream_id), partial_name(held.stream_id), state_held.path.name]
    )


def _kept(
    tmp_path: Path,
    content: bytes,
    stored: int,
    sender: str = "server",
    requested: str | None = None,
) -> Offer:
    offer = _offer(size=10).model_copy(update={"sender": sender})
    (tmp_path / partial_name(offer.stream_id)).write_bytes(content)
    state = StreamState.create(tmp_path, offer, "q", requested)
    state.save(stored, stored * 4, ended=True)
    state.release()
    return offer


def test_an_ended_stream_is_not_taken_over_but_a_retrieval_resumes_it(tmp_path: Path) -> None:
    ended = _kept(tmp_path, b"abcdefgh", 2)
    live = _offer()
    (tmp_path / partial_name(live.stream_id)).write_bytes(b"abcd")
    state = StreamState.create(tmp_path, live, "q")
    state.save(1, 4)
    state.release()  # suspended for a successor: not ended
    resumable, over = find_resumable(tmp_path)
    assert [item.offer for item in resumable] == [live]
    assert [item.offer for item in over] == [ended]
    assert not over[0].state.locked  # let go: nobody takes an ended stream over
    kept = find_kept(tmp_path, "server", "f.bin")
    assert kept is not None
    assert (kept.offer, kept.stored, kept.ended) == (ended, 2, True)


def test_a_state_with_an_unknown_mark_is_left_alone(tmp_path: Path) -> None:
    offer = _kept(tmp_path, b"abcdefgh", 2)
    [state_file] = tmp_path.glob("*.state")
    text = state_file.read_text().replace(" ended", " other")
    state_file.write_text(text)
    assert find_resumable(tmp_path) == ([], [])
    assert find_kept(tmp_path, offer.sender, offer.name) is None


def test_a_kept_prefix_is_found_by_sender_and_requested_name(tmp_path: Path) -> None:
    _kept(tmp_path, b"abcd", 1)  # a push of f.bin: found under its own name
    _kept(tmp_path, b"abcdefgh", 2, requested="sub/f.bin")
    _kept(tmp_path, b"abcdefgh", 2, sender="other")
    assert find_kept(tmp_path, "server", "nothing") is None
    item = find_kept(tmp_path, "server", "f.bin")
    assert item is not None
    assert item.stored == 1
    assert find_kept(tmp_path, "server", "f.bin") is None  # this process holds it now
    item.state.release()
    deeper = find_kept(tmp_path, "server", "sub/f.bin")
    assert deeper is not None
    assert (deeper.stored, deeper.requested) == (2, "sub/f.bin")


def test_adopting_a_prefix_renames_it_and_cuts_what_was_never_recorded(tmp_path: Path) -> None:
    _kept(tmp_path, b"abcdefgh-unrecorded", 2)
    kept = find_kept(tmp_path, "server", "f.bin")
    assert kept is not None
    offer = _offer(size=12).model_copy(update={"resume_from": 2})
    state = adopt(kept, tmp_path, offer, "q2")
    assert (tmp_path / partial_name(offer.stream_id)).read_bytes() == b"abcdefgh"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [partial_name(offer.stream_id), state.path.name]
    )
    state.release()
    [item], [] = find_resumable(tmp_path)  # the new stream goes on; it has not ended
    assert (item.offer, item.reply_to, item.stored, item.stored_bytes) == (offer, "q2", 2, 8)


def test_what_a_dead_receiver_left_of_a_redelivered_offer_is_cleared(tmp_path: Path) -> None:
    """A receiver took an offer and died before it acked it (its partial file and a state of
    0 bytes, or only the partial file): the broker delivers the offer again, and the next
    receiver must be able to set the stream up, not fail it with 'File exists'."""
    from objstream.consumer.resume import clear_stream

    offer = _offer()
    (tmp_path / partial_name(offer.stream_id)).write_bytes(b"")
    state = StreamState.create(tmp_path, offer, "q")
    os.close(state._fd)  # died
    assert clear_stream(tmp_path, offer.stream_id)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / partial_name(offer.stream_id)).write_bytes(b"")  # died before its state
    assert clear_stream(tmp_path, offer.stream_id)
    assert list(tmp_path.iterdir()) == []
    assert clear_stream(tmp_path, offer.stream_id)  # nothing there: nothing to do


def test_a_stream_a_live_receiver_holds_is_not_cleared(tmp_path: Path) -> None:
    from objstream.consumer.resume import clear_stream

    offer = _offer()
    (tmp_path / partial_name(offer.stream_id)).write_bytes(b"abcd")
    state = StreamState.create(tmp_path, offer, "q")  # locked: its receiver lives
    assert not clear_stream(tmp_path, offer.stream_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [partial_name(offer.stream_id), state.path.name]
    )
    state.remove()
