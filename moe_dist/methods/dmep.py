"""DMEP: LoRA-MoE adapters (N LoRA experts + a top-k router per module), low-utility LoRA
experts pruned per module, then the load-balancing loss switched off (../shared/seeds/).

Choices the summary leaves open, and why:
- Utilisation of a LoRA expert = its share of the module's top-k selections since the last
  decision (all ranks' tokens). It is what the router actually spends on the expert, the
  quantity load balancing equalises, and comparable across modules of any width.
- Threshold: prune an expert whose share is below `util_threshold / N` (N = the module's
  current experts; default 0.8, i.e. under 80% of the uniform share), always keeping at
  least top-k experts (the most used). The load-balancing loss keeps shares near uniform, so
  a threshold at half the uniform share pruned only 19% of the LoRA-MoE parameters on the
  embedded task; 0.8 pruned 52% at the same accuracy (bench/results/methods*.json). Per module, so each module ends with its own width, which is
  the paper's point ("compact architectures tailored to each module").
- After the last prune point the load-balancing loss is switched off, letting survivors
  specialise.
- Default targets: attention projections of MoE models (their experts are already sparse);
  attention and MLP projections of dense models (the paper's Qwen3 setting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.adapters.lora_moe import lora_moe_modules
from moe_dist.methods.base import Change, Method, register
from moe_dist.models.arch import arch_spec, attention_targets, is_moe
from moe_dist.parallel.reduce import all_reduce
from moe_dist.plan import ATTENTION_PROJECTIONS, AdapterPlan
from moe_dist.validation import ConfigError, non_negative, positive


@dataclass
class DmepSection:
    """method: dmep (the choices and their reasons are in this file's docstring)."""

    num_experts: int = 8  # LoRA experts per target module (rank: lora.rank)
    top_k: int = 2
    targets: list[str] = field(default_factory=list)  # [] (auto), or paths in a layer: [self_attn.q_proj, mlp.up_proj]
    lb_coef: float = 0.01  # load-balancing loss weight until the last prune point
    prune_start: int = 40  # first prune point (step)
    prune_interval: int = 20
    prune_times: int = 2  # prune points: prune_start + i * prune_interval, i < prune_times
    util_threshold: float = 0.8  # prune below util_threshold / N of the module's selections

    def validate(self, path: str) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"{path}.top_k ({self.top_k}) must be in 1..{path}.num_experts ({self.num_experts})")
        positive(self, path, "prune_start", "prune_interval")
        non_negative(self, path, "prune_times", "util_threshold", "lb_coef")

    def prune_points(self) -> list[int]:
        return [self.prune_start + i * self.prune_interval for i in range(self.prune_times)]

DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def dmep_targets(num_layers: int, dense: bool, targets: list[str] | tuple[str, ...] = (),
                 attention: dict[int, list[str]] | None = None) -> list[tuple[int, str]]:
    """(layer, module path) of every LoRA-MoE. `targets`: paths in each layer, or empty (or
    ["auto"]) for the default; `attention`: the MoE architecture's attention paths per layer
    (moe_dist.models.arch.attention_targets); dense models use q,k,v,o."""
    paths = [t.strip() for t in targets if t.strip() and t.strip() != "auto"]
    if paths:
        return [(layer, path) for layer in range(num_layers) for path in paths]
    if attention is None:
        attention = {layer: [f"self_attn.{p}" for p in ATTENTION_PROJECTIONS] for layer in range(num_layers)}
    mlp = list(DENSE_MLP) if dense else []
    return [(layer, path) for layer in range(num_layers) for path in attention.get(layer, []) + mlp]


def initial_plan(targets: list[tuple[int, str]], num_experts: int, rank: int, top_k: int) -> AdapterPlan:
    return AdapterPlan(lora_moe={t: tuple(range(num_experts)) for t in targets}, lora_moe_rank=rank,
                       lora_moe_top_k=top_k)


def collect_utilisation(model: nn.Module, reset: bool = True) -> dict[tuple[int, str], dict[int, float]]:
    """Collective: each module's share of selections per LoRA expert, summed over all ranks."""
    mods = lora_moe_modules(model)
    device = next(model.parameters()).device  # the rank's (NCCL takes only CUDA tensors)
    counts = (torch.cat([m.selected_N.double() for m in mods]) if mods
              else torch.zeros(0, dtype=torch.float64, device=device))
    all_reduce(counts)
    out, start = {}, 0
    for m in mods:
        c = counts[start: start + len(m.experts)].cpu()
        start += len(m.experts)
        total = c.sum().item()
        out[(m.layer, m.path)] = {e: (c[i].item() / total if total else 0.0) for i, e in enumerate(m.experts)}
        if reset:
            m.selected_N.zero_()
            m.gate_mass_N.zero_()
    return out


