"""The one path for a structure change mid-training (EPnG prune/grow, later moves):

    snapshot (full fp32 values + Adam moments by logical key, a collective)
    -> tear the engine down (hooks included: engine.destroy() leaves its forward hooks on the
       module, and old engines then stay alive; shared/notes/deepspeed-0.19.8.md)
    -> rebuild the changed layers' adapters from the new plan
    -> carry surviving tensors over by logical key (grown adapters: old part kept, new part
       orthogonal A rows / zero B columns, so the output is unchanged)
    -> a fresh DeepSpeed engine over the new parameter set, states restored exactly
       (fp32 masters, moments, Adam step, LR schedule, engine step counters).

Pruned adapters simply have no key in the new model: their parameters and optimizer state
are gone, not zeroed.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import types

import torch

from moe_dist.adapters.lora import LoRAConfig, _key_seed
from moe_dist.models.convert import adapter_params
from moe_dist.plan import AdapterPlan
from moe_dist.routing import experts_modules
from moe_dist.train import checkpoint as ckpt


def destroy_engine(engine) -> None:
    # DeepSpeed binds methods to every trainable parameter (get_full_hp_param & co. in
    # utils/mixed_precision_linkage.py, load_hp_checkpoint_state): each refers back to its
    # parameter, a cycle only the cycle collector frees, and never if the parameter predates
    # gc.freeze() (the trainer freezes its setup): a dropped adapter would keep the old
    # engine's flat buffer alive. Unbinding them lets reference counting free it.
    for p in engine.module.parameters():
        for name, value in list(p.__dict__.items()):
            if isinstance(value, types.MethodType) and value.__self__ is p:
                del p.__dict__[name]
        p.__dict__.pop("_hp_mapping", None)
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
    engine.destroy()


def apply_plan(model: torch.nn.Module, plan: AdapterPlan) -> list[int]:
    """Rebuild the expert adapters of every layer whose ranks differ from `plan`. Attention
    adapters are not changed by any method here. Returns the rebuilt layers."""
    from moe_dist.methods.dmep import lora_moe_modules

    changed = []
    for m in lora_moe_modules(model):  # DMEP: pruning only (survivors keep their tensors)
        want = plan.lora_moe.get((m.layer, m.path), ())
        if tuple(m.experts) != tuple(want):
            if not set(want) <= set(m.experts):
                raise ValueError(f"layer {m.layer} {m.path}: LoRA experts {list(want)} not a subset of {m.experts}")
            m.keep_experts(tuple(want))
            changed.append(m.layer)
    for layer, mod in experts_modules(model).items():
        want = {k: r for k, r in plan.expert_ranks_of_layer(layer).items() if k[0] in mod.local_experts}
        have = {key: a.shape[0] for key, a in _bank_ranks(mod).items()}
        if want != have:
            mod.set_adapter_ranks(plan.expert_ranks_of_layer(layer))
            changed.append(layer)
    return sorted(set(changed))


def _bank_ranks(mod) -> dict[tuple[int, str], torch.Tensor]:
    bank = mod.adapters
    return {bank._keys[name]: bank.lora_A[name] for name in bank.lora_A}


def orthogonal_rows(A_old_RI: torch.Tensor, extra: int, key: str, seed: int) -> torch.Tensor:
    """`extra` new A rows orthogonal to the row space of A_old (and to each other), with the
    row norm of the seeded LoRA initialisation, so growth adds directions, not copies."""
    R, I = A_old_RI.shape
    if R + extra > I:
        raise ValueError(f"{key}: cannot grow rank {R} by {extra} beyond the input size {I}")
    gen = torch.Generator().manual_seed(_key_seed(seed, f"{key}@grow{R}"))
    G_IX = torch.randn(I, extra, generator=gen, dtype=torch.float64)
    Q_IR, _ = torch.linalg.qr(A_old_RI.double().T)
    G_IX = G_IX - Q_IR @ (Q_IR.T @ G_IX)
    Q_IX, _ = torch.linalg.qr(G_IX)
    row_norm = math.sqrt(I / 3) / math.sqrt(I)  # E|row| of U(-1/sqrt(I), 1/sqrt(I)) rows
    return (Q_IX.T * row_norm).to(A_old_RI.dtype)


def carry_over(old_values: dict, old_optim: dict, new_params: dict[str, torch.nn.Parameter], lora: LoRAConfig
               ) -> tuple[dict, dict]:
    """Values and moments for the new parameter set, by logical key.

    Same shape: carried as is. Grown rank (R -> R'): A gets orthogonal new rows, B new zero
    columns, and B's old columns are rescaled by scale(R)/scale(R') (alpha/R changes with the
    rank) so B'A' x scale(R') == B A x scale(R); B's moments are rescaled alike. New or grown
    parts start from zero moments (they inherit the group's Adam step; noted in the issue).
    New keys keep their fresh initialisation."""
    values, optim = {}, {}
    for key, p in new_params.items():
        if key not in old_values:
            continue
        old = old_values[key]
        if old.shape == p.shape:
            values[key] = old
            optim.update({k: v for k, v in old_optim.items() if k.rsplit("/", 1)[0] == key})
            continue
        if key.endswith("lora_A") and old.shape[1] == p.shape[1] and old.shape[0] < p.shape[0]:
            extra = p.shape[0] - old.shape[0]
            values[key] = torch.cat([old, orthogonal_rows(old, extra, key, lora.seed)])
            for name in ckpt.OPTIM_KEYS:
                if f"{key}/{name}" in old_optim:
                    o = old_optim[f"{key}/{name}"]
                    optim[f"{key}/{name}"] = torch.cat([o, o.new_zeros(extra, o.shape[1])])
        elif key.endswith("lora_B") and old.shape[0] == p.shape[0] and old.shape[1] < p.shape[1]:
            extra = p.shape[1] - old.shape[1]
            c = lora.scale(old.shape[1]) / lora.scale(p.shape[1])
            values[key] = torch.cat([old * c, old.new_zeros(old.shape[0], extra)], dim=1)
            for name, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
                if f"{key}/{name}" in old_optim:
                    o = old_optim[f"{key}/{name}"] * c**power
                    optim[f"{key}/{name}"] = torch.cat([o, o.new_zeros(o.shape[0], extra)], dim=1)
        else:
            raise ValueError(f"{key}: cannot carry shape {tuple(old.shape)} into {tuple(p.shape)} (only rank growth)")
    return values, optim


def restructure(trainer, new_plan: AdapterPlan, placements: dict | None = None) -> dict:
    """Collective. Moves `trainer` (model, engine, scheduler) onto `new_plan` and, if given,
    new expert placements (one engine rebuild for both); returns counts and the move report."""
    from moe_dist.train.repartition import move_experts

    old_values, old_optim, optimizer_step, scheduler_state, counters = teardown(trainer)
    changed = apply_plan(trainer.model, new_plan)
    trainer.model.moe_dist_info = dataclasses.replace(trainer.model.moe_dist_info, plan=new_plan)
    trainer.plan = new_plan
    new_params = adapter_params(trainer.model)
    values, optim = carry_over(old_values, old_optim, new_params, trainer.model.moe_dist_info.lora)
    move = None
    if placements:
        values, optim, move = move_experts(trainer.model, new_plan, placements, values, optim, optimizer_step > 0)
    rebuild_engine(trainer, values, optim, optimizer_step, scheduler_state, counters)
    return {"layers_rebuilt": len(changed), "tensors_carried": len(values), "tensors": len(new_params), "move": move}


def rebuild_engine(trainer, values: dict, optim: dict, optimizer_step: int, scheduler_state: dict | None,
                   counters: dict) -> None:
    """A fresh engine over the model's current parameters, starting from `values` (by key)
    and the given optimizer/scheduler state. The old engine must be torn down already."""
    from moe_dist.train.engine import build_engine

    new_params = adapter_params(trainer.model)
    with torch.no_grad():
        for key, v in values.items():
            new_params[key].copy_(v.to(new_params[key].dtype))
    trainer.engine, trainer.scheduler = build_engine(trainer.model, trainer.cfg, trainer.bf16)
    trainer.params = {k: p for k, p in new_params.items() if p.requires_grad}
    ckpt.restore_engine_state(trainer.engine, trainer.scheduler, trainer.params, values, optim, optimizer_step,
                              scheduler_state)
    for k, v in counters.items():
        setattr(trainer.engine, k, v)


def teardown(trainer) -> tuple[dict, dict, int, dict, dict]:
    """Collective: snapshot everything by key, then destroy the engine (hooks included)."""
    engine = trainer.engine
    values, optim = ckpt.full_state(adapter_params(trainer.model), engine)
    optimizer_step = ckpt.adam_step(engine)
    scheduler_state = trainer.scheduler.state_dict()
    counters = {k: getattr(engine, k) for k in ("global_steps", "global_samples", "micro_steps")}
    destroy_engine(engine)
    trainer.engine = trainer.scheduler = engine = None
    gc.collect()
    return values, optim, optimizer_step, scheduler_state, counters
