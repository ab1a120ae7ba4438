"""LoRA pieces shared by expert and attention adapters: config, scaling, seeded init.

Initialisation is seeded by the adapter's logical key, so an adapter starts from the same
values whichever rank builds it and whatever the placement: a run on EP 2 and on EP 4 (or a
run that moved the expert) begin identical, which the invariance tests rely on.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_dist.kernels.expert_loop import ExpertLoopLinear, SlotAdapter


@dataclass(frozen=True)
class LoRAConfig:
    """`alpha` scales the update by alpha/r (alpha/sqrt(r) with `rslora`)."""

    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def scale(self, rank: int) -> float:
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)


def key_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_lora_A(rank: int, in_features: int, key: str, seed: int) -> torch.Tensor:
    """Kaiming-uniform(a=sqrt(5)) like nn.Linear and PEFT, from a generator seeded by `key`."""
    gen = torch.Generator().manual_seed(key_seed(seed, key))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class LoRALinear(nn.Module):
    """Plain LoRA around a frozen nn.Linear (attention projections). Logical keys are given
    by the owner; the wrapped module keeps HF's name (`q_proj.base`)."""

    def __init__(self, base: nn.Linear, rank: int, config: LoRAConfig, key: str, device=None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRALinear for {key}: rank must be > 0, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = config.scale(rank)
        self.key = key
        dev = device if device is not None else base.weight.device
        a = init_lora_A(rank, base.in_features, f"{key}.lora_A", config.seed)
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads proj.weight.dtype
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        if (x.device.type == "cpu" and type(self.base) is nn.Linear and isinstance(self.dropout, nn.Identity)
                and not self.base.weight.requires_grad):
            # The CPU expert kernel with one group: LoRA added into the base GEMM's output and
            # input gradient in place, rank-R products in MKL's fast orientation.
            x_MI = x.reshape(-1, x.shape[-1]).contiguous()
            adapter = SlotAdapter(0, 1, 0, self.out_features, self.scaling)
            y_MO = ExpertLoopLinear.apply(x_MI, self.base.weight.unsqueeze(0), [x_MI.shape[0]], [[adapter]], a, b)
            if self.base.bias is not None:
                y_MO = y_MO + self.base.bias
            return y_MO.view(*x.shape[:-1], self.out_features)
        out = self.base(x)
        return out + (self.dropout(x) @ a.t() @ b.t()) * self.scaling

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {f"{self.key}.lora_A": self.lora_A, f"{self.key}.lora_B": self.lora_B}
