"""TLS and identities for real (issue 13): a throwaway node with a TLS listener and the EXTERNAL
mechanism, certificates made at test time, pushes and retrievals with password and certificate
logins, every connect failure as one line (exit 3), and ``listen --accept-from``."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from objstream.common.amqp import connect
from objstream.common.cli import EXIT_BROKER, EXIT_FAILED
from objstream.common.settings import KiB, Settings
from objstream.consumer import Retriever
from objstream.producer import FileRetriever, FileStreamer
from tests.conftest import as_received, random_file, sha256_of, stored_names, stored_path
from tests.integration.conftest import BackgroundReceiver, BackgroundServer
from tests.tls import Authority, Issued, Pki, TlsRabbitNode, make_pki, silent, stub_peer, tls_server

pytestmark = pytest.mark.usefixtures("local_nodes")

CONNECT_TIMEOUT = "3"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(pki: Pki) -> Iterator[TlsRabbitNode]:
    """One node for the module: users alice and bob log in by certificate only, carol by
    password."""
    node = TlsRabbitNode(pki)
    node.start()
    try:
        node.add_user("alice")
        node.add_user("bob")
        node.add_user("carol", "carol-pw")
        yield node
    finally:
        node.cleanup()


def _by_certificate(node: TlsRabbitNode, pki: Pki, user: str, namespace: str) -> Settings:
    client = pki.client(user)
    return Settings(url=node.tls_url(None, None), tls_ca=pki.ca.pem, tls_cert=client.cert,
                    tls_key=client.key, namespace=namespace, timeout=30)  # fmt: skip


def _namespace() -> str:
    return f"objstream-tls-{uuid.uuid4().hex[:8]}"


def _push_and_retrieve(sender: Settings, receiver: Settings, tmp_path: Path) -> list[str | None]:
    """site-1 receives a push from site server, then retrieves a file from it; returns the
    sender users the two :class:`Received` name."""
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "a.bin", 300 * KiB + 1)
    listener = BackgroundReceiver("site-1", tmp_path / "in", receiver)
    try:
        with FileStreamer("server", sender) as streamer:
            streamer.stream_file("site-1", src / "a.bin", chunk_size=64 * KiB)
        [pushed] = listener.wait_for(1)
    finally:
        listener.stop()
    assert sha256_of(stored_path(pushed)) == digest
    server = BackgroundServer("server", sender, lambda s: FileRetriever(s, source_dir=src))
    try:
        with Retriever("site-1", tmp_path / "fetched", receiver) as retriever:
            fetched = retriever.retrieve("file", "server", "a.bin", 60)
    finally:
        server.stop()
    assert sha256_of(stored_path(fetched)) == digest
    return [as_received(pushed).sender_user, fetched.sender_user]


def test_push_and_retrieval_over_tls_with_a_password(
    node: TlsRabbitNode, pki: Pki, tmp_path: Path
) -> None:
    # carol logs in for both sites: a user they share.
    settings = Settings(url=node.tls_url("carol", "carol-pw"), tls_ca=pki.ca.pem,
                        namespace=_namespace(), timeout=30, shared_users="carol")  # fmt: skip

    assert _push_and_retrieve(settings, settings, tmp_path) == ["carol", "carol"]


def test_push_and_retrieval_over_tls_with_certificates(
    node: TlsRabbitNode, pki: Pki, tmp_path: Path
) -> None:
    """No password anywhere: EXTERNAL logins as alice (sender, owner) and bob (receiver); the
    user_id on every message is the certificate's common name, or RabbitMQ would refuse it."""
    ns = _namespace()
    users = {"site_users": {"server": "alice", "site-1": "bob"}}
    alice = _by_certificate(node, pki, "alice", ns).model_copy(update=users)
    bob = _by_certificate(node, pki, "bob", ns).model_copy(update=users)

    assert _push_and_retrieve(alice, bob, tmp_path) == ["alice", "alice"]


