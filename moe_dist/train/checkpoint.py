"""Checkpoints that survive a changed placement, EP size or world size.

DeepSpeed's own expert checkpoints name files by EP rank and assume contiguous placement
(see shared/notes/deepspeed-0.19.8.md), so we write our own, keyed by logical adapter keys:

    output_dir/checkpoints/step-N/
        plan.json                       which adapters exist, their ranks
        adapters-rank{R}.safetensors    fp32 master values, logical keys, each key once
        optimizer-rank{R}.safetensors   `{key}/exp_avg`, `{key}/exp_avg_sq`, same writers
        rng-rank{R}.pt                  RNG states (restored when the world size matches)
        routing.safetensors             routing counters at save time
        trainer_state.json              step, scheduler, data position, world/EP, files

Full (un-partitioned) values come from ZeRO through deepspeed.utils' tensor-fragment API, a
collective over each parameter's data-parallel group. Base weights are never copied.
Atomic: all ranks write into `.tmp-step-N/`, then rank 0 writes trainer_state.json and renames
the directory; a crash at any point leaves the previous `step-*` directories untouched and
the partial one invisible (resume only considers `step-N` directories). Multi-node runs need
output_dir on a shared filesystem.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from moe_dist.parallel.groups import writes_canonical_copy

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


class ResumeError(RuntimeError):
    pass


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := STEP_DIR.match(d.name)) and (d / STATE_FILE).is_file()]
    return sorted(found)


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`""` -> None; `auto` -> newest complete checkpoint (or None: a fresh start); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(output_dir))
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ResumeError(f"checkpoint.resume: {resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return path


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


# ---- gather -------------------------------------------------------------------------------
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


def full_state(params: dict[str, torch.nn.Parameter], engine) -> tuple[dict, dict]:
    """Collective: (values, optimizer state) of every param, full and fp32, by logical key.

    With a ZeRO-1/2 engine: one all-gather per optimizer param group (`_zero_full_state`);
    otherwise DeepSpeed's per-parameter fragment API (`fragment_full_state`)."""
    fast = _zero_full_state(engine, params)
    return fast if fast is not None else fragment_full_state(params, engine)


