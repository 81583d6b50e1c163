"""Certificates made at test time, a throwaway RabbitMQ node with a TLS listener, and stub peers.

:func:`make_pki` writes a CA, a server certificate for ``localhost`` / ``127.0.0.1`` and client
certificates (one per user, the user being the common name) into a directory;
:class:`TlsRabbitNode` is a :class:`~tests.rabbitmq_node.LocalRabbitNode` with a TLS listener
that verifies client certificates against that CA (when one is sent) and the EXTERNAL
mechanism. :class:`StubPeer` answers on a port the way a broker must not (a TLS server with a
bad certificate, a peer that never speaks AMQP), for the failure tests. The benchmark uses
this module too.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.rabbitmq_node import LocalRabbitNode, free_port

DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Authority:
    """A CA that issues certificates into ``directory``."""

    directory: Path
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, directory: Path, name: str = "objstream test CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        authority = cls(directory, name, key, cert)
        directory.mkdir(parents=True, exist_ok=True)
        authority.pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return authority

    def as_issued(self) -> Issued:
        """This CA's own certificate and key: a self-signed certificate to present."""
        key = self.directory / f"{self.pem.stem}.key"
        key.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Issued(self.pem, key)

    @property
    def pem(self) -> Path:
        return self.directory / f"{self.name.replace(' ', '-')}.pem"

    def issue(
        self,
        file_name: str,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        expired: bool = False,
        server: bool = False,
    ) -> Issued:
        """A certificate for ``common_name`` (and the DNS names / IPs ``hosts``)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 10 * DAY, now - DAY) if expired else (now - DAY, now + 30 * DAY)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else (
            ExtendedKeyUsageOID.CLIENT_AUTH
        )  # fmt: skip
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.directory / f"{file_name}.pem", self.directory / f"{file_name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


@dataclass(frozen=True)
class Pki:
    """What :func:`make_pki` made."""

    ca: Authority
    server: Issued
    other_ca: Authority
    """Another CA: its certificates are strangers to the node."""

    def client(self, user: str) -> Issued:
        """A client certificate of ``ca`` for broker user ``user`` (its common name)."""
        return self.ca.issue(f"client-{user}", user)


def make_pki(directory: Path) -> Pki:
    ca = Authority.create(directory)
    server = ca.issue("server", "localhost", hosts=("localhost", "127.0.0.1"), server=True)
    return Pki(ca, server, Authority.create(directory / "other", "stranger CA"))


class TlsRabbitNode(LocalRabbitNode):
    """A throwaway node with a TLS listener on :attr:`tls_port` next to its plain one.

    Client certificates are verified against the CA when sent, not required (so password
    logins over TLS work too); EXTERNAL logs in as the certificate's common name. The
    certificate files are copied into the node's own directory (its user must read them).
    """

    def __init__(self, pki: Pki) -> None:
        super().__init__()
        self.tls_port = free_port()
        files = self.base / "tls"
        files.mkdir()
        copies = {}
        for label, path in (("ca", pki.ca.pem), ("cert", pki.server.cert),
                            ("key", pki.server.key)):  # fmt: skip
            copies[label] = files / path.name
            copies[label].write_bytes(path.read_bytes())
        self.plugins.append("rabbitmq_auth_mechanism_ssl")
        self.config_lines += [
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
            f"ssl_options.cacertfile = {copies['ca']}",
            f"ssl_options.certfile = {copies['cert']}",
            f"ssl_options.keyfile = {copies['key']}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = false",
            "auth_mechanisms.1 = PLAIN",
            "auth_mechanisms.2 = AMQPLAIN",
            "auth_mechanisms.3 = EXTERNAL",
            "ssl_cert_login_from = common_name",
        ]

    def tls_url(self, user: str | None = "guest", password: str | None = "guest",
                host: str = "localhost") -> str:  # fmt: skip
        """``amqps://`` to the TLS listener (no user and password: a certificate login)."""
        login = f"{user}:{password}@" if user and password else ""
        return f"amqps://{login}{host}:{self.tls_port}/%2F"

    def add_user(self, user: str, password: str | None = None) -> None:
        """A broker user with every permission on ``/`` (no password: certificate login only)."""
        steps: list[tuple[str, ...]] = [("add_user", user, password or "unused-password")]
        if password is None:
            steps.append(("clear_password", user))
        steps.append(("set_permissions", "-p", "/", user, ".*", ".*", ".*"))
        for args in steps:
            done = self.ctl(*args)
            if done.returncode != 0:
                raise RuntimeError(f"rabbitmqctl {args[0]} {user}: {done.stderr.strip()}")


class StubPeer:
    """A listener on 127.0.0.1 that is no broker: ``serve`` runs for each connection."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._serve = serve
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="stub-peer")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self._serve(conn)

    def close(self) -> None:
        self._listener.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()


def silent(conn: socket.socket) -> None:
    """Accept the connection and never say a word (a port that does not speak AMQP)."""
    while conn.recv(4096):
        pass


def tls_server(issued: Issued) -> Callable[[socket.socket], None]:
    """A TLS server presenting ``issued``; after the handshake (if the client completes it),
    silence."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)

    def serve(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            silent(tls)

    return serve


@contextlib.contextmanager
def stub_peer(serve: Callable[[socket.socket], None]) -> Iterator[StubPeer]:
    peer = StubPeer(serve)
    try:
        yield peer
    finally:
        peer.close()
