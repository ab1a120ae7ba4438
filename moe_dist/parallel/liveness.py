"""Bounded waits and naming the rank that stopped responding.

- Every process group gets `dist_timeout_s`: torch gives groups created without an explicit
  timeout its 30-minute default, not the world group's (DeepSpeed's expert and
  expert-data-parallel groups are created that way), so a stopped rank hung the others far
  past the bound. `bound_collective_waits` sets the default before any group exists and
  applies it to groups that already do.
- A heartbeat file per rank (a daemon thread touches `<dir>/rank-R` every few seconds, with
  host and pid): when a collective times out, the ranks whose heartbeat went stale are the
  unresponsive ones. Files, not the TCP store, because the store lives in rank 0's process:
  if rank 0 is the one stopped, the store is stopped with it. Multi-node runs keep
  output_dir on a shared filesystem anyway (checkpoints need it).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch.distributed as dist

from moe_dist.procfs import cmdline, running


def bound_collective_waits(seconds: float) -> None:
    """Every process group, existing or future, times out after `seconds`."""
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout  # read at each new_group() without a timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    if dist.is_initialized():
        for group in list(c10d._world.pg_map):
            c10d._set_pg_timeout(timeout, group)


def group_timeouts() -> dict[str, float]:
    """Timeout (s) of every process group that exists, by a readable name (for tests/logs)."""
    import torch
    import torch.distributed.distributed_c10d as c10d

    out = {}
    for group, name in c10d._world.pg_names.items():
        try:
            backend = group._get_backend(torch.device("cpu"))
        except RuntimeError:  # an NCCL-only group
            backend = group._get_backend(torch.device("cuda"))
        out[name] = backend.options._timeout.total_seconds()
    return out


class Heartbeat:
    """A daemon thread that touches this rank's heartbeat file every `interval` seconds."""

    def __init__(self, directory: str | Path, rank: int, interval: float = 2.0):
        self.dir, self.rank, self.interval = Path(directory), rank, interval
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / f"rank-{rank}"
        self.file.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="moe_dist-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.file)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()


def unresponsive_ranks(directory: str | Path, world: int, stale_after: float) -> list[tuple[int, float, dict]]:
    """(rank, seconds since its last beat, {host, pid}) of every rank whose heartbeat is older
    than `stale_after` (or missing: seconds = inf)."""
    now, out = time.time(), []
    for rank in range(world):
        f = Path(directory) / f"rank-{rank}"
        try:
            age = now - f.stat().st_mtime
            who = json.loads(f.read_text() or "{}")
        except (OSError, ValueError):
            age, who = float("inf"), {}
        if age > stale_after:
            out.append((rank, age, who))
    return out


def _is_same_program(pid: int) -> bool:
    """Runs the same script as this process (not a reused pid of something else)."""
    theirs, ours = cmdline(pid), cmdline(os.getpid())
    return len(theirs) > 1 and len(ours) > 1 and theirs[1] == ours[1]


def exited_ranks(directory: str | Path, world: int) -> list[tuple[int, dict]]:
    """Ranks on this host whose process is gone (killed by a signal, the OOM killer, ...)."""
    out = []
    for rank in range(world):
        try:
            who = json.loads((Path(directory) / f"rank-{rank}").read_text() or "{}")
        except (OSError, ValueError):
            continue
        if who.get("host") == socket.gethostname() and who.get("pid") and not running(int(who["pid"])):
            out.append((rank, who))
    return out



def describe_unresponsive(directory: str | Path, world: int, stale_after: float, fence: bool = True) -> str:
    """A line naming the stale ranks; with `fence`, stale ranks on this host get SIGKILL (the
    job is ending: a stopped process would otherwise hold its launcher up)."""
    stale = unresponsive_ranks(directory, world, stale_after)
    if not stale:
        return "no rank's heartbeat is stale (a peer may have exited or be stuck in a collective)"
    parts = []
    for rank, age, who in stale:
        what = f"rank {rank} ({who.get('host', '?')} pid {who.get('pid', '?')}, no heartbeat for {age:.0f} s)"
        if fence and who.get("host") == socket.gethostname() and who.get("pid") not in (None, os.getpid()) \
                and _is_same_program(int(who["pid"])):  # not a reused pid of a finished run
            try:
                os.kill(int(who["pid"]), signal.SIGKILL)
                what += ", killed"
            except OSError:
                pass
        parts.append(what)
    return "unresponsive: " + "; ".join(parts)
