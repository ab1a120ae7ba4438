"""HELLoRA / HELLoRI: LoRA only on each layer's hot experts (../shared/seeds/).

A profiling phase counts, per layer, how often the router selects each expert on the training
data; then adapters go on the hot set only and the cold experts cost exactly their base
expert. Two selections: `top_k` (the k most selected experts per layer) and `coverage` (the
smallest set whose selections reach a share of the layer's routed slots; DeepSeek's ESFT
uses 0.2). HELLoRI is the same placement with LoRI adapters (frozen random A, sparse B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_dist.methods.base import Method, RunInfo, Start, lora_plan, register
from moe_dist.plan import DEFAULT_EXPERT_TARGETS, AdapterPlan
from moe_dist.validation import ConfigError, one_of, positive


@dataclass
class HelloraSection:
    """method: hellora. Profile routing for `profile_steps` micro-batches of training data
    (forward only, not trained on), then LoRA on each layer's hot experts only."""

    profile_steps: int = 20
    selection: str = "top_k"  # top_k | coverage
    top_k: int = 2  # hot experts per layer (selection: top_k)
    coverage: float = 0.2  # share of routed slots the hot set must cover (selection: coverage)

    def validate(self, path: str) -> None:
        one_of(self, path, "selection", ("top_k", "coverage"))
        positive(self, path, "profile_steps")
        if self.selection == "coverage" and not 0 < self.coverage <= 1:
            raise ConfigError(f"{path}.coverage must be in (0, 1], got {self.coverage}")


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


@register
class HELLoRA(Method):
    name = "hellora"
    sections = {"hellora": HelloraSection}
    lori = False  # HELLoRI: the same placement with LoRI adapters

    @classmethod
    def validate(cls, cfg, num_experts: int | None) -> None:
        super().validate(cfg, num_experts)
        h = cfg.hellora
        if h.selection == "top_k" and not 0 < h.top_k <= (num_experts or h.top_k):
            raise ConfigError(f"hellora.top_k must be in 1..{num_experts} (the expert count), got {h.top_k}")

    def initial_plan(self, run: RunInfo) -> Start:
        """Count routing on `profile_steps` training micro-batches with the frozen base (attention
        adapters start at B = 0, so they change nothing), then adapters on the hot experts."""
        cfg, h = run.cfg, run.cfg.hellora
        base = lora_plan(cfg, run.hf_config)
        stats = run.profile_routing(AdapterPlan(expert_ranks={}, attention_ranks=dict(base.attention_ranks)),
                                    h.profile_steps)
        hot = hot_experts(stats.tokens_LE, stats.layers, h.selection, h.top_k, h.coverage)
        plan = hot_plan(base, hot, cfg.lora.rank, lori=self.lori)
        summary = "; ".join(f"layer {layer}: {experts}" for layer, experts in hot.items())
        return Start(plan, routing=stats, summary=f"hellora plan {plan.hash()}: profiled {h.profile_steps} "
                                                  f"micro-batches per rank; hot experts {summary}")
