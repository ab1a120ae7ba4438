"""What a DeepSpeed ZeRO engine holds for our trainable parameters, by logical key, in and out.

Checkpoints (moe_dist/train/checkpoint.py) and structure changes (moe_dist/train/structure.py)
both go through here: `snapshot` gives the full fp32 values, Adam moments, step count, LR
schedule and engine counters of every parameter (a collective); `restore` puts a snapshot
into a fresh engine; `destroy_engine` frees an engine completely. Expert adapters come as
views of their rank bucket's Parameter (moe_dist/param_views.py): the engine's state is
taken and set per Parameter and split or assembled by key here. The DeepSpeed 0.19.8
internals this relies on (ZeRO-1/2 flat groups, the optimizer-state link bug, bound methods
on parameters) are all in this file; shared/notes/deepspeed-0.19.8.md has the probes.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moe_dist.optim import OPTIM_KEYS
from moe_dist.parallel.device import check_collective_device
from moe_dist.param_views import slice_of, storage_param

COUNTERS = ("global_steps", "global_samples", "micro_steps")  # the engine's own step counters


@dataclass
class EngineSnapshot:
    """An engine's trainable state, full and fp32 on the CPU, by logical key (this rank's
    parameters; each key is the same on every rank that holds it)."""

    values: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]  # "{key}/exp_avg", "{key}/exp_avg_sq"
    optimizer_step: int = 0
    scheduler: dict | None = None  # None: the fresh engine's schedule stays
    counters: dict[str, int] = field(default_factory=dict)

    def meta(self) -> dict:
        """The JSON part (checkpoints write the tensors to safetensors, this to trainer_state)."""
        return {"optimizer_step": self.optimizer_step, "scheduler": self.scheduler, "counters": self.counters}


def snapshot(engine, scheduler, params: dict[str, torch.Tensor]) -> EngineSnapshot:
    """Collective over every parameter's data-parallel group. `params`: by logical key, taken
    after the engine was built."""
    values, optim = full_state(params, engine)
    return EngineSnapshot(values, optim, adam_step(engine), scheduler.state_dict(),
                          {k: getattr(engine, k) for k in COUNTERS})


def _by_key(params: dict[str, torch.Tensor], home: dict[str, str], state: tuple[dict, dict]) -> tuple[dict, dict]:
    """Per-Parameter (values, optimizer state) split into each logical key's part."""
    base_values, base_optim = state
    values, optim = {}, {}
    for key, name in home.items():
        t = params[key]
        values[key] = slice_of(base_values[name], t, key).clone()
        for n in OPTIM_KEYS:
            if f"{name}/{n}" in base_optim:
                optim[f"{key}/{n}"] = slice_of(base_optim[f"{name}/{n}"], t, key).clone()
    return values, optim


def _storage(params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.nn.Parameter], dict[str, str]]:
    """The Parameters that store `params`, each named by the smallest logical key it holds (the
    same name on every rank that holds it), and each key's Parameter name."""
    storage, name_of, home = {}, {}, {}
    for key in sorted(params):
        base = storage_param(params[key])
        name = name_of.setdefault(id(base), key)
        storage[name], home[key] = base, name
    return storage, home


def link_optimizer_state(engine) -> None:
    """Point every parameter's ZeRO fragment at its optimizer state.

    DeepSpeed 0.19.8 bug (stage 1/2): the link is made once, right after the first param
    group's optimizer step, when later groups (the MoE expert groups) have no state yet, and
    never again; their `safe_get_full_optimizer_state` then fails with "exp_avg not found in
    optimizer state fragment". Re-linking once every group has state fixes it.
    """
    zero = getattr(engine, "optimizer", None)
    if zero is not None and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _ordered(params: dict[str, torch.nn.Parameter]) -> list[tuple[str, torch.nn.Parameter]]:
    """Dense parameters first, then expert ones, each sorted: the fragment API is a collective
    per parameter over its data-parallel group, so every group member must go in one order."""
    return sorted(params.items(), key=lambda kv: (getattr(kv[1], "allreduce", True) is False, kv[0]))


def full_state(params: dict[str, torch.Tensor], engine) -> tuple[dict, dict]:
    """Collective: (values, optimizer state) of every param, full and fp32, by logical key.

    With a ZeRO-1/2 engine: one all-gather per optimizer param group (`_zero_full_state`);
    otherwise DeepSpeed's per-parameter fragment API (`fragment_full_state`)."""
    storage, home = _storage(params)
    fast = _zero_full_state(engine, storage)
    return _by_key(params, home, fast if fast is not None else _fragment_full_state(storage, engine))


def fragment_full_state(params: dict[str, torch.Tensor], engine) -> tuple[dict, dict]:
    """Through DeepSpeed's public tensor-fragment API: one collective per Parameter and
    state (~0.3 s for 450 Parameters on 2 CPU ranks)."""
    storage, home = _storage(params)
    return _by_key(params, home, _fragment_full_state(storage, engine))


def _fragment_full_state(params: dict[str, torch.nn.Parameter], engine) -> tuple[dict, dict]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    link_optimizer_state(engine)
    values, optim = {}, {}
    for key, p in _ordered(params):
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        values[key] = (full if full is not None else p.detach().float()).cpu().contiguous()
        if p.requires_grad:
            for name in OPTIM_KEYS:
                state = safe_get_full_optimizer_state(p, name)
                if state is not None:
                    optim[f"{key}/{name}"] = state.cpu().contiguous()
    return values, optim


