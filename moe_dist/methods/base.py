"""The method protocol: what the trainer asks every fine-tuning method, and the registry.

A method is one class in one file of this package. It owns its config section(s), its
initial plan, when it decides, what it decides (a `Change`: data, applied by the one
structure-change path in moe_dist/train/structure.py), any extra loss, and its own state
for checkpoints. The trainer calls these hooks and names no method:

    start     = method.initial_plan(run)            fresh runs (resumes read the saved plan);
                                                    default: plan_from_config(hf_config)
    method.prepare(model, step)                     after every build or change
    loss     += method.extra_loss(model)            every micro-batch (None: nothing)
    method.observe(stats)                           every all-reduced routing read
    if method.decides_at(step):
        change = method.decide(step, model, plan)   collective: every rank, same order

Decisions read all-reduced statistics only, so every rank computes the same change; the
trainer still checks the plan's hash against rank 0 before applying it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from moe_dist.models.arch import attention_targets, expert_sizes, moe_layer_indices
from moe_dist.plan import AdapterPlan
from moe_dist.validation import ConfigError

if TYPE_CHECKING:
    from moe_dist.parallel.placement import ExpertPlacement
    from moe_dist.routing import RoutingStats


@dataclass(frozen=True)
class Start:
    """A method's starting point. `routing`: counts it was chosen from (HELLoRA's profile);
    with them the trainer builds the model with its experts already balanced across ranks."""

    plan: AdapterPlan
    routing: "RoutingStats | None" = None
    summary: str = ""  # logged as an event


@dataclass(frozen=True)
class Change:
    """A structure change, as data. Any combination; fields left at their default change nothing.

    - `plan`: the new adapter plan (rank per expert adapter, LoRA-MoE experts per module);
      `routing`: the counts behind it, on which the trainer balances the experts for the
      new plan in the same rebuild (when repartitioning is on).
    - `placements`: which EP rank owns which expert, per layer (a move; same plan).
    - `lori_sparsity`: set every LoRI mask from |B| (one global threshold keeping
      1 - sparsity of the entries); masked B restart at zero with fresh optimizer state.
    - `expert_lr_scale`: multiply the expert adapters' learning rate (schedule position kept).
    """

    plan: AdapterPlan | None = None
    routing: "RoutingStats | None" = None
    placements: "Mapping[int, ExpertPlacement] | None" = None
    lori_sparsity: float | None = None
    expert_lr_scale: float = 1.0
    summary: str = ""  # what was decided, for the log ("" and nothing applied: no event)

    def applies_to(self, plan: AdapterPlan) -> bool:
        """Whether applying it to a model on `plan` changes anything."""
        return ((self.plan is not None and self.plan != plan) or bool(self.placements)
                or self.lori_sparsity is not None or self.expert_lr_scale != 1.0)


@dataclass(frozen=True)
class RunInfo:
    """What a method's initial plan may use: the run's config and model config, the EP size,
    and `profile_routing(plan, micro_batches)`: forward passes over training micro-batches
    with a model built on `plan` (not trained on; the data position goes back to the start),
    returning the all-reduced routing counts."""

    cfg: Any  # moe_dist.config.RunConfig
    hf_config: Any  # transformers PretrainedConfig
    ep_size: int
    profile_routing: Callable[[AdapterPlan, int], "RoutingStats"]


def lora_plan(cfg: Any, hf_config: Any) -> AdapterPlan:
    """`lora.rank` on every expert projection in `lora.expert_targets` and, with
    `lora.attention`, on the attention projections (per layer: MLA for DeepSeek, none on
    linear-attention layers)."""
    num_experts, *_ = expert_sizes(hf_config)
    experts = AdapterPlan.uniform(moe_layer_indices(hf_config), num_experts, cfg.lora.rank,
                                  expert_projections=cfg.lora.expert_target_list())
    attention = attention_targets(hf_config, cfg.lora.attention_target_list()) if cfg.lora.attention else {}
    return AdapterPlan(expert_ranks=experts.expert_ranks,
                       attention_ranks={(layer, p): cfg.lora.rank for layer, projs in attention.items() for p in projs})



class Method:
    """Defaults: a method that starts from LoRA everywhere and never changes structure."""

    name: ClassVar[str]
    sections: ClassVar[dict[str, type]] = {}  # config sections it owns: {"epng": EpngSection}
    uses_sections: ClassVar[tuple[str, ...]] = ()  # other methods' sections it reads too
    exports_as_lora: ClassVar[bool] = True  # False: no merged / PEFT / vLLM export (DMEP)

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: Any, num_experts: int | None) -> None:
        """Config checks beyond its sections' own (which run first), naming the field path."""
        for name in (*cls.sections, *cls.uses_sections):
            getattr(cfg, name).validate(name)

    def plan_from_config(self, hf_config: Any) -> AdapterPlan:
        """The plan from the configs alone: where the method starts unless it looks at routing
        first (launch/plan.py sizes memory on it). Default: LoRA everywhere."""
        return lora_plan(self.cfg, hf_config)

    def initial_plan(self, run: RunInfo) -> Start:
        return Start(self.plan_from_config(run.hf_config))

    def prepare(self, model: nn.Module, step: int) -> None:
        """Put the model in the state this method wants at `step` (after a build or change)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def observe(self, stats: "RoutingStats") -> None:
        """All-reduced routing counts since the previous read (identical on every rank)."""

    def decides_at(self, step: int) -> bool:
        return False

    def decide(self, step: int, model: nn.Module, plan: AdapterPlan) -> Change | None:
        return None

    def state_dict(self) -> dict:
        """JSON-serialisable state a resume needs to decide as the uninterrupted run would."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice ({METHODS[cls.name]}, {cls})")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def method_sections() -> dict[str, type]:
    """Every registered method's config sections, by name (a section is defined once)."""
    out: dict[str, type] = {}
    for cls in METHODS.values():
        for name, section in cls.sections.items():
            if out.setdefault(name, section) is not section:
                raise ValueError(f"config section {name!r} is defined by two methods")
    return out
