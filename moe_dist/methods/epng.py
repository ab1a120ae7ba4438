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
from dataclasses import dataclass

import torch
from torch import nn

from moe_dist.methods.base import Change, Method, register
from moe_dist.plan import AdapterPlan
from moe_dist.routing import RoutingStats, decayed_importance
from moe_dist.validation import ConfigError, fraction, positive


@dataclass
class EpngSection:
    """method: epng (the choices and their reasons are in this file's docstring)."""

    warmup_steps: int = 20  # first prune/grow after this many steps
    interval: int = 20  # then every `interval` steps
    stop_step: int = 0  # no updates from this step on (0 = until the end)
    prune_ratio: float = 0.25  # of the adapted experts, per update
    grow_ratio: float = 0.25  # of the adapted experts receive the freed rank
    decay: float = 0.9  # importance EMA
    rank_unit: int = 4  # rank granularity of growth
    max_rank: int = 64

    def validate(self, path: str) -> None:
        fraction(self, path, "prune_ratio", "grow_ratio", "decay")
        positive(self, path, "interval", "rank_unit")


def expert_rank(plan: AdapterPlan, layer: int, expert: int) -> int:
    ranks = {r for (l, e, _), r in plan.expert_ranks.items() if (l, e) == (layer, expert)}
    if len(ranks) > 1:
        raise ValueError(f"epng: layer {layer} expert {expert} has different ranks per projection {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def plan_update(importance_LE: torch.Tensor, layers: list[int], plan: AdapterPlan, prune_ratio: float,
                grow_ratio: float, rank_unit: int, max_rank: int) -> tuple[AdapterPlan, str]:
    """(the next plan, a note when the policy had to cap the update). Pure: same inputs, same
    plan, on every rank.

    The survivors can hold only so much more rank under `max_rank`: when the freed rank of
    `prune_ratio` of the experts would not fit, fewer (the least important) are pruned, so a
    schedule with many updates converges instead of failing mid-run."""
    adapted = sorted({(l, e) for (l, e, _) in plan.expert_ranks})
    row = {layer: i for i, layer in enumerate(layers)}
    imp = {(l, e): float(importance_LE[row[l], e]) for l, e in adapted}
    ranks = {(l, e): expert_rank(plan, l, e) for l, e in adapted}
    wanted = n_prune = math.floor(prune_ratio * len(adapted))
    if n_prune == 0 or n_prune >= len(adapted):
        return plan, ""
    by_importance = sorted(adapted, key=lambda k: (imp[k], k))
    room = lambda n: sum((max_rank - ranks[k]) // rank_unit for k in by_importance[n:])  # noqa: E731
    while n_prune and sum(ranks[k] for k in by_importance[:n_prune]) // rank_unit > room(n_prune):
        n_prune -= 1
    note = ""
    if n_prune < wanted:
        note = (f"capped: pruned {n_prune} of the {wanted} wanted (epng.prune_ratio {prune_ratio}), the survivors "
                f"cannot hold more rank under epng.max_rank {max_rank}")
        if n_prune == 0:
            return plan, note
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
        if not placed:  # every grower at max_rank: widen to the next survivors (room() says one has space)
            growers = growers + [k for k in survivors if k not in growers][:1]
    projections = sorted({p for (_, _, p) in plan.expert_ranks})
    expert_ranks = {(l, e, p): r for (l, e), r in new_ranks.items() for p in projections}
    return AdapterPlan(expert_ranks=expert_ranks, attention_ranks=dict(plan.attention_ranks), lori=plan.lori), note


def prune_and_grow(importance_LE: torch.Tensor, layers: list[int], plan: AdapterPlan, prune_ratio: float,
                   grow_ratio: float, rank_unit: int, max_rank: int) -> AdapterPlan:
    """The next plan (plan_update without its note)."""
    return plan_update(importance_LE, layers, plan, prune_ratio, grow_ratio, rank_unit, max_rank)[0]


@register
class EPnG(Method):
    name = "epng"
    sections = {"epng": EpngSection}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.importance_LE: torch.Tensor | None = None  # decayed importance, over the updates so far
        self.window: RoutingStats | None = None  # routing since the last update

    @classmethod
    def validate(cls, cfg, num_experts: int | None) -> None:
        super().validate(cfg, num_experts)
        g = cfg.epng
        if cfg.lora.rank % g.rank_unit:
            raise ConfigError(f"lora.rank ({cfg.lora.rank}) must be a multiple of epng.rank_unit ({g.rank_unit})")
        if g.max_rank < cfg.lora.rank:
            raise ConfigError(f"epng.max_rank ({g.max_rank}) is below lora.rank ({cfg.lora.rank})")

    def observe(self, stats: RoutingStats) -> None:
        self.window = stats if self.window is None else self.window + stats

    def decides_at(self, step: int) -> bool:
        e = self.cfg.epng
        return (step >= e.warmup_steps and (step - e.warmup_steps) % e.interval == 0 and step < self.cfg.train.steps
                and not (e.stop_step and step >= e.stop_step))

    def decide(self, step: int, model: nn.Module, plan: AdapterPlan) -> Change:
        """Importance from the window since the last update -> the prune/grow plan; the experts
        are rebalanced for it on the same window (the trainer does that in the same rebuild)."""
        e = self.cfg.epng
        window, self.window = self.window, None
        self.importance_LE = decayed_importance(self.importance_LE, window, e.decay)
        new, note = plan_update(self.importance_LE, window.layers, plan, e.prune_ratio, e.grow_ratio, e.rank_unit,
                                e.max_rank)
        if new == plan:
            return Change(plan=new, summary=f"epng step {step}: {note}" if note else "")
        pruned = sorted({(l, x) for (l, x, _) in plan.expert_ranks} - {(l, x) for (l, x, _) in new.expert_ranks})
        grown = sorted({(l, x) for (l, x, p), r in new.expert_ranks.items() if r > plan.rank(l, x, p)})
        return Change(plan=new, routing=window,
                      summary=f"epng step {step}: pruned {len(pruned)} expert adapters {pruned}, grew {grown}; "
                              f"rank budget {sum(plan.expert_ranks.values())} -> {sum(new.expert_ranks.values())}"
                              + (f"; {note}" if note else ""))

    def state_dict(self) -> dict:
        return {"importance_LE": None if self.importance_LE is None else self.importance_LE.tolist(),
                "window": None if self.window is None else self.window.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        imp, w = state.get("importance_LE"), state.get("window")
        self.importance_LE = None if imp is None else torch.tensor(imp, dtype=torch.float64, device="cpu")
        self.window = None if w is None else RoutingStats.from_dict(w)
