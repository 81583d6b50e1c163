"""rounds: the federated-learning loop. The server broadcasts the global model (a dict of
bfloat16 tensors, saved as ``.safetensors``) to every client in one send; each client changes a
fraction of the tensors and sends its update back; the server aggregates (the mean of the
clients' versions, in float32, cast back to bfloat16) and goes on with the next round.

Every side stores what it receives in a directory of its own (the clients the server's model,
the server the clients' updates), so that each round's transfers in both directions can be
deltas against the round before: the tensors no client changed stay bit-identical, and only the
others move again.

Both sides derive every model and update from ``--seed``: each verifies what it received
against what it computed itself, bit for bit, and the job compares the SHA-256 each receiver
reports with the sender's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from objstream.common import safetensors_format
from objstream.common.errors import ObjstreamError, SendFailed, TransferFailed
from objstream.common.settings import Settings
from objstream.consumer import Received, Receiver
from objstream.jobs.file_streaming import _kind
from objstream.jobs.runner import Result
from objstream.producer import ContainerStreamer

BF16 = np.dtype(ml_dtypes.bfloat16)
ROW = 256
"""Elements in a row of every tensor (each tensor is ROW wide)."""
ITEM = 2
"""Bytes of a bfloat16 value."""
NOISE = 0.01
"""How much a client's training moves the values of a tensor it changes."""
PICKS = ("same", "rotate")
Model = dict[str, Any]
"""Tensor name -> a bfloat16 array (or a memory map of one in a stored ``.safetensors``)."""


class Mismatch(ObjstreamError):
    """What a side received is not what the seed gives."""


