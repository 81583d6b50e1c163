"""TLS settings, identities and the words of connect failures, without a broker (issue 13)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from objstream.common.cli import build_parser, settings_from
from objstream.common.errors import ConfigError
from objstream.common.settings import Settings, load_settings
from objstream.common.tls import (
    broker_user,
    client_context,
    closed_in_handshake,
    external_login,
    tls_failure,
)
from tests.tls import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_options_on_every_command(pki: Pki) -> None:
    client = pki.client("alice")
    args = build_parser().parse_args([
        "consumer", "listen", "--site", "s", "--dest", "d", "--url", "amqps://h/",
        "--tls-ca", str(pki.ca.pem), "--tls-cert", str(client.cert), "--tls-key",
        str(client.key), "--connect-timeout", "2.5", "--accept-from", "alice",
        "--accept-from", "bob",
    ])  # fmt: skip
    settings = settings_from(args, **args.settings_overrides(args))
    assert (settings.tls_ca, settings.tls_cert, settings.tls_key) == (
        pki.ca.pem,
        client.cert,
        client.key,
    )
    assert settings.connect_timeout == 2.5
    assert settings.accept_from == ("alice", "bob")


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBJSTREAM_ACCEPT_FROM", "alice, bob,")
    monkeypatch.setenv("OBJSTREAM_CONNECT_TIMEOUT", "4")
    monkeypatch.setenv("OBJSTREAM_TLS_CA", "/etc/ca.pem")
    settings = load_settings()
    assert settings.accept_from == ("alice", "bob")
    assert settings.connect_timeout == 4
    assert settings.tls_ca == Path("/etc/ca.pem")
    monkeypatch.delenv("OBJSTREAM_ACCEPT_FROM")
    monkeypatch.delenv("OBJSTREAM_CONNECT_TIMEOUT")
    assert load_settings().accept_from == ()
    assert load_settings().connect_timeout == 10


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_settings(tls_cert="/x.pem")


def test_the_certificates_common_name_is_the_user_of_a_certificate_login(pki: Pki) -> None:
    client = pki.client("site-7")
    by_cert = Settings(url="amqps://broker/", tls_cert=client.cert, tls_key=client.key)
    assert external_login(by_cert)
    assert broker_user(by_cert) == "site-7"
    # A password in the URL: PLAIN as that user, the certificate only for mutual TLS.
    with_password = by_cert.model_copy(update={"url": "amqps://carol:pw@broker/"})
    assert not external_login(with_password)
    assert broker_user(with_password) == "carol"
    assert broker_user(Settings(url="amqp://a%40b:pw@h/")) == "a@b"
    assert broker_user(Settings(url="amqp://h/")) == "guest"  # pika's default


def test_client_context_verifies(pki: Pki) -> None:
    context = client_context(Settings(url="amqps://h/", tls_ca=pki.ca.pem), tls=True)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert client_context(Settings(url="amqp://h/"), tls=False) is None


def test_tls_files_with_a_plain_url_are_a_usage_error(pki: Pki) -> None:
    settings = Settings(url="amqp://u:secret@h/", tls_ca=pki.ca.pem)
    with pytest.raises(ConfigError, match=r"amqp://u:\*\*\*@h/ is amqp://, without TLS"):
        client_context(settings, tls=False)


def test_missing_or_unreadable_tls_files(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"nope\.pem: no such file \(--tls-ca, OBJSTREAM_TLS_CA or Settings\.tls_ca\)",
    ):
        client_context(Settings(url="amqps://h/", tls_ca=tmp_path / "nope.pem"), tls=True)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        client_context(Settings(url="amqps://h/", tls_ca=garbage), tls=True)


def test_words_of_tls_failures() -> None:
    settings = Settings(url="amqps://h/")
    wrong = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    wrong.reason = "WRONG_VERSION_NUMBER"
    assert str(tls_failure(settings, "amqps://h/", wrong)) == (
        "broker unreachable at amqps://h/: TLS handshake failed: wrong version number; that port "
        "does not speak TLS: a plain AMQP port wants amqp://"
    )
    text = "StreamLostError: (\"... SSLError(1, '[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)')\",)"  # noqa: E501
    closed = closed_in_handshake(settings, "amqps://h/", True, text)
    assert closed.detail == "the broker closed the TLS connection in the handshake (tlsv1 alert " \
        "unknown ca)"  # fmt: skip
    assert "client certificate" in closed.hint
