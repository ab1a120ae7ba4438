"""Routing statistics: the per-expert counters each experts module keeps, summed over ranks.

Every rank routes its own tokens through every layer's router, so a layer's global load is
the sum of all ranks' counters. Reading is a collective (one all-reduce for all layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.moe.experts import ExpertParallelExperts


@dataclass
class RoutingStats:
    layers: list[int]
    tokens_LE: torch.Tensor  # routed (token, slot) pairs per layer and expert, all ranks

    def load_share_LE(self) -> torch.Tensor:
        """Fraction of each layer's routed slots that went to each expert."""
        return self.tokens_LE / self.tokens_LE.sum(-1, keepdim=True).clamp(min=1)


def experts_modules(model: nn.Module) -> dict[int, ExpertParallelExperts]:
    return {m.layer: m for m in model.modules() if isinstance(m, ExpertParallelExperts)}


def collect_routing_stats(model: nn.Module, reset: bool = True) -> RoutingStats:
    mods = experts_modules(model)
    layers = sorted(mods)
    tokens_LE = torch.stack([mods[layer].routed_tokens_E for layer in layers]).clone()
    if dist.is_initialized():
        dist.all_reduce(tokens_LE)
    if reset:
        for m in mods.values():
            m.routed_tokens_E.zero_()
    return RoutingStats(layers, tokens_LE.cpu())
