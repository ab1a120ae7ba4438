"""Grouped-matmul pieces of the expert kernel (the GPU path; torch._grouped_mm also runs on CPU).

Shape legend: M rows sorted by local expert slot, I in-features, O out-features, G experts in
one rank bucket, R adapter rank.
"""

from __future__ import annotations

from typing import Sequence

import torch


def grouped_mm(x_MI: torch.Tensor, w_GIO: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x_MI, w_GIO, offs=offs_G)


def grouped_mm_alignment(dtype: torch.dtype) -> int:
    """torch._grouped_mm wants 16-byte strides: rank multiple of 4 in fp32, 8 in bf16."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


def _slot_rows(slots: Sequence[int], starts: list[int], counts: list[int], device) -> torch.Tensor:
    idx = [torch.arange(starts[s], starts[s] + counts[s]) for s in slots]
    return torch.cat(idx).to(device)


def add_lora_delta_(A_GIR: torch.Tensor, B_GRO: torch.Tensor, slots: Sequence[int], x_MI: torch.Tensor,
                    out_MO: torch.Tensor, starts: list[int], counts: list[int]) -> None:
    """out[rows of `slots`] += x[rows] @ A^T @ B^T (scale is in B), in place, grouped."""
    offs_G = torch.tensor([counts[s] for s in slots], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    offs_G = offs_G.to(x_MI.device)
    if tuple(slots) == tuple(range(slots[0], slots[-1] + 1)):  # contiguous rows: no gather
        lo = starts[slots[0]]
        hi = starts[slots[-1]] + counts[slots[-1]]
        out_MO[lo:hi] += grouped_mm(grouped_mm(x_MI[lo:hi], A_GIR, offs_G), B_GRO, offs_G)
    else:
        rows = _slot_rows(slots, starts, counts, x_MI.device)
        out_MO.index_add_(0, rows, grouped_mm(grouped_mm(x_MI.index_select(0, rows), A_GIR, offs_G), B_GRO, offs_G))
