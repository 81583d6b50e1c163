"""``retrieve-file --list`` / ``retrieve-container --list`` (and ``Retriever.list``) against a
real broker: a served site lists what the requester may retrieve, with sizes; a hostile or
older owner, or none at all, gives one line and a documented exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pytest

from objstream.common.cli import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE
from objstream.common.protocol import CONTENT_TYPE, Request, parse
from objstream.common.settings import Settings
from objstream.common.topology import Topology
from objstream.consumer import Retriever
from objstream.producer import ContainerRetriever, FileRetriever, RetrievalServer
from tests.integration.conftest import Declared, StartServer
from tests.integration.rawpeer import declare_base, declare_bound, login_user
from tests.integration.test_cli import _env, _objstream


def _list(env: dict[str, str], command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return _objstream(
        "consumer", command, "--site", "site-1", "--from", "server", "--list", *extra, env=env
    )


def _serve(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        ["objstream", "producer", "serve", "--site", "server", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)
    assert server.poll() is None, server.communicate()
    return server


def _stop(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "Traceback" not in err


@pytest.fixture
def served(tmp_path: Path, settings: Settings, declared: Declared) -> Iterator[dict[str, str]]:
    """``producer serve`` of a source dir (files, a link in, a link out, a FIFO, a
    subdirectory) and two containers; yields the environment to reach it."""
    declared.sites.add("server")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(1000))
    (src / "sub" / "b.bin").write_bytes(os.urandom(12345))
    (src / "empty").write_bytes(b"")
    (src / "link-in").symlink_to(src / "a.bin")
    (tmp_path / "secret").write_bytes(b"x" * 7)
    (src / "link-out").symlink_to(tmp_path / "secret")  # refused if asked: not listed
    os.mkfifo(src / "fifo")  # no file to serve: not listed
    np.savez(tmp_path / "model.npz", w=np.arange(1000, dtype=np.float32), b=np.ones(3))
    np.savez(tmp_path / "tiny.npz", x=np.zeros(1, dtype=np.int8))
    env = _env(settings)
    server = _serve(
        env,
        "--source-dir", str(src),
        "--container", f"model={tmp_path / 'model.npz'}",
        "--container", f"tiny={tmp_path / 'tiny.npz'}",
    )  # fmt: skip
    yield env
    _stop(server)


def test_files_and_containers_are_listed_with_their_sizes(
    tmp_path: Path, served: dict[str, str]
) -> None:
    env = served
    got = _list(env, "retrieve-file", "--json")
    assert got.returncode == EXIT_OK, got.stderr
    listing = json.loads(got.stdout)
    assert listing["ok"] is True
    assert listing["from"] == "server"
    assert listing["truncated"] is False
    assert listing["objects"] == [
        {"kind": "file", "name": "a.bin", "size": 1000},
        {"kind": "file", "name": "empty", "size": 0},
        {"kind": "file", "name": "link-in", "size": 1000},
        {"kind": "file", "name": "sub/b.bin", "size": 12345},
    ]
    assert listing["count"] == 4

    got = _list(env, "retrieve-file")  # the table: sizes right-aligned, the name last
    assert got.returncode == EXIT_OK, got.stderr
    assert got.stdout.splitlines() == [
        "BYTES  NAME",
        " 1000  a.bin",
        "    0  empty",
        " 1000  link-in",
        "12345  sub/b.bin",
    ]
    assert got.stderr == ""

    got = _list(env, "retrieve-file", "sub/", "--json")  # NAME with --list: a prefix
    assert [o["name"] for o in json.loads(got.stdout)["objects"]] == ["sub/b.bin"]

    got = _list(env, "retrieve-container", "--json")
    assert got.returncode == EXIT_OK, got.stderr
    containers = {o["name"]: o for o in json.loads(got.stdout)["objects"]}
    assert sorted(containers) == ["model", "tiny"]
    assert containers["model"]["entries"] == 2
    assert containers["tiny"]["entries"] == 1
    # The size listed is what a retrieval then moves.
    fetched = _objstream(
        "consumer", "retrieve-container", "--site", "site-1", "--from", "server", "model",
        "--out", str(tmp_path / "m.npz"), "--json", env=env,
    )  # fmt: skip
    assert fetched.returncode == EXIT_OK, fetched.stderr
    assert json.loads(fetched.stdout)["bytes"] == containers["model"]["size"]

    got = _list(env, "retrieve-container")
    assert got.stdout.splitlines()[0] == "BYTES  ENTRIES  NAME"
    assert got.stdout.splitlines()[1].split() == [str(containers["model"]["size"]), "2", "model"]

    got = _list(env, "retrieve-file", "nothing-like-this")
    assert got.returncode == EXIT_OK
    assert got.stdout == ""
    assert got.stderr.strip() == (
        "objstream: site 'server' has no files whose names begin with 'nothing-like-this' "
        "for site 'site-1'"
    )


def test_a_user_not_allowed_sees_nothing_of_a_site_served_to_others(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("server")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"abc")
    env = _env(settings)
    server = _serve(env, "--source-dir", str(tmp_path / "src"), "--allow", "alice")
    try:
        got = _list(env, "retrieve-file", "--json")
        assert got.returncode == EXIT_OK, got.stderr
        listing = json.loads(got.stdout)
        assert (listing["count"], listing["objects"]) == (0, [])
        got = _list(env, "retrieve-file")
        assert got.stdout == ""
        assert "has no files for site 'site-1'" in got.stderr
    finally:
        _stop(server)


def test_each_object_is_listed_only_to_the_users_its_allow_list_names(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    """Per-object allow lists (the Python API): the requester (broker user guest) sees what
    names guest or anyone, never alice's; ``Retriever.list`` and the command agree."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"abc")

    def setup(server: RetrievalServer) -> None:
        ContainerRetriever(server).add_container("open", {"x": 1})
        ContainerRetriever(server).add_container("ours", [1, 2, 3], allow=["guest"])
        ContainerRetriever(server).add_container("alices", {"k": b"v"}, allow=["alice"])
        FileRetriever(server, tmp_path / "src", allow=["alice"])

    start_server(settings, setup)
    with Retriever("site-1", tmp_path / "out", settings) as retriever:
        listing = retriever.list("server", timeout=20)
        assert [(o.kind, o.name, o.entries) for o in listing.objects] == [
            ("container", "open", 1),
            ("container", "ours", 3),
        ]
        assert not listing.truncated
        assert retriever.list("server", "file", timeout=20).objects == ()
        assert [o.name for o in retriever.list("server", prefix="ou", timeout=20).objects] == [
            "ours"
        ]
    got = _list(_env(settings), "retrieve-container", "--json")
    assert [o["name"] for o in json.loads(got.stdout)["objects"]] == ["open", "ours"]


