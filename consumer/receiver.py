"""``Receiver``: the receiving side of a site. Takes offers from the site's inbox and streams in.

One receiver holds one connection and works in the thread that calls :meth:`Receiver.receive`.
It is composed of parts: a :class:`~objstream.consumer.core.ConsumerCore` (the connection, and
what turns an offer into a stream), whose :class:`~objstream.consumer.stream_table.StreamTable`
drives one :class:`~objstream.common.receive_session.ReceiveSession` per stream on a channel of
its own (prefetch: the receiver's ``receive_window``, never more) and whose
:class:`~objstream.consumer.takeover.ResumeStore` holds state files and kept prefixes; and an
:class:`~objstream.consumer.inbox.Inbox` that takes offers from the site's inbox. Chunks are
judged by the session and written by the stream's assembler; the receiver only moves bytes and
messages between them and the broker.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Unpack

from objstream.common.errors import TransferFailed
from objstream.common.settings import Settings
from objstream.consumer.core import ConsumerCore
from objstream.consumer.inbox import Inbox
from objstream.consumer.options import AssemblerFactory, ReceiverOptions
from objstream.consumer.side import ConsumerSide
from objstream.consumer.streams import Received

__all__ = ["AssemblerFactory", "Receiver"]


class Receiver(ConsumerSide):
    """Receives the objects streamed to ``site`` into the directory ``dest``.

    Use :meth:`receive` (or iterate) to get each object as it completes::

        with Receiver("site-1", "/data/in", settings) as receiver:
            item = receiver.receive(timeout=60)

    A stream that fails raises :class:`TransferFailed` from :meth:`receive`; the receiver itself
    goes on and can be asked for the next object.

    Files go to ``dest``; containers come back in :attr:`Received.value`, or entry by entry to
    ``on_entry`` (then they are not kept). With ``spool_containers`` a container goes to
    ``dest`` first and is decoded once complete, so that it survives this process like a file
    does (at the cost of its size on disk while in transit; see
    :mod:`objstream.consumer.container_spool`). ``assemblers`` adds custom kinds: a mapping from a
    kind name to a factory that takes the :class:`Offer` and returns an
    :class:`~objstream.common.streaming.ObjectAssembler`. ``save`` runs on each object once it is
    verified and before the sender is told it arrived (see
    :data:`~objstream.consumer.stream_table.Save`): a save that fails fails the transfer.
    ``as_torch`` returns a container's arrays (and gives ``on_entry`` its entries) as CPU
    ``torch.Tensor`` objects, built from the received bytes without pickle (needs the
    ``objstream[torch]`` extra).
    """

    def __init__(
        self,
        site: str,
        dest: str | Path,
        settings: Settings | None = None,
        **options: Unpack[ReceiverOptions],
    ) -> None:
        core = ConsumerCore(site, dest, settings, **options)
        # Hashing what a dead receiver left can take long: done before connecting, so that no
        # heartbeat waits for it.
        core.start([Inbox(core)], core.store.left_over())
        super().__init__(core)

    def receive(self, timeout: float | None = None) -> Received | None:
        """Wait for the next object to complete; ``None`` if none did within ``timeout`` s.

        Raises:
            TransferFailed: the next stream to end failed (the partial file is gone).
                :class:`~objstream.common.errors.SenderGone` when it was a stream an earlier
                receiver of this directory left whose sender has gone since: nothing
                arrived, and its verified prefix is kept for a retrieval.
            BrokerUnreachable: the broker connection was lost and could not be re-established.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outcomes = self._core.table.outcomes
        while not outcomes:
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None
            self._core.events(wait)
        outcome = outcomes.popleft()
        if isinstance(outcome, TransferFailed):
            raise outcome
        return outcome

    def drain(self) -> list[Received | TransferFailed]:
        """Every outcome that has not been taken yet, without waiting: failures are returned,
        not raised. After :meth:`close` this includes what closing settled (a commit that was
        under way, a stream it failed), so that every object stored can still be reported."""
        outcomes = self._core.table.outcomes
        items = list(outcomes)
        outcomes.clear()
        return items

    def __iter__(self) -> Receiver:
        return self

    def __next__(self) -> Received:
        item = self.receive()
        assert item is not None  # no timeout: receive() only returns with an object
        return item

    @property
    def active_streams(self) -> int:
        return len(self._core.table)

    def close(self, checkpoint: bool = True) -> None:
        """Stop and disconnect.

        With ``checkpoint`` (the default), file streams (and spooled containers) in progress
        are left for the next receiver of this site and directory: what was written is acked
        and recorded, and that receiver takes over from there (the sender waits, up to its
        timeout). Other streams fail and their senders are told.
        """
        self._core.close(checkpoint)
