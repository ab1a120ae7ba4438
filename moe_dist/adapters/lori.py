"""LoRI masks (HELLoRI's adapters, moe_dist/methods/hellori.py), as the public LoRI code does it:
A frozen at its seeded random initialisation; stage 1 trains B dense; then one global
magnitude threshold over every expert adapter's B keeps the top (1 - sparsity) entries
(sparsity 0.9 by default); stage 2 restarts B at zero with the same frozen A and trains it
under that mask (the forward multiplies B by the mask, so gradients outside it are zero and
B stays zero there), with a 10x learning rate (LoRI's choice for the sparse stage).

The threshold is found by bisection on all-reduced counts (|B| > t summed over ranks, each
EP shard counted once), so no rank ever gathers every adapter and all ranks get the same t.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_dist.parallel.groups import writes_canonical_copy
from moe_dist.parallel.reduce import all_reduce


def global_magnitude_threshold(tensors: list[torch.Tensor], keep_fraction: float, device: torch.device,
                               iterations: int = 60) -> float:
    """Smallest t with (#|x| > t over all ranks' tensors) <= keep_fraction x total. Collective;
    its counts are made on `device` (the rank's: NCCL takes only CUDA tensors), also on a rank
    that holds no tensor."""
    flat = (torch.cat([t.detach().abs().reshape(-1).to(device, torch.float64) for t in tensors]) if tensors
            else torch.zeros(0, dtype=torch.float64, device=device))
    total = torch.tensor([flat.numel()], dtype=torch.float64, device=device)
    hi = flat.max().reshape(1) if flat.numel() else torch.zeros(1, dtype=torch.float64, device=device)
    all_reduce(total)
    all_reduce(hi, op=dist.ReduceOp.MAX)
    target, lo, hi = keep_fraction * total.item(), 0.0, hi.item()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        count = (flat > mid).sum().to(torch.float64).reshape(1)
        all_reduce(count)
        if count.item() > target:
            lo = mid
        else:
            hi = mid
    return hi


def sparsify_lori(params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor], sparsity: float,
                  device: torch.device, values: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    """Set every LoRI mask from its B's magnitude; returns (threshold, kept fraction here).
    Collective (`device`: this rank's). `values`: the B to measure, by key (the fp32 masters;
    default the parameters themselves, which a bf16 engine holds rounded)."""
    values = params if values is None else values
    keys = sorted(masks)
    canonical = [values[k] for k in keys if writes_canonical_copy(params[k])]
    t = global_magnitude_threshold(canonical, 1.0 - sparsity, device)
    kept = total = 0
    with torch.no_grad():
        for k in keys:
            masks[k].copy_((values[k].detach().abs() > t).to(masks[k].dtype))
            kept += int(masks[k].sum().item())
            total += masks[k].numel()
    return t, kept / max(total, 1)
