"""The DeepSpeed side of a run: its JSON config filled from ours, the optimizer, the LR schedule.

The ds_configs/*.json files hold what a user tunes per cluster (ZeRO stage, offload, comm
overlap); batch sizes, accumulation, clipping and precision come from the run config so
there is one source of truth. The optimizer is torch AdamW with DeepSpeed's MoE parameter
groups (so ZeRO reduces expert adapters over the expert-data-parallel group); it needs
`zero_allow_untested_optimizer`, and with optimizer offload `zero_force_ds_cpu_optimizer:
false` (DeepSpeedCPUAdam needs a C++ build at first use).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moe_dist.config import ConfigError, RunConfig
from moe_dist.optim import adamw


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def use_bf16(precision: str, on_gpu: bool, bf16_supported: bool) -> bool:
    """`train.precision`: auto is bf16 on a GPU that has it and fp32 elsewhere (fp32 on CPU
    is what the CPU path was tuned for); bf16 where it is not supported is an error."""
    if precision == "bf16" and not bf16_supported:
        raise ConfigError("train.precision: bf16 is not supported by this accelerator; use auto or fp32")
    return precision == "bf16" or (precision == "auto" and on_gpu and bf16_supported)


def deepspeed_config(cfg: RunConfig, bf16: bool) -> dict:
    try:
        ds = json.loads(Path(cfg.ds_config).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"ds_config {cfg.ds_config!r}: {exc}") from exc
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"ds_config {cfg.ds_config!r}: remove 'optimizer'/'scheduler'; moe_dist builds them "
                          "(train.lr, train.warmup_steps, ...)")
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds["bf16"] = {"enabled": bf16}
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) in (1, 2):
        # every parameter 16-byte aligned in ZeRO's flat buffer (DeepSpeed's default packs them
        # at any element offset): CUDA's grouped_mm reads adapter buckets in place from there
        zero.setdefault("parameter_alignment", True)
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)
    return ds


def build_engine(model: torch.nn.Module, cfg: RunConfig, bf16: bool):
    """(engine, lr_scheduler). The scheduler is stepped by the engine after each optimizer step."""
    import deepspeed

    optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay)
    t = cfg.train

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, t.warmup_steps, t.steps, t.min_lr_ratio))

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                   config=deepspeed_config(cfg, bf16))
    return engine, scheduler
