"""HELLoRA / HELLoRI: LoRA only on each layer's hot experts (../shared/seeds/).

A profiling phase counts, per layer, how often the router selects each expert on the training
data; then adapters go on the hot set only and the cold experts cost exactly their base
expert. Two selections: `top_k` (the k most selected experts per layer) and `coverage` (the
smallest set whose selections reach a share of the layer's routed slots; DeepSeek's ESFT
uses 0.2). HELLoRI is the same placement with LoRI adapters (frozen random A, sparse B).
"""

from __future__ import annotations

import torch

from moe_dist.plan import DEFAULT_EXPERT_TARGETS, AdapterPlan


def hot_experts(tokens_LE: torch.Tensor, layers: list[int], selection: str, top_k: int = 0,
                coverage: float = 0.0) -> dict[int, list[int]]:
    """Per layer, the hot experts in descending activation order (ties: lower id first)."""
    out: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        counts = tokens_LE[i].to(torch.float64)
        order = sorted(range(counts.numel()), key=lambda e: (-counts[e].item(), e))
        if selection == "top_k":
            chosen = order[:top_k]
        elif selection == "coverage":
            total, acc, chosen = counts.sum().item(), 0.0, []
            for e in order:
                if chosen and acc >= coverage * total:
                    break
                chosen.append(e)
                acc += counts[e].item()
        else:
            raise ValueError(f"hellora.selection must be 'top_k' or 'coverage', got {selection!r}")
        out[layer] = chosen
    return out


def hot_plan(base: AdapterPlan, hot: dict[int, list[int]], rank: int, lori: bool) -> AdapterPlan:
    """`base`'s attention adapters, expert adapters of `rank` on the hot experts only."""
    projections = sorted({p for (_, _, p) in base.expert_ranks}) or sorted(DEFAULT_EXPERT_TARGETS)
    ranks = {(layer, e, p): rank for layer, experts in hot.items() for e in experts for p in projections}
    return AdapterPlan(expert_ranks=ranks, attention_ranks=dict(base.attention_ranks), lori=lori)
