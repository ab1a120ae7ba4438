"""The expert all-to-all over shared memory, for CPU ranks of one host (gloo groups).

Why: on gloo every collective costs a fixed ~0.3-0.5 ms on a 2-core box (measured: a 1-float
all-reduce 0.33-0.43 ms, where a TCP round trip between the same processes is 19 us), and
expert parallelism runs five per MoE layer per step (counts, rows out and back, and their
two mirrors in backward). Over shared memory a rank writes its message into its own outbox,
publishes a sequence number, waits for its peers' numbers and copies its chunks out of
their outboxes: a few microseconds of synchronisation plus the copies.

Used by `all_to_all_single` below for CPU tensors on a gloo group whose ranks can all map
one another's files in /dev/shm (checked at first use, so two containers without a shared IPC
namespace fall back to gloo); NCCL groups and everything else go through torch.distributed.
MOE_DIST_HOST_EXCHANGE=0 turns it off.

Protocol of call n (the same sequence on every rank, as for any collective):
1. wait until every peer acknowledged call n-1 (it finished reading this rank's outbox);
2. write the message (per-destination offsets and sizes, then the rows) into the outbox,
   growing it into a new file generation when too small;
3. publish seq = n; wait for every peer's seq >= n;
4. copy this rank's chunk out of each peer's outbox (mapping a new generation when the peer
   grew), checking its size against the expected split; acknowledge n.
A peer whose process is gone is named at once; one that does not arrive within the group's
timeout is named as timed out (launch/train.py then names the unresponsive ranks). Files are
unlinked as soon as every rank has mapped them, so nothing is left in /dev/shm.
"""

from __future__ import annotations

import atexit
import math
import mmap
import os
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.kernels.expert_loop import native_loop
from moe_dist.procfs import running

SHM_DIR = Path("/dev/shm")
SLOT = 16  # int64s of control per rank: 128 bytes, seq and ack on their own cache lines
SEQ, GEN, ACK = 0, 1, 8
FIRST_CAPACITY = 1 << 20
WAIT_SLICE_S = 0.2  # how often a wait checks its peers' processes


