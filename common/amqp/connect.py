"""Connecting: pika's parameters, one bounded attempt after another, and the tuning of pika
every connection gets (framing with fewer copies, :mod:`.framing`; bounded header decoding)."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import pika
import pika.credentials
import pika.exceptions
import pika.spec
from pika.adapters.utils.connection_workflow import (
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)

from objstream.common.amqp.connection import REJECTED_HEADERS, Connection, describe
from objstream.common.amqp.framing import tune_pika
from objstream.common.buffers import tune_malloc
from objstream.common.errors import (
    AuthenticationRefused,
    BrokerUnreachable,
    ConfigError,
    ObjstreamError,
    VhostRefused,
    setting,
)
from objstream.common.headers import HeadersRejected, check_properties, without_headers
from objstream.common.settings import Settings
from objstream.common.tls import (
    broker_user,
    client_context,
    closed_in_handshake,
    external_login,
    tls_failure,
)
from objstream.common.urls import mask_url, split_urls

log = logging.getLogger(__name__)


def params_vhost(nodes: dict[str, pika.ConnectionParameters]) -> str:
    """The virtual host the connection asked for (every node's is the URL's path)."""
    return next((p.virtual_host for p in nodes.values()), "/")


def _bound_header_decoding() -> None:
    """Make pika decode a delivery's properties only within :mod:`objstream.common.headers`'
    bounds. A header table beyond them (a legal 2,000-level nesting made pika's recursive decoder
    raise RecursionError and stop the connection) is left out, the other properties are decoded,
    and the reason is noted on the properties (:data:`REJECTED_HEADERS`): the delivery reaches
    its consumer's guard, which rejects it. Like the framing (:mod:`.framing`), this replaces a
    method of pika's class (pika is pinned to 1.3/1.4); done once."""
    cls: Any = pika.spec.BasicProperties
    original = cls.decode
    if getattr(original, "objstream_bounded", False):
        return

    def decode(self: Any, encoded: bytes, offset: int = 0) -> Any:
        try:
            check_properties(encoded, offset)
            return original(self, encoded, offset)
        except HeadersRejected as e:
            reason = str(e)
        except Exception as e:  # pika's own decoder on something the bounds let through
            reason = f"{type(e).__name__}: {e}"
        try:
            original(self, without_headers(encoded, offset), 0)
        except Exception:
            cls.__init__(self)  # nothing decodes: every property None
        self.headers = None
        setattr(self, REJECTED_HEADERS, reason)
        return self

    decode.objstream_bounded = True  # type: ignore[attr-defined]
    cls.decode = decode


def _tls_options(settings: Settings, params: pika.URLParameters) -> pika.SSLOptions | None:
    """amqps://: verify the broker's certificate and host name (see :func:`client_context`)."""
    context = client_context(settings, tls=params.ssl_options is not None)
    return None if context is None else pika.SSLOptions(context, server_hostname=params.host)


def _credentials(settings: Settings, params: pika.URLParameters) -> Any:
    """EXTERNAL (the broker takes the user from the client certificate) when there is a
    certificate and no password in the URL; otherwise the URL's user and password."""
    if external_login(settings):
        return pika.credentials.ExternalCredentials()
    return params.credentials


def _parameters(settings: Settings, url: str, name: str) -> pika.URLParameters:
    """pika's parameters for one connect attempt to ``url``, bounded by ``connect_timeout``."""
    try:
        params = pika.URLParameters(url)
    except Exception as e:  # pika raises assorted errors for bad URLs
        raise ConfigError(f"invalid broker URL {mask_url(url)}: {e}") from e
    params.ssl_options = _tls_options(settings, params)
    params.credentials = _credentials(settings, params)
    params.heartbeat = settings.heartbeat
    params.client_properties = {"connection_name": name, "product": "objstream"}
    params.connection_attempts = 1
    # The TCP connect, each wait on the socket, and the whole attempt (TCP, TLS, the AMQP
    # handshake): a peer that accepts and says nothing fails in connect_timeout, not never.
    params.socket_timeout = settings.connect_timeout
    params.stack_timeout = settings.connect_timeout
    params.blocked_connection_timeout = max(settings.timeout, 30.0)
    return params


