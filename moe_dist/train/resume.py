"""What a resumed run may change, and how a new learning rate takes effect.

A checkpoint fixes what its state means: the model, the method and its decisions, the
adapters' shapes and scaling, the data order and position. Keys outside FREE_ON_RESUME that
differ from the saved config are refused, listed with both values. Everything else applies
to the rest of the run; `train.lr` becomes the new peak with the schedule's position kept
(each param group's base LR scaled by new / saved, LoRI's stage-2 factor included).

The global batch (sequences per optimizer step) is fixed too: a resume at another world (an
elastic restart, a job moved to other nodes) splits the same global batch into micro-batches
and accumulation for its world (`batch_layout`), so the optimisation and the LR schedule stay
the ones the run started with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_dist.parallel.elastic import ElasticLaunch, check_global_batch, split_global_batch
from moe_dist.validation import ConfigError

FREE_ON_RESUME = ("output_dir", "cache_dir", "ep_size", "ds_config", "dist_timeout_s", "train.steps", "train.lr",
                  "train.micro_batch", "train.grad_accum",  # (the global batch is fixed: they only split it)
                  "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay", "train.grad_clip",
                  "train.log_every", "data.eval", "data.eval_split", "eval.", "checkpoint.", "export.",
                  "repartition.", "moe.", "kernels.", "faults.")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fixed_key_changes(saved_config: dict, cfg: Any) -> list[str]:
    """'key (saved X, given Y)' for every key the checkpoint fixes that `cfg` changes."""
    from moe_dist.config import config_from_dict

    # Through today's config classes, so older spellings (comma strings for lists) compare equal.
    saved, now = _flat(dataclasses.asdict(config_from_dict(saved_config))), _flat(dataclasses.asdict(cfg))
    free = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in FREE_ON_RESUME)  # noqa: E731
    return [f"{k} (saved {saved[k]!r}, given {now[k]!r})" for k in sorted(saved)
            if k in now and not free(k) and _norm(saved[k]) != _norm(now[k])]


def _norm(v: Any) -> Any:
    return [] if v == ["auto"] else v  # a list option's default spelled out ("targets: auto")


def check_resume_config(saved_config: dict, cfg: Any, path) -> float:
    """Raise on fixed keys changed; return the LR factor (new peak / saved peak)."""
    changed = fixed_key_changes(saved_config, cfg)
    if changed:
        raise ConfigError(f"checkpoint.resume: {path} was written with a different config; these keys are fixed by "
                          f"the checkpoint: {'; '.join(changed)}. Change them in a new run (new output_dir), or "
                          f"only change keys a resume may change: {', '.join(FREE_ON_RESUME)}")
    saved_lr = _flat(saved_config).get("train.lr")
    return cfg.train.lr / saved_lr if saved_lr else 1.0


def scale_schedule(scheduler_state: dict, factors: list[float], from_this_step: bool = True) -> dict:
    """A LambdaLR state with each param group's base LR scaled (position kept); with
    `from_this_step` the current LR too, else the factor shows from the next step on."""
    out = dict(scheduler_state)
    out["base_lrs"] = [lr * f for lr, f in zip(scheduler_state["base_lrs"], factors)]
    if from_this_step and "_last_lr" in scheduler_state:
        out["_last_lr"] = [lr * f for lr, f in zip(scheduler_state["_last_lr"], factors)]
    return out


def saved_global_batch(saved: dict) -> int:
    """Sequences per optimizer step of a checkpoint's run (older checkpoints: from its config
    and world)."""
    train = saved["config"].get("train", {})
    return train.get("global_batch") or train["micro_batch"] * train.get("grad_accum", 1) * saved["world_size"]


def with_saved_global_batch(saved: dict) -> dict:
    """The saved config with its global batch spelled out (what a resume compares against)."""
    config = dict(saved["config"])
    config["train"] = dict(config.get("train", {}), global_batch=saved_global_batch(saved))
    return config


def batch_layout(cfg: Any, world: int, saved: dict | None, launch: ElasticLaunch | None) -> Any:
    """`cfg` with train.global_batch, micro_batch and grad_accum as this world runs them: the
    configured global batch, else the checkpoint's, else micro_batch x grad_accum x world;
    split with the largest micro-batch <= train.micro_batch. Every world an elastic launch may
    restart at must split it exactly (checked now, named in the error)."""
    t = cfg.train
    global_batch = t.global_batch or (saved_global_batch(saved) if saved else t.micro_batch * t.grad_accum * world)
    worlds = sorted({world, *(launch.worlds() if launch else [])})
    where = launch.nodes_text() if launch and launch.worlds() else f"this launch (world {world})"
    check_global_batch(global_batch, worlds, where)
    micro, accum = split_global_batch(global_batch, world, t.micro_batch)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, global_batch=global_batch, micro_batch=micro,
                                                              grad_accum=accum))
