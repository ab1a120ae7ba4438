"""Fixed-order sums of rows into their destinations, the reduction every expert-parallel
combine ends in (moe_dist/moe/dispatch.py): each destination's rows added in one fixed order on
every device, so runs and resumes reproduce, and no dense (destinations x top-k) grid of
mostly zeros is built for it (at Qwen3-30B-A3B's recipe shape such grids held ~1.5 GiB per
layer: bench/combine_memory.py). No host sync.
"""

from __future__ import annotations

import torch


def _fixed_order_add(g_ND: torch.Tensor) -> bool:
    """CPU index_add_ is sequential (deterministic) and one pass; elsewhere it is atomic (GPU)
    or would round every add (bf16), so those take a segment sum."""
    return g_ND.device.type == "cpu" and g_ND.dtype in (torch.float32, torch.float64)


def sum_rows_into(y_ND: torch.Tensor, index_N: torch.Tensor, pos_N: torch.Tensor, T: int) -> torch.Tensor:
    """out[t] = sum of the rows y[n] with index[n] = t, added in the order of `pos` (distinct
    keys, ascending within a t): fixed order, no atomics, and no (T x K) grid of mostly zeros.

    CPU fp32 takes one sequential index_add_ (in row order n: fixed as well). Elsewhere the
    rows are sorted by `pos` and summed per segment (torch.segment_reduce: one sequential pass
    per (segment, column) on CUDA, `unsafe` so no `.item()` checks), accumulated in fp32, then
    cast back."""
    if _fixed_order_add(y_ND):
        return y_ND.new_zeros(T, y_ND.shape[1]).index_add_(0, index_N, y_ND)
    lengths_T = torch.zeros(T, dtype=torch.long, device=y_ND.device).index_add_(
        0, index_N, torch.ones_like(index_N))  # integer adds: exact in any order
    acc = torch.promote_types(y_ND.dtype, torch.float32)
    sorted_ND = y_ND.index_select(0, torch.argsort(pos_N)).to(acc)
    return torch.segment_reduce(sorted_ND, "sum", lengths=lengths_T, axis=0, unsafe=True, initial=0).to(y_ND.dtype)