def fragment_full_state(params: dict[str, torch.nn.Parameter], engine) -> tuple[dict, dict]:
    """Through DeepSpeed's public tensor-fragment API: one collective per parameter and
    state (~0.3 s for the embedded default's 450 adapter tensors on 2 CPU ranks)."""
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


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- save ---------------------------------------------------------------------------------
def save_checkpoint(output_dir: str | Path, step: int, engine, params: dict[str, torch.nn.Parameter], plan_json: str,
                    trainer_state: dict, routing: dict[str, torch.Tensor], keep: int,
                    masks: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. `masks` (LoRI's, by the
    key of their B) are saved beside the adapters as `{key}.mask`."""
    rank, world = _rank_world()
    root = checkpoint_root(output_dir)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        tmp.mkdir(parents=True)
    _barrier()
    values, optim = full_state(params, engine)
    mine = {k for k, p in params.items() if writes_canonical_copy(p)}
    if mine:
        tensors = {k: v for k, v in values.items() if k in mine}
        tensors.update({f"{k}.mask": m.detach().cpu().contiguous() for k, m in (masks or {}).items() if k in mine})
        save_file(tensors, str(tmp / f"adapters-rank{rank:05d}.safetensors"))
        opt_mine = {k: v for k, v in optim.items() if k.rsplit("/", 1)[0] in mine}
        if opt_mine:
            save_file(opt_mine, str(tmp / f"optimizer-rank{rank:05d}.safetensors"))
    torch.save(_rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    _barrier()
    if rank == 0:
        (tmp / "plan.json").write_text(plan_json)
        if routing:
            save_file({k: v.contiguous() for k, v in routing.items()}, str(tmp / "routing.safetensors"))
        state = dict(trainer_state, step=step, world_size=world)
        with open(tmp / STATE_FILE, "w") as f:  # written last: its presence marks completeness
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): swap, never delete first
            old = root / f".old-step-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        for _, stale in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


# ---- load ---------------------------------------------------------------------------------
def _key_index(path: Path, prefix: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for f in sorted(path.glob(f"{prefix}-rank*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            index.update({k: f for k in sf.keys()})
    return index


def _read(index: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(index[k], []).append(k)
    for f, ks in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in ks})
    return out


def load_adapter_values(path: Path, params: dict[str, torch.nn.Parameter]) -> int:
    """Copy saved values into this rank's params (before the engine is built, so ZeRO's fp32
    partitions start from them). Every param must be in the checkpoint."""
    index = _key_index(path, "adapters")
    missing = sorted(set(params) - set(index))  # (mask entries are extra keys, ignored here)
    if missing:
        raise ResumeError(f"checkpoint {path} lacks {len(missing)} adapter tensors this run needs, e.g. {missing[:3]}; "
                          "was it written with a different plan?")
    saved = _read(index, list(params))
    with torch.no_grad():
        for k, p in params.items():
            if saved[k].shape != p.shape:
                raise ResumeError(f"checkpoint {path}: {k} has shape {tuple(saved[k].shape)}, the model {tuple(p.shape)}")
            p.copy_(saved[k].to(p.dtype))
    return len(saved)


def load_masks(path: Path, masks: dict[str, torch.Tensor]) -> int:
    """LoRI masks saved with the adapters (absent before HELLoRI's stage 2: left as they are)."""
    index = _key_index(path, "adapters")
    present = [k for k in masks if f"{k}.mask" in index]
    saved = _read(index, [f"{k}.mask" for k in present])
    with torch.no_grad():
        for k in present:
            masks[k].copy_(saved[f"{k}.mask"])
    return len(present)


def adam_step(engine) -> int:
    """The optimizer's step count (torch Adam keeps it per flat ZeRO group; all are equal)."""
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return int(float(state["step"]))
    return 0


def restore_engine_state(engine, scheduler, params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor],
                         optim: dict[str, torch.Tensor], optimizer_step: int, scheduler_state: dict | None) -> None:
    """Put saved fp32 masters, Adam moments, step count and LR schedule into a fresh engine.

    torch's Adam creates its state lazily at the first step, and ZeRO links the per-parameter
    fragments only then; we create the state (zeros, step count) the way that first step
    would and link it (private method: the one seam on DeepSpeed internals here). The fp32
    masters are set too: with bf16 the module copy the engine started from was rounded."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = engine.optimizer.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            base.state[flat].update(step=torch.tensor(float(optimizer_step)), exp_avg=torch.zeros_like(flat),
                                    exp_avg_sq=torch.zeros_like(flat))
    link_optimizer_state(engine)
    for key, p in params.items():
        if key in values:
            safe_set_full_fp32_param(p, values[key].to(p.device, torch.float32))
        for name in OPTIM_KEYS:
            if f"{key}/{name}" in optim:
                safe_set_full_optimizer_state(p, optim[f"{key}/{name}"].to(p.device), name)
    if scheduler_state is not None:
        scheduler.load_state_dict(scheduler_state)
        # LambdaLR.load_state_dict restores its counter, not the optimizer's current lr.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr


def load_engine_state(path: Path, engine, scheduler, params: dict[str, torch.nn.Parameter]) -> int:
    """Resume: the checkpoint's masters, moments, step and schedule into the engine."""
    state = read_trainer_state(path)
    values = _read(_key_index(path, "adapters"), [k for k in params])
    index = _key_index(path, "optimizer")
    keys = [f"{k}/{n}" for k in params for n in OPTIM_KEYS]
    missing = [k for k in keys if k not in index]
    if missing:
        raise ResumeError(f"checkpoint {path} lacks optimizer state for {missing[:3]}")
    restore_engine_state(engine, scheduler, params, values, _read(index, keys), state["optimizer_step"],
                         state["scheduler"])
    return len(keys)


def load_rng_state(path: Path) -> bool:
    """Restore this rank's RNG if the checkpoint has one for it (same world size)."""
    rank, world = _rank_world()
    f = path / f"rng-rank{rank:05d}.pt"
    if read_trainer_state(path).get("world_size") != world or not f.is_file():
        return False
    _set_rng_state(torch.load(f, weights_only=False))
    return True
