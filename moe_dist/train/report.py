"""The run's closing summary as the console shows it (summary.json holds the same numbers), and
the adapter cost it reports."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from moe_dist.models.convert import adapter_params
from moe_dist.parallel.reduce import global_max, global_sum
from moe_dist.routing import experts_modules
from moe_dist.train.memory import frozen_bytes
from moe_dist.train.rebalance import expert_imbalance


def run_summary(tr, losses: list[float], times: list[float], tokens_per_step: int, before: dict | None,
                after: dict | None, final: Path | None) -> dict:
    """Collective (the loss, FLOPs and memory are all-reduced): summary.json of the Trainer `tr`."""
    cfg, r = tr.cfg, tr.routing_total
    flops = (adapter_flops_per_token(tr.model, tr.hf_config, r.load_share_LE(), r.layers, tr.world, tr.ep_size,
                                     tr.device) if r is not None else None)
    last = times[-max(1, len(times) // 4):]
    finite = [x for x in losses if math.isfinite(x)]  # skipped steps are counted, not averaged
    own = tr.memory.peak_gib()  # the steps' own memory (None: one step, or nothing to read), max over ranks
    peak = global_max(-1.0 if own is None else own, tr.device)
    run_losses = global_sum(sum(finite[-5:]) / max(1, len(finite[-5:])), tr.device) / tr.world
    return {
        "method": cfg.method, "model": cfg.model, "world_size": tr.world, "ep_size": tr.ep_size,
        "trainable_params": tr.trainable_total, "adapter_flops_per_token": flops,
        "expert_imbalance": expert_imbalance(tr.model, tr.plan, r, tr.ep_size),
        "steps": tr.step, "tokens_per_sec": tokens_per_step * len(times) / sum(times) if times else None,
        # after the structure changes have happened (prunes, growth): the last quarter
        "tokens_per_sec_final": tokens_per_step * len(last) / sum(last) if last else None,
        "tokens_per_step": tokens_per_step, "step_ends_s": tr.step_ends,  # everything in the loop
        "sequences_per_step": cfg.train.global_batch, "micro_batch": cfg.train.micro_batch,
        "grad_accum": cfg.train.grad_accum,
        "first_loss": finite[0] if finite else None, "final_loss": run_losses if finite else None,
        "skipped_steps": tr.guard.nonfinite_total, "activation_checkpointing": cfg.train.activation_checkpointing,
        "step_peak_memory_gib": peak if peak >= 0 else None,
        "frozen_bytes_per_rank": {k: int(global_max(v, tr.device)) for k, v in frozen_bytes(tr.model).items()},
        "accuracy_before": (before or {}).get("accuracy"), "accuracy_after": (after or {}).get("accuracy"),
        "eval_loss_before": (before or {}).get("loss"), "eval_loss_after": (after or {}).get("loss"),
        "eval_perplexity_after": (after or {}).get("perplexity"),
        "eval_samples": (after or {}).get("samples", []),
        "checkpoint": None if final is None else str(final), "output_dir": cfg.output_dir,
    }


def adapter_flops_per_token(model: nn.Module, hf_config, share_LE: torch.Tensor, layers: list[int], world: int,
                            ep_size: int, device: torch.device) -> float:
    """Collective: expected adapter FLOPs of one token under the measured routing load."""
    top_k = getattr(hf_config, "num_experts_per_tok", 1)
    mods = experts_modules(model)
    expert = sum(share_LE[i, e].item() * top_k * mods[layer].adapters.flops_per_token(e)
                 for i, layer in enumerate(layers) for e in mods[layer].local_experts)
    expert = global_sum(expert, device) / (world // ep_size)  # EDP replicas counted once
    # Attention LoRA and LoRA-MoE run on every token (LoRA-MoE computes all its experts).
    dense = sum(2 * p.numel() for k, p in adapter_params(model).items() if ".experts." not in k)
    return expert + dense


def format_summary(s: dict) -> str:
    acc = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    loss = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return "\n".join(line for line in [
        "=" * 60,
        f"moe_dist {s['method']} on {s['model']}: world {s['world_size']}, EP {s['ep_size']}, {s['steps']} steps",
        f"  loss            {s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s["final_loss"] is not None else "",
        f"  skipped steps   {s['skipped_steps']} (non-finite loss or gradient)" if s.get("skipped_steps") else "",
        f"  eval loss       {loss(s.get('eval_loss_before'))} before -> {loss(s.get('eval_loss_after'))} after "
        f"(perplexity {s['eval_perplexity_after']:.3g})" if s.get("eval_loss_after") is not None else "",
        f"  exact match     {acc(s['accuracy_before'])} before -> {acc(s['accuracy_after'])} after"
        if s.get("accuracy_after") is not None or s.get("eval_loss_after") is None else "",
        f"  trainable       {s['trainable_params']:,} params, "
        f"{(s['adapter_flops_per_token'] or 0) / 1e6:.3f} MFLOP/token in adapters",
        f"  throughput      {s['tokens_per_sec'] or 0:.0f} tokens/s",
        f"  step memory     {s['step_peak_memory_gib']:.2f} GiB peak over what step 1 left (max over ranks; activation "
        f"checkpointing {'on' if s.get('activation_checkpointing') else 'off'})"
        if s.get("step_peak_memory_gib") is not None else "",
        f"  frozen base     {s['frozen_bytes_per_rank']['expert'] / 2**20:,.1f} MiB experts + "
        f"{s['frozen_bytes_per_rank']['non_expert'] / 2**20:,.1f} MiB rest, as stored (max over ranks)"
        if s.get("frozen_bytes_per_rank") else "",
        f"  expert balance  max/mean per-rank cost {s['expert_imbalance']:.3f} over EP {s['ep_size']}"
        if s.get("expert_imbalance") is not None else "",
        f"  logs            {s['output_dir']} (summary.json, metrics.jsonl, tensorboard/)",
        f"  checkpoint      {s['checkpoint']}",
        "=" * 60] if line)