@dataclass(frozen=True)
class Plan:
    """The job's model and how it changes, as both sides derive them from the seed."""

    size: int
    tensors: int
    change: float
    seed: int
    clients: int
    rounds: int
    pick: str = "same"
    full: bool = False
    """Every transfer whole, even to a site that holds most of it (no delta)."""

    @property
    def rows(self) -> int:
        """Rows of each tensor (``size`` bytes in all, give or take a row per tensor)."""
        return max(1, self.size // (self.tensors * ROW * ITEM))

    @property
    def model_bytes(self) -> int:
        return self.tensors * self.rows * ROW * ITEM

    @property
    def names(self) -> list[str]:
        return [f"layer-{t:03d}.weight" for t in range(self.tensors)]

    def changed(self, round_no: int) -> list[int]:
        """The tensors every client changes in a round: ``change`` of them, at least one. The
        same ones every round (``same``: the layers being fine-tuned), or others each round
        (``rotate``)."""
        count = min(self.tensors, max(1, round(self.change * self.tensors)))
        which = [self.seed, 0] if self.pick == "same" else [self.seed, 0, round_no]
        order = np.random.default_rng(which).permutation(self.tensors)
        return sorted(int(t) for t in order[:count])


def global_name(round_no: int) -> str:
    return f"global-r{round_no}.safetensors"


def update_name(round_no: int, site: str) -> str:
    return f"update-r{round_no}-{site}.safetensors"


def initial_model(plan: Plan) -> Model:
    shape = (plan.rows, ROW)
    return {
        name: np.random.default_rng([plan.seed, t])
        .standard_normal(shape, dtype=np.float32)
        .astype(BF16)
        for t, name in enumerate(plan.names)
    }


def trained(tensor: Any, plan: Plan, round_no: int, client: int, t: int) -> np.ndarray:
    """Tensor ``t`` as client number ``client`` (1...N) changes it in round ``round_no``."""
    rng = np.random.default_rng([plan.seed, round_no, client, t])
    values = np.asarray(tensor).astype(np.float32)
    values += rng.standard_normal(values.shape, dtype=np.float32) * np.float32(NOISE)
    return values.astype(BF16)


def client_update(model: Mapping[str, Any], plan: Plan, round_no: int, client: int) -> Model:
    """The client's version of ``model`` after the round (the other tensors as they came)."""
    update = dict(model)
    for t in plan.changed(round_no):
        name = plan.names[t]
        update[name] = trained(model[name], plan, round_no, client, t)
    return update


def mean(versions: list[Any]) -> np.ndarray:
    """The clients' versions of a tensor averaged in float32, cast back to bfloat16."""
    total = np.zeros(np.shape(versions[0]), dtype=np.float32)
    for version in versions:
        total += np.asarray(version).astype(np.float32)
    total /= np.float32(len(versions))
    return total.astype(BF16)


def aggregate(model: Model, versions: list[Mapping[str, Any]]) -> Model:
    """The next global model: each tensor the mean of the clients' versions. A tensor every
    client left as it was keeps its array (its mean is the same bits: N times a bfloat16 is
    exact in float32, and so is dividing it by N again)."""
    return {
        name: tensor
        if all(same(v[name], tensor) for v in versions)
        else mean([v[name] for v in versions])
        for name, tensor in model.items()
    }


def expected_next(model: Model, plan: Plan, round_no: int) -> Model:
    """The global model after round ``round_no`` as the seed gives it (no transfer involved)."""
    following = dict(model)
    for t in plan.changed(round_no):
        name = plan.names[t]
        clients = range(1, plan.clients + 1)
        following[name] = mean([trained(model[name], plan, round_no, c, t) for c in clients])
    return following


def same(a: Any, b: Any) -> bool:
    """Bit for bit the same tensor (bfloat16 compared as its 16-bit patterns)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != BF16 or b.dtype != BF16 or a.shape != b.shape:
        return False
    return bool(np.array_equal(a.view(np.uint16), b.view(np.uint16)))


def check(got: Mapping[str, Any], want: Model, what: str) -> None:
    """Raise :class:`Mismatch` unless ``got`` holds exactly ``want``'s tensors."""
    if list(got) != list(want):
        raise Mismatch(f"{what} has tensors {sorted(got)[:3]}..., not the model's")
    for name, tensor in want.items():
        if not same(got[name], tensor):
            raise Mismatch(f"{what}: tensor {name} is not what the seed gives")


def wait_for(
    receiver: Receiver, streamer: ContainerStreamer, timeout: float, what: str
) -> Received:
    """The next object the receiver verified; the streamer's connection kept alive meanwhile.

    Raises:
        TransferFailed: it failed on its way.
        _Late: nothing came within ``timeout`` (``error_type`` TimedOut in the result).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = receiver.receive(timeout=0.5)
        if item is not None:
            return item
        streamer.serve(0)
    raise _Late(f"{what} did not come in {timeout:g} s")


class _Late(ObjstreamError):
    """Nothing came in time (reported as ``TimedOut``: the job exits 4)."""


def _failed(error: Exception, **extra: Any) -> Result:
    kind = type(error).__name__
    if isinstance(error, SendFailed):
        kind = _kind(error)
    elif isinstance(error, _Late):
        kind = "TimedOut"
    return {"ok": False, "error": str(error), "error_type": kind, **extra}


def mapped(item: Received, what: str) -> Model:
    """The tensors of a model received into a ``.safetensors``, mapped from that file (read
    only; unmapped once the last of them is dropped).

    They are plain ``ndarray`` views of one memory map: the container codec counts only an
    exact ``ndarray`` as an array, and a receiver's own ``as_memmap`` values stay mapped while
    it is open.
    """
    if item.path is None:
        raise Mismatch(f"{what} was not stored in a file")
    header, start = safetensors_format.read_header(item.path)
    header.pop("__metadata__", None)
    data = np.memmap(item.path, dtype=np.uint8, mode="r")
    tensors: Model = {}
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") != "BF16":
            raise Mismatch(f"{what}: tensor {name} is not bfloat16")
        begin, end = info["data_offsets"]
        raw = np.asarray(data[start + begin : start + end])
        tensors[name] = raw.view(BF16).reshape(info["shape"])
    return tensors


def _receiver(site: str, dest: str, settings: Settings) -> Receiver:
    Path(dest).mkdir(parents=True, exist_ok=True)
    return Receiver(site, dest, settings, store_containers=True, connection_thread=True)


def server_side(
    settings: Settings,
    *,
    site: str,
    sites: list[str],
    plan: Plan,
    dest: str,
    timeout: float,
    reports: Any,
) -> Result:
    """Broadcast each round's model, take the clients' updates, check and aggregate them."""
    model = initial_model(plan)
    index = {s: i for i, s in enumerate(sites, 1)}
    done = 0
    try:
        with (
            _receiver(site, dest, settings) as receiver,
            ContainerStreamer(site, settings) as streamer,
        ):
            held: list[Path] = []
            for r in range(1, plan.rounds + 1):
                started = time.monotonic()
                results = streamer.stream_container(
                    sites, model, name=global_name(r), timeout=timeout, full=plan.full
                )
                down = time.monotonic() - started
                got: dict[str, Received] = {}
                while len(got) < len(sites):
                    item = wait_for(receiver, streamer, timeout, f"round {r}'s updates")
                    sender = item.sender
                    if sender not in index or sender in got or item.name != update_name(r, sender):
                        raise Mismatch(f"round {r}: unexpected {item.name!r} from {sender!r}")
                    want = client_update(model, plan, r, index[sender])
                    check(mapped(item, sender), want, f"round {r}: {sender}'s update")
                    got[sender] = item
                following = aggregate(model, [mapped(got[s], s) for s in sites])
                check(following, expected_next(model, plan, r), f"round {r}: the aggregate")
                for path in held:  # the round before's updates: this round's serve the next
                    path.unlink(missing_ok=True)
                held = [stored for s in sites if (stored := got[s].path) is not None]
                reports.put(
                    {
                        "side": site,
                        "round": r,
                        "seconds": round(time.monotonic() - started, 3),
                        "down_seconds": round(down, 3),
                        "model_bytes": results[0].size,
                        "down_published": max(x.bytes_published for x in results),
                        "down_reused": {x.site: x.bytes_reused for x in results},
                        "down_sha256": {x.site: x.sha256 for x in results},
                        "up_received": {s: i.size - i.reused_bytes for s, i in got.items()},
                        "up_reused": {s: i.reused_bytes for s, i in got.items()},
                        "up_sha256": {s: i.sha256 for s, i in got.items()},
                    }
                )
                model, got = following, {}
                done = r
    except (ObjstreamError, TransferFailed) as e:
        return _failed(e, role="producer", rounds=done)
    return {"ok": True, "role": "producer", "rounds": done, "bytes": plan.model_bytes}


def client_side(
    settings: Settings,
    *,
    site: str,
    client: int,
    server: str,
    plan: Plan,
    dest: str,
    timeout: float,
    reports: Any,
) -> Result:
    """Take each round's model, check it, change some tensors and send the update back."""
    expected = initial_model(plan)
    done = 0
    try:
        with (
            _receiver(site, dest, settings) as receiver,
            ContainerStreamer(site, settings) as streamer,
        ):
            previous: Path | None = None
            for r in range(1, plan.rounds + 1):
                item = wait_for(receiver, streamer, timeout, f"round {r}'s model")
                started = time.monotonic()
                if item.name != global_name(r) or item.sender != server:
                    raise Mismatch(f"round {r}: unexpected {item.name!r} from {item.sender!r}")
                received = mapped(item, f"round {r}'s model")
                check(received, expected, f"round {r}: the model")
                if previous is not None:  # this round's model serves the next round
                    previous.unlink(missing_ok=True)
                previous = item.path
                update = client_update(received, plan, r, client)
                [result] = streamer.stream_container(
                    server, update, name=update_name(r, site), timeout=timeout, full=plan.full
                )
                reports.put(
                    {
                        "side": site,
                        "round": r,
                        "seconds": round(time.monotonic() - started, 3),
                        "model_bytes": item.size,
                        "got_reused": item.reused_bytes,
                        "got_sha256": item.sha256,
                        "up_published": result.bytes_published,
                        "up_reused": result.bytes_reused,
                        "up_sha256": result.sha256,
                    }
                )
                del received, update  # unmaps the model (the next round's replaces it)
                expected = expected_next(expected, plan, r)
                done = r
    except (ObjstreamError, TransferFailed) as e:
        return _failed(e, role="consumer", rounds=done)
    return {"ok": True, "role": "consumer", "rounds": done, "bytes": plan.model_bytes}
