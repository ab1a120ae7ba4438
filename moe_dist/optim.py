"""Optimizer parameter groups the way DeepSpeed's MoE support expects them."""

from __future__ import annotations

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn


OPTIM_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter moments: what checkpoints and moves carry


def moe_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Trainable params in one group, split by DeepSpeed into dense and per-EP-size expert
    groups (ZeRO reduces expert groups over the expert-data-parallel group)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: the plan adds no adapters")
    group = {"params": params, "name": "adapters", "lr": lr, "weight_decay": weight_decay}
    return split_params_into_different_moe_groups_for_optimizer(group)


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(moe_param_groups(model, lr, weight_decay), lr=lr, weight_decay=weight_decay)
