"""The expert all-to-all and the gradient reductions over shared memory, for CPU ranks of one
host (gloo groups).

Why: on gloo every collective costs a fixed ~0.3-0.5 ms on a 2-core box (measured: a 1-float
all-reduce 0.33-0.43 ms, where a TCP round trip between the same processes is 19 us), and
expert parallelism runs five per MoE layer per step (counts, rows out and back, and their
two mirrors in backward). Over shared memory a rank writes its message into its own outbox,
publishes a sequence number, waits for its peers' numbers and copies its chunks out of
their outboxes: a few microseconds of synchronisation plus the copies.

Used by `all_to_all_single` (the dispatcher), `all_reduce`, `reduce` and
`all_gather_into_tensor` (DeepSpeed's ZeRO through moe_dist/parallel/ds_comm.py, the trainer's
per-step checks through moe_dist/parallel/reduce.py) for CPU tensors on a gloo group whose ranks can all map
one another's files in /dev/shm (checked at first use, so two containers without a shared IPC
namespace fall back to gloo); NCCL groups and everything else go through torch.distributed.
MOE_DIST_HOST_EXCHANGE=0 turns it off.

Reductions fold the ranks' messages in rank order on every rank, so every rank holds the same
bits; they and the gathers go in pieces of at most CHUNK_BYTES, so a gradient bucket of any size
passes through a bounded outbox.

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
from moe_dist.parallel.device import check_collective_device
from moe_dist.procfs import running

SHM_DIR = Path("/dev/shm")
SLOT = 16  # int64s of control per rank: 128 bytes, seq and ack on their own cache lines
SEQ, GEN, ACK = 0, 1, 8
FIRST_CAPACITY = 1 << 20
WAIT_SLICE_S = 0.2  # how often a wait checks its peers' processes
CHUNK_BYTES = 4 << 20  # the largest piece of a reduction or gather through an outbox
# how a reduction folds the next rank's message into the running result, in place
FOLDS = {
    dist.ReduceOp.SUM: lambda acc, m: acc.add_(m),
    dist.ReduceOp.PRODUCT: lambda acc, m: acc.mul_(m),
    dist.ReduceOp.MAX: lambda acc, m: torch.maximum(acc, m, out=acc),
    dist.ReduceOp.MIN: lambda acc, m: torch.minimum(acc, m, out=acc),
}


def fold_of(op):
    """FOLDS' entry for a reduce op (ReduceOp instances compare equal to, but do not hash as,
    the enum values), or None: AVG and the bitwise ops go through torch.distributed."""
    return next((fold for key, fold in FOLDS.items() if op == key), None)


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
                raise RuntimeError(f"moe_dist host exchange ({what}): the process of rank {late} of the group "
                                   f"(global rank {self.ranks[late]}, pid {self.pids[late]}) is gone")
            if left <= 0:
                raise RuntimeError(f"moe_dist host exchange timed out after {self.timeout_s:.0f} s ({what}): rank "
                                   f"{late} of the group (global rank {self.ranks[late]}) did not arrive")

    def _grow(self, need: int) -> None:
        self.gen += 1
        path = self._outbox(self.me, self.gen)
        self.out_buf = self._open(path, max(need, 2 * self.out_buf.numel()))
        self.ctl_i64[self.me * SLOT + GEN] = self.gen  # read by peers after this call's seq
        self.unlink_after.append((self.calls + 1, path))

    def _publish(self, src: torch.Tensor, ranges: list[tuple[int, int]]) -> int:
        """Steps 1-3 of a call: `src` (bytes) into the outbox after a header giving, per
        destination, the (start, size) in src of the bytes meant for it; publish; wait for
        every peer's message. Returns the call's number."""
        n = self.calls + 1
        self._wait(ACK, n - 1, "peers reading the previous message")
        while self.unlink_after and self.unlink_after[0][0] < n:
            self.unlink_after.pop(0)[1].unlink(missing_ok=True)
        need = self.header + src.numel()
        if need > self.out_buf.numel():
            self._grow(need)
        head = torch.tensor(ranges, dtype=torch.int64, device="cpu")
        head[:, 0] += self.header
        self.out_buf[:self.header].view(torch.int64).copy_(head.reshape(-1))
        self.out_buf[self.header:need].copy_(src)
        self.native.flag_store(self.ctl_i64, self.me * SLOT + SEQ, n)
        self._wait(SEQ, n, "peers writing their messages")
        return n

    def _message(self, r: int, nbytes: int, n: int) -> torch.Tensor:
        """The bytes rank r's call n addressed to this rank (its outbox, mapping a new generation
        when the peer grew), checked against the size this rank expects."""
        box = self.out_buf
        if r != self.me:
            gen = int(self.ctl_i64[r * SLOT + GEN])
            if gen != self.peer_gen[r]:
                self.peer_buf[r], self.peer_gen[r] = self._open(self._outbox(r, gen)), gen
            box = self.peer_buf[r]
        off, size = box[:self.header].view(torch.int64).view(self.P, 2)[self.me].tolist()
        if size != nbytes:
            raise RuntimeError(f"moe_dist host exchange (call {n}): rank {r} of the group (global rank "
                               f"{self.ranks[r]}) sent {size} bytes, this rank expected {nbytes}")
        return box[off:off + nbytes]

    def _done(self, n: int) -> None:
        """Step 4's end: this rank read every peer's message of call n."""
        self.native.flag_store(self.ctl_i64, self.me * SLOT + ACK, n)
        self.calls = n

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, output_splits: list[int],
                   input_splits: list[int]) -> None:
        """dist.all_to_all_single(out, inp, output_splits, input_splits) over shared memory
        (rows of `inp`/`out` along dim 0; both contiguous)."""
        row = math.prod(inp.shape[1:]) * inp.element_size()
        ranges, start = [], 0
        for rows in input_splits:
            ranges.append((start, rows * row))
            start += rows * row
        n = self._publish(_bytes(inp), ranges)
        dst = _bytes(out)
        at = 0
        for r, rows in enumerate(output_splits):
            nbytes = rows * row
            dst[at:at + nbytes].copy_(self._message(r, nbytes, n))
            at += nbytes
        self._done(n)

    # ---- collectives of same-shaped tensors (DeepSpeed's gradient reductions) -----------------
    def _chunks(self, flat: torch.Tensor):
        """Pieces of at most CHUNK_BYTES: a gradient bucket of any size passes through a bounded
        outbox (a container's /dev/shm is often 64 MiB)."""
        step = max(1, CHUNK_BYTES // flat.element_size())
        return [(i, flat[i:i + step]) for i in range(0, flat.numel(), step)]

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp) -> None:
        """dist.all_reduce(t, op) for a contiguous t. Every rank folds the messages in rank
        order, so all ranks hold the same bits (as gloo's ring gives)."""
        self.reduce(t, None, op)

    def reduce(self, t: torch.Tensor, dst: int | None, op: dist.ReduceOp) -> None:
        """dist.reduce(t, dst, op): the group's rank `dst` (every rank where None) gets the
        fold; the others keep t."""
        fold = fold_of(op)
        for _, piece in self._chunks(t.view(-1)):
            nbytes = piece.numel() * piece.element_size()
            n = self._publish(_bytes(piece), self._same(nbytes))
            if dst is None or self.me == dst:
                msgs = [self._message(r, nbytes, n).view(t.dtype) for r in range(self.P)]
                piece.copy_(msgs[0])
                for m in msgs[1:]:
                    fold(piece, m)
            self._done(n)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """dist.all_gather_into_tensor(out, inp): out holds every rank's inp, in rank order."""
        out_R = out.view(self.P, -1)
        for start, piece in self._chunks(inp.view(-1)):
            nbytes = piece.numel() * piece.element_size()
            n = self._publish(_bytes(piece), self._same(nbytes))
            for r in range(self.P):
                _bytes(out_R[r, start:start + piece.numel()]).copy_(self._message(r, nbytes, n))
            self._done(n)

    def _same(self, nbytes: int) -> list[tuple[int, int]]:
        """Header ranges for a message every destination reads whole."""
        return [(0, nbytes)] * self.P

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
    check_collective_device(inp, group, "all_to_all_single")
    exchange = host_exchange(group) if inp.device.type == "cpu" else None
    if exchange is None:
        dist.all_to_all_single(out, inp, output_splits, input_splits, group=group)
    else:
        exchange.all_to_all(out, inp.contiguous(), output_splits, input_splits)


def _exchange_for(t: torch.Tensor, group) -> HostExchange | None:
    """The exchange of a same-shaped collective on `t` (None: use torch.distributed). The same
    answer on every rank, as the collective's arguments agree."""
    if t.device.type != "cpu" or t.dtype == torch.bool or t.is_complex():
        return None
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return None
    return host_exchange(group)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> bool:
    """dist.all_reduce(t, op, group) over shared memory where the group allows it; False when
    it does not (the caller uses torch.distributed)."""
    return reduce(t, None, op, group)


def reduce(t: torch.Tensor, dst: int | None, op=dist.ReduceOp.SUM, group=None) -> bool:
    """dist.reduce(t, dst (a global rank; None: every rank, an all-reduce), op, group) over
    shared memory, or False."""
    exchange = _exchange_for(t, group) if fold_of(op) is not None else None
    if exchange is None:
        return False
    flat = t if t.is_contiguous() else t.contiguous()
    exchange.reduce(flat, None if dst is None else exchange.ranks.index(dst), op)
    if flat is not t:
        t.copy_(flat)
    return True


def all_gather_into_tensor(out: torch.Tensor, inp: torch.Tensor, group=None) -> bool:
    """dist.all_gather_into_tensor(out, inp, group) over shared memory, or False."""
    exchange = _exchange_for(inp, group) if out.is_contiguous() else None
    if exchange is None:
        return False
    exchange.all_gather(out, inp.contiguous())
    return True
