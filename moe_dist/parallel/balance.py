"""Which expert goes to which expert-parallel rank: the balancing policy, pure functions.

Shape legend: L MoE layers, E experts per layer, P expert-parallel ranks.

Layers run one after another, each ending in an all-to-all that waits for the slowest rank,
so a step costs about the sum over layers of the *maximum* per-rank cost. The policy
therefore balances every layer on its own, and the figure it reports is

    imbalance = sum_l max_r cost(l, r) / sum_l mean_r cost(l, r)

(1.0 = perfect; the step-time inflation caused by uneven work). Every rank keeps E/P experts
of every layer, so base-weight memory stays even whatever the routing does.

Cost of an expert = expected tokens x (base FLOPs + adapter FLOPs) per token, training
(forward + backward): the frozen base does forward and input-gradient matmuls (2 x 2 x 3DF),
an adapter of rank R on an I -> O projection also its weight gradient (3 x 2R(I+O)).
"""

from __future__ import annotations

from typing import Mapping

import torch

from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan, expert_proj_layout


def expert_costs_E(plan: AdapterPlan, layer: int, tokens_E: torch.Tensor, hidden: int, intermediate: int
                   ) -> torch.Tensor:
    """Expected training FLOPs of each expert of `layer` for the measured token counts."""
    D, F = hidden, intermediate
    base = 12.0 * D * F
    adapter_E = torch.zeros(len(tokens_E), dtype=torch.float64, device="cpu")
    for (e, proj), r in plan.expert_ranks_of_layer(layer).items():
        in_f, out_f, _, _ = expert_proj_layout(proj, D, F)
        adapter_E[e] += 6.0 * r * (in_f + out_f)
    return tokens_E.to(torch.float64) * (base + adapter_E)


