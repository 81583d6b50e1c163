"""What a serving site lists: the body of a ``reply`` to a ``request`` of ``kind=list``.

The body is a JSON array (UTF-8) of objects ``{"kind", "name", "size", "entries"}``, one per
object the requester may retrieve, at most :data:`MAX_LISTED` of them in at most
:data:`MAX_LISTING_BYTES` bytes; the reply's headers say how many (``listed``) and whether more
matched than it holds (``truncated``). The owner builds it with :func:`encode_listing`; the
requester validates it with :func:`decode_listing` (strict types, the bounds, the count), since
a hostile owner may send anything. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from objstream.common.errors import ProtocolError, one_line
from objstream.common.protocol import MAX_CHUNKS, MAX_OBJECT_BYTES
from objstream.common.settings import MAX_NAME_LENGTH

MAX_LISTED = 10_000
"""Objects in one listing at most (more: the reply says ``truncated``)."""
MAX_LISTING_BYTES = 1024 * 1024
"""Bytes of one listing's body at most (more: the reply says ``truncated``)."""

ListedKind = Literal["file", "container"]


class ListedObject(BaseModel):
    """One object a site serves, as its listing describes it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    kind: ListedKind = Field(description="file, or container.")
    name: str = Field(
        min_length=1, max_length=MAX_NAME_LENGTH, description="What to ask for it by."
    )
    size: Annotated[int, Field(ge=0, le=MAX_OBJECT_BYTES)] = Field(
        description="Bytes it takes on the wire (a container: its encoded entries)."
    )
    entries: Annotated[int, Field(ge=0, le=MAX_CHUNKS)] | None = Field(
        None, description="A container's number of entries."
    )


_LISTING: TypeAdapter[list[ListedObject]] = TypeAdapter(list[ListedObject])


@dataclass(frozen=True)
class Listing:
    """What site ``site`` offers the requester: ``objects`` (in the owner's order), and whether
    more matched than one reply holds (``truncated``: ask with a narrower prefix)."""

    site: str
    objects: tuple[ListedObject, ...]
    truncated: bool


def encode_item(kind: str, name: str, size: int, entries: int | None) -> bytes | None:
    """One listed object as the body carries it; None if its name cannot travel (not UTF-8,
    such as a file name of undecodable bytes, or longer than a request may name)."""
    if not name or len(name) > MAX_NAME_LENGTH:
        return None
    item: dict[str, object] = {"kind": kind, "name": name, "size": size}
    if entries is not None:
        item["entries"] = entries
    try:
        return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return None


def encode_listing(items: Iterable[bytes]) -> bytes:
    """The body: the encoded items (:func:`encode_item`) as one JSON array."""
    return b"[" + b",".join(items) + b"]"


def decode_listing(body: bytes, listed: int) -> tuple[ListedObject, ...]:
    """Validate a listing's body against its reply's ``listed``.

    Raises:
        ProtocolError: too long, not a JSON array of listed objects, or another count (the
            text is one short line, quoting nothing the owner sent).
    """
    if len(body) > MAX_LISTING_BYTES:
        raise ProtocolError(f"a body of {len(body)} bytes (at most {MAX_LISTING_BYTES})")
    if listed > MAX_LISTED:
        raise ProtocolError(f"{listed} objects (at most {MAX_LISTED})")
    try:
        objects = _LISTING.validate_json(body)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        # A key of the owner's choosing can be in the location: printable and short only.
        where = one_line(".".join(str(p) for p in first["loc"]) or "body", 80)
        raise ProtocolError(
            f"{where}: {first['msg']} ({e.error_count()} problem"
            f"{'' if e.error_count() == 1 else 's'})"
        ) from None
    if len(objects) != listed:
        raise ProtocolError(f"{len(objects)} objects in the body, the reply says {listed}")
    return tuple(objects)