class _HostileOwner:
    """Site ``server`` by hand (raw pika): takes one request, answers as it is told."""

    def __init__(self, settings: Settings) -> None:
        self.ns = settings.namespace
        self.user = login_user(settings)
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        self.channel = self.connection.channel()
        topology = Topology.from_settings(settings)
        declare_base(self.channel, topology, "server")
        self.service = declare_bound(
            self.channel, topology, f"{self.ns}.serve.server", "serve:server"
        )

    def answer_one(self, headers: dict[str, Any], body: bytes, timeout: float = 30) -> Request:
        """Wait for a request and reply to it with ``headers`` (plus its request id) and
        ``body``, through the exchange with this site's answer key."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, _ = self.channel.basic_get(self.service, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.05)
                continue
            request = parse(props.type, props.headers)
            assert isinstance(request, Request)
            out = pika.BasicProperties(
                type="reply",
                headers={"objstream": 2, "request_id": request.request_id, **headers},
                message_id=request.request_id,
                correlation_id=request.request_id,
                content_type=CONTENT_TYPE,
                delivery_mode=1,
                user_id=self.user,
            )
            self.channel.basic_publish(self.ns, f"{props.reply_to}:server", body, out)
            return request
        raise AssertionError("no request came")

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def hostile_owner(settings: Settings, declared: Declared) -> Iterator[_HostileOwner]:
    declared.sites.add("server")
    owner = _HostileOwner(settings)
    yield owner
    owner.close()


def _list_against(
    owner: _HostileOwner, settings: Settings, headers: dict[str, Any], body: bytes, *extra: str
) -> tuple[subprocess.CompletedProcess[str], Request]:
    """``retrieve-file --list`` in a process while ``owner`` answers its request."""
    outcome: list[subprocess.CompletedProcess[str]] = []
    lister = threading.Thread(
        target=lambda: outcome.append(_list(_env(settings), "retrieve-file", *extra))
    )
    lister.start()
    try:
        request = owner.answer_one(headers, body)
    finally:
        lister.join(60)
    [got] = outcome
    return got, request


@pytest.mark.parametrize(
    ("headers", "body", "words"),
    [
        ({"ok": True, "listed": 1}, b"\x00not json at all", "Invalid JSON"),
        ({"ok": True, "listed": 1}, b'[{"kind":"file","name":"a","size":"big"}]', "0.size"),
        ({"ok": True, "listed": 1}, b'[{"kind":"file","name":"a\\nb","size":-5}]', "0.size"),
        ({"ok": True, "listed": 2}, b'[{"kind":"file","name":"a","size":1}]', "says 2"),
        ({"ok": True, "listed": 0}, b"[" + b" " * (2 * 1024 * 1024) + b"]", "at most 1048576"),
        ({"ok": True, "listed": "lots"}, b"[]", "invalid reply headers"),
        ({"ok": True, "listed": 0, "evil\nheader": 1}, b"[]", "evil?header"),
        ({"ok": True, "stream_id": "a" * 32}, b"", "without listed"),
    ],
    ids=["not-json", "wrong-type", "negative", "count", "huge", "headers", "key", "a-stream"],
)
def test_a_forged_or_malformed_listing_is_one_line_exit_1(
    settings: Settings,
    hostile_owner: _HostileOwner,
    headers: dict[str, Any],
    body: bytes,
    words: str,
) -> None:
    got, request = _list_against(hostile_owner, settings, headers, body)
    assert (request.kind, request.of, request.name) == ("list", "file", "")
    assert got.returncode == EXIT_FAILED, got.stderr
    assert got.stdout == ""
    assert len(got.stderr.splitlines()) == 1, got.stderr
    [line] = got.stderr.splitlines()
    assert line.startswith("objstream: error: site 'server' sent an invalid listing: ")
    assert words in line


def test_a_malformed_listing_with_json_prints_one_failure_object(
    settings: Settings, hostile_owner: _HostileOwner
) -> None:
    got, _ = _list_against(hostile_owner, settings, {"ok": True, "listed": 3}, b"[]", "--json")
    assert got.returncode == EXIT_FAILED
    record = json.loads(got.stdout)
    assert (record["ok"], record["code"], record["from"]) == (False, "protocol", "server")
    assert len(got.stderr.splitlines()) == 1


def test_an_older_owner_refuses_the_kind_and_the_requester_says_so(
    settings: Settings, hostile_owner: _HostileOwner
) -> None:
    """What an objstream from before listing answers (its Request model knows only file and
    container kinds: the request does not parse, and is refused ``unsupported``)."""
    detail = "invalid request headers: kind: Input should be 'file' or 'container'"
    headers = {"ok": False, "code": "unsupported", "detail": detail}
    got, _ = _list_against(hostile_owner, settings, headers, b"")
    assert got.returncode == EXIT_FAILED
    [line] = got.stderr.splitlines()
    assert line.startswith("objstream: error: site 'server' does not support listing")


def test_listing_a_site_that_does_not_serve_times_out_in_one_line(
    settings: Settings, declared: Declared
) -> None:
    declared.sites.add("server")
    started = time.monotonic()
    got = _list(_env(settings), "retrieve-file", "--timeout", "2")
    assert got.returncode == EXIT_TIMEOUT
    [line] = got.stderr.splitlines()
    assert "timed out after 2 s" in line
    assert "site 'server' did not answer the list request" in line
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("command", "extra", "words"),
    [
        ("retrieve-file", ["--dest", "x"], "--list stores nothing: leave out --dest"),
        ("retrieve-container", ["--out", "x.npz"], "--list stores nothing: leave out --out"),
        ("retrieve-file", ["x" * 1025], "prefix of 1025 characters (at most 1024)"),
    ],
)
def test_list_with_a_destination_is_a_usage_error(
    settings: Settings, command: str, extra: list[str], words: str
) -> None:
    got = _list(_env(settings), command, *extra)
    assert got.returncode == EXIT_USAGE
    assert got.stderr.strip() == f"objstream: error: {words}"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--dest", "x"], "give NAME (the object to retrieve) and --dest, or --list"),
        (["a.bin"], "give --dest: where to store 'a.bin'"),
    ],
)
def test_retrieving_without_list_still_needs_a_name_and_a_destination(
    settings: Settings, args: list[str], words: str
) -> None:
    got = _objstream(
        "consumer", "retrieve-file", "--site", "site-1", "--from", "server", *args,
        env=_env(settings),
    )  # fmt: skip
    assert got.returncode == EXIT_USAGE
    assert got.stderr.strip() == f"objstream: error: {words}"