def rank_loads_P(cost_E: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    owner = torch.tensor(placement.owner, device="cpu")
    return torch.zeros(placement.ep_size, dtype=torch.float64, device="cpu").index_add_(0, owner, cost_E.to(torch.float64))


def imbalance(costs: Mapping[int, torch.Tensor], placements: Mapping[int, ExpertPlacement]) -> float:
    """sum over layers of the max per-rank cost / sum of the mean (1.0 when there is no cost)."""
    total_max = total_mean = 0.0
    for layer, cost_E in costs.items():
        loads_P = rank_loads_P(cost_E, placements[layer])
        total_max += loads_P.max().item()
        total_mean += loads_P.mean().item()
    return total_max / total_mean if total_mean > 0 else 1.0


def _refine_by_swaps(cost: list[float], bins: list[list[int]], max_rounds: int = 10000) -> list[list[int]]:
    """Swap one expert of the most loaded bin with one of another bin while that lowers the
    pair's maximum (best swap first); stop when no swap helps. Bin sizes never change."""
    cost_E = torch.tensor(cost, dtype=torch.float64, device="cpu")
    bin_of = torch.empty(len(cost), dtype=torch.long, device="cpu")
    for i, b in enumerate(bins):
        bin_of[b] = i
    for _ in range(max_rounds):
        loads = torch.zeros(len(bins), dtype=torch.float64, device="cpu").index_add_(0, bin_of, cost_E)
        hi = int(torch.argmax(loads))
        a_A = (bin_of == hi).nonzero().squeeze(1)
        b_B = (bin_of != hi).nonzero().squeeze(1)
        delta_AB = cost_E[a_A, None] - cost_E[None, b_B]  # what the swap moves off the hot bin
        pair_max_AB = torch.maximum(loads[hi] - delta_AB, loads[bin_of[b_B]][None, :] + delta_AB)
        pair_max_AB[delta_AB <= 0] = float("inf")
        best = int(torch.argmin(pair_max_AB))
        if not pair_max_AB.view(-1)[best] < loads[hi] * (1 - 1e-12):
            break
        a, b = int(a_A[best // len(b_B)]), int(b_B[best % len(b_B)])
        bin_of[a], bin_of[b] = bin_of[b].clone(), bin_of[a].clone()
    return [sorted((bin_of == i).nonzero().squeeze(1).tolist()) for i in range(len(bins))]


def _largest_first(cost: list[float], ep_size: int) -> list[list[int]]:
    """Greedy: heaviest expert first, into the least loaded bin that still has room."""
    per = len(cost) // ep_size
    bins: list[list[int]] = [[] for _ in range(ep_size)]
    loads = [0.0] * ep_size
    for e in sorted(range(len(cost)), key=lambda e: (-cost[e], e)):
        r = min((r for r in range(ep_size) if len(bins[r]) < per), key=lambda r: (loads[r], r))
        bins[r].append(e)
        loads[r] += cost[e]
    return bins


def _label_like(bins: list[list[int]], current: ExpertPlacement) -> ExpertPlacement:
    """Give each bin the rank that already holds most of its experts (greedy assignment), so
    balance is unchanged and as few experts as possible move."""
    overlap = sorted(((sum(current.owner[e] == r for e in b), -i, -r, i, r) for i, b in enumerate(bins)
                      for r in range(current.ep_size)), reverse=True)
    rank_of, taken = {}, set()
    for *_, i, r in overlap:
        if i not in rank_of and r not in taken:
            rank_of[i] = r
            taken.add(r)
    owner = [0] * len(current.owner)
    for i, b in enumerate(bins):
        for e in b:
            owner[e] = rank_of[i]
    return ExpertPlacement(tuple(owner), current.ep_size)


def balanced_placement(cost_E: torch.Tensor, ep_size: int, current: ExpertPlacement | None = None,
                       min_gain: float = 0.01) -> ExpertPlacement:
    """An expert -> rank map with E/ep_size experts per rank and the maximum per-rank cost
    as low as greedy largest-first plus pairwise swaps reach.

    Two candidates: the current placement refined by swaps (few moves) and a fresh
    largest-first packing refined by swaps; the fresh one wins only if its maximum is lower
    by more than `min_gain` (relative), then its ranks are labelled to keep most experts
    where they are. The current placement is returned unchanged unless a candidate lowers
    the maximum by more than `min_gain`: moving costs time, noise in the counts does not
    justify it."""
    E = len(cost_E)
    if E % ep_size:
        raise ValueError(f"balanced_placement: {E} experts do not split evenly over ep_size {ep_size}")
    if current is None:
        current = ExpertPlacement.contiguous(E, ep_size)
    if current.ep_size != ep_size or current.num_experts != E:
        raise ValueError(f"balanced_placement: current placement is for {current.num_experts} experts over "
                         f"{current.ep_size} ranks, asked for {E} over {ep_size}")
    if ep_size == 1:
        return current
    if any(len(current.experts_of(r)) != E // ep_size for r in range(ep_size)):
        return current  # a hand-made uneven map: moving would change a rank's memory; left alone
    cost = [float(c) for c in cost_E]
    current_max = max(rank_loads_P(cost_E, current).tolist())
    refined = _refine_by_swaps(cost, [current.experts_of(r) for r in range(ep_size)])
    fresh = _refine_by_swaps(cost, _largest_first(cost, ep_size))
    loads_max = lambda bins: max(sum(cost[e] for e in b) for b in bins)  # noqa: E731
    best = fresh if loads_max(fresh) < loads_max(refined) * (1 - min_gain) else refined
    if loads_max(best) >= current_max * (1 - min_gain):
        return current
    return _label_like(best, current)


def balanced_placements(costs: Mapping[int, torch.Tensor], ep_size: int,
                        current: Mapping[int, ExpertPlacement] | None = None,
                        min_gain: float = 0.01) -> dict[int, ExpertPlacement]:
    """Every MoE layer's placement for its expert costs (`layer_costs`). Pure: every rank
    computes the same maps from the same all-reduced counts."""
    current = current or {}
    return {layer: balanced_placement(cost_E, ep_size, current.get(layer), min_gain) for layer, cost_E in costs.items()}


def layer_costs(plan: AdapterPlan, tokens_LE: torch.Tensor, layers: list[int], hidden: int, intermediate: int
                ) -> dict[int, torch.Tensor]:
    return {layer: expert_costs_E(plan, layer, tokens_LE[i], hidden, intermediate) for i, layer in enumerate(layers)}


def moved_experts(old: Mapping[int, ExpertPlacement], new: Mapping[int, ExpertPlacement]) -> dict[int, list[int]]:
    """Per layer, the experts whose owner changes."""
    return {layer: [e for e, (a, b) in enumerate(zip(old[layer].owner, new[layer].owner)) if a != b]
            for layer in new}