@pytest.mark.parametrize(
    ("login", "expected"), [("certificate", ["alice", "true", "EXTERNAL"]),
                            ("password", ["carol", "true", "PLAIN"])],
)  # fmt: skip
def test_the_broker_sees_a_tls_connection_and_the_login_mechanism(
    node: TlsRabbitNode, pki: Pki, login: str, expected: list[str]
) -> None:
    settings = _by_certificate(node, pki, "alice", _namespace())
    if login == "password":
        settings = Settings(url=node.tls_url("carol", "carol-pw"), tls_ca=pki.ca.pem)
    connection = connect(settings, f"tls-test-{login}")
    try:
        listed = node.ctl("-q", "list_connections", "user", "ssl", "auth_mechanism").stdout
    finally:
        connection.close()
    assert expected in [line.split("\t") for line in listed.splitlines()], listed


# -- failures: one line, exit 3 -------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBJSTREAM_")}
    env["OBJSTREAM_LOG_LEVEL"] = "warning"
    return env


def _listen(tmp_path: Path, url: str, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["objstream", "consumer", "listen", "--site", "site-1", "--dest", str(tmp_path / "in"),
         "--count", "1", "--timeout", "5", "--url", url, "--connect-timeout", CONNECT_TIMEOUT,
         *tls],
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _ca(pki: Pki) -> list[str]:
    return ["--tls-ca", str(pki.ca.pem)]


def _cert(issued: Issued) -> list[str]:
    return ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]


def _fails_with(run: subprocess.CompletedProcess[str], expected: str) -> None:
    assert "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == EXIT_BROKER, run.stderr
    assert last.startswith("objstream: error: "), last
    assert expected in last, last


def test_wrong_ca(node: TlsRabbitNode, pki: Pki, tmp_path: Path) -> None:
    run = _listen(tmp_path, node.tls_url(), "--tls-ca", str(pki.other_ca.pem))
    _fails_with(run, f"broker unreachable at amqps://guest:***@localhost:{node.tls_port}/%2F: "
                     "certificate verify failed: self-signed certificate in certificate chain; "
                     f"checked against {pki.other_ca.pem}")  # fmt: skip


def test_no_ca_given_checks_against_the_systems_cas(
    node: TlsRabbitNode, pki: Pki, tmp_path: Path
) -> None:
    run = _listen(tmp_path, node.tls_url())
    _fails_with(run, "certificate verify failed: self-signed certificate in certificate chain; "
                     "checked against the system's CAs")  # fmt: skip


def test_self_signed_server_certificate(pki: Pki, tmp_path: Path) -> None:
    own = Authority.create(tmp_path / "self", "localhost").as_issued()
    with stub_peer(tls_server(own)) as peer:
        run = _listen(tmp_path, f"amqps://guest:guest@localhost:{peer.port}/", *_ca(pki))
    _fails_with(run, "certificate verify failed: self-signed certificate; ")


def test_expired_server_certificate(pki: Pki, tmp_path: Path) -> None:
    expired = pki.ca.issue("expired", "localhost", hosts=("localhost",), expired=True,
                           server=True)  # fmt: skip
    with stub_peer(tls_server(expired)) as peer:
        run = _listen(tmp_path, f"amqps://guest:guest@localhost:{peer.port}/", *_ca(pki))
    _fails_with(run, "certificate verify failed: certificate has expired")


def test_host_name_mismatch(pki: Pki, tmp_path: Path) -> None:
    elsewhere = pki.ca.issue("elsewhere", "broker.example", hosts=("broker.example",),
                             server=True)  # fmt: skip
    with stub_peer(tls_server(elsewhere)) as peer:
        run = _listen(tmp_path, f"amqps://guest:guest@localhost:{peer.port}/", *_ca(pki))
    _fails_with(run, "certificate verify failed: Hostname mismatch, certificate is not valid "
                     "for 'localhost'")  # fmt: skip


def test_client_certificate_rejected(node: TlsRabbitNode, pki: Pki, tmp_path: Path) -> None:
    stranger = pki.other_ca.issue("client-stranger", "alice")
    run = _listen(tmp_path, node.tls_url(None, None), *_ca(pki), *_cert(stranger))
    _fails_with(run, "the broker closed the TLS connection in the handshake")
    assert f"it did not accept the client certificate {stranger.cert}" in run.stderr