def _map(path: Path, size: int | None = None) -> tuple[mmap.mmap, torch.Tensor]:
    """Map a file in shared memory (creating it with `size` bytes, reserved up front so a
    full /dev/shm is an error here, not a SIGBUS later); returns the mapping and a uint8 view."""
    if size is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise OSError(exc.errno, f"moe_dist host exchange: no room for {size} bytes in {path.parent} "
                                     f"({exc.strerror}); give the container more (docker --shm-size) or set "
                                     "MOE_DIST_HOST_EXCHANGE=0") from exc
    else:
        fd = os.open(path, os.O_RDWR)
    try:
        buf = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return buf, torch.frombuffer(buf, dtype=torch.uint8)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class HostExchange:
    """all_to_all_single for the ranks of `group`, all on this host, over /dev/shm."""

    def __init__(self, group: dist.ProcessGroup, base: Path, timeout_s: float):
        self.group, self.base, self.timeout_s = group, base, timeout_s
        self.ranks = dist.get_process_group_ranks(group)
        self.P, self.me = len(self.ranks), dist.get_rank(group)
        self.native = native_loop()
        self.calls = 0
        self.header = 2 * self.P * 8  # per destination: byte offset, byte count
        self.maps: dict[Path, mmap.mmap] = {}  # keep every mapping alive while its tensor is used
        self.pids: list[int | None] = []  # the group's ranks' (one host): a wait notices a peer that is gone
        self.peer_gen = [0] * self.P
        self.peer_buf: list[torch.Tensor | None] = [None] * self.P
        self.unlink_after: list[tuple[int, Path]] = []  # (call, path): unlink once every peer acked it
        self.ctl: torch.Tensor | None = None
        self.ctl_i64: torch.Tensor | None = None
        self.gen, self.out_buf = 0, None

    def _outbox(self, rank: int, gen: int) -> Path:
        return self.base.with_name(f"{self.base.name}-r{rank}-g{gen}")

    def _open(self, path: Path, size: int | None = None) -> torch.Tensor:
        buf, t = _map(path, size)
        self.maps[path] = buf
        return t

    # ---- setup: collective ------------------------------------------------------------------
    def setup(self) -> bool:
        """Create and map the files; True when every rank mapped every file (else use gloo)."""
        ctl, own = self.base.with_name(self.base.name + "-ctl"), self._outbox(self.me, 0)

        def create() -> None:  # rank 0: the control block; every rank: its outbox
            if self.me == 0:
                self.ctl = self._open(ctl, self.P * SLOT * 8)
            self.out_buf = self._open(own, FIRST_CAPACITY)

        def attach() -> None:
            if self.me != 0:
                self.ctl = self._open(ctl)
            for r in range(self.P):
                if r != self.me:
                    self.peer_buf[r] = self._open(self._outbox(r, 0))

        pids = [None] * self.P
        dist.all_gather_object(pids, os.getpid(), group=self.group)
        # a peer in another PID namespace (a container sharing only /dev/shm) is not checked
        self.pids = [p if r == self.me or running(p) else None for r, p in enumerate(pids)]
        ok = self._agree(create) and self._agree(attach)
        if self.me == 0:  # every rank has mapped every file, or given up: the names can go
            ctl.unlink(missing_ok=True)
        own.unlink(missing_ok=True)
        if ok:
            self.ctl_i64 = self.ctl.view(torch.int64)
        return ok

    def _agree(self, step) -> bool:
        """Run `step` on every rank; True only if it worked on all of them."""
        try:
            step()
            flag = 1
        except OSError:
            flag = 0
        flags = [None] * self.P
        dist.all_gather_object(flags, flag, group=self.group)
        return all(flags)

    # ---- the exchange -----------------------------------------------------------------------
    def _wait(self, field: int, value: int, what: str) -> None:
        """Every peer's flag `field` >= value. In slices of at most WAIT_SLICE_S: between them a
        peer whose process is gone ends the wait at once (gloo's socket would have said so),
        and pending signals (a SIGTERM's stop request) get handled."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            late = self.native.flags_wait(self.ctl_i64, field, SLOT, self.P, self.me, value,
                                          max(0.0, min(WAIT_SLICE_S, left)))
            if late < 0:
                return
            if self.pids[late] is not None and not running(self.pids[late]):
                raise RuntimeError(f"moe_dist host exchange ({what}): the process of EP rank {late} (global rank "
                                   f"{self.ranks[late]}, pid {self.pids[late]}) is gone")
            if left <= 0:
                raise RuntimeError(f"moe_dist host exchange timed out after {self.timeout_s:.0f} s ({what}): EP rank "
                                   f"{late} (global rank {self.ranks[late]}) did not arrive")

    def _grow(self, need: int) -> None:
        self.gen += 1
        path = self._outbox(self.me, self.gen)
        self.out_buf = self._open(path, max(need, 2 * self.out_buf.numel()))
        self.ctl_i64[self.me * SLOT + GEN] = self.gen  # read by peers after this call's seq
        self.unlink_after.append((self.calls + 1, path))

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, output_splits: list[int],
                   input_splits: list[int]) -> None:
        """dist.all_to_all_single(out, inp, output_splits, input_splits) over shared memory
        (rows of `inp`/`out` along dim 0; both contiguous)."""
        n = self.calls + 1
        row = math.prod(inp.shape[1:]) * inp.element_size()
        self._wait(ACK, n - 1, "peers reading the previous message")
        while self.unlink_after and self.unlink_after[0][0] < n:
            self.unlink_after.pop(0)[1].unlink(missing_ok=True)
        src = _bytes(inp)
        need = self.header + src.numel()
        if need > self.out_buf.numel():
            self._grow(need)
        offsets = torch.tensor([0, *input_splits], dtype=torch.int64).cumsum(0) * row
        head = torch.stack([offsets[:-1] + self.header, offsets[1:] - offsets[:-1]], 1)
        self.out_buf[:self.header].view(torch.int64).copy_(head.reshape(-1))
        self.out_buf[self.header:need].copy_(src)
        self.native.flag_store(self.ctl_i64, self.me * SLOT + SEQ, n)
        self._wait(SEQ, n, "peers writing their messages")
        dst = _bytes(out)
        at = 0
        for r, rows in enumerate(output_splits):
            nbytes = rows * row
            if r == self.me:
                start = int(offsets[r])
                dst[at:at + nbytes].copy_(src[start:start + nbytes])
            else:
                gen = int(self.ctl_i64[r * SLOT + GEN])
                if gen != self.peer_gen[r]:
                    self.peer_buf[r], self.peer_gen[r] = self._open(self._outbox(r, gen)), gen
                off, size = self.peer_buf[r][:self.header].view(torch.int64).view(self.P, 2)[self.me].tolist()
                if size != nbytes:
                    raise RuntimeError(f"moe_dist host exchange (call {n}): EP rank {r} sent {size} bytes, "
                                       f"this rank expected {nbytes} ({rows} rows)")
                dst[at:at + nbytes].copy_(self.peer_buf[r][off:off + nbytes])
            at += nbytes
        self.native.flag_store(self.ctl_i64, self.me * SLOT + ACK, n)
        self.calls = n

    def close(self) -> None:
        for _, path in self.unlink_after:
            path.unlink(missing_ok=True)
        self.unlink_after = []


_exchanges: dict[object, HostExchange | None] = {}


def _group_timeout(group) -> float:
    try:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return 1800.0


def host_exchange(group: dist.ProcessGroup) -> HostExchange | None:
    """The group's shared-memory exchange, or None (use torch.distributed). Collective on its
    first call for a group: every rank of the group must reach it together."""
    if group in _exchanges:
        return _exchanges[group]
    exchange = None
    usable = (os.environ.get("MOE_DIST_HOST_EXCHANGE", "1") != "0" and dist.get_backend(group) == "gloo"
              and SHM_DIR.is_dir() and native_loop() is not None)
    flags = [None] * dist.get_world_size(group)
    dist.all_gather_object(flags, usable, group=group)
    if all(flags):
        name = [f"moe_dist-{uuid.uuid4().hex[:12]}" if dist.get_rank(group) == 0 else None]
        dist.broadcast_object_list(name, src=dist.get_process_group_ranks(group)[0], group=group)
        candidate = HostExchange(group, SHM_DIR / name[0], _group_timeout(group))
        if candidate.setup():
            exchange = candidate
            atexit.register(candidate.close)
    _exchanges[group] = exchange
    return exchange


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, output_splits: list[int], input_splits: list[int],
                      group: dist.ProcessGroup) -> None:
    """torch.distributed.all_to_all_single, over shared memory where the group allows it."""
    exchange = host_exchange(group) if inp.device.type == "cpu" else None
    if exchange is None:
        dist.all_to_all_single(out, inp, output_splits, input_splits, group=group)
    else:
        exchange.all_to_all(out, inp.contiguous(), output_splits, input_splits)
