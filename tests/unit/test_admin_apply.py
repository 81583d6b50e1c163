"""``objstream admin permissions --apply`` without a broker: what rabbitmqctl prints, read; the
changes planned from it; and the whole command with a fake ``rabbitmqctl`` and a fake
connection. That a real RabbitMQ ends up as planned is tests/integration/test_permissions.py's
job.
"""

from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from objstream.common import admin
from objstream.common.cli import EXIT_BROKER, EXIT_OK, EXIT_USAGE, main
from objstream.common.errors import BrokerMismatch, ConfigError
from objstream.common.rabbitmqctl import (
    TopicPermission,
    connection_names,
    read_json,
    topic_permissions,
    user_permissions,
    user_tags,
)
from objstream.common.settings import Settings
from objstream.common.topology import permissions
from objstream.common.urls import mask_url

# -- reading rabbitmqctl's JSON ---------------------------------------------------------------

# What RabbitMQ 3.10.8 printed for `list_connections -q --formatter json client_properties`
# with one pika connection (trimmed to two properties besides the name), which ends with " \n".
CONNECTIONS_3_10 = """[
{"client_properties":[["product","longstr","objstream"],["capabilities","table",\
[["basic.nack","bool",true]]],["connection_name","longstr","objstream admin s 1f2e"]]}
,{"client_properties":[["product","longstr","other"]]}
]
"""
CONNECTIONS_3_10 += " \n"


def test_connection_names_of_rabbitmq_3_10() -> None:
    assert connection_names(read_json(CONNECTIONS_3_10)) == {"objstream admin s 1f2e"}


def test_connection_names_as_an_object_and_odd_rows() -> None:
    listing = [
        {"client_properties": {"connection_name": "a", "product": "x"}},
        {"client_properties": [["connection_name", "longstr", "b"], ["oops"]]},
        {"client_properties": None},
        {"name": "no properties"},
        "not a row",
        {"client_properties": [["connection_name", "table", [["x", "bool", True]]]]},
    ]
    assert connection_names(listing) == {"a", "b"}
    assert connection_names({"not": "a list"}) == set()


def test_read_json_skips_an_informational_line() -> None:
    assert read_json('Listing users ...\n[\n{"user":"u","tags":[]}\n]\n') == [
        {"user": "u", "tags": []}
    ]
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_json("Error: something\n")


def test_user_tags_as_a_list_as_text_and_missing() -> None:
    listing = read_json(
        '[\n{"user":"guest","tags":["administrator"]}\n,{"user":"s1","tags":["administrator",'
        '"impersonator"]}\n,{"user":"s2","tags":[]}\n,{"user":"s3","tags":"[management, x]"}\n]'
    )
    assert user_tags(listing, "s1") == ("administrator", "impersonator")
    assert user_tags(listing, "s2") == ()
    assert user_tags(listing, "s3") == ("management", "x")
    assert user_tags(listing, "nobody") is None


def test_user_permissions_in_one_vhost() -> None:
    listing = [
        {"vhost": "other", "configure": "x", "write": "y", "read": "z"},
        {"vhost": "/", "configure": ".*", "write": ".*", "read": ""},
    ]
    assert user_permissions(listing, "/") == (".*", ".*", "")
    assert user_permissions(listing, "fed") is None


def test_topic_permissions_rows() -> None:
    listing = [{"vhost": "/", "exchange": "fl.dead", "write": ".*", "read": ""}]
    assert topic_permissions(listing) == [TopicPermission("/", "fl.dead", ".*", "")]


# -- the plan -----------------------------------------------------------------------------------

GRANT = admin.Grant("site-1", "u1", "fl", "/", "n@h")
P = permissions("fl", "site-1")
EXACT = admin.UserState(
    True,
    (),
    (P.configure, P.write, P.read),
    (TopicPermission("/", "fl", P.topic_write, P.topic_read),),
)


def verbs(changes: list[admin.Change]) -> list[str]:
    return [change.args[0] for change in changes]


def test_nothing_to_change_for_a_user_with_exactly_the_permissions() -> None:
    assert admin.plan(GRANT, EXACT, password=None) == []
    assert admin.plan(GRANT, EXACT, password="pw") == []  # an existing user keeps its password


