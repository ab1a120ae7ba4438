"""When and where experts move between expert-parallel ranks, from the routing of the run.

The decisions are pure functions (moe_dist/parallel/balance.py); this object holds the one
piece of state they need (routing since the last placement decision) and turns them into
placements for a `Change`: at build time for a plan chosen from profiled counts, together
with a method's new plan (in the same rebuild), and on its own schedule (`repartition.every`,
`repartition.force_step`).
"""

from __future__ import annotations

from torch import nn

from moe_dist.config import RunConfig
from moe_dist.models.arch import expert_sizes
from moe_dist.parallel.balance import balanced_placements, imbalance, layer_costs
from moe_dist.parallel.move import MoveReport, current_placements, plan_placements
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan
from moe_dist.routing import RoutingStats, experts_modules

Placements = dict[int, ExpertPlacement]


class Rebalancer:
    def __init__(self, cfg: RunConfig, ep_size: int):
        self.cfg, self.ep_size = cfg.repartition, ep_size
        self.total_steps = cfg.train.steps
        self.enabled = self.cfg.enabled and ep_size > 1
        self.window: RoutingStats | None = None

    def state_dict(self) -> dict:
        return {"window": None if self.window is None else self.window.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.window = RoutingStats.from_dict(state["window"]) if state.get("window") else None

    def observe(self, stats: RoutingStats) -> None:
        self.window = stats if self.window is None else self.window + stats

    def initial(self, plan: AdapterPlan, stats: RoutingStats, hf_config) -> tuple[Placements, MoveReport] | None:
        """Placements to build the model with (nothing moves: experts load where they go)."""
        if not self.enabled:
            return None
        _, D, F, _ = expert_sizes(hf_config)
        costs = layer_costs(plan, stats.tokens_LE, stats.layers, D, F)
        placements = balanced_placements(costs, self.ep_size)
        contiguous = {layer: ExpertPlacement.contiguous(p.num_experts, self.ep_size) for layer, p in placements.items()}
        return placements, MoveReport(imbalance_before=imbalance(costs, contiguous),
                                      imbalance_after=imbalance(costs, placements))

    def for_plan(self, model: nn.Module, plan: AdapterPlan, stats: RoutingStats
                 ) -> tuple[Placements | None, float, float]:
        """Balanced placements for a new plan under the counts it was decided from (None: the
        current ones are already it), with the expected imbalance now and after; a placement
        decision, so the window restarts."""
        if not self.enabled:
            return None, 1.0, 1.0
        mods = experts_modules(model)
        placements, now, after = plan_placements(mods, plan, stats.tokens_LE, stats.layers)
        self.window = None
        return (None if placements == current_placements(mods) else placements), now, after

    def due(self, step: int, model: nn.Module) -> bool:
        if self.ep_size == 1 or not experts_modules(model) or step >= self.total_steps:
            return False
        return step == self.cfg.force_step or bool(self.cfg.every and step % self.cfg.every == 0)

    def decide(self, step: int, model: nn.Module, plan: AdapterPlan) -> tuple[Placements | None, float, float, str]:
        """From the window since the last decision: a move if the expected imbalance passes the
        threshold (or this is the forced step), else None."""
        force = step == self.cfg.force_step
        window, self.window = self.window, None
        mods = experts_modules(model)
        placements, now, after = plan_placements(mods, plan, window.tokens_LE, window.layers,
                                                 min_gain=0.0 if force else 0.01)
        if placements == current_placements(mods) or not (force or now > self.cfg.threshold):
            return None, now, after, ""
        return placements, now, after, f"step {step}{' (forced)' if force else ''}"


def expert_imbalance(model: nn.Module, plan: AdapterPlan, routing: RoutingStats | None, ep_size: int,
                     contiguous: bool = False) -> float | None:
    """Expected max/mean per-rank cost of `routing` under the current placement (or, with
    `contiguous`, under the contiguous one, for comparison)."""
    mods = experts_modules(model)
    if routing is None or not mods or ep_size == 1:
        return None
    any_mod = next(iter(mods.values()))
    placements = current_placements(mods)
    if contiguous:
        placements = {l: ExpertPlacement.contiguous(p.num_experts, ep_size) for l, p in placements.items()}
    return imbalance(layer_costs(plan, routing.tokens_LE, routing.layers, any_mod.hidden_size,
                                 any_mod.intermediate_size), placements)