def _zero_full_state(engine, params: dict[str, torch.nn.Parameter]) -> tuple[dict, dict] | None:
    """The same as the fragment API, from ZeRO-1/2's flat groups: each param group's fp32
    partition and moments are all-gathered over its data-parallel group at once, and each
    parameter is its slice at the offset its (flat-buffer view) weight has. Reads DeepSpeed
    internals (stage_1_and_2: bit16_groups, bit16_groups_flat, single_partition_of_fp32_groups,
    real_dp_process_group); tests/test_repartition.py checks it against the public API.
    None when the optimizer is not a ZeRO-1/2 one."""
    zero = getattr(engine, "optimizer", None)
    if not all(hasattr(zero, a) for a in ("bit16_groups", "bit16_groups_flat", "single_partition_of_fp32_groups",
                                          "real_dp_process_group")):
        return None
    key_of = {id(p): k for k, p in params.items()}
    offsets = {}
    for i, group in enumerate(zero.bit16_groups):  # layout checked on every rank before any collective
        flat = zero.bit16_groups_flat[i]
        for p in group:
            offsets[id(p)] = (p.data_ptr() - flat.data_ptr()) // p.element_size()
            if not 0 <= offsets[id(p)] <= flat.numel() - p.numel():
                return None  # not a view of its flat group (a layout this code does not know)
    values, optim = {}, {}
    for i, group in enumerate(zero.bit16_groups):
        flat = zero.bit16_groups_flat[i]
        part = zero.single_partition_of_fp32_groups[i]
        state = zero.optimizer.state.get(part, {})
        names = [n for n in OPTIM_KEYS if n in state]
        local_SP = torch.stack([part.detach(), *(state[n] for n in names)]).to(flat.device, torch.float32)
        dp_group = zero.real_dp_process_group[i]
        dp = dist.get_world_size(group=dp_group) if dist.is_initialized() else 1
        gathered_DSP = torch.empty(dp * local_SP.shape[0], local_SP.shape[1], dtype=local_SP.dtype,
                                   device=local_SP.device)  # ranks stacked along dim 0 (gloo and NCCL)
        if dp > 1:
            check_collective_device(local_SP, dp_group, "optimizer state gather")
            dist.all_gather_into_tensor(gathered_DSP, local_SP, group=dp_group)
        else:
            gathered_DSP.copy_(local_SP)
        full_SN = gathered_DSP.view(dp, *local_SP.shape).transpose(0, 1).reshape(len(local_SP), -1)
        for p in group:
            key = key_of.get(id(p))
            if key is None:
                continue
            offset = offsets[id(p)]
            rows = full_SN[:, offset:offset + p.numel()].reshape(len(local_SP), *p.shape).cpu()
            values[key] = rows[0].clone()
            optim.update({f"{key}/{n}": rows[1 + j].clone() for j, n in enumerate(names)})
    for key, p in params.items():  # not in the optimizer: LoRI's frozen A
        if key not in values:
            values[key] = p.detach().float().cpu().contiguous()
    return values, optim



def adam_step(engine) -> int:
    """The optimizer's step count (torch Adam keeps it per flat ZeRO group; all are equal)."""
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return int(float(state["step"]))
    return 0


def restore(engine, scheduler, params: dict[str, torch.Tensor], snap: EngineSnapshot) -> None:
    """A fresh engine (built over `params`) continues exactly where `snap` was taken: fp32
    masters, Adam moments, step count, LR schedule, engine counters.

    torch's Adam creates its state lazily at the first step, and ZeRO links the per-parameter
    fragments only then; we create the state (zeros, step count) the way that first step
    would and link it (private method: the one seam on DeepSpeed internals here). The fp32
    masters are set too: with bf16 the module copy the engine started from was rounded.
    `params` by logical key, taken after the engine was built: a bucket Parameter gets its
    members' values (its current value where a key has none) and moments (zeros where none)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    values, optim, optimizer_step, scheduler_state = snap.values, snap.optim, snap.optimizer_step, snap.scheduler
    base = engine.optimizer.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            base.state[flat].update(step=torch.tensor(float(optimizer_step), device="cpu"), exp_avg=torch.zeros_like(flat),
                                    exp_avg_sq=torch.zeros_like(flat))
    link_optimizer_state(engine)
    storage, home = _storage(params)
    members: dict[str, list[str]] = {}
    for key, name in home.items():
        members.setdefault(name, []).append(key)
    for name, p in storage.items():
        keys = members[name]
        if any(k in values for k in keys):
            full = p.detach().to(torch.float32, copy=True)
            for k in keys:
                if k in values:
                    slice_of(full, params[k], k).copy_(values[k])
            safe_set_full_fp32_param(p, full)
        for n in OPTIM_KEYS:
            if any(f"{k}/{n}" in optim for k in keys):
                full = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                for k in keys:
                    if f"{k}/{n}" in optim:
                        slice_of(full, params[k], k).copy_(optim[f"{k}/{n}"])
                safe_set_full_optimizer_state(p, full, n)
    if scheduler_state is not None:
        scheduler.load_state_dict(scheduler_state)
        # LambdaLR.load_state_dict restores its counter, not the optimizer's current lr.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    for k, v in snap.counters.items():
        setattr(engine, k, v)
    if "global_steps" in snap.counters:  # DeepSpeed's accumulation boundary is (micro_steps + 1) % gas == 0: a
        # resume at another world splits the global batch into another number of micro-steps
        engine.micro_steps = snap.counters["global_steps"] * engine.gradient_accumulation_steps()


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

