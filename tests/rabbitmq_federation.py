"""Throwaway regions: a central RabbitMQ node and regional nodes joined by exchange federation.

Each node is a :class:`~tests.rabbitmq_node.LocalRabbitNode` of its own (not a cluster: regions
are separate brokers, as they are across a WAN), with the federation plugin that ships with
RabbitMQ. :meth:`LocalRegions.federate` applies what ``objstream admin federation`` prints, on
every node, so the namespace's exchange is federated both ways between the central node and each
region. Optionally every link runs through a counting proxy (:class:`CountingProxy`), so a test
can measure the bytes that cross between brokers. Nothing here touches the shared broker.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import threading
import time
from pathlib import Path

import pika

from objstream.common.federation import (
    DEFAULT_LINK_QUEUE_MAX,
    FederationLink,
    federation_commands,
    link_permissions,
)
from tests.rabbitmq_node import LocalRabbitNode, free_port


class CountingProxy:
    """A TCP pass-through on a free loopback port to ``target_port``, counting the bytes that
    go each way: ``down`` (from the target to the client) and ``up``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.down = 0
        self.up = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(src, dst, down), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
                with self._lock:
                    if down:
                        self.down += n
                    else:
                        self.up += n
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> None:
        with self._lock:
            self.down = self.up = 0

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                conn.close()


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
        self.proxies: dict[tuple[int, int], CountingProxy] = {}
        """(downstream, upstream) node indexes -> the proxy the link runs through."""

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

    def _upstream_port(self, downstream: int, upstream: int) -> int:
        port = self.nodes[upstream].port
        if not self.count_links:
            return port
        if (downstream, upstream) not in self.proxies:
            self.proxies[(downstream, upstream)] = CountingProxy(port)
        return self.proxies[(downstream, upstream)].port

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
            while True:
                listing = node.ctl("federation_status", "--formatter", "json")
                if listing.returncode == 0 and listing.stdout.count('"running"') >= want:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"federation links of {node.nodename}: {listing.stdout}")
                time.sleep(0.5)

    def wait_binding(self, node: int, key: str, timeout: float = 30.0) -> None:
        """Until node ``node`` has a binding with routing key ``key`` (one that federation
        propagated from a downstream, for instance)."""
        deadline = time.monotonic() + timeout
        while True:
            listing = self.nodes[node].ctl("list_bindings", "-q", "routing_key")
            if key in listing.stdout.split():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no binding {key!r} on node {node}")
            time.sleep(0.25)

    def link_bytes(self) -> dict[tuple[int, int], int]:
        """Bytes each link carried from its upstream to its downstream since the last reset."""
        return {key: proxy.down for key, proxy in self.proxies.items()}

    def reset_counts(self) -> None:
        for proxy in self.proxies.values():
            proxy.reset()

    def copy_logs(self, dest: Path) -> None:
        for node in self.nodes:
            shutil.copytree(node.base / "log", dest / node.nodename, dirs_exist_ok=True)

    def cleanup(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.cleanup(), self.nodes))
        for proxy in self.proxies.values():
            proxy.close()