def connect_failure(
    settings: Settings, url: str, params: pika.URLParameters, error: BaseException
) -> BrokerUnreachable:
    """What a failed connect attempt to ``url`` says in one line: the cause (DNS, refused, TLS
    verification, a peer that does not speak AMQP or TLS...) and what to check."""
    url, tls = mask_url(url), params.ssl_options is not None
    if isinstance(error, ssl.SSLError):
        return tls_failure(settings, url, error)
    if isinstance(error, socket.gaierror):
        return BrokerUnreachable(url, f"unknown host {params.host!r}: {describe(error)}")
    if isinstance(error, AMQPConnectorStackTimeout):
        what = "TLS or AMQP" if tls else "AMQP"
        return BrokerUnreachable(
            url,
            f"no {what} handshake within {settings.connect_timeout:g} s",
            f"is that an AMQP{'S' if tls else ''} port of RabbitMQ? "
            f"({setting('url')}; {setting('connect_timeout')} bounds each attempt)",
        )
    if isinstance(error, pika.exceptions.IncompatibleProtocolError):
        # pika hands over only the words of the stream error here (its repr), not the error.
        return closed_in_handshake(settings, url, tls, describe(error))
    return BrokerUnreachable(url, describe(error))


def connect(settings: Settings, name: str) -> Connection:
    """Open a connection named ``name`` (shown in the broker's connection list), waiting up to
    ``settings.connect_wait`` s for a broker that is not up yet; each attempt takes at most
    ``settings.connect_timeout`` s per node. With several URLs (a cluster's nodes), to the first
    that answers; a reconnect goes through the list again.

    Raises:
        BrokerUnreachable: nothing answers at the URL, it is no AMQP broker, TLS failed.
        AuthenticationRefused: the broker refused the credentials (or the certificate login).
        ConfigError: the URL is malformed, the TLS files do not load.
    """
    nodes = broker_parameters(settings, name)
    params = next(iter(nodes.values()))  # a failure is worded for the first node
    tune_pika()
    _bound_header_decoding()
    tune_malloc()
    deadline = time.monotonic() + settings.connect_wait
    delay = 0.5
    while True:
        try:
            impl = pika.BlockingConnection(list(nodes.values()))
        except pika.exceptions.ProbableAccessDeniedError as e:  # Connection.Open: the vhost
            found = re.search(r"\(\d+\) '([^']*)'", str(e))
            reason = found.group(1) if found else "access denied"
            vhost = params_vhost(nodes)
            raise VhostRefused(settings.masked_url, vhost, reason) from e
        except (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.AuthenticationError,  # the broker does not offer the mechanism
        ) as e:
            user = broker_user(settings) if external_login(settings) else None
            separate = settings.user is not None or settings.password is not None
            raise AuthenticationRefused(settings.masked_url, user, separate=separate) from e
        # pika raises its connection errors, OSErrors (DNS, TLS) and, for a timeout of the
        # whole attempt, a connector error.
        except (pika.exceptions.AMQPConnectionError, OSError, AMQPConnectorException) as e:
            failure = connect_failure(settings, settings.url, params, e)
            left = deadline - time.monotonic()
            if left <= 0 or isinstance(e, ssl.SSLError):  # a certificate will not change
                raise failure from e
            wait = min(delay, left)
            log.warning(
                "broker at %s unreachable (%s); retrying in %.1f s (giving up in %.0f s)",
                settings.masked_url,
                failure.detail,
                wait,
                left,
            )
            time.sleep(wait)
            delay = min(delay * 2, 10.0)
            continue
        url = connected_url(impl, nodes, settings.masked_url)
        log.debug("connected to %s as %r", url, name)
        return Connection(impl, url, name)


def broker_parameters(settings: Settings, name: str = "objstream") -> dict[str, pika.URLParameters]:
    """pika's parameters for each broker URL of ``settings`` (masked URL -> parameters), in the
    order given: a cluster's nodes, tried in turn by one connection attempt.

    Raises:
        ConfigError: a URL is malformed, the TLS files do not load.
    """
    return {mask_url(url): _parameters(settings, url, name) for url in split_urls(settings.url)}


def connected_url(
    impl: pika.BlockingConnection, nodes: Mapping[str, pika.URLParameters], default: str
) -> str:
    """The (masked) URL of the node ``impl`` connected to, of ``nodes``."""
    params = getattr(getattr(impl, "_impl", None), "params", None)
    if params is None:
        return default
    node = (params.host, params.port)  # pika connects with a copy of the parameters
    return next((url for url, p in nodes.items() if (p.host, p.port) == node), default)


def reestablish(settings: Settings, within: float, setup: Callable[[], None]) -> None:
    """Run ``setup`` (reconnect, reopen channels...) until it works or ``within`` s have passed.

    Raises:
        BrokerUnreachable: it still failed at the deadline.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            setup()
            return
        except ObjstreamError as e:
            if time.monotonic() > deadline:
                detail = f"no reconnection within {within:g} s: {e}"
                raise BrokerUnreachable(settings.masked_url, detail) from e
            time.sleep(1.0)
