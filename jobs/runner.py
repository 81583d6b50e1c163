"""Running one side of a job in a process of its own and collecting its result."""

from __future__ import annotations

import multiprocessing as mp
import queue
import re
import resource
import traceback
from collections.abc import Callable
from typing import Any

from objstream.common.errors import ObjstreamError

Result = dict[str, Any]


def peak_rss_mib() -> float:
    """This process's own peak resident set size, in MiB.

    From VmHWM: Linux carries a parent's peak into a child's ``ru_maxrss`` across fork and
    exec, so a side started by a large process (pytest) would report the parent's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            match = re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE)
        if match:
            return round(int(match.group(1)) / 1024, 1)
    except OSError:  # not Linux
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _child(target: Callable[..., Result], kwargs: dict[str, Any], out: Any) -> None:
    try:
        result = target(**kwargs)
    except ObjstreamError as e:
        result = {"ok": False, "error": str(e), "error_type": type(e).__name__}
    except Exception as e:  # reported to the parent, which prints one line
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    result["peak_rss_mib"] = peak_rss_mib()
    out.put(result)


class Side:
    """One side of a job running in a spawned process."""

    def __init__(self, target: Callable[..., Result], **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._process = ctx.Process(target=_child, args=(target, kwargs, self._out), daemon=True)
        self._process.start()
        self._result: Result | None = None

    def poll(self) -> Result | None:
        """The side's result if it ended, without waiting (None while it runs)."""
        if self._result is None:
            try:
                self._result = self._out.get(timeout=0 if self._process.is_alive() else 1)
            except queue.Empty:
                if self._process.is_alive():
                    return None
                code = self._process.exitcode
                self._result = {"ok": False, "error": f"its process ended (exit code {code})"}
            self._process.join(10)
        return self._result

    def stop(self, why: str) -> Result:
        """End the side now (another side failed): its result, or ``why`` if it had none."""
        if self.poll() is None:
            self._process.kill()
            self._process.join(10)
            self._result = {"ok": False, "error": why}
        assert self._result is not None
        return self._result

    def result(self, timeout: float) -> Result:
        try:
            result: Result = self._out.get(timeout=timeout)
        except Exception:
            self._process.kill()
            return {"ok": False, "error": f"no result within {timeout:g} s"}
        finally:
            self._process.join(10)
        return result
