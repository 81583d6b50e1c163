"""Sites behind shaped links for bench/links.py: network namespaces, veth pairs, ``tbf``.

Each site ``i`` (1-based) gets a network namespace of its own, joined to the host by a veth pair
with the private addresses ``10.231.i.1`` (host side) and ``10.231.i.2`` (site side) on a /30.
A rate shapes the link in both directions with the ``tbf`` qdisc: on the host-side veth (what
the site downloads) and on the site-side veth inside the namespace (what it uploads). Nothing
outside the namespaces this module creates is touched; :meth:`Links.cleanup` deletes them (with
a namespace go its veth pair and qdiscs) and kills whatever still runs inside.

The helpers at the top are pure (no I/O) and unit-tested.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import uuid
from dataclasses import dataclass

SUBNET = "10.231"
"""First two octets of every address the bench gives out (10.231.i.0/30 for site i)."""

BURST_SECONDS = 0.01
"""tbf bucket: 10 ms of the rate (at least :data:`MIN_BURST` bytes); a larger bucket lets
short bursts through at line speed, a smaller one cannot keep up with the kernel's timer."""
MIN_BURST = 16 * 1024
QUEUE_SECONDS = 0.05
"""tbf queue: 50 ms of the rate (at least 64 KiB) may wait to go out; more is dropped, as on a
router with modest buffers."""
MIN_QUEUE = 64 * 1024

_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(bit|kbit|mbit|gbit)?\s*$", re.IGNORECASE)
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
UNSHAPED = ("none", "unshaped", "0")


def parse_rate(text: str) -> int | None:
    """Bits per second of a rate as ``tc`` writes it (``100mbit``, ``1gbit``, ``512kbit``,
    a bare number of bit/s); ``none``, ``unshaped`` or ``0``: no shaping (None).

    Raises:
        ValueError: not a rate.
    """
    if text.strip().lower() in UNSHAPED:
        return None
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"not a rate: {text!r} (use e.g. 100mbit, 1gbit, 512kbit or none)")
    bits = float(match[1]) * _UNITS[(match[2] or "bit").lower()]
    if bits < 8000:
        raise ValueError(f"rate {text!r} is below 8kbit")
    return int(bits)


def parse_sites(text: str) -> list[int | None]:
    """The ``--sites`` list: comma-separated rates, one per site (see :func:`parse_rate`)."""
    rates = [parse_rate(part) for part in text.split(",") if part.strip()]
    if not rates:
        raise ValueError("--sites needs at least one rate")
    if len(rates) > 250:
        raise ValueError("at most 250 sites (one 10.231.i.0/30 each)")
    return rates


def format_rate(bits: int | None) -> str:
    """``100 Mbit/s``, ``1 Gbit/s``, ``unshaped``."""
    if bits is None:
        return "unshaped"
    for unit, scale in (("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits} bit/s"


def tbf_args(bits: int) -> list[str]:
    """The ``tc qdisc ... tbf`` arguments that shape to ``bits`` per second."""
    rate_bytes = bits / 8
    burst = max(MIN_BURST, int(rate_bytes * BURST_SECONDS))
    limit = burst + max(MIN_QUEUE, int(rate_bytes * QUEUE_SECONDS))
    return ["tbf", "rate", f"{bits}bit", "burst", str(burst), "limit", str(limit)]


def addresses(index: int) -> tuple[str, str]:
    """(host-side, site-side) address of site ``index`` (1-based)."""
    if not 1 <= index <= 250:
        raise ValueError(f"site index {index} outside 1..250")
    return f"{SUBNET}.{index}.1", f"{SUBNET}.{index}.2"


# -- the namespaces themselves (root only) ---------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Site:
    """One site: its namespace, veth names, addresses and link rate (None: unshaped)."""

    index: int
    netns: str
    host_if: str
    site_if: str
    host_ip: str
    site_ip: str
    rate: int | None

    def exec_prefix(self) -> list[str]:
        """Prefix of a command line run inside this site's namespace."""
        return ["ip", "netns", "exec", self.netns]


class Links:
    """Create the sites' namespaces (``create()``), delete them (``cleanup()``, idempotent)."""

    def __init__(self, rates: list[int | None]) -> None:
        run = uuid.uuid4().hex[:4]
        self.sites = []
        for i, rate in enumerate(rates, start=1):
            host_ip, site_ip = addresses(i)
            # Interface names are at most 15 characters: "ol" + 4 hex + side + up to 3 digits.
            names = f"objstream-links-{run}-{i}", f"ol{run}h{i}", f"ol{run}s{i}"
            self.sites.append(Site(i, *names, host_ip, site_ip, rate))
        self._made: list[Site] = []

    def create(self) -> None:
        taken = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        if f" {SUBNET}." in taken:
            raise RuntimeError(f"addresses {SUBNET}.0.0/16 are in use here already: not touching")
        for site in self.sites:
            _ip("netns", "add", site.netns)
            self._made.append(site)
            _ip("link", "add", site.host_if, "type", "veth", "peer", "name", site.site_if,
                "netns", site.netns)  # fmt: skip
            _ip("addr", "add", f"{site.host_ip}/30", "dev", site.host_if)
            _ip("link", "set", site.host_if, "up")
            inside = ["-n", site.netns]
            _ip(*inside, "addr", "add", f"{site.site_ip}/30", "dev", site.site_if)
            _ip(*inside, "link", "set", site.site_if, "up")
            _ip(*inside, "link", "set", "lo", "up")
            if site.rate is not None:
                tc = ["tc", "qdisc", "replace", "dev"]
                shape = ["root", *tbf_args(site.rate)]
                subprocess.run([*tc, site.host_if, *shape], check=True, capture_output=True)
                subprocess.run([*site.exec_prefix(), *tc, site.site_if, *shape],
                               check=True, capture_output=True)  # fmt: skip

    def cleanup(self) -> None:
        while self._made:
            site = self._made.pop()
            pids = subprocess.run(["ip", "netns", "pids", site.netns], capture_output=True,
                                  text=True).stdout.split()  # fmt: skip
            for pid in pids:  # only what the bench started in its own namespace
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            # The namespace takes its veth end, hence the pair and both qdiscs, with it.
            subprocess.run(["ip", "netns", "del", site.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", site.host_if], capture_output=True)
