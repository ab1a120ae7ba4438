"""Which expert-parallel rank owns which expert of a layer.

Placement is data, separate from the adapter plan: dispatch accepts any expert -> rank map,
so a rebalance is a new map, not a new code path. Balancing policies (issue: repartitioner)
are pure functions that return one of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from moe_dist.plan import EXPERT_PROJECTIONS


@dataclass(frozen=True)
class ExpertPlacement:
    """`owner[e]` is the expert-parallel rank (0..ep_size-1) that holds expert `e`."""

    owner: tuple[int, ...]
    ep_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner", tuple(int(r) for r in self.owner))
        if self.ep_size < 1:
            raise ValueError(f"ExpertPlacement: ep_size must be >= 1, got {self.ep_size}")
        bad = [(e, r) for e, r in enumerate(self.owner) if not 0 <= r < self.ep_size]
        if bad:
            e, r = bad[0]
            raise ValueError(f"ExpertPlacement: expert {e} is placed on rank {r}, outside 0..{self.ep_size - 1}")
        empty = [r for r in range(self.ep_size) if r not in self.owner]
        if empty:
            raise ValueError(
                f"ExpertPlacement: EP rank(s) {empty} own no expert; every rank needs at least one "
                f"({len(self.owner)} experts over ep_size {self.ep_size})"
            )

    @classmethod
    def contiguous(cls, num_experts: int, ep_size: int) -> "ExpertPlacement":
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
        per = num_experts // ep_size
        return cls(tuple(e // per for e in range(num_experts)), ep_size)

    @classmethod
    def from_lists(cls, experts_of_rank: Sequence[Sequence[int]]) -> "ExpertPlacement":
        num = sum(len(x) for x in experts_of_rank)
        owner = [-1] * num
        for r, experts in enumerate(experts_of_rank):
            for e in experts:
                if not 0 <= e < num or owner[e] != -1:
                    raise ValueError(f"ExpertPlacement.from_lists: expert {e} is out of range or placed twice")
                owner[e] = r
        return cls(tuple(owner), len(experts_of_rank))

    @property
    def num_experts(self) -> int:
        return len(self.owner)

    def experts_of(self, ep_rank: int) -> list[int]:
        return [e for e, r in enumerate(self.owner) if r == ep_rank]

    def to_dict(self) -> dict:
        return {"owner": list(self.owner), "ep_size": self.ep_size}



def slot_order(placement: ExpertPlacement, ranks: Mapping[tuple[int, str], int]) -> list[list[int]]:
    """Per EP rank, its experts in local slot order: experts with equal adapter ranks (per
    projection, largest first) sit together, so each rank bucket is a contiguous row range in
    the common case (no gather). Derived from the placement and the plan, which every rank
    holds, so every rank knows every rank's order."""
    signature = lambda e: (tuple(-ranks.get((e, p), 0) for p in EXPERT_PROJECTIONS), e)  # noqa: E731
    return [sorted(placement.experts_of(r), key=signature) for r in range(placement.ep_size)]
