"""The keyword options of a receiving site: :class:`~objstream.consumer.receiver.Receiver` takes
:class:`ReceiverOptions`, :class:`~objstream.consumer.retriever.Retriever` the
:class:`RetrieverOptions` among them. Both are checked by the type checker at every call
(``**options: Unpack[...]``) and documented here, once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypedDict

from objstream.common.protocol import Offer
from objstream.common.streaming import ObjectAssembler, ProgressHook
from objstream.consumer.container_assembler import OnEntry
from objstream.consumer.streams import Save

AssemblerFactory = Callable[[Offer], ObjectAssembler]


class RetrieverOptions(TypedDict, total=False):
    """What a retrieving site chooses."""

    on_entry: OnEntry | None
    """Containers go to this callback entry by entry as they complete (and are not kept)."""
    progress: ProgressHook | None
    """Called as chunks are stored."""
    save: Save | None
    """Runs on each object once it is verified and before the sender is told it arrived; a
    save that fails fails the transfer."""
    as_torch: bool
    """Containers (and ``on_entry``'s entries) come as CPU ``torch.Tensor`` objects, built from
    the received bytes without pickle (the ``objstream[torch]`` extra)."""
    connection_thread: bool
    """Serve the broker connection on a thread of its own, so that heartbeats, acks and
    progress never wait for the caller to call ``receive()`` (or retrieve) again."""


class ReceiverOptions(RetrieverOptions, total=False):
    """What a receiving (pushed-to) site chooses, besides the :class:`RetrieverOptions`."""

    assemblers: Mapping[str, AssemblerFactory] | None
    """Custom kinds: a kind name -> a factory that takes the :class:`Offer` and returns an
    :class:`~objstream.common.streaming.ObjectAssembler`."""
    spool_containers: bool
    """A container goes to the destination first and is decoded once complete, so that it
    survives this process like a file does."""
    accept_from: Iterable[str] | None
    """Take pushes only from these broker users (the offer's ``user_id``, which RabbitMQ
    validates); others are refused at once with code ``forbidden``. Overrides the
    ``accept_from`` setting (``OBJSTREAM_ACCEPT_FROM``); ``None`` keeps it."""