def test_a_new_user_is_created_with_the_password_on_stdin_then_granted() -> None:
    changes = admin.plan(GRANT, admin.UserState(False), password="s3cr$t")
    assert verbs(changes) == ["add_user", "set_permissions", "set_topic_permissions"]
    assert changes[0].args == ("add_user", "u1")  # no password on the command line
    assert changes[0].stdin == "s3cr$t\n"
    assert "s3cr" not in repr(changes)
    assert changes[1].args == ("set_permissions", "-p", "/", "u1", P.configure, P.write, P.read)
    assert changes[2].args[-3:] == ("fl", P.topic_write, P.topic_read)


def test_a_missing_user_without_a_password_is_refused_before_any_change() -> None:
    with pytest.raises(ConfigError, match="user 'u1' does not exist on that broker"):
        admin.plan(GRANT, admin.UserState(False), password=None)


def test_leftovers_are_cleared_before_the_grants() -> None:
    state = admin.UserState(
        True,
        ("administrator", "impersonator"),
        (".*", ".*", ".*"),
        (
            TopicPermission("/", "fl.dead", ".*", ".*"),
            TopicPermission("/", "amq.topic", ".*", ""),
            TopicPermission("/", "fl", P.topic_write, P.topic_read),
            TopicPermission("other", "fl.dead", ".*", ".*"),  # another vhost: not ours
        ),
    )
    changes = admin.plan(GRANT, state, password=None)
    assert [change.args for change in changes] == [
        ("set_user_tags", "u1"),
        ("clear_topic_permissions", "-p", "/", "u1", "fl.dead"),
        ("clear_topic_permissions", "-p", "/", "u1", "amq.topic"),
        ("set_permissions", "-p", "/", "u1", P.configure, P.write, P.read),
    ]  # the topic permissions on fl were right already
    assert [change.says for change in changes] == [
        "cleared tags administrator, impersonator of user 'u1'",
        "cleared topic permissions of 'u1' on exchange 'fl.dead'",
        "cleared topic permissions of 'u1' on exchange 'amq.topic'",
        "set permissions of 'u1' in vhost '/' (they were configure '.*', write '.*', read '.*')",
    ]


def test_the_leftovers_are_every_other_exchange_of_the_vhost() -> None:
    """``NS.dead`` included: a site publishes and binds with topic permissions only on ``NS``
    (the dead-letter exchange is a fanout, which topic permissions do not apply to)."""
    rows = [
        TopicPermission("/", exchange, ".*", ".*")
        for exchange in ("fl", "fl.dead", "amq.topic", "fl.other", "flx", "")
    ]
    left = [row.exchange for row in admin.topic_leftovers(GRANT, rows)]
    assert left == ["fl.dead", "amq.topic", "fl.other", "flx", ""]


def test_wrong_topic_permissions_on_the_exchange_are_set_again() -> None:
    state = admin.UserState(
        True, (), EXACT.permissions, (TopicPermission("/", "fl", ".*", P.topic_read),)
    )
    changes = admin.plan(GRANT, state, password=None)
    assert [change.says for change in changes] == ["set topic permissions of 'u1' on exchange 'fl'"]


def test_the_mismatch_error_says_where_and_what_to_do() -> None:
    error = BrokerMismatch("rabbitmqctl's default node", "amqp://admin:***@a:5672/%2F", "rabbit@b")
    assert str(error) == (
        "--apply refused, nothing changed: rabbitmqctl's default node (cluster 'rabbit@b') does "
        "not see this command's connection to amqp://admin:***@a:5672/%2F, so it manages "
        "another broker; run this on a node of that broker, or name one with --node"
    )
    assert isinstance(error, ConfigError)  # exit 2


# -- the command, with a fake rabbitmqctl and a fake connection ----------------------------------

FAKE_RABBITMQCTL = """\
import json, sys
from pathlib import Path
from typing import Any

here = Path(__file__).parent
args = sys.argv[1:]
verb = args[2] if args[:1] == ["-n"] else args[0]
with open(here / "calls", "a") as log:
    log.write(json.dumps({"argv": args, "verb": verb, "stdin": sys.stdin.read()}) + "\\n")
answer = json.loads((here / "answers.json").read_text()).get(verb, {})
out = answer.get("out", "")
if "{connection}" in out:
    out = out.replace("{connection}", (here / "connection_name").read_text())
sys.stdout.write(out)
sys.stderr.write(answer.get("err", ""))
sys.exit(answer.get("code", 0))
"""

