"""Several broker URLs (a cluster's nodes) and credentials given apart from the URL."""

from __future__ import annotations

import pika
import pytest

from objstream.common.admin import vhost_of
from objstream.common.amqp import broker_parameters, connected_url
from objstream.common.errors import ConfigError
from objstream.common.settings import Settings, load_settings
from objstream.common.tls import broker_user
from objstream.common.urls import mask_url, split_urls, with_credentials

THREE = "amqp://u:s1@n1:5672/%2F,amqp://u:s2@n2:5673/%2F, amqp://u:s3@[::1]:5674/%2F"


def test_split_urls_takes_commas_and_spaces() -> None:
    assert split_urls(THREE) == [
        "amqp://u:s1@n1:5672/%2F",
        "amqp://u:s2@n2:5673/%2F",
        "amqp://u:s3@[::1]:5674/%2F",
    ]
    assert split_urls("amqp://h/") == ["amqp://h/"]
    assert split_urls(" , ") == []


def test_every_password_of_a_list_is_masked() -> None:
    masked = mask_url(THREE)
    assert masked == (
        "amqp://u:***@n1:5672/%2F,amqp://u:***@n2:5673/%2F,amqp://u:***@[::1]:5674/%2F"
    )
    settings = Settings(url=THREE)
    for secret in ("s1", "s2", "s3"):
        assert secret not in settings.masked_url
        assert secret not in repr(settings)


@pytest.mark.parametrize(
    "urls",
    [
        "amqps://u:s1@n1:5671/%2F,amqp://u:s2@n2:5672/%2F",
        "amqp://u:s1@n1:5672/%2F, AMQPS://u:s2@n2:5671/%2F",
        "amqps://u:s1@n1/%2F,amqps://u:s2@n2/%2F,amqp://n3/%2F",
    ],
)
def test_a_url_list_mixing_amqps_and_amqp_is_refused_with_passwords_masked(
    monkeypatch: pytest.MonkeyPatch, urls: str
) -> None:
    with pytest.raises(ConfigError, match="mixes amqps:// and amqp://") as caught:
        load_settings(url=urls)
    assert "s1" not in str(caught.value)
    assert "s2" not in str(caught.value)
    assert "u:***@n1" in str(caught.value)
    monkeypatch.setenv("OBJSTREAM_URL", urls)  # the environment is checked the same way
    with pytest.raises(ConfigError, match="mixes"):
        load_settings()


def test_a_refused_url_keeps_its_password_out_of_pydantic_s_error_too() -> None:
    with pytest.raises(ConfigError) as caught:  # Settings(...) itself: our error, not pydantic's
        Settings(url="amqps://u:s1@n1/%2F,amqp://u:s2@n2/%2F")
    assert "mixes" in str(caught.value)
    assert "s1" not in str(caught.value)
    assert "s2" not in str(caught.value)


def test_a_url_list_of_one_scheme_is_taken_whatever_its_case() -> None:
    tls = "amqps://u:s1@n1:5671/%2F,AMQPS://u:s2@n2:5671/%2F"
    assert load_settings(url=tls).url == tls
    assert load_settings(url=THREE).url == THREE


def test_an_empty_url_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no broker URL"):
        load_settings(url=" , ")


@pytest.mark.parametrize("password", ["p@ss/w:rd", "a,b", "100%", "sp ace#?"])
def test_a_password_apart_from_the_url_may_hold_any_character(password: str) -> None:
    settings = Settings(url=THREE, user="site-1", password=password)
    for url in split_urls(settings.url):
        params = pika.URLParameters(url)
        assert params.credentials.username == "site-1"
        assert params.credentials.password == password
    assert [pika.URLParameters(u).host for u in split_urls(settings.url)] == ["n1", "n2", "::1"]
    assert broker_user(settings) == "site-1"
    assert "site-1:***@" in settings.masked_url
    assert password not in repr(settings)


def test_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBJSTREAM_URL", "amqp://rabbitmq:5672/%2F")
    monkeypatch.setenv("OBJSTREAM_USER", "objstream")
    monkeypatch.setenv("OBJSTREAM_PASSWORD", "s3cret@/")
    params = pika.URLParameters(Settings().url)
    assert (params.credentials.username, params.credentials.password) == ("objstream", "s3cret@/")
    assert (params.host, params.port, params.virtual_host) == ("rabbitmq", 5672, "/")


def test_unset_parts_keep_the_url_s() -> None:
    assert with_credentials("amqp://u:p@h:1/v", None, "q") == "amqp://u:q@h:1/v"
    assert with_credentials("amqp://u:p@h:1/v", "w", None) == "amqp://w:p@h:1/v"
    assert with_credentials("amqp://h/", "w", None) == "amqp://w@h/"
    assert Settings(url="amqp://u:p@h/").url == "amqp://u:p@h/"


def test_parameters_per_node_in_order_and_the_connected_one() -> None:
    nodes = broker_parameters(Settings(url=THREE))
    assert list(nodes) == mask_url(THREE).split(",")
    assert [p.port for p in nodes.values()] == [5672, 5673, 5674]

    class Connected:
        def __init__(self, params: pika.URLParameters) -> None:
            self._impl = type("Impl", (), {"params": params})()

    second = pika.URLParameters("amqp://u:s2@n2:5673/%2F")  # pika's copy
    fake = Connected(second)
    assert connected_url(fake, nodes, "all") == "amqp://u:***@n2:5673/%2F"
    assert connected_url(object(), nodes, "all") == "all"


def test_the_first_url_names_the_user_and_vhost() -> None:
    assert broker_user(Settings(url="amqp://a:x@n1/v1,amqp://b:y@n2/v2")) == "a"
    assert vhost_of("amqp://a:x@n1/v1,amqp://b:y@n2/v2") == "v1"
