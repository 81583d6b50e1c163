"""The keyword options of a receiving site: :class:`~objstream.consumer.receiver.Receiver` takes
:class:`ReceiverOptions`, :class:`~objstream.consumer.retriever.Retriever` the
:class:`RetrieverOptions` among them. Both are checked by the type checker at every call
(``**options: Unpack[...]``) and documented here, once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypedDict

from objstream.common.errors import ConfigError
from objstream.common.protocol import Offer
from objstream.common.streaming import ObjectAssembler, ProgressHook
from objstream.consumer.container_assembler import OnEntry
from objstream.consumer.container_sink import StoreOptions
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
    store_containers: bool
    """Containers are written into the destination as they arrive, each chunk straight to its
    place in the file they are saved as (``.npz``, ``.safetensors``, ``.json``, or a directory
    for a name ending in ``/``; see ``store_as``): no entry is ever whole in memory, and a
    container survives this process as a file does. :attr:`Received.path` names the file;
    :attr:`Received.value` is None, or the arrays with ``as_memmap``. A container that cannot
    be stored as asked (a bfloat16 array as ``.npz``) is refused at its offer."""
    store_as: str | None
    """With ``store_containers``: the name every container is saved under (its suffix chooses
    the format), in place of the one its own name gives."""
    as_memmap: bool
    """With ``store_containers``: :attr:`Received.value` holds a ``.safetensors`` or ``.npz``
    container's arrays as read-only numpy memory maps of the stored file (a dict, or a list),
    so that arrays larger than memory can be used."""
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


def store_options(options: ReceiverOptions) -> StoreOptions | None:
    """The ``store_containers`` choices, or None without it.

    Raises:
        ConfigError: options that contradict each other.
    """
    store = options.get("store_containers", False)
    if not store:
        for needs in ("store_as", "as_memmap"):
            if options.get(needs):
                raise ConfigError(f"{needs} needs store_containers=True")
        return None
    for other, why in (
        ("on_entry", "on_entry takes the entries in memory"),
        ("spool_containers", "spool_containers decodes the container into memory"),
        ("as_torch", "as_torch builds tensors in memory (as_memmap maps the stored arrays)"),
    ):
        if options.get(other):
            raise ConfigError(f"store_containers writes containers to files; {why}")
    return StoreOptions(options.get("store_as"), options.get("as_memmap", False))
