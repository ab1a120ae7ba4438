"""Checkpoints that survive a changed placement, EP size or world size.

DeepSpeed's own expert checkpoints name files by EP rank and assume contiguous placement
(see shared/notes/deepspeed-0.19.8.md), so we write our own, keyed by logical adapter keys:

    output_dir/checkpoints/step-N/
        plan.json                       which adapters exist, their ranks
        adapters-rank{R}.safetensors    fp32 master values, logical keys, each key once
        optimizer-rank{R}.safetensors   `{key}/exp_avg`, `{key}/exp_avg_sq`, same writers
        rng-rank{R}.safetensors         RNG states (restored when the world size matches)
        routing.safetensors             routing counters at save time
        trainer_state.json              step, world/EP, placements, config, and each owner's
                                        state: engine (Adam step, LR schedule, counters),
                                        data position, method

Save and load are symmetric: the engine's state is an `EngineSnapshot` (moe_dist/train/
zero_state.py) both ways, every other owner gives and takes a JSON dict. Nothing is pickled:
tensors are safetensors, the rest JSON, so opening a checkpoint never runs code. Base weights
are never copied.
Atomic: all ranks write into `.tmp-step-N/`, then rank 0 writes trainer_state.json and renames
the directory; a crash at any point leaves the previous `step-*` directories untouched and
the partial one invisible (resume only considers `step-N` directories). Multi-node runs need
output_dir on a shared filesystem.
"""

from __future__ import annotations

import json
import math
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

