"""``objstream admin permissions`` and :func:`topology.permissions`, without a broker.

The regexes are checked with Python's ``re.search``, which agrees with RabbitMQ's (Erlang's
PCRE ``re:run``, unanchored) on what they use: anchors, alternation, classes, ``{32}``. That
RabbitMQ enforces them as checked here is tests/integration/test_permissions.py's job.
"""

from __future__ import annotations

import re
import shlex

import pytest

from objstream.common import admin
from objstream.common.cli import EXIT_OK, EXIT_USAGE, main
from objstream.common.topology import Permissions, Topology, permissions

ID = "0123456789abcdef0123456789abcdef"
QID = "fedcba9876543210fedcba9876543210"
T = Topology("fl", 60_000)


def allowed(regex: str, name: str) -> bool:
    return re.search(regex, name) is not None


# -- the regexes ------------------------------------------------------------------------------


def own_queues(site: str) -> list[str]:
    return [T.inbox(site), T.service_queue(site), T.data_queue(site, ID), T.reply_queue(site, QID)]


@pytest.mark.parametrize("site", ["site-1", "a.b", "a", "x_y", "S1"])
def test_a_site_may_configure_write_and_read_its_own_queues(site: str) -> None:
    p = permissions("fl", site)
    for queue in own_queues(site):
        assert allowed(p.configure, queue), queue
        assert allowed(p.write, queue), queue
        assert allowed(p.read, queue), queue


@pytest.mark.parametrize(
    ("site", "other"),
    [("site-1", "site-2"), ("a", "a.b"), ("a.b", "a"), ("a.b", "aXb"), ("a", "a-1"), ("a", "b.a")],
)
def test_a_site_may_touch_no_queue_of_another_site(site: str, other: str) -> None:
    """Dots are escaped (``a.b`` is not ``aXb``) and names anchored (``a`` is not ``a.b``)."""
    p = permissions("fl", site)
    for queue in [*own_queues(other), T.dead(other)]:
        assert not allowed(p.configure, queue), queue
        assert not allowed(p.read, queue), queue
        assert not allowed(p.write, queue), queue


def test_a_site_named_like_a_data_queue_suffix_does_not_match() -> None:
    """Site ``a``'s ``(data|reply)`` pattern ends in exactly 32 hex digits: a site named
    ``a.<32 hex>`` has names with one more part."""
    p = permissions("fl", "a")
    tricky = f"a.{ID}"
    for queue in own_queues(tricky):
        assert not allowed(p.read, queue), queue


def test_the_exchange_is_written_and_read_never_configured() -> None:
    p = permissions("fl", "site-1")
    assert allowed(p.write, "fl")
    assert allowed(p.read, "fl")
    for name in ("fl", "fl.dead", "amq.default", "amq.topic", "flx", "fl.other"):
        assert not allowed(p.configure, name), name
    assert not allowed(p.write, "amq.default")  # nothing goes to the default exchange in v2
    assert not allowed(p.write, "fl.x")
    for shared in ("fl.dead", "fl.dead.site-2"):  # no dead letters but its own
        assert not allowed(p.write, shared), shared
        assert not allowed(p.read, shared), shared


def test_a_site_owns_its_dead_letters() -> None:
    """Its queues dead-letter to ``NS.dead.SITE``: declaring a queue with that argument needs
    write on the exchange, and the site declares the exchange and its queue itself."""
    p = permissions("fl", "site-1")
    for perm in (p.configure, p.write, p.read):
        assert allowed(perm, "fl.dead.site-1")


def test_the_namespace_is_escaped_and_anchored() -> None:
    p = permissions("a.b", "s")
    assert allowed(p.read, "a.b.site.s")
    assert not allowed(p.read, "aXb.site.s")
    assert not allowed(p.read, "x.a.b.site.s")
    assert not allowed(p.write, "aXb")


def test_topic_write_names_the_site_as_publisher() -> None:
    p = permissions("fl", "site-1")
    ok = [T.offer_key("site-2"), T.service_key("server"), T.data_key(ID, "site-1"),
          T.data_key(ID, "site-1", "site-2"),
          T.reply_key(T.reply_to("server", QID), "site-1")]  # fmt: skip
    for key in ok:
        assert allowed(p.topic_write, key), key
    refused = [T.data_key(ID, "server"), T.data_key(ID, "server", "site-2"),
               T.reply_key(T.reply_to("site-2", QID), "server"), "site.site-2", "serve.server",
               f"data:{ID}:site-1x", T.data_key(ID, "site-1") + ":a:b", "#"]  # fmt: skip
    for key in refused:
        assert not allowed(p.topic_write, key), key


