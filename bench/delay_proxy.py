"""The TCP helpers of bench/links.py: a delaying, counting proxy and a bulk source.

- A **proxy** listener forwards each connection to a target address. With a delay it holds
  every piece of bytes it read for that long before writing it on, in each direction (the
  kernel here has no ``netem``); it holds at most ``bound`` bytes per direction, then stops
  reading, so TCP's flow control still reaches the sender. With a counter it adds the bytes
  its clients sent (client to target) to a shared number: how the bench counts what the
  sender uploaded to the broker; with a ``down_counter``, the bytes the target sent back (how
  the federation tests count what crossed a link between brokers).
- A **source** listener answers a request of 8 bytes (big-endian n) with n bytes: the plain
  TCP bulk transfer whose rate is a link's raw rate. :func:`fetch` is its client, run inside a
  site's namespace (``python bench/delay_proxy.py HOST PORT N``, prints seconds as JSON).

Every listener of a run lives in one asyncio loop in one process (:func:`serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

PIECE = 256 * 1024
_ZEROS = bytes(1024 * 1024)


@dataclass(frozen=True)
class Listener:
    """``target`` None: a bulk source. ``counter``: index into the shared counters."""

    host: str
    port: int
    target: tuple[str, int] | None = None
    delay: float = 0.0
    bound: int = 64 * 1024 * 1024
    counter: int | None = None
    down_counter: int | None = None
    """Index of the shared counter of the bytes the target sent to the client."""


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: Listener,
    counters: Any, upstream: bool,
) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    index = spec.counter if upstream else spec.down_counter

    def count(data: bytes) -> None:
        if index is not None:
            with counters.get_lock():
                counters[index] += len(data)

    if not spec.delay:
        while data := await reader.read(PIECE):
            count(data)
            writer.write(data)
            await writer.drain()
        return
    held: deque[tuple[float, bytes]] = deque()
    size = 0
    arrived = asyncio.Event()
    room = asyncio.Event()
    done = False

    async def take() -> None:
        nonlocal size, done
        while data := await reader.read(PIECE):
            count(data)
            held.append((loop.time() + spec.delay, data))
            size += len(data)
            arrived.set()
            while size > spec.bound:
                room.clear()
                await room.wait()
        done = True
        arrived.set()

    taker = asyncio.create_task(take())
    taker.add_done_callback(_retrieve)
    try:
        while True:
            while not held:
                if done:
                    return
                arrived.clear()
                await arrived.wait()
            due, data = held.popleft()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            size -= len(data)
            room.set()
    finally:
        taker.cancel()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a task's end as seen: a peer resetting its connection is how connections end."""
    if not task.cancelled():
        task.exception()


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    (left,) = struct.unpack(">Q", await reader.readexactly(8))
    while left:
        n = min(left, len(_ZEROS))
        writer.write(_ZEROS[:n])
        await writer.drain()
        left -= n


def _handler(spec: Listener, counters: Any) -> Any:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if spec.target is None:
                await _source(reader, writer)
                return
            up_reader, up_writer = await asyncio.open_connection(*spec.target)
            try:
                pipes = [
                    asyncio.create_task(_pipe(reader, up_writer, spec, counters, True)),
                    asyncio.create_task(_pipe(up_reader, writer, spec, counters, False)),
                ]
                # Either side closing ends the connection for both.
                for task in pipes:
                    task.add_done_callback(_retrieve)
                _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
            finally:
                up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


async def _main(specs: list[Listener], counters: Any, ready: Any, stop: Any) -> None:
    servers = [
        await asyncio.start_server(_handler(spec, counters), spec.host, spec.port) for spec in specs
    ]
    ready.put("ready")
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for server in servers:
        server.close()


def serve(specs: list[Listener], counters: Any, ready: Any, stop: Any) -> None:
    """Run ``specs`` until ``stop`` (a multiprocessing Event) is set; ``ready`` gets a word
    once every listener listens. Ctrl-C is the parent's to handle: it stops this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_main(specs, counters, ready, stop))


def fetch(host: str, port: int, size: int) -> float:
    """Seconds from asking a source for ``size`` bytes to having the last of them."""
    buffer = bytearray(PIECE)
    with socket.create_connection((host, port), timeout=600) as sock:
        start = time.monotonic()
        sock.sendall(struct.pack(">Q", size))
        left = size
        while left:
            n = sock.recv_into(buffer, min(left, PIECE))
            if not n:
                raise ConnectionError(f"source closed with {left} bytes to go")
            left -= n
        return time.monotonic() - start


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        seconds = fetch(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
        print(json.dumps({"seconds": seconds}))
