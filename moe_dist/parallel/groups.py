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
from deepspeed.moe.layer import MoE
from torch import nn

from moe_dist.param_views import storage_param


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


def writes_canonical_copy(p: torch.Tensor) -> bool:
    """Whether this rank is the one that saves `p`: for an expert parameter the first rank of
    its expert-data-parallel group (each EP shard once), otherwise global rank 0."""
    if not dist.is_initialized():
        return True
    p = storage_param(p)  # an expert adapter's view: its bucket Parameter carries the marks
    if getattr(p, "allreduce", True) is False:
        from deepspeed.utils import groups

        return groups._get_expert_data_parallel_rank(p.group_name) == 0
    return dist.get_rank() == 0


class DeepSpeedExpertLayer(MoE):
    """What DeepSpeed's engine needs of an expert layer, and nothing more.

    The engine finds MoE layers by `isinstance(module, deepspeed.moe.layer.MoE)` and then reads
    a few attributes (expert count, EP size, group name) to reduce expert gradients over the
    expert-data-parallel group; none of MoE's own machinery (its gate, its experts, its
    all-to-all) is used. Subclasses call `nn.Module.__init__` and `_register_with_deepspeed`.
    """

    def _register_with_deepspeed(self, num_experts: int, groups: "ExpertGroups") -> None:
        self.num_experts = num_experts
        self.ep_size = groups.ep_size
        self.expert_group_name = groups.name
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine; our groups already exist (created in conversion)."""


def zero_anchor(has_trainable: bool, ep_size: int, device, dtype: torch.dtype) -> nn.Parameter | None:
    """ZeRO needs >= 1 trainable expert parameter on every rank: a rank whose experts carry no
    adapter gets a one-element anchor (it takes part in forward with weight 0)."""
    if has_trainable:
        return None
    anchor = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
    mark_expert_param(anchor, ep_size)
    return anchor