URL = "amqp://admin:s3cret@broker.example:5672/%2F"
APPLY = ["admin", "permissions", "--site", "site-1", "--user", "u1", "--apply", "--namespace"]
APPLY += ["fl", "--node", "n@h", "--url", URL]
MUTATING = {"add_user", "set_user_tags", "set_permissions", "set_topic_permissions"}
MUTATING |= {"clear_topic_permissions", "clear_permissions", "delete_user"}


class FakeConnection:
    """What ``apply`` uses of a connection: its name, masked URL, events and close."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.closed = False

    def process_events(self, time_limit: float = 0) -> None:
        time.sleep(time_limit)

    def close(self) -> None:
        self.closed = True


class Fake:
    """A fake rabbitmqctl alone on PATH, answering per verb, and the connections made."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        exe = self.bin / "rabbitmqctl"
        exe.write_text(f"#!{sys.executable}\n{FAKE_RABBITMQCTL}")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", str(self.bin))
        self.connections: list[FakeConnection] = []
        self.declared: list[str] = []
        monkeypatch.setattr(admin, "connect", self.connect)
        monkeypatch.setattr(admin, "declare_for", self.declare_for)
        self.answer(list_connections=listing_of("{connection}"), list_users=[])

    def connect(self, settings: Settings, name: str) -> FakeConnection:
        (self.bin / "connection_name").write_text(name)
        self.connections.append(FakeConnection(name, mask_url(settings.url)))
        return self.connections[-1]

    def declare_for(self, connection: object, topology: object, site: str) -> list[str]:
        self.declared.append(site)
        return []

    def answer(self, **answers: object) -> None:
        """Each verb's JSON answer (an object), or a dict with ``out``, ``err``, ``code``."""
        path = self.bin / "answers.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        for verb, value in answers.items():
            is_raw = isinstance(value, dict) and {"out", "err", "code"} >= set(value)
            current[verb] = value if is_raw else {"out": json.dumps(value)}
        path.write_text(json.dumps(current))

    def calls(self) -> list[dict[str, Any]]:
        """Each run: ``argv``, ``verb`` (the command) and what it read on ``stdin``."""
        path = self.bin / "calls"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def verbs(self) -> list[str]:
        return [call["verb"] for call in self.calls()]


def listing_of(name: str) -> list[dict[str, object]]:
    return [{"client_properties": [["connection_name", "longstr", name]]}]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    monkeypatch.delenv("OBJSTREAM_ADMIN_PASSWORD", raising=False)
    return Fake(tmp_path, monkeypatch)


def test_apply_creates_a_user_with_the_password_on_stdin(
    fake: Fake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OBJSTREAM_ADMIN_PASSWORD", "pw$HOME`x`")
    assert main(APPLY) == EXIT_OK
    calls = fake.calls()
    assert all(call["argv"][:2] == ["-n", "n@h"] for call in calls)
    assert fake.verbs() == [
        "list_connections", "list_users", "add_user", "set_permissions", "set_topic_permissions",
    ]  # fmt: skip
    [add_user] = [call for call in calls if call["verb"] == "add_user"]
    assert add_user["argv"] == ["-n", "n@h", "add_user", "u1"]  # no password here
    assert add_user["stdin"] == "pw$HOME`x`\n"  # but on stdin, exactly
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "rabbitmqctl's node 'n@h' manages the broker at amqp://admin:***@broker.example:5672/%2F: "
        "it sees this connection",
        "created user 'u1' (password read from stdin)",
        "set permissions of 'u1' in vhost '/'",
        "set topic permissions of 'u1' on exchange 'fl'",
        "user 'u1' has exactly the permissions of site 'site-1' in vhost '/'",
    ]
    assert "pw$" not in out + err
    assert "s3cret" not in out + err
    assert fake.declared == ["site-1"]
    assert [c.closed for c in fake.connections] == [True]


