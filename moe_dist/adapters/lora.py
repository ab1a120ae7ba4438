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
    return (torch.rand(rank, in_features, generator=gen, dtype=torch.float32, device="cpu") * 2 - 1) * bound


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
        self.shared_input: SharedInputProjections | None = None  # set by link_shared_input

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads proj.weight.dtype
        return self.base.weight

    def kernel_eligible(self, x: torch.Tensor) -> bool:
        """Whether the CPU kernel computes this projection of x (else: plain torch ops)."""
        return (x.device.type == "cpu" and type(self.base) is nn.Linear and isinstance(self.dropout, nn.Identity)
                and not self.base.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input is not None:
            out = self.shared_input.output(self, x)
            if out is not None:
                return out
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        if self.kernel_eligible(x):
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


class SharedInputProjections:
    """LoRA linears that read the same input (an attention module's q, k and v), computed by
    one kernel call: the first one called computes all of them and keeps the others' outputs
    for their calls on that same input tensor.

    Why: on CPU each projection is a small GEMM (1,024 x 128 x 128 on the embedded model) whose
    fixed costs (the autograd node, the input's pass through cache, three rank-r products
    instead of one wider base GEMM) are a fair share of its time; measured one layer's q, k, v
    forward + backward 3.8 -> 3.0 ms (min of 100). The outputs are column views of one
    M x (Oq + Ok + Ov) product, so the gradients meet in one buffer and one backward call.

    A member asked with another input while its output for an earlier one waits (a module that
    feeds k and v something other than q's input) switches the group off for good; each member
    then runs alone. The concatenated frozen weight is built on first use and again only if a
    base weight changes (its storage or version). It is no parameter or buffer: state dicts,
    checkpoints and exports do not see it."""

    def __init__(self, members: list[LoRALinear]):
        self.members = members
        self.enabled = True
        self._weight: torch.Tensor | None = None
        self._weight_key: tuple | None = None
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def _concatenated_weight(self) -> torch.Tensor:
        ws = [m.base.weight for m in self.members]
        key = tuple((w.data_ptr(), w._version, w.device, w.dtype) for w in ws)
        if key != self._weight_key:
            self._weight, self._weight_key = torch.cat(ws).unsqueeze(0).contiguous(), key
        return self._weight

    def output(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """member(x) from the group's one call, or None (the member computes it alone)."""
        if not self.enabled:
            return None
        i = self.members.index(member)
        if i in self._pending:
            if self._x is x:
                out = self._pending.pop(i)
                if not self._pending:
                    self._x = None
                return out
            self.enabled, self._pending, self._x = False, {}, None  # k / v read another input than q
            return None
        if not all(m.kernel_eligible(x) for m in self.members) or x.dtype != self.members[0].base.weight.dtype:
            return None
        outs = self._compute(x)
        self._pending = {j: o for j, o in enumerate(outs) if j != i}
        self._x = x if self._pending else None
        return outs[i]

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        x_MI = x.reshape(-1, x.shape[-1]).contiguous()
        adapters, slot, lo = [], [], 0
        for j, m in enumerate(self.members):
            adapters += [m.lora_A.to(x.dtype), m.lora_B.to(x.dtype)]
            slot.append(SlotAdapter(2 * j, 2 * j + 1, lo, lo + m.out_features, m.scaling))
            lo += m.out_features
        y_MO = ExpertLoopLinear.apply(x_MI, self._concatenated_weight(), [x_MI.shape[0]], [slot], *adapters)
        outs = []
        for ad, m in zip(slot, self.members):
            y = y_MO[:, ad.lo:ad.hi]
            if m.base.bias is not None:
                y = y + m.base.bias
            outs.append(y.view(*x.shape[:-1], m.out_features))
        return outs


def link_shared_input(members: list[LoRALinear]) -> SharedInputProjections | None:
    """Group LoRA linears that a module calls on the same input (see SharedInputProjections);
    None when fewer than two or their in-features differ."""
    if len(members) < 2 or len({m.in_features for m in members}) != 1:
        return None
    group = SharedInputProjections(members)
    for m in members:
        m.shared_input = group
    return group