def prune_plan(utilisation: dict[tuple[int, str], dict[int, float]], plan: AdapterPlan, util_threshold: float
               ) -> AdapterPlan:
    """Pure: per module, drop experts under util_threshold / N, keeping at least top-k."""
    new = {}
    for key, experts in plan.lora_moe.items():
        share = utilisation.get(key, {})
        n = len(experts)
        ranked = sorted(experts, key=lambda e: (-share.get(e, 0.0), e))
        keep = [e for e in ranked if share.get(e, 0.0) >= util_threshold / n]
        if len(keep) < plan.lora_moe_top_k:
            keep = ranked[: plan.lora_moe_top_k]
        new[key] = tuple(sorted(keep))
    return AdapterPlan(expert_ranks=dict(plan.expert_ranks), attention_ranks=dict(plan.attention_ranks), lori=plan.lori,
                       lora_moe=new, lora_moe_rank=plan.lora_moe_rank, lora_moe_top_k=plan.lora_moe_top_k)


def set_load_balancing(model: nn.Module, enabled: bool) -> None:
    for m in lora_moe_modules(model):
        m.lb_enabled = enabled
        m.aux_loss = None


def load_balancing_loss(model: nn.Module) -> torch.Tensor | None:
    losses = [m.aux_loss for m in lora_moe_modules(model) if m.lb_enabled and m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None


@register
class DMEP(Method):
    name = "dmep"
    sections = {"dmep": DmepSection}
    exports_as_lora = False  # a router in every module: no fixed W + s*B*A

    def plan_from_config(self, hf) -> AdapterPlan:
        cfg, d = self.cfg, self.cfg.dmep
        attention = None
        if is_moe(hf):
            spec = arch_spec(hf)
            attention = {layer: [f"{spec.attention_module(layer)}.{p}" for p in projs]
                         for layer, projs in attention_targets(hf, cfg.lora.attention_target_list()).items()}
        targets = dmep_targets(hf.num_hidden_layers, dense=not is_moe(hf), targets=d.targets, attention=attention)
        return initial_plan(targets, d.num_experts, cfg.lora.rank, d.top_k)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.pending_counts: dict | None = None  # from a checkpoint, until the model exists

    def state_dict(self) -> dict:
        """Collective: the selections counted since the last prune, summed over ranks (a resume
        prunes from the same utilisation as the uninterrupted run)."""
        mods = lora_moe_modules(self.model) if self.model is not None else []
        if not mods:
            return {}
        both = torch.cat([torch.cat([m.selected_N.double(), m.gate_mass_N]) for m in mods])
        all_reduce(both)
        return {"counts": both.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.pending_counts = state.get("counts")

    def last_prune_passed(self, step: int) -> bool:
        points = self.cfg.dmep.prune_points()
        return bool(points) and step >= points[-1]

    def prepare(self, model: nn.Module, step: int) -> None:
        """The load-balancing loss goes off once the last prune point has passed (survivors
        specialise); uniform LoRA-MoE (no prune points) keeps it."""
        self.model = model
        if self.pending_counts is not None:  # the job's sums on rank 0, zeros elsewhere: same totals
            counts, start = torch.tensor(self.pending_counts, dtype=torch.float64, device="cpu"), 0
            first = not dist.is_initialized() or dist.get_rank() == 0
            for m in lora_moe_modules(model):
                n = len(m.experts)
                if first:
                    m.selected_N.copy_(counts[start:start + n].long())
                    m.gate_mass_N.copy_(counts[start + n:start + 2 * n])
                else:
                    m.selected_N.zero_()
                    m.gate_mass_N.zero_()
                start += 2 * n
            self.pending_counts = None
        if self.last_prune_passed(step):
            set_load_balancing(model, False)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        lb = load_balancing_loss(model)  # None once off
        return None if lb is None else self.cfg.dmep.lb_coef * lb

    def decides_at(self, step: int) -> bool:
        return step in self.cfg.dmep.prune_points() and step < self.cfg.train.steps

    def decide(self, step: int, model: nn.Module, plan: AdapterPlan) -> Change:
        """Utilisation since the last decision (all ranks) -> per-module prune."""
        new = prune_plan(collect_utilisation(model), plan, self.cfg.dmep.util_threshold)
        before = sum(len(v) for v in plan.lora_moe.values())
        after = sum(len(v) for v in new.lora_moe.values())
        widths = sorted(len(v) for v in new.lora_moe.values())
        return Change(plan=new, summary=f"dmep step {step}: LoRA experts {before} -> {after} over {len(new.lora_moe)} "
                                        f"modules (widths {widths[0]}..{widths[-1]}); load balancing "
                                        f"{'off' if self.last_prune_passed(step) else 'on'}")
