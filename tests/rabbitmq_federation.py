"""Throwaway regions: a central RabbitMQ node and regional nodes joined by exchange federation.

Each node is a :class:`~tests.rabbitmq_node.LocalRabbitNode` of its own (not a cluster: regions
are separate brokers, as they are across a WAN), with the federation plugin that ships with
RabbitMQ. :meth:`LocalRegions.federate` applies what ``objstream admin federation`` prints, on
every node, so the namespace's exchange is federated both ways between the central node and each
region. Optionally every link runs through a counting proxy (bench/delay_proxy.py's, in a
process of its own), so a test can measure the bytes that cross between brokers. Nothing here
touches the shared broker.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pika

from bench import delay_proxy
from objstream.common.federation import (
    DEFAULT_LINK_QUEUE_MAX,
    FederationLink,
    federation_commands,
    link_permissions,
)
from tests.rabbitmq_node import LocalRabbitNode, free_port


class LocalRegions:
    """A central node and ``regions`` regional nodes: ``start()``, ``federate(ns)``,
    ``cleanup()``. ``central`` is node 0; ``region(i)`` the i-th regional node (0-based)."""

    def __init__(
        self,
        regions: int = 2,
        *,
        count_links: bool = False,
        link_user: tuple[str, str] = ("guest", "guest"),
        link_queue_max: int = DEFAULT_LINK_QUEUE_MAX,
    ) -> None:
        self.link_queue_max = link_queue_max
        """Bytes each broker holds for one downstream's link (``--link-queue-max``)."""
        self.link_user = link_user
        """(user, password) every link logs in as on its upstream."""
        self.nodes = [LocalRabbitNode() for _ in range(regions + 1)]
        for node in self.nodes:
            node.plugins = ["rabbitmq_federation"]
        self.count_links = count_links
        self.proxies: dict[tuple[int, int], int] = {}
        """(downstream, upstream) node indexes -> the port of the proxy the link runs through
        (its counter has the same index in :attr:`proxies`' order)."""
        self._context = mp.get_context("spawn")
        self._counters = self._context.Array("q", 0)
        self._stop = self._context.Event()
        self._proxy: mp.process.BaseProcess | None = None

    @property
    def central(self) -> LocalRabbitNode:
        return self.nodes[0]

    def region(self, index: int) -> LocalRabbitNode:
        return self.nodes[index + 1]

    def start(self, timeout: float = 120.0) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            for started in [pool.submit(node.start, timeout) for node in self.nodes]:
                started.result()
        for node in self.nodes:
            node.ctl("set_cluster_name", node.nodename.split("@")[0])
        if self.count_links:
            self._start_proxies()

    def _start_proxies(self) -> None:
        """One proxy per link, counting what the upstream sends its downstream."""
        ends = range(1, len(self.nodes))
        pairs = [(0, up) for up in ends] + [(down, 0) for down in ends]
        specs = []
        for index, (down, up) in enumerate(pairs):
            self.proxies[(down, up)] = port = free_port()
            target = ("127.0.0.1", self.nodes[up].port)
            specs.append(delay_proxy.Listener("127.0.0.1", port, target, down_counter=index))
        self._counters = self._context.Array("q", len(pairs))
        ready = self._context.Queue()
        self._proxy = self._context.Process(
            target=delay_proxy.serve, args=(specs, self._counters, ready, self._stop), daemon=True
        )
        self._proxy.start()
        ready.get(timeout=30)

    def _upstream_port(self, downstream: int, upstream: int) -> int:
        return self.proxies.get((downstream, upstream), self.nodes[upstream].port)

    def links(self, downstream: int) -> list[FederationLink]:
        """The upstreams of node ``downstream``: every region for the central node, the central
        node for a region."""
        ups = range(1, len(self.nodes)) if downstream == 0 else [0]
        user, password = self.link_user
        return [
            FederationLink(
                name=f"node{up}",
                uri=f"amqp://{user}:{password}@127.0.0.1:{self._upstream_port(downstream, up)}/%2F",
            )
            for up in ups
        ]

    def federate(self, namespace: str) -> None:
        """Federate the exchange ``namespace`` (declared here on every node, as ``admin
        permissions --apply`` does on a broker) between the central node and each region; the
        link user (unless guest) is made on every node with ``link_permissions``."""
        user, password = self.link_user
        for index, node in enumerate(self.nodes):
            if user != "guest":
                node.ctl("add_user", user, password)  # fails harmlessly if it exists
                done = node.ctl(*link_permissions(namespace, user)[1:])
                if done.returncode != 0:
                    raise RuntimeError(f"link permissions on {node.nodename}: {done.stderr}")
            connection = pika.BlockingConnection(pika.URLParameters(node.url))
            try:
                connection.channel().exchange_declare(namespace, "topic", durable=True)
            finally:
                connection.close()
            lines = federation_commands(
                namespace, self.links(index), link_queue_max=self.link_queue_max
            )
            for argv in lines:
                done = node.ctl(*argv[1:])
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv)} on {node.nodename}: {done.stderr}")

    def wait_links(self, timeout: float = 60.0) -> None:
        """Until every node reports each of its federation links running."""
        deadline = time.monotonic() + timeout
        for index, node in enumerate(self.nodes):
            want = len(self.links(index))

            def running(node: LocalRabbitNode = node, want: int = want) -> bool:
                listing = node.ctl("federation_status", "--formatter", "json")
                return listing.returncode == 0 and listing.stdout.count('"running"') >= want

            _until(running, deadline, f"the federation links of {node.nodename}")

    def wait_binding(self, node: int, key: str, timeout: float = 30.0) -> None:
        """Until node ``node`` has a binding with routing key ``key`` (one that federation
        propagated from a downstream, for instance)."""

        def bound() -> bool:
            return key in self.nodes[node].ctl("list_bindings", "-q", "routing_key").stdout.split()

        _until(bound, time.monotonic() + timeout, f"a binding {key!r} on node {node}")

    def link_bytes(self) -> dict[tuple[int, int], int]:
        """Bytes each link carried from its upstream to its downstream since the last reset."""
        return {pair: self._counters[index] for index, pair in enumerate(self.proxies)}

    def reset_counts(self) -> None:
        with self._counters.get_lock():
            for index in range(len(self.proxies)):
                self._counters[index] = 0

    def copy_logs(self, dest: Path) -> None:
        for node in self.nodes:
            shutil.copytree(node.base / "log", dest / node.nodename, dirs_exist_ok=True)

    def cleanup(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.cleanup(), self.nodes))
        self._stop.set()
        if self._proxy is not None:
            self._proxy.join(10)


def _until(condition: Callable[[], bool], deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} in time")
        time.sleep(0.25)
