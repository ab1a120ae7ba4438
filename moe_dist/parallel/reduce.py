"""Reductions over the whole job (collectives: every rank calls them, in the same order).

`all_reduce` is torch.distributed's, over shared memory where the ranks are CPU processes of
one host (moe_dist/parallel/host_exchange.py): the per-step checks then cost microseconds,
not gloo's ~0.4 ms each.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_dist.parallel import host_exchange
from moe_dist.parallel.device import check_collective_device


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> None:
    """dist.all_reduce(t, op, group) in place; nothing without a process group. `t` must be on
    the device the group's backend takes (checked: a clear error, not NCCL's)."""
    if not dist.is_initialized():
        return
    check_collective_device(t, group, "all_reduce")
    if not host_exchange.all_reduce(t, op, group):
        dist.all_reduce(t, op=op, group=group)


def global_sum(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    all_reduce(t)
    return t.item()


def global_max(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
