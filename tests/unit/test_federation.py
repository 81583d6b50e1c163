"""``objstream admin federation`` and :mod:`objstream.common.federation`, without a broker.

That RabbitMQ federates as these lines say (one copy per region, verdicts back, least privilege
on every broker) is tests/integration/test_federation.py's job (``-m federation``).
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from objstream.common.cli import EXIT_OK, EXIT_USAGE, main
from objstream.common.errors import ConfigError
from objstream.common.federation import (
    ROUTE_SETTLE,
    FederationLink,
    arrival_link,
    federation_commands,
    link_permissions,
    route_settle,
)
from objstream.common.identity import Forged, Identities
from objstream.common.settings import Settings

CENTRAL = FederationLink("central", "amqps://link:pw@central.example.org/%2F")
EU = FederationLink("eu", "amqp://link:pw@eu:5672/%2F")


def test_one_upstream_parameter_per_link_trusting_user_id() -> None:
    lines = federation_commands("fl", [CENTRAL, EU], max_hops=2, vhost="v")
    upstreams = [argv for argv in lines if "federation-upstream" in argv]
    assert [argv[5] for argv in upstreams] == ["objstream-fl-central", "objstream-fl-eu"]
    for argv, link in zip(upstreams, (CENTRAL, EU), strict=True):
        assert argv[:5] == ["rabbitmqctl", "set_parameter", "-p", "v", "federation-upstream"]
        definition = json.loads(argv[6])
        # Without trust-user-id the plugin clears user_id, and every receiver refuses the
        # message: objstream's proof of the publisher is that header.
        assert definition == {
            "uri": link.uri,
            "trust-user-id": True,
            "max-hops": 2,
            "ack-mode": "on-confirm",
        }


def test_the_set_holds_every_link_and_the_policy_applies_it_to_the_exchange_alone() -> None:
    lines = federation_commands("fl.x", [CENTRAL, EU], node="rabbit@c")
    *_, upstream_set, policy, _ = lines
    assert upstream_set[:3] == ["rabbitmqctl", "-n", "rabbit@c"]
    assert json.loads(upstream_set[-1]) == [
        {"upstream": "objstream-fl.x-central"},
        {"upstream": "objstream-fl.x-eu"},
    ]
    assert policy[3:9] == [
        "set_policy",
        "-p",
        "/",
        "--apply-to",
        "exchanges",
        "objstream-federation-fl.x",
    ]
    pattern = policy[9]
    assert re.search(pattern, "fl.x")
    for other in ("flax", "fl.x.dead.site-1", "xfl.x", "fl.x2", "fl"):
        assert not re.search(pattern, other), other
    assert json.loads(policy[10]) == {"federation-upstream-set": "objstream-fl.x"}


def test_the_queues_kept_for_downstream_links_are_bounded() -> None:
    *_, policy = federation_commands("fl.x", [CENTRAL], link_queue_max=16 * 1024 * 1024)
    assert policy[1:7] == [
        "set_policy",
        "-p",
        "/",
        "--apply-to",
        "queues",
        "objstream-federation-fl.x-links",
    ]
    pattern = policy[7]
    # The plugin's names for the exchange and queue it keeps upstream for a downstream's link.
    assert re.search(pattern, "federation: fl.x -> rabbit@eu")
    for other in ("federation: flax -> rabbit@eu", "fl.x.site.site-1", "federation: other -> x"):
        assert not re.search(pattern, other), other
    assert json.loads(policy[8]) == {"max-length-bytes": 16 * 1024 * 1024}
    with pytest.raises(ConfigError, match="--link-queue-max 0"):
        federation_commands("fl", [CENTRAL], link_queue_max=0)


def test_the_link_user_may_touch_only_the_plugins_own_names_and_read_the_exchange() -> None:
    argv = link_permissions("fl", "link")
    assert argv[:5] == ["rabbitmqctl", "set_permissions", "-p", "/", "link"]
    configure, write, read = argv[5:]
    for regex in (configure, write):
        assert re.search(regex, "federation: fl -> rabbit@eu A")
        assert not re.search(regex, "fl")
        assert not re.search(regex, "fl.site.site-1")
    assert re.search(read, "fl")
    assert not re.search(read, "fl.site.site-1")
    assert not re.search(read, "fl.data.site-1.0123456789abcdef0123456789abcdef")


@pytest.mark.parametrize(
    ("links", "hops", "says"),
    [
        ([], 1, "at least one"),
        ([CENTRAL, FederationLink("central", "amqp://x")], 1, "two upstreams with one name"),
        ([CENTRAL], 0, "--max-hops 0"),
        ([CENTRAL], 9, "--max-hops 9"),
    ],
)
def test_bad_sets_of_links(links: list[FederationLink], hops: int, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        federation_commands("fl", links, max_hops=hops)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("central", "expected NAME=URI"),
        ("amqp://user:secret@host", "expected NAME=URI"),
        ("bad name=amqp://h", "upstream name 'bad name'"),
        ("=amqp://h", "upstream name ''"),
        ("eu=http://h", "must start amqp:// or amqps://"),
    ],
)
def test_an_upstream_is_name_equals_uri(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)) as raised:
        FederationLink.parse(text)
    assert "secret" not in str(raised.value)


def test_only_an_offer_that_crossed_a_link_waits_before_its_first_contact() -> None:
    assert route_settle(None) == 0
    assert route_settle({}) == 0
    assert route_settle({"x-delivery-count": 1}) == 0
    crossed = {
        "x-received-from": [{"uri": "amqp://central", "exchange": "fl", "redelivered": False}]
    }
    assert route_settle(crossed) == ROUTE_SETTLE > 0
    assert route_settle(crossed, 2.5) == 2.5
    assert route_settle({}, 2.5) == 0
    assert Settings().route_settle == ROUTE_SETTLE


def test_the_command_prints_lines_a_shell_runs_as_they_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = "amqp://link:p'w$x@central:5672/%2F"
    code = main([
        "admin", "federation", "--namespace", "fl", "--upstream", f"central={uri}",
        "--link-user", "link", "--max-hops", "2",
    ])  # fmt: skip
    assert code == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# objstream v2: federate exchange 'fl'")
    commands = [shlex.split(line) for line in out if not line.startswith("#")]
    assert commands == [
        *federation_commands("fl", [FederationLink("central", uri)], max_hops=2),
        link_permissions("fl", "link"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--upstream", "central"],
        ["--upstream", "c=amqp://h", "--max-hops", "0"],
        ["--upstream", "c=amqp://h", "--link-user", ""],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code: int | str | None
    try:
        code = main(["admin", "federation", "--namespace", "fl", *argv])
    except SystemExit as exit_:  # argparse's own checks (a required option missing)
        code = exit_.code
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err


# -- which link a message came by, and the sites behind each ----------------------------------

EU_LINK = "amqp://broker.eu:5672/%2F"


def test_the_arrival_link_is_the_uri_in_the_last_received_from_entry() -> None:
    entry = {"uri": EU_LINK, "exchange": "fl", "redelivered": False, "cluster-name": "eu"}
    assert arrival_link({"x-received-from": [entry]}) == EU_LINK
    assert arrival_link({"x-received-from": [{"uri": "amqp://x"}, entry]}) == EU_LINK
    assert arrival_link({"x-received-from": [{"uri": EU_LINK.encode()}]}) == EU_LINK
    assert arrival_link({"x-received-from": [{}]}) == "an unnamed link"
    nothing: list[dict[str, object] | None] = [
        None,
        {},
        {"x-received-from": []},
        {"x-received-from": "amqp://x"},
    ]
    for headers in nothing:
        assert arrival_link(headers) is None


def test_site_links_name_the_link_without_credentials() -> None:
    settings = Settings(
        site_links="site-a1=amqps://link:secret@broker.eu:5671/%2F, server=" + EU_LINK
    )
    assert settings.site_links == {"site-a1": "amqps://broker.eu:5671/%2F", "server": EU_LINK}
    for bad in ("site-a1", "site-a1=http://u:secret@x", "a:b=amqp://u:secret@x"):
        with pytest.raises(ConfigError, match=r"site_links|site name") as raised:
            Settings(site_links=bad)
        assert "secret" not in str(raised.value)


def test_without_site_links_any_way_in_counts() -> None:
    identities = Identities.of({}, ())
    identities.check_claim("offer", "site-a1", "site-a1", via="amqp://anywhere/%2F")
    identities.check_claim("offer", "site-a1", "site-a1", via=None)


def test_a_site_behind_a_link_counts_only_by_that_link() -> None:
    identities = Identities.of({}, (), {"site-a1": EU_LINK})
    identities.check_claim("request 1", "site-a1", "site-a1", via=EU_LINK)
    with pytest.raises(Forged, match=r"came by the federation link from amqp://us/%2F"):
        identities.check_claim("request 1", "site-a1", "site-a1", via="amqp://us/%2F")
    with pytest.raises(Forged, match=r"was published here, and site 'site-a1' is behind"):
        identities.check_claim("request 1", "site-a1", "site-a1", via=None)
    # A site not named publishes on this broker; by a link it is forged.
    identities.check_claim("offer", "server", "server", via=None)
    with pytest.raises(Forged, match=r"site 'server' is on this broker \(OBJSTREAM_SITE_LINKS\)"):
        identities.check_claim("offer", "server", "server", via=EU_LINK)


def test_an_answer_is_checked_for_its_link_too() -> None:
    identities = Identities.of({}, (), {"site-a1": EU_LINK})
    key = "reply:server:0123456789abcdef0123456789abcdef:site-a1"
    identities.check_answer("done", "site-a1", key, "site-a1", EU_LINK)
    with pytest.raises(Forged, match="OBJSTREAM_SITE_LINKS"):
        identities.check_answer("done", "site-a1", key, "site-a1", "amqp://us/%2F")