from moe_dist.optim import OPTIM_KEYS
from moe_dist.train.zero_state import EngineSnapshot

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


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (a file and its reason), or None. Reads every JSON
    file and every safetensors header (a cut file fails its header's size check), no tensor."""
    for name in (STATE_FILE, "plan.json"):
        try:
            json.loads((path / name).read_text())
        except (OSError, ValueError) as exc:
            return f"{name}: {type(exc).__name__}: {exc}"
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except Exception as exc:  # SafetensorError (truncated, corrupt header), OSError
            return f"{f.name}: {type(exc).__name__}: {exc}"
    return None


def resolve_resume(resume: str, output_dir: str | Path, log=print, set_aside: bool = False) -> Path | None:
    """`""` -> None; `auto` -> the newest complete checkpoint that loads, skipping (and naming)
    any newer one that does not (or None: a fresh start); else that path, which must load.
    With `set_aside` (the run that resumes, once), a skipped one is renamed `.bad-step-N`: kept
    for a look, out of the way of resume and rotation."""
    if not resume:
        return None
    if resume == "auto":
        for _, path in reversed(complete_checkpoints(checkpoint_root(output_dir))):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log(f"checkpoint.resume=auto: skipping {path}: {problem}")
            if set_aside:
                os.rename(path, path.with_name(f".bad-{path.name}"))
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ResumeError(f"checkpoint.resume: {resume!r} is not a complete checkpoint (no {STATE_FILE})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ResumeError(f"checkpoint.resume: {path}: {problem}")
    return path


def agreed_resume_path(resume: str, output_dir: str | Path, log=print) -> Path | None:
    """Collective: rank 0 picks the checkpoint (setting unreadable ones aside), every rank
    takes its pick, so no two ranks can resume from different steps."""
    rank, _ = _rank_world()
    found: list = [None]
    if rank == 0:
        try:
            path = resolve_resume(resume, output_dir, log, set_aside=True)
            found = [("ok", None if path is None else str(path))]
        except ResumeError as exc:
            found = [("error", str(exc))]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    kind, value = found[0]
    if kind == "error":
        raise ResumeError(value)
    return None if value is None else Path(value)


def _finite_loss(path: Path) -> bool:
    try:
        loss = json.loads((path / STATE_FILE).read_text()).get("loss")
    except (OSError, ValueError):
        return False
    return loss is not None and math.isfinite(loss)


def rotate(root: Path, keep: int, written: Path) -> None:
    """Keep the newest `keep` complete checkpoints, the one just `written` (a run resumed from
    an older step may sit below newer ones), and always the newest one whose loss was finite
    (a diverged stretch never rotates away the last good state)."""
    found = complete_checkpoints(root)
    good = next((path for _, path in reversed(found) if _finite_loss(path)), None)
    for _, stale in found[:-keep]:
        if stale not in (good, written):
            shutil.rmtree(stale, ignore_errors=True)


def read_trainer_state(path: Path) -> dict:
    """The state file, in today's layout: checkpoints written before each owner had its own
    entry (Adam step and schedule at the top level, `data_position`, a method's `importance_LE`)
    are read as if written now."""
    state = json.loads((path / STATE_FILE).read_text())
    if "engine" not in state and "optimizer_step" in state:
        state["engine"] = {"optimizer_step": state.pop("optimizer_step"), "scheduler": state.pop("scheduler", None),
                           "counters": {}}
    if "data" not in state and "data_position" in state:
        state["data"] = state.pop("data_position")
    if "method_state" not in state and "importance_LE" in state:
        state["method_state"] = {"importance_LE": state.pop("importance_LE")}
    return state


# ---- RNG (safetensors + JSON, no pickle) --------------------------------------------------
def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
               "python": torch.tensor(mt, dtype=torch.int64, device="cpu")}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python": [version, gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, {k: json.dumps(v) for k, v in meta.items()}


def _set_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- save ---------------------------------------------------------------------------------
def save_checkpoint(output_dir: str | Path, step: int, engine: EngineSnapshot, writes: set[str], plan_json: str,
                    owners: dict[str, dict], routing: dict[str, torch.Tensor], keep: int,
                    masks: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it (after `zero_state.snapshot`, itself a collective).
    `writes`: the keys this rank writes (each key is written by one rank); `owners`: every
    other owner's state dict (JSON), stored under its name. `masks` (LoRI's, by the key of
    their B) are saved beside the adapters as `{key}.mask`. Returns the final directory."""
    rank, world = _rank_world()
    root = checkpoint_root(output_dir)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        tmp.mkdir(parents=True)
    _barrier()
    mine = writes
    if mine:
        tensors = {k: v for k, v in engine.values.items() if k in mine}
        tensors.update({f"{k}.mask": m.detach().cpu().contiguous() for k, m in (masks or {}).items() if k in mine})
        save_file(tensors, str(tmp / f"adapters-rank{rank:05d}.safetensors"))
        opt_mine = {k: v for k, v in engine.optim.items() if k.rsplit("/", 1)[0] in mine}
        if opt_mine:
            save_file(opt_mine, str(tmp / f"optimizer-rank{rank:05d}.safetensors"))
    rng, rng_meta = _rng_tensors()
    save_file(rng, str(tmp / f"rng-rank{rank:05d}.safetensors"), metadata=rng_meta)
    _barrier()
    if rank == 0:
        (tmp / "plan.json").write_text(plan_json)
        if routing:
            save_file({k: v.contiguous() for k, v in routing.items()}, str(tmp / "routing.safetensors"))
        state = dict(owners, step=step, world_size=world, engine=engine.meta())
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
        rotate(root, keep, final)
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


def _read_values(path: Path, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The saved values of `params`; every one must be in the checkpoint, at its shape."""
    index = _key_index(path, "adapters")
    missing = sorted(set(params) - set(index))  # (mask entries are extra keys, ignored here)
    if missing:
        raise ResumeError(f"checkpoint {path} lacks {len(missing)} adapter tensors this run needs, e.g. {missing[:3]}; "
                          "was it written with a different plan?")
    saved = _read(index, list(params))
    for k, p in params.items():
        if saved[k].shape != p.shape:
            raise ResumeError(f"checkpoint {path}: {k} has shape {tuple(saved[k].shape)}, the model {tuple(p.shape)}")
    return saved


def load_adapter_values(path: Path, params: dict[str, torch.nn.Parameter]) -> int:
    """Copy saved values into `params` (evaluation of a checkpoint, without an engine)."""
    saved = _read_values(path, params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(p.dtype))
    return len(saved)


def load_masks(path: Path, masks: dict[str, torch.Tensor]) -> int:
    """LoRI masks saved with the adapters (absent before masks were taken: left as they are)."""
    index = _key_index(path, "adapters")
    present = [k for k in masks if f"{k}.mask" in index]
    saved = _read(index, [f"{k}.mask" for k in present])
    with torch.no_grad():
        for k in present:
            masks[k].copy_(saved[f"{k}.mask"])
    return len(present)


def load_engine_snapshot(path: Path, params: dict[str, torch.nn.Parameter]) -> EngineSnapshot:
    """This rank's part of the saved engine state: values and moments of `params` (every one
    must be in the checkpoint, at its shape), Adam step, schedule, counters."""
    values = _read_values(path, params)
    trained = [k for k, p in params.items() if p.requires_grad]
    index = _key_index(path, "optimizer")
    keys = [f"{k}/{n}" for k in trained for n in OPTIM_KEYS]
    missing = [k for k in keys if k not in index]
    if missing:
        raise ResumeError(f"checkpoint {path} lacks optimizer state for {missing[:3]}")
    meta = read_trainer_state(path)["engine"]
    return EngineSnapshot(values, _read(index, keys), meta["optimizer_step"], meta["scheduler"],
                          meta.get("counters", {}))


def load_rng_state(path: Path) -> bool:
    """Restore this rank's RNG if the checkpoint has one for it (same world size)."""
    rank, world = _rank_world()
    f = path / f"rng-rank{rank:05d}.safetensors"
    if read_trainer_state(path).get("world_size") != world or not f.is_file():
        return False
    with safe_open(str(f), framework="pt") as sf:
        _set_rng({k: sf.get_tensor(k) for k in sf.keys()}, sf.metadata())
    return True


def load_routing(path: Path):
    """The routing counters the run had measured when it saved (RoutingStats), or None."""
    from moe_dist.routing import RoutingStats

    f = path / "routing.safetensors"
    if not f.is_file():
        return None
    with safe_open(str(f), framework="pt") as sf:
        t = {k: sf.get_tensor(k) for k in sf.keys()}
    return RoutingStats([int(x) for x in t["layers"].tolist()], t["tokens_LE"], t["mass_LE"])
