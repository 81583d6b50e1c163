"""A site gone bad: raw pika as one site's own broker user, publishing whatever that user may.

The broker is the only thing a hostile site cannot get around: it checks the ``user_id`` of
every message against the login and each routing key against the user's topic permissions
(``objstream admin permissions --apply``). Everything else (header fields, claimed site names,
stream and request ids, bodies, header tables objstream would never build) is the attacker's
to choose. So this peer goes around objstream's adapter and sends raw pika messages, the way
another client would; only names and message models come from objstream.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pika
import pika.exceptions

from objstream.common.protocol import Message, new_stream_id
from objstream.common.settings import Settings
from objstream.common.topology import Topology
from tests.integration.rawpeer import declare_reply_queue, login_user, properties

Got = tuple[Any, bytes]
"""A message taken from a queue: pika's properties and the body."""


class Hostile:
    """One connection as ``site``'s broker user (its ``settings`` hold the site's URL)."""

    def __init__(self, settings: Settings, site: str) -> None:
        self.site = site
        self.user = login_user(settings)
        self.topology = Topology.from_settings(settings)
        self.exchange = self.topology.exchange
        params = pika.URLParameters(settings.url)
        params.client_properties = {"connection_name": f"hostile {site}"}
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()

    def publish(self, key: str, props: pika.BasicProperties, body: bytes = b"") -> None:
        """Publish to the namespace's exchange, and wait until the broker has it (a synchronous
        call on the same channel answers only after the publish was handled)."""
        self.channel.basic_publish(self.exchange, key, body, props)
        self.channel.exchange_declare(self.exchange, passive=True)

    def send(
        self,
        key: str,
        message: Message,
        *,
        reply_to: str | None = None,
        body: bytes = b"",
        message_id: str | None = None,
        expiration_ms: int | None = None,
    ) -> None:
        """Publish a protocol message as documented, signed with this site's own user."""
        props = properties(message, reply_to=reply_to, user_id=self.user, message_id=message_id)
        if expiration_ms is not None:
            props.expiration = str(expiration_ms)
        self.publish(key, props, body)

    def refusal(self, key: str, message: Message) -> str | None:
        """Try to publish ``message`` with ``key`` on a channel of its own: the broker's refusal
        (``"403 ACCESS_REFUSED - ..."``), or None if it took it."""
        channel = self.connection.channel()
        try:
            props = properties(message, user_id=self.user)
            channel.basic_publish(self.exchange, key, b"", props)
            channel.exchange_declare(self.exchange, passive=True)  # collects the refusal
        except pika.exceptions.ChannelClosedByBroker as e:
            return f"{e.reply_code} {e.reply_text}"
        if channel.is_open:
            channel.close()
        return None

    def reply_queue(self, *peers: str) -> tuple[str, str]:
        """An exclusive reply queue of this site bound for ``peers``' answers: ``(queue,
        reply_to)``, as any requester or sender makes one."""
        return declare_reply_queue(self.channel, self.topology.namespace, self.site, *peers)

    def unbound_reply_to(self) -> str:
        """A ``reply_to`` of this site that no queue is bound for: answers to it go nowhere."""
        return self.topology.reply_to(self.site, new_stream_id())

    def get(self, queue: str, timeout: float = 10) -> Got | None:
        """The next message of ``queue`` (one this site may read), or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is not None:
                return props, body
            if time.monotonic() > deadline:
                return None
            self.connection.process_data_events(time_limit=0.05)

    def take(self, queue: str, count: int, timeout: float = 10) -> list[Got]:
        """``count`` messages of ``queue`` (fewer if they do not come within ``timeout``)."""
        got: list[Got] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            message = self.get(queue, max(0.0, deadline - time.monotonic()))
            if message is None:
                break
            got.append(message)
        return got

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def __enter__(self) -> Hostile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def marked(prefix: str) -> str:
    """A message id that says what a hostile message was (found again in dead letters)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
