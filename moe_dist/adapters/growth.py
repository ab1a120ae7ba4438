"""Carrying adapter values across a plan change by logical key, growth included.

Same shape: carried as is. Grown rank (R -> R'): A gets new rows orthogonal to its row space,
B new zero columns, so the output is unchanged and the new directions are really new (not
copies). Pruned adapters have no key in the new model: their values and moments are gone.
"""

from __future__ import annotations

import math

import torch

from moe_dist.adapters.lora import LoRAConfig, key_seed
from moe_dist.optim import OPTIM_KEYS


def orthogonal_rows(A_old_RI: torch.Tensor, extra: int, key: str, seed: int) -> torch.Tensor:
    """`extra` new A rows orthogonal to the row space of A_old (and to each other), with the
    row norm of the seeded LoRA initialisation, so growth adds directions, not copies."""
    R, I = A_old_RI.shape
    if R + extra > I:
        raise ValueError(f"{key}: cannot grow rank {R} by {extra} beyond the input size {I}")
    gen = torch.Generator().manual_seed(key_seed(seed, f"{key}@grow{R}"))
    G_IX = torch.randn(I, extra, generator=gen, dtype=torch.float64, device="cpu")
    Q_IR, _ = torch.linalg.qr(A_old_RI.double().T)
    G_IX = G_IX - Q_IR @ (Q_IR.T @ G_IX)
    Q_IX, _ = torch.linalg.qr(G_IX)
    row_norm = math.sqrt(I / 3) / math.sqrt(I)  # E|row| of U(-1/sqrt(I), 1/sqrt(I)) rows
    return (Q_IX.T * row_norm).to(A_old_RI.dtype)


def carry_over(old_values: dict, old_optim: dict, new_params: dict[str, torch.nn.Parameter], lora: LoRAConfig
               ) -> tuple[dict, dict]:
    """Values and moments for the new parameter set, by logical key.

    Same shape: carried as is. Grown rank (R -> R'): A gets orthogonal new rows, B new zero
    columns, and B's old columns are rescaled by scale(R)/scale(R') (alpha/R changes with the
    rank) so B'A' x scale(R') == B A x scale(R); B's moments are rescaled alike. New or grown
    parts start from zero moments (they inherit the group's Adam step; noted in the issue).
    New keys keep their fresh initialisation."""
    values, optim = {}, {}
    for key, p in new_params.items():
        if key not in old_values:
            continue
        old = old_values[key]
        if old.shape == p.shape:
            values[key] = old
            optim.update({k: v for k, v in old_optim.items() if k.rsplit("/", 1)[0] == key})
            continue
        if key.endswith("lora_A") and old.shape[1] == p.shape[1] and old.shape[0] < p.shape[0]:
            extra = p.shape[0] - old.shape[0]
            values[key] = torch.cat([old, orthogonal_rows(old, extra, key, lora.seed)])
            for name in OPTIM_KEYS:
                if f"{key}/{name}" in old_optim:
                    o = old_optim[f"{key}/{name}"]
                    optim[f"{key}/{name}"] = torch.cat([o, o.new_zeros(extra, o.shape[1])])
        elif key.endswith("lora_B") and old.shape[0] == p.shape[0] and old.shape[1] < p.shape[1]:
            extra = p.shape[1] - old.shape[1]
            c = lora.scale(old.shape[1]) / lora.scale(p.shape[1])
            values[key] = torch.cat([old * c, old.new_zeros(old.shape[0], extra)], dim=1)
            for name, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
                if f"{key}/{name}" in old_optim:
                    o = old_optim[f"{key}/{name}"] * c**power
                    optim[f"{key}/{name}"] = torch.cat([o, o.new_zeros(o.shape[0], extra)], dim=1)
        else:
            raise ValueError(f"{key}: cannot carry shape {tuple(old.shape)} into {tuple(p.shape)} (only rank growth)")
    return values, optim
