"""A throwaway RabbitMQ cluster of local nodes (:class:`~tests.rabbitmq_node.LocalRabbitNode`).

Each node has its own ports, data dir and node name; nodes 2..N join node 1 with
``rabbitmqctl join_cluster``. Tests kill and restart nodes with :meth:`LocalRabbitCluster.kill`
and :meth:`LocalRabbitCluster.restart`. Nothing here touches the shared broker.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from pathlib import Path

from tests.rabbitmq_node import LocalRabbitNode


class LocalRabbitCluster:
    """``size`` local nodes joined into one cluster: ``start()``, use ``url``, ``cleanup()``."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [LocalRabbitNode() for _ in range(size)]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (the form ``OBJSTREAM_URL`` takes)."""
        return ",".join(node.url for node in self.nodes)

    def url_from(self, first: int) -> str:
        """Every node's URL, node ``first``'s first: a client connects there while it is up."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def start(self, timeout: float = 120.0) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            for started in [pool.submit(node.start, timeout) for node in self.nodes]:
                started.result()
        seed = self.nodes[0].nodename
        for node in self.nodes[1:]:
            for args in (("stop_app",), ("join_cluster", seed), ("start_app",)):
                self._ctl(node, *args)
        self.wait_running(len(self.nodes), timeout)

    def _ctl(self, node: LocalRabbitNode, *args: str) -> str:
        done = node.ctl(*args, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.nodename}: {done.stderr}")
        return done.stdout

    def running(self) -> list[str]:
        """The node names the cluster reports running (asked of a node that is up)."""
        for node in self.nodes:
            if node.process is None:
                continue
            done = node.ctl("eval", "rabbit_nodes:all_running().", timeout=30)
            if done.returncode == 0:
                return [n for n in self._names() if f"'{n}'" in done.stdout or n in done.stdout]
        return []

    def _names(self) -> list[str]:
        return [node.nodename for node in self.nodes]

    def wait_running(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.running()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.running()} of the cluster running")
            time.sleep(0.5)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (its data stays, for :meth:`restart`)."""
        self.nodes[index].kill()

    def restart(self, *indexes: int, timeout: float = 120.0) -> None:
        """Start killed nodes again (together: a node waits for its peers) and wait until the
        whole cluster runs."""
        with concurrent.futures.ThreadPoolExecutor(max(len(indexes), 1)) as pool:
            for started in [pool.submit(self.nodes[i].start, timeout) for i in indexes]:
                started.result()
        self.wait_running(len(self.nodes), timeout)

    def copy_logs(self, into: Path) -> None:
        """Copy each node's log directory to ``into/NODENAME``."""
        for node in self.nodes:
            shutil.copytree(node.base / "log", into / node.nodename, dirs_exist_ok=True)

    def cleanup(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(LocalRabbitNode.cleanup, self.nodes))