def test_certificate_of_no_broker_user(node: TlsRabbitNode, pki: Pki, tmp_path: Path) -> None:
    run = _listen(tmp_path, node.tls_url(None, None), *_ca(pki), *_cert(pki.client("mallory")))
    _fails_with(run, "refused the certificate login (EXTERNAL) as user 'mallory'")


def test_amqps_to_a_plain_port(node: TlsRabbitNode, pki: Pki, tmp_path: Path) -> None:
    run = _listen(tmp_path, f"amqps://guest:guest@localhost:{node.port}/", *_ca(pki))
    _fails_with(run, "TLS handshake failed: wrong version number; that port does not speak TLS")


def test_amqp_to_a_tls_port(node: TlsRabbitNode, tmp_path: Path) -> None:
    run = _listen(tmp_path, f"amqp://guest:guest@localhost:{node.tls_port}/")
    _fails_with(run, "the peer closed the connection in the AMQP handshake; is that an AMQP "
                     "port? (a TLS port wants amqps://)")  # fmt: skip


def test_a_port_that_does_not_speak_amqp(tmp_path: Path) -> None:
    """Like Redis on 6379: it accepts the connection and waits for words it understands.
    Before, pika gave up after 15 s with a traceback, exit 1."""
    with stub_peer(silent) as peer:
        run = _listen(tmp_path, f"amqp://guest:s3cret@127.0.0.1:{peer.port}/")
    _fails_with(run, f"broker unreachable at amqp://guest:***@127.0.0.1:{peer.port}/: no AMQP "
                     f"handshake within {CONNECT_TIMEOUT} s")  # fmt: skip


def test_an_unknown_host(tmp_path: Path) -> None:
    run = _listen(tmp_path, "amqp://guest:s3cret@no-such-host.invalid/")
    _fails_with(run, "broker unreachable at amqp://guest:***@no-such-host.invalid/: unknown host "
                     "'no-such-host.invalid'")  # fmt: skip
    assert "s3cret" not in run.stderr


# -- who may push ---------------------------------------------------------------------------------


def _cli(settings: Settings, *args: str) -> list[str]:
    tls = [str(settings.tls_ca), str(settings.tls_cert), str(settings.tls_key)]
    return ["objstream", *args, "--url", settings.url, "--namespace", settings.namespace,
            "--tls-ca", tls[0], "--tls-cert", tls[1], "--tls-key", tls[2]]  # fmt: skip


def test_listen_accept_from_takes_one_user_and_refuses_another(
    node: TlsRabbitNode, pki: Pki, tmp_path: Path
) -> None:
    ns = _namespace()
    carol, alice, bob = (_by_certificate(node, pki, user, ns) for user in ("carol", "alice", "bob"))
    src = tmp_path / "a.bin"
    digest = random_file(src, 1000)
    # Each site its own user (by certificate): bob is site-2's, which speaks for itself but
    # is not among the users site-1 takes pushes from.
    env = {**_env(), "OBJSTREAM_SITE_USERS": "server=alice,site-1=carol,site-2=bob"}
    listener = subprocess.Popen(
        _cli(carol, "consumer", "listen", "--site", "site-1", "--dest", str(tmp_path / "in"),
             "--accept-from", "alice", "--accept-from", "dave", "--count", "2", "--json"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        send = ["producer", "send-file", "--to", "site-1", "--timeout", "60"]
        ok = subprocess.run(_cli(alice, *send, "--site", "server", str(src)), env=env,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        refused = subprocess.run(_cli(bob, *send, "--site", "site-2", str(src)), env=env,
                                 capture_output=True, text=True, timeout=120,
                                 check=False)  # fmt: skip
        out, _ = listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert ok.returncode == 0, ok.stderr
    assert refused.returncode == EXIT_FAILED
    *_, line = refused.stderr.strip().splitlines()
    assert line.startswith("objstream: error: transfer "), line
    assert line.endswith("with site 'site-1' failed (forbidden): site site-1 takes pushes only "
                         "from broker users alice, dave, not from 'bob'")  # fmt: skip
    taken, refusal = (json.loads(record) for record in out.splitlines())
    assert (taken["ok"], taken["sender_user"], taken["sha256"]) == (True, "alice", digest)
    assert (refusal["ok"], refusal["code"]) == (False, "forbidden")
    assert stored_names(tmp_path / "in") == ["a.bin"]