def test_apply_clears_the_leftovers_of_an_existing_user(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    p = permissions("fl", "site-1")
    fake.answer(
        list_users=[{"user": "u1", "tags": ["administrator", "impersonator"]}],
        list_user_permissions=[{"vhost": "/", "configure": p.configure, "write": p.write,
                                "read": p.read}],
        list_user_topic_permissions=[
            {"vhost": "/", "exchange": "fl.dead", "write": ".*", "read": ".*"},
            {"vhost": "/", "exchange": "fl", "write": p.topic_write, "read": p.topic_read},
        ],
    )  # fmt: skip
    assert main([*APPLY, "--existing-user"]) == EXIT_OK
    changed = [call["argv"][2:] for call in fake.calls() if call["verb"] in MUTATING]
    assert changed == [
        ["set_user_tags", "u1"],
        ["clear_topic_permissions", "-p", "/", "u1", "fl.dead"],
    ]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "cleared tags administrator, impersonator of user 'u1'",
        "cleared topic permissions of 'u1' on exchange 'fl.dead'",
        "user 'u1' has exactly the permissions of site 'site-1' in vhost '/'",
    ]


def test_apply_with_nothing_to_change_says_so(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    p = permissions("fl", "site-1")
    fake.answer(
        list_users=[{"user": "u1", "tags": []}],
        list_user_permissions=[{"vhost": "/", "configure": p.configure, "write": p.write,
                                "read": p.read}],
        list_user_topic_permissions=[
            {"vhost": "/", "exchange": "fl", "write": p.topic_write, "read": p.topic_read},
        ],
    )  # fmt: skip
    assert main([*APPLY, "--password", "pw"]) == EXIT_OK
    assert not MUTATING & set(fake.verbs())
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "user 'u1' exists: its password is unchanged",
        "nothing changed: user 'u1' has exactly the permissions of site 'site-1', and the "
        "site's queues exist",
    ]


def test_apply_on_another_broker_changes_nothing_one_line_exit_2(
    fake: Fake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """rabbitmqctl's node lists connections, not this one: it is another broker's node."""
    monkeypatch.setenv("OBJSTREAM_ADMIN_PASSWORD", "pw")
    fake.answer(
        list_connections=listing_of("objstream admin site-1 0000"),
        cluster_status={"cluster_name": "rabbit@elsewhere", "running_nodes": ["n@h"]},
    )
    assert main(APPLY) == EXIT_USAGE
    assert fake.verbs() == ["list_connections", "cluster_status"]
    assert fake.declared == []
    assert [c.closed for c in fake.connections] == [True]
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "objstream: error: --apply refused, nothing changed: rabbitmqctl's node 'n@h' (cluster "
        "'rabbit@elsewhere') does not see this command's connection to "
        "amqp://admin:***@broker.example:5672/%2F, so it manages another broker; run this on a "
        "node of that broker, or name one with --node\n"
    )


def test_apply_without_rabbitmqctl_is_one_line_and_exit_2(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(APPLY) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "needs rabbitmqctl on PATH" in err
    assert fake.connections == []  # not even connected


def test_a_failing_rabbitmqctl_is_one_line_and_exit_3(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.answer(
        list_connections={
            "err": "Error: unable to perform an operation on node 'n@h'.\nDIAGNOSTICS\n * words\n",
            "code": 69,
        }
    )
    assert main(APPLY) == EXIT_BROKER
    assert capsys.readouterr().err == (
        "objstream: error: rabbitmqctl list_connections failed (exit 69): unable to perform an "
        "operation on node 'n@h'.\n"
    )
    assert fake.declared == []
    assert [c.closed for c in fake.connections] == [True]


def test_a_missing_user_without_a_password_changes_nothing(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(APPLY) == EXIT_USAGE
    assert not MUTATING & set(fake.verbs())
    assert fake.declared == []
    assert "user 'u1' does not exist on that broker" in capsys.readouterr().err


def test_apply_with_a_vhost_other_than_the_urls_is_refused(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    """The queues are declared in the URL's vhost; permissions in another would not fit."""
    assert main([*APPLY, "--vhost", "fed"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (
        "objstream: error: --vhost 'fed' is not the vhost of --url ('/'): with --apply, give "
        "the vhost in the URL\n"
    )
    assert fake.connections == []
    assert fake.calls() == []
