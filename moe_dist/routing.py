"""Routing statistics: the per-expert counters each experts module keeps, summed over ranks.

Every rank routes its own tokens through every layer's router, so a layer's global load is
the sum of all ranks' counters. Counters accumulate on the device with no host sync; reading
them is one all-reduce over the whole world, so every rank decides from identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_dist.moe.experts import ExpertParallelExperts
from moe_dist.parallel.reduce import all_reduce


@dataclass
class RoutingStats:
    layers: list[int]
    tokens_LE: torch.Tensor  # top-k selections per layer and expert, all ranks (float64)
    mass_LE: torch.Tensor  # router probability mass of those selections (float64)

    def load_share_LE(self) -> torch.Tensor:
        """Fraction of each layer's routed slots that went to each expert."""
        return self.tokens_LE / self.tokens_LE.sum(-1, keepdim=True).clamp(min=1)

    def mass_share_LE(self) -> torch.Tensor:
        return self.mass_LE / self.mass_LE.sum(-1, keepdim=True).clamp(min=1e-30)

    def to_dict(self) -> dict:
        """JSON (float64 values round-trip exactly through Python's float repr)."""
        return {"layers": self.layers, "tokens_LE": self.tokens_LE.tolist(), "mass_LE": self.mass_LE.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingStats":
        return cls(list(d["layers"]), torch.tensor(d["tokens_LE"], dtype=torch.float64, device="cpu"),
                   torch.tensor(d["mass_LE"], dtype=torch.float64, device="cpu"))

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        assert self.layers == other.layers, (self.layers, other.layers)
        return RoutingStats(self.layers, self.tokens_LE + other.tokens_LE, self.mass_LE + other.mass_LE)


def decayed_importance(previous_LE: torch.Tensor | None, stats: RoutingStats, decay: float) -> torch.Tensor:
    """EPnG's importance: an exponential moving average of each expert's share of its layer's
    router probability mass (shares, so layers and intervals of different length compare)."""
    share_LE = stats.mass_share_LE()
    return share_LE if previous_LE is None else decay * previous_LE + (1 - decay) * share_LE


def experts_modules(model: nn.Module) -> dict[int, ExpertParallelExperts]:
    return {m.layer: m for m in model.modules() if isinstance(m, ExpertParallelExperts)}


def collect_routing_stats(model: nn.Module, reset: bool = True) -> RoutingStats:
    """Collective: all ranks call it. Sums every rank's counters; optionally resets them."""
    mods = experts_modules(model)
    layers = sorted(mods)
    if not layers:  # a dense model (DMEP)
        empty = torch.zeros(0, 0, dtype=torch.float64, device="cpu")
        return RoutingStats([], empty, empty.clone())
    both_2LE = torch.stack([
        torch.stack([mods[layer].routed_tokens_E.to(torch.float64) for layer in layers]),
        torch.stack([_mass(mods[layer]) for layer in layers]),
    ])
    all_reduce(both_2LE)
    if reset:
        for m in mods.values():
            m.routed_tokens_E.zero_()
            if getattr(m, "routed_mass_E", None) is not None:
                m.routed_mass_E.zero_()
    both_2LE = both_2LE.cpu()
    return RoutingStats(layers, both_2LE[0], both_2LE[1])


def _mass(m: ExpertParallelExperts) -> torch.Tensor:
    mass = getattr(m, "routed_mass_E", None)
    return mass if mass is not None else torch.zeros(m.num_experts, dtype=torch.float64, device=m.routed_tokens_E.device)
