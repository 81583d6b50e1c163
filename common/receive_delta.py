"""The receiving half of a delta transfer, without I/O: the manifest, and what is held.

A receiver that holds pieces of what a sender sent it before says so in its first ``progress``
(``delta``, only when the offer allows it: :attr:`Terms.delta`). The sender's manifest then
comes on the data queue; the driver finds which chunks this receiver holds
(:class:`FindHeld`), the sender hears it (``progress.holds``) and never sends them. The
stream still takes every chunk in order: a held one is copied from what this receiver stored
(:class:`FillHeld`), checked against its digest in the manifest, and counted into the whole
object's SHA-256 like any other. A chunk that comes after held ones is taken once they are
copied; one that cannot be copied is asked for again (``resend_from``), and the sender then
sends everything from there (docs/protocol.md, "Delta transfer").
"""

from __future__ import annotations

import bisect

from objstream.common.delta import Holds, Manifest
from objstream.common.errors import ProtocolError
from objstream.common.protocol import CONTAINER_KIND, Chunk, Offer
from objstream.common.protocol import Manifest as ManifestMessage
from objstream.common.receive_actions import Action, FillHeld, FindHeld
from objstream.common.streaming import MetaValue

FILL_BURST = 256 * 1024 * 1024
"""Bytes of held chunks copied in one go, between two looks at the connection (at local disk
speed, a fraction of a second); the copy goes on at the next message or tick."""


class DeltaReceive:
    """One stream's delta: asked for, its manifest, the chunks held.

    Args:
        asked: this receiver asks for the manifest (:attr:`Terms.delta`).
        offer: the stream's offer.
    """

    def __init__(self, asked: bool, offer: Offer) -> None:
        self.asked = asked
        self.offer = offer
        self.manifest: Manifest | None = None
        self.holds: Holds | None = None
        self.filling = False  # a FillHeld is out: no second one
        self.burst = max(1, FILL_BURST // max(1, offer.chunk_size))
        """Chunks one FillHeld copies at most (the connection's thread then works again)."""
        self._firsts: list[int] = []  # each container entry's first chunk

    @property
    def finding(self) -> bool:
        """The manifest came, and the driver is finding what is held."""
        return self.manifest is not None and self.holds is None

    @property
    def asking(self) -> bool:
        """Say ``delta`` in progress reports: asked, and no manifest yet."""
        return self.asked and self.manifest is None

    def take_manifest(self, header: ManifestMessage, body: bytes) -> list[Action]:
        """The sender's manifest (asked for): find what is held.

        Raises:
            ProtocolError: nobody asked, a second different one, or it does not fit the offer.
        """
        offer = self.offer
        if not self.asked:
            raise ProtocolError("a manifest this receiver did not ask for")
        if self.manifest is not None:
            if body == self.manifest.body():
                return []  # the same again (a resend)
            raise ProtocolError("a second manifest, not the first")
        if offer.chunk_count is None or offer.size is None:
            raise ProtocolError(f"a manifest for a {offer.kind} of unknown size")
        if header.entries and offer.kind != CONTAINER_KIND:
            raise ProtocolError(f"a manifest with entries for a {offer.kind}")
        if header.chunk_count != offer.chunk_count:
            raise ProtocolError(
                f"manifest of {header.chunk_count} chunks, the offer says {offer.chunk_count}"
            )
        self.manifest = Manifest.parse(
            body,
            chunk_count=header.chunk_count,
            entries=header.entries,
            chunk_size=offer.chunk_size,
            size=offer.size,
        )
        self._firsts = [e.first for e in self.manifest.entries]
        return [FindHeld(self.manifest)]

    def found(self, holds: Holds) -> str:
        """What the driver found held: the answer for the sender."""
        self.holds = holds
        return holds.encode()

    def fill(self, stored: int) -> FillHeld | None:
        """Copy the held chunks from ``stored`` on (at most :attr:`burst`), if it is held."""
        holds = self.holds
        if holds is None or self.filling or stored not in holds:
            return None
        self.filling = True
        return FillHeld(stored, holds.run_from(stored, min(holds.count, stored + self.burst)))

    def before(self, stored: int, tag: int, chunk: Chunk, body: bytes) -> FillHeld | None:
        """``chunk`` (delivered with ``tag``) came with every chunk from ``stored`` up to it
        held: copy them, then take it (not a gap: the sender skipped them)."""
        holds, seq = self.holds, chunk.seq
        if holds is None or self.filling or seq <= stored or holds.run_from(stored, seq) != seq:
            return None
        self.filling = True
        return FillHeld(stored, seq, (tag, chunk, body))

    def lost(self, seq: int) -> None:
        """Held chunk ``seq`` cannot be copied: from there on, everything comes from the sender."""
        self.filling = False
        if self.holds is not None:
            self.holds.drop_from(seq)

    def meta(self, seq: int) -> dict[str, MetaValue] | None:
        """The meta of held chunk ``seq``, as the sender would have sent it (a container's)."""
        if self.manifest is None or not self._firsts:
            return None
        index = bisect.bisect_right(self._firsts, seq) - 1
        return self.manifest.entries[index].meta(index, seq)
