"""Scalars summed (or maxed) over the whole job (a collective: every rank calls it, in the same order)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_sum(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def global_max(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