def test_topic_read_only_keys_addressed_to_the_site() -> None:
    p = permissions("fl", "site-1")
    ok = [T.offer_key("site-1"), T.service_key("site-1"), "site.site-1", "serve.site-1",
          T.data_key(ID, "server"), T.data_key(ID, "server", "site-1"),
          T.reply_key(T.reply_to("site-1", QID), "server")]  # fmt: skip
    for key in ok:
        assert allowed(p.topic_read, key), key
    refused = [T.offer_key("site-2"), T.service_key("site-2"), "site.site-2",
               T.data_key(ID, "server", "site-2"),
               T.reply_key(T.reply_to("site-2", QID), "x")]  # fmt: skip
    for key in refused:
        assert not allowed(p.topic_read, key), key


@pytest.mark.parametrize(
    "key", ["#", "*", f"data:{ID}:a.#", f"data:{ID}:a.*", f"data:{ID}:*", f"reply:site-1:{QID}:#",
            "offer:#", "site.#", "serve.*", f"data:{ID}:a.#:site-1"],
)  # fmt: skip
def test_no_wildcard_binding_is_allowed(key: str) -> None:
    """Topic words split at dots and site names hold dots: ``data:ID:a.#`` would route
    ``data:ID:a.b:site-2`` (sender ``a.b``'s unicast to site-2) to site-1."""
    assert not allowed(permissions("fl", "site-1").topic_read, key)


# -- the printed lines ------------------------------------------------------------------------


def printed(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main(["admin", "permissions", *argv]) == EXIT_OK
    return capsys.readouterr().out.splitlines()


def commands(lines: list[str]) -> list[list[str]]:
    return [shlex.split(line) for line in lines if not line.startswith("#")]


def test_prints_add_user_and_both_permission_lines(capsys: pytest.CaptureFixture[str]) -> None:
    lines = printed(capsys, "--site", "site.1", "--user", "it's me", "--namespace", "fl")
    p = permissions("fl", "site.1")
    assert commands(lines) == [
        ["rabbitmqctl", "add_user", "it's me", "<password>"],
        ["rabbitmqctl", "set_user_tags", "it's me"],  # no tags: clears an existing user's
        ["rabbitmqctl", "set_permissions", "-p", "/", "it's me", p.configure, p.write, p.read],
        ["rabbitmqctl", "set_topic_permissions", "-p", "/", "it's me", "fl", p.topic_write,
         p.topic_read],
    ]  # fmt: skip
    assert any("<password>" in line and line.startswith("#") for line in lines)
    assert r"site\.1" in p.configure  # the dot of the site name is escaped


def test_every_line_is_one_shell_word_list(capsys: pytest.CaptureFixture[str]) -> None:
    """The regexes hold ``$``, ``|``, ``(``, ``\\``: quoted, a shell passes them unchanged."""
    lines = printed(capsys, "--site", "s", "--user", "u")
    for line in lines:
        if not line.startswith("#"):
            assert shlex.join(shlex.split(line)) == line
            assert "$|" not in line.replace("'", "") or "'" in line


def test_namespace_vhost_and_node(capsys: pytest.CaptureFixture[str]) -> None:
    lines = printed(
        capsys, "--site", "s", "--user", "u", "--namespace", "prod.fl", "--vhost", "fed",
        "--node", "rabbit@b1", "--existing-user",
    )  # fmt: skip
    cmds = commands(lines)
    assert [c[:4] for c in cmds] == [
        ["rabbitmqctl", "-n", "rabbit@b1", "set_user_tags"],
        ["rabbitmqctl", "-n", "rabbit@b1", "set_permissions"],
        ["rabbitmqctl", "-n", "rabbit@b1", "set_topic_permissions"],
    ]
    assert cmds[1][4:6] == ["-p", "fed"]
    assert cmds[2][7] == "prod.fl"
    assert cmds[1][-1].startswith(r"^prod\.fl$|")
    assert any("exists" in line for line in lines if line.startswith("#"))
    comments = " ".join(line for line in lines if line.startswith("#"))
    assert "any exchange but 'prod.fl'" in comments  # the topic permissions to clear
    assert "clear_topic_permissions" in comments


def test_the_vhost_defaults_to_the_urls(capsys: pytest.CaptureFixture[str]) -> None:
    lines = printed(capsys, "--site", "s", "--user", "u", "--url", "amqp://a:b@h:5672/fed%2Fx")
    assert commands(lines)[2][:4] == ["rabbitmqctl", "set_permissions", "-p", "fed/x"]
    assert admin.vhost_of("amqp://h") == admin.vhost_of("amqp://h/") == "/"
    assert admin.vhost_of("amqp://h/%2F") == "/"


def test_a_bad_site_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["admin", "permissions", "--site", "a:b", "--user", "u"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("objstream: error: invalid site name 'a:b'")
    assert "\n" not in err


def test_the_lines_match_topology_permissions() -> None:
    grant = admin.Grant("s", "u", "fl")
    p: Permissions = permissions("fl", "s")
    assert grant.grants()[0][-3:] == [p.configure, p.write, p.read]
    assert grant.grants()[1][-2:] == [p.topic_write, p.topic_read]
