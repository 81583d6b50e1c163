"""TLS and identities of broker connections: the client's TLS context, who a connection logs
in as (the URL's user, or a certificate's common name), and the words of TLS failures.
Pika-free; :mod:`objstream.common.amqp` puts it into pika's parameters.

objstream never turns verification off: an ``amqps://`` connection checks the broker's
certificate against ``tls_ca`` (or the system's CAs) and its host name against the URL's.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from urllib.parse import unquote, urlsplit

from objstream.common.errors import BrokerUnreachable, ConfigError, setting
from objstream.common.settings import Settings
from objstream.common.urls import split_urls


def external_login(settings: Settings) -> bool:
    """A client certificate and no password in the URL: log in by certificate (EXTERNAL)."""
    return settings.tls_cert is not None and urlsplit(_first_url(settings)).password is None


def broker_user(settings: Settings) -> str:
    """The broker user ``settings`` log in as (what RabbitMQ checks ``user_id`` against): the
    URL's user (pika's default ``guest`` if none), or with a certificate login (EXTERNAL) the
    certificate's common name.

    Raises:
        ConfigError: the certificate cannot be read.
    """
    if external_login(settings):
        assert settings.tls_cert is not None
        return certificate_user(settings.tls_cert)
    return unquote(urlsplit(_first_url(settings)).username or "guest")


def _first_url(settings: Settings) -> str:
    """The first of the broker URLs (a cluster's nodes share one user and vhost; the settings
    refuse an empty list)."""
    return split_urls(settings.url)[0]


def certificate_user(cert: Path) -> str:
    """The common name of the PEM certificate ``cert``: the broker user of an EXTERNAL login
    (RabbitMQ's ``ssl_cert_login_from = common_name``).

    Raises:
        ConfigError: the file is unreadable, not a certificate, or has no single common name.
    """
    # The standard library decodes a certificate file only through this CPython helper (the
    # one ssl's own tests use); it spares a runtime dependency on a crypto package.
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # pragma: no cover - another Python implementation
        raise ConfigError("cannot read certificates here: give the user in the URL")
    try:
        subject = decode(str(cert))["subject"]
    except (OSError, ssl.SSLError, KeyError) as e:
        raise ConfigError(f"cannot read the client certificate {cert}: {e}") from None
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    if len(names) != 1:
        raise ConfigError(f"client certificate {cert} has {len(names)} common names, not one")
    return str(names[0])


def client_context(settings: Settings, *, tls: bool) -> ssl.SSLContext | None:
    """For an amqps:// URL (``tls``): a context that verifies the broker's certificate
    (against ``tls_ca``, or the system's CAs) and host name, presenting the client certificate
    if one is set. ``None`` for amqp://.

    Raises:
        ConfigError: TLS files are set for an amqp:// URL, are missing, or do not load.
    """
    if not tls:
        if settings.tls_ca or settings.tls_cert:
            raise ConfigError(
                f"TLS files are set ({setting('tls_ca')}; {setting('tls_cert')}) but "
                f"{settings.masked_url} "
                "is amqp://, without TLS: use amqps://"
            )
        return None
    files = {"tls_ca": settings.tls_ca, "tls_cert": settings.tls_cert, "tls_key": settings.tls_key}
    for name, path in files.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: no such file ({setting(name)})")
    try:
        # CERT_REQUIRED and check_hostname: nothing in objstream turns them off.
        context = ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert is not None:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as e:
        given = ", ".join(str(f) for f in files.values() if f)
        raise ConfigError(f"cannot load the TLS files ({given}): {e}") from None
    return context


def ssl_words(text: str) -> str | None:
    """The words of an OpenSSL error ("wrong version number" of "[SSL: WRONG_VERSION_NUMBER]
    wrong version number (_ssl.c:1006)")."""
    found = re.search(r"\[SSL: \w+\] ([^(']+?) \(", text)
    return found.group(1) if found else None


def tls_failure(settings: Settings, url: str, error: ssl.SSLError) -> BrokerUnreachable:
    """A TLS handshake that failed on this side: the broker's certificate did not verify, or
    the peer does not speak TLS."""
    if isinstance(error, ssl.SSLCertVerificationError):
        ca = settings.tls_ca or "the system's CAs"
        hint = f"checked against {ca} ({setting('tls_ca')}) and the URL's host name"
        return BrokerUnreachable(url, f"certificate verify failed: {error.verify_message}", hint)
    hint = "check the CA, certificate and key: --tls-ca, --tls-cert, --tls-key (Settings.tls_*)"
    if error.reason == "WRONG_VERSION_NUMBER":
        hint = "that port does not speak TLS: a plain AMQP port wants amqp://"
    reason = ssl_words(str(error)) or error.reason or str(error)
    return BrokerUnreachable(url, f"TLS handshake failed: {reason}", hint)


def closed_in_handshake(settings: Settings, url: str, tls: bool, text: str) -> BrokerUnreachable:
    """The peer closed the connection before the AMQP handshake was through; ``text`` is
    what the client library said."""
    if tls and "SSL" in text:
        alert = ssl_words(text)
        detail = "the broker closed the TLS connection in the handshake"
        if alert:
            detail += f" ({alert})"
        if settings.tls_cert is not None:
            hint = (
                f"it did not accept the client certificate {settings.tls_cert} "
                f"({setting('tls_cert')})"
            )
        else:
            hint = f"it may want a client certificate ({setting('tls_cert')}; {setting('tls_key')})"
        return BrokerUnreachable(url, detail, hint)
    hint = "is that an AMQP port? (a TLS port wants amqps://)"
    return BrokerUnreachable(url, "the peer closed the connection in the AMQP handshake", hint)
