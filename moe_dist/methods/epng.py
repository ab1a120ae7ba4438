"""EPnG: prune the LoRA of low-importance experts, grow the rank of high-importance ones,
total rank budget fixed (../shared/seeds/).

Choices the summary leaves open, and why:
- Importance = exponential moving average (decay `epng.decay`, default 0.9) of each expert's
  share of its layer's router probability mass over the last interval. Shares (not raw mass)
  make layers comparable, so the decision is global across layers: the summary reports that
  EPnG "concentrates capacity on deeper, more task-relevant layers", which a per-layer budget
  could not do.
- Each update prunes `prune_ratio` (default 0.25) of the currently adapted experts, lowest
  importance first, and gives their freed rank, in units of `rank_unit`, round-robin to the
  top `grow_ratio` (default 0.25) of the survivors, most important first; no expert grows
  past `max_rank`. An expert's projections share one rank. Budget: the sum of ranks over all
  adapted (layer, expert, projection) is exactly unchanged.
- Ties break by (layer, expert) so every rank computes the same plan from the same numbers.
"""

from __future__ import annotations

import math

import torch

from moe_dist.plan import AdapterPlan


def expert_rank(plan: AdapterPlan, layer: int, expert: int) -> int:
    ranks = {r for (l, e, _), r in plan.expert_ranks.items() if (l, e) == (layer, expert)}
    if len(ranks) > 1:
        raise ValueError(f"epng: layer {layer} expert {expert} has different ranks per projection {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def prune_and_grow(importance_LE: torch.Tensor, layers: list[int], plan: AdapterPlan, prune_ratio: float,
                   grow_ratio: float, rank_unit: int, max_rank: int) -> AdapterPlan:
    """The next plan. Pure: same inputs, same plan, on every rank."""
    adapted = sorted({(l, e) for (l, e, _) in plan.expert_ranks})
    row = {layer: i for i, layer in enumerate(layers)}
    imp = {(l, e): float(importance_LE[row[l], e]) for l, e in adapted}
    ranks = {(l, e): expert_rank(plan, l, e) for l, e in adapted}
    n_prune = math.floor(prune_ratio * len(adapted))
    if n_prune == 0 or n_prune >= len(adapted):
        return plan
    by_importance = sorted(adapted, key=lambda k: (imp[k], k))
    pruned, survivors = by_importance[:n_prune], by_importance[n_prune:][::-1]  # survivors: most important first
    freed = sum(ranks[k] for k in pruned)
    if freed % rank_unit:
        raise ValueError(f"epng: freed rank {freed} is not a multiple of epng.rank_unit {rank_unit}")
    growers = survivors[: max(1, round(grow_ratio * len(adapted)))]
    units = freed // rank_unit
    new_ranks = {k: ranks[k] for k in survivors}
    while units:
        placed = False
        for k in growers:
            if units and new_ranks[k] + rank_unit <= max_rank:
                new_ranks[k] += rank_unit
                units -= 1
                placed = True
        if not placed:  # every grower at max_rank: widen to the next survivors
            rest = [k for k in survivors if k not in growers]
            if not rest:
                raise ValueError(f"epng: no expert can take {units * rank_unit} more rank under max_rank {max_rank}")
            growers = growers + rest[:1]
    projections = sorted({p for (_, _, p) in plan.expert_ranks})
    expert_ranks = {(l, e, p): r for (l, e), r in new_ranks.items() for p in projections}
    return AdapterPlan(expert_ranks=expert_ranks, attention_ranks=dict(plan.attention_ranks), lori=plan.lori)
