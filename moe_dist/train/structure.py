"""The one path for every structure change mid-training, and for starting an engine:

    snapshot  full fp32 values + Adam moments + schedule by logical key (a collective),
              then the engine is destroyed (moe_dist/train/zero_state.py)
    apply     a Change (moe_dist/methods/base.py), any combination of:
                plan        rebuild the changed layers' adapters; surviving tensors carried
                            over by key, grown ranks extended orthogonally (adapters/growth.py)
                placements  move experts between EP ranks (moe_dist/parallel/move.py)
                LoRI masks  from |B|; masked B restart at zero with fresh moments
                lr scale    the expert adapters' learning rate, schedule position kept
    rebuild   a fresh DeepSpeed engine over the new parameter set, the snapshot restored

A repartition is a Change with placements only; a resume is `start_engine` with a snapshot
read from disk. Functions return new objects (engine, scheduler, parameters); nothing here
holds or writes a trainer.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moe_dist.adapters.growth import carry_over
from moe_dist.adapters.lora_moe import lora_moe_modules
from moe_dist.adapters.lori import sparsify_lori
from moe_dist.methods.base import Change
from moe_dist.models.convert import adapter_params
from moe_dist.parallel.move import MoveReport, move_experts, rehome_experts
from moe_dist.plan import AdapterPlan
from moe_dist.routing import experts_modules
from moe_dist.train import zero_state
from moe_dist.train.resume import scale_schedule
from moe_dist.train.zero_state import EngineSnapshot

BuildEngine = Callable[[nn.Module], tuple]  # model -> (engine, lr scheduler)


@dataclass
class Engine:
    """A DeepSpeed engine, its LR scheduler and the trainable parameters it optimises, by key."""

    engine: object
    scheduler: object
    params: dict[str, nn.Parameter]


@dataclass
class ChangeReport:
    layers_rebuilt: int = 0
    move: MoveReport | None = None
    lori_threshold: float | None = None
    lori_kept: float | None = None  # share of B entries the masks keep on this rank
    seconds: float = 0.0

    def line(self) -> str:
        parts = []
        if self.layers_rebuilt:
            parts.append(f"{self.layers_rebuilt} layers rebuilt")
        if self.lori_threshold is not None:
            parts.append(f"LoRI masks at |B| > {self.lori_threshold:.3g} keep {100 * self.lori_kept:.1f}% of B here")
        return f"{', '.join(parts) or 'rebuilt'} in {self.seconds:.2f}s"


def start_engine(model: nn.Module, build: BuildEngine, snap: EngineSnapshot | None = None) -> Engine:
    """A fresh engine over the model's current parameters, starting from `snap` (by key) if
    given: values are written into the module first (ZeRO's fp32 partitions start from them),
    then masters, moments, Adam step, schedule and engine counters are restored exactly."""
    params = adapter_params(model)
    if snap is not None:
        with torch.no_grad():
            for key, v in snap.values.items():
                params[key].copy_(v.to(params[key].dtype))
    engine, scheduler = build(model)
    # taken anew: the engine moved each Parameter into its flat buffer (views of the old are stale)
    trainable = {k: p for k, p in adapter_params(model).items() if p.requires_grad}
    if snap is not None:
        zero_state.restore(engine, scheduler, trainable, snap)
    return Engine(engine, scheduler, trainable)


def take_down(model: nn.Module, current: Engine) -> EngineSnapshot:
    """Collective: snapshot `current`, then destroy it and empty the handle, so that the
    collection here frees its flat buffers now (nothing else may still hold the engine)."""
    snap = zero_state.snapshot(current.engine, current.scheduler, adapter_params(model))
    engine = current.engine
    current.engine = current.scheduler = None
    current.params = {}
    zero_state.destroy_engine(engine)
    del engine
    gc.collect()
    return snap


def apply_plan(model: nn.Module, plan: AdapterPlan) -> list[int]:
    """Rebuild the adapters of every layer whose plan differs: LoRA-MoE modules drop pruned
    experts (survivors keep their tensors), expert layers get fresh adapters of the new
    ranks (their experts stay; the slot order follows the ranks). Attention adapters are not
    changed by any method here. Returns the rebuilt layers."""
    changed = []
    for m in lora_moe_modules(model):
        want = plan.lora_moe.get((m.layer, m.path), ())
        if tuple(m.experts) != tuple(want):
            if not set(want) <= set(m.experts):
                raise ValueError(f"layer {m.layer} {m.path}: LoRA experts {list(want)} not a subset of {m.experts}")
            m.keep_experts(tuple(want))
            changed.append(m.layer)
    for layer, mod in experts_modules(model).items():
        want = {k: r for k, r in plan.expert_ranks_of_layer(layer).items() if k[0] in mod.local_experts}
        if want != mod.adapters.ranks():
            rehome_experts(mod, mod.placement, plan.expert_ranks_of_layer(layer), {})
            changed.append(layer)
    return sorted(set(changed))


def _restart_lori(model: nn.Module, snap: EngineSnapshot, sparsity: float) -> tuple[EngineSnapshot, float, float]:
    """Masks from the snapshot's B (the fp32 masters), then masked B at zero, no moments."""
    params = adapter_params(model)
    with torch.no_grad():
        for k, v in snap.values.items():
            params[k].copy_(v.to(params[k].dtype))
    masks = {k: m for mod in experts_modules(model).values() for k, m in mod.adapters.lori_masks().items()}
    threshold, kept = sparsify_lori(params, masks, sparsity, next(model.parameters()).device, snap.values)
    values = {k: (torch.zeros_like(v) if k in masks else v) for k, v in snap.values.items()}
    optim = {k: v for k, v in snap.optim.items() if k.rsplit("/", 1)[0] not in masks}
    return dataclasses.replace(snap, values=values, optim=optim), threshold, kept


def _scale_expert_lr(snap: EngineSnapshot, expert_groups: list[bool], factor: float) -> EngineSnapshot:
    """The expert (MoE) param groups' LR x factor, the schedule's position kept. The step right
    after the change still runs at the old LR (as LoRI stage 2 has since it landed; the per-step
    losses of bench/loss_trace.py pin it), the factor shows from the next one on."""
    factors = [factor if moe else 1.0 for moe in expert_groups]
    return dataclasses.replace(snap, scheduler=scale_schedule(snap.scheduler, factors, from_this_step=False))


def change_structure(model: nn.Module, current: Engine, change: Change, build: BuildEngine
                     ) -> tuple[Engine, ChangeReport]:
    """Collective: every rank, same change. `current` is destroyed; returns the new engine."""
    t0 = time.perf_counter()
    report = ChangeReport()
    expert_groups = [bool(g.get("moe")) for g in current.scheduler.optimizer.param_groups]
    snap = take_down(model, current)
    info = model.moe_dist_info
    plan = info.plan
    if change.plan is not None and change.plan != plan:
        report.layers_rebuilt = len(apply_plan(model, change.plan))
        plan = change.plan
        values, optim = carry_over(snap.values, snap.optim, adapter_params(model), info.lora)
        snap = dataclasses.replace(snap, values=values, optim=optim)
    if change.placements:
        values, optim, report.move = move_experts(experts_modules(model), plan, dict(change.placements), snap.values,
                                                  snap.optim, snap.optimizer_step > 0)
        snap = dataclasses.replace(snap, values=values, optim=optim)
        info = dataclasses.replace(info, placements={**info.placements, **change.placements})
    model.moe_dist_info = dataclasses.replace(info, plan=plan)
    if change.lori_sparsity is not None:
        snap, report.lori_threshold, report.lori_kept = _restart_lori(model, snap, change.lori_sparsity)
    if change.expert_lr_scale != 1.0:
        snap = _scale_expert_lr(snap, expert_groups, change.expert_lr_scale)
    new = start_engine(model, build, snap)
    report.seconds = time.perf_counter() - t0
    if report.move is not None:
        report.move.seconds = report.seconds
    return new, report
