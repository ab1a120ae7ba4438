"""HELLoRI: HELLoRA's hot-expert placement with LoRI adapters (A frozen at its seeded random
initialisation, B sparse). Stage 1 trains B dense for `stage1_steps`; then one global
magnitude threshold keeps the top (1 - sparsity) of B's entries (moe_dist/adapters/lori.py),
B restarts at zero under that mask with fresh optimizer state, and the expert adapters'
learning rate goes up `stage2_lr_scale` times (LoRI's choice for the sparse stage; attention
adapters stay plain LoRA on the normal schedule)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_dist.methods.base import Change, register
from moe_dist.methods.hellora import HELLoRA
from moe_dist.plan import AdapterPlan
from moe_dist.validation import ConfigError, fraction


@dataclass
class HelloriSection:
    """method: hellori = hellora placement (the hellora section) + LoRI adapters."""

    stage1_steps: int = 50  # dense-B steps before the mask is taken
    sparsity: float = 0.9  # share of B entries masked out
    stage2_lr_scale: float = 10.0

    def validate(self, path: str) -> None:
        fraction(self, path, "sparsity")


@register
class HELLoRI(HELLoRA):
    name = "hellori"
    sections = {"hellori": HelloriSection}
    uses_sections = ("hellora",)
    lori = True

    @classmethod
    def validate(cls, cfg, num_experts: int | None) -> None:
        super().validate(cfg, num_experts)
        if not 0 < cfg.hellori.stage1_steps < cfg.train.steps:
            raise ConfigError(f"hellori.stage1_steps ({cfg.hellori.stage1_steps}) must be in 1..train.steps-1")

    def decides_at(self, step: int) -> bool:
        return step == self.cfg.hellori.stage1_steps

    def decide(self, step: int, model: nn.Module, plan: AdapterPlan) -> Change:
        h = self.cfg.hellori
        return Change(lori_sparsity=h.sparsity, expert_lr_scale=h.stage2_lr_scale,
                      summary=f"hellori step {step}: LoRI stage 2, B restarted at zero under the masks, "
                              f"expert-adapter lr x{h.stage2_lr_scale}")
