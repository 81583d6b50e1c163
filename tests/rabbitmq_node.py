"""A throwaway RabbitMQ node started from the local ``rabbitmq-server`` binary.

For machines without a Docker engine: it runs on free ports with its own data, log and plugin
files, so it never touches a shared broker; tests that kill or restart a broker use one of these.

What a test does when it cannot have a broker is decided here, once: :func:`skip_or_fail`.
Tests that start nodes of their own go through :func:`require_local_nodes` (the ``local_nodes``
fixture of the integration tests).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NoReturn, Protocol

REQUIRE_BROKER = "OBJSTREAM_REQUIRE_BROKER"
"""Set to ``1`` (CI does): a broker a test cannot have fails the test instead of skipping it."""


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the calling test for want of a broker (``reason`` says what is missing), or fail it
    under ``OBJSTREAM_REQUIRE_BROKER=1``: there a missing broker is a broken machine, and a run
    that quietly tested less must not pass."""
    import pytest  # here, not at the top: bench/ uses this module without the test extra

    if os.environ.get(REQUIRE_BROKER) == "1":
        pytest.fail(f"{REQUIRE_BROKER}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_local_nodes() -> None:
    """Return if throwaway nodes (:class:`LocalRabbitNode`) can be started here; otherwise
    :func:`skip_or_fail`."""
    if not LocalRabbitNode.available():
        skip_or_fail(
            "a throwaway RabbitMQ node needs the rabbitmq-server and rabbitmqctl binaries on PATH"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class LocalRabbitNode:
    """One RabbitMQ node of our own: ``start()``, use ``url``, ``stop()``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.nodename = f"objstream{self.port}@localhost"
        self.base = Path(tempfile.mkdtemp(prefix="objstream-rabbit-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.config_lines: list[str] = []  # extra rabbitmq.conf lines, set before start()
        self.plugins: list[str] = []  # plugins to enable (enabled_plugins), set before start()

    @staticmethod
    def available() -> bool:
        return (
            shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None
        )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_PID_FILE=str(self.base / "node.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            # Our own config: the system one may pin the listener to the shared node's port.
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
        )
        return env

    def start(self, timeout: float = 90.0) -> None:
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(exist_ok=True)
        (self.base / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            + "".join(f"{line}\n" for line in self.config_lines)
        )
        if os.geteuid() == 0:
            # The Debian wrapper drops root to the rabbitmq user, who must own the node's files.
            user = pwd.getpwnam("rabbitmq")
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        log = open(self.base / "console.log", "ab")
        self.process = subprocess.Popen(
            ["rabbitmq-server"],
            env=self._env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: see {self.base / 'console.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rabbitmq-server did not open port {self.port} in {timeout} s")
            time.sleep(0.25)

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.nodename, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _beam_pids(self) -> list[int]:
        """The Erlang VM(s) of this node: found by the node name in their environment (the
        Debian wrapper starts them through su, in a session of their own)."""
        marker = f"RABBITMQ_NODENAME={self.nodename}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    if (entry / "comm").read_text().strip().startswith("beam"):
                        pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def kill(self) -> None:
        """SIGKILL the node, no goodbye (its data dir stays for a restart with ``start()``)."""
        for pid in self._beam_pids():
            os.kill(pid, 9)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait()
            self.process = None
        deadline = time.monotonic() + 30
        while port_open("127.0.0.1", self.port) or self._beam_pids():
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.nodename} did not die")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.ctl("stop")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self._beam_pids():  # whatever is left of it (a failed stop), no goodbye
            self.kill()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class Nodes(Protocol):
    """Throwaway nodes of a test (a cluster, regions): their logs can be kept, then removed."""

    def copy_logs(self, dest: Path) -> None: ...

    def cleanup(self) -> None: ...


KEEP_LOGS = "OBJSTREAM_KEEP_NODE_LOGS"
"""A directory: the nodes' logs are copied there before the nodes are removed."""


def remove_nodes(nodes: Nodes) -> None:
    """Stop and remove ``nodes``, first copying their logs to ``$OBJSTREAM_KEEP_NODE_LOGS``."""
    if keep := os.environ.get(KEEP_LOGS):
        nodes.copy_logs(Path(keep))
    nodes.cleanup()
