"""The one place that touches DeepSpeed's (private) expert-parallel group registry.

DeepSpeed keys its expert groups `ep_size_{P}`: EP groups are consecutive ranks and
expert-data-parallel (EDP) groups are strided (world 4, P 2: EP [0,1],[2,3]; EDP [0,2],[1,3]).
ZeRO reduces a parameter marked `allreduce=False, group_name=...` over its EDP group, so
using DeepSpeed's own groups is what makes our adapter gradients reduce correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


@dataclass(frozen=True)
class ExpertGroups:
    ep_size: int
    ep_rank: int
    ep_group: "dist.ProcessGroup | None"  # None when not distributed (single process)
    edp_group: "dist.ProcessGroup | None"

    @property
    def name(self) -> str:
        return group_name(self.ep_size)


def expert_groups(ep_size: int) -> ExpertGroups:
    """Create (once) and return DeepSpeed's EP/EDP groups for `ep_size`.

    Without an initialised process group only ep_size 1 is possible; the layer then runs
    the local dispatcher and no group is needed.
    """
    if not dist.is_initialized():
        if ep_size != 1:
            raise RuntimeError(f"ep_size {ep_size} needs torch.distributed to be initialised (deepspeed launcher)")
        return ExpertGroups(1, 0, None, None)
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world})")
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return ExpertGroups(
        ep_size=ep_size,
        ep_rank=groups._get_expert_parallel_rank(name),
        ep_group=groups._get_expert_parallel_group(name),
        edp_group=groups._get_expert_data_parallel_group(name),
    )


def mark_expert_param(p: torch.nn.Parameter, ep_size: int) -> None:
    """Mark a parameter the way deepspeed.moe marks expert parameters.

    Frozen expert base weights need it too: otherwise the engine's initial broadcast copies
    rank 0's experts over every rank's (silent, see shared/notes/deepspeed-0.19.8.md).
    """
    p.allreduce = False
    p.group_name = group_name(ep_size)


def writes_canonical_copy(p: torch.nn.Parameter) -> bool:
    """Whether this rank is the one that saves `p`: for an expert parameter the first rank of
    its expert-data-parallel group (each EP shard once), otherwise global rank 0."""
    if not dist.is_initialized():
        return True
    if getattr(p, "allreduce", True) is False:
        from deepspeed.utils import groups

        return groups._get_expert_data_parallel_rank(p.group_name) == 0
    return dist.get_rank() == 0
