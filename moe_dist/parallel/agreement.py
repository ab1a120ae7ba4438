"""Every rank computes each structure decision itself (from identical all-reduced statistics);
before anyone acts, all ranks check they reached the same plan. A mismatch is an error on
every rank at once, naming the first layer/expert that differs: never a silent divergence,
never a hang with half the ranks in a rebuild."""

from __future__ import annotations

import torch.distributed as dist

from moe_dist.plan import AdapterPlan


class PlanMismatchError(RuntimeError):
    pass


def agree_on_plan(plan: AdapterPlan, what: str = "plan") -> None:
    """Collective. Returns when all ranks hold `plan`'s hash; raises on every rank otherwise."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    hashes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, plan.hash())
    if len(set(hashes)) == 1:
        return
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    ref, other = [plan.to_json() if dist.get_rank() == 0 else None], [plan.to_json() if dist.get_rank() == bad[0] else None]
    dist.broadcast_object_list(ref, src=0)
    dist.broadcast_object_list(other, src=bad[0])
    first = AdapterPlan.from_json(ref[0]).diff(AdapterPlan.from_json(other[0]))
    raise PlanMismatchError(f"{what}: ranks {bad} reached a different plan than rank 0 (hash {hashes[bad[0]]} vs "
                            f"{hashes[0]}); first difference, rank 0 -> rank {bad[0]}: {first[0] if first else '?'}")
