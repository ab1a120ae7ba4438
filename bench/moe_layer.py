"""Train-step throughput of moe_dist's expert layer against transformers grouped_mm + PEFT.

Shape (issue 2): OLMoE config, vocab 2048, hidden 256, 4 layers, 4 heads, 64 experts, top-8,
expert intermediate 128, batch 4 x 256, LoRA r=8 on q,k,v,o and every expert projection, full
step (forward, backward, AdamW). Single process, EP 1, CPU fp32 (or the GPU when present).
"Every expert projection" as the baseline defines it: PEFT's target_parameters puts one
adapter on each expert's fused gate_up weight and one on down, so moe_dist's headline
variants use lora.expert_targets=gate_up_proj,down_proj (same trainable parameters); the
variant with separate gate and up adapters (moe_dist's default) is reported beside them.
Variants are interleaved round-robin so machine noise hits them alike; the figure is each
variant's median tok/s over the baseline's median in the same run.

    python bench/moe_layer.py [--rounds 11] [--out bench/results/moe_layer.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_peft import BENCH_SHAPE, build_baseline, olmoe_config, random_batch, train_step  # noqa: E402

from moe_dist.models.convert import convert_model, trainable_params  # noqa: E402
from moe_dist.plan import AdapterPlan  # noqa: E402


PEFT_TARGETS = ("gate_up_proj", "down_proj")  # what the baseline's target_parameters adapts, per expert
SPLIT_TARGETS = ("gate_proj", "up_proj", "down_proj")


def build_moe_dist(experts_per_layer: int | None, targets: tuple[str, ...] = PEFT_TARGETS, seed: int = 0):
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(olmoe_config())
    L, E = BENCH_SHAPE["layers"], BENCH_SHAPE["experts"]
    if experts_per_layer == 0:
        chosen = {l: [] for l in range(L)}
    elif experts_per_layer is None:
        chosen = None
    else:  # a fixed spread of hot experts, like HELLoRA would pick
        chosen = {l: list(range(0, E, E // experts_per_layer))[:experts_per_layer] for l in range(L)}
    plan = AdapterPlan.uniform(range(L), E, 8, expert_projections=targets, attention_layers=range(L), experts=chosen)
    convert_model(model, plan)
    model.train()
    opt = torch.optim.AdamW(list(trainable_params(model).values()), lr=1e-4, fused=True)
    return model, opt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    ids = random_batch()
    tokens = ids.numel()
    variants = {
        "baseline_peft_grouped_mm": build_baseline(seed=0),
        "moe_dist_all_experts": build_moe_dist(None),
        "moe_dist_hot10": build_moe_dist(10),
        "moe_dist_all_experts_split_gate_up": build_moe_dist(None, SPLIT_TARGETS),
        "moe_dist_attention_only": build_moe_dist(0),
    }
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in variants.items()}
    for m, o in variants.values():  # warm-up
        train_step(m, o, ids)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (m, o) in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(m, o, ids)
            times[name].append((time.perf_counter() - t0) / args.steps)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    base = tps["baseline_peft_grouped_mm"]
    # Per-round ratios (baseline and variant measured back to back): their spread shows how
    # much of a figure is machine noise.
    per_round = {k: [b / t for b, t in zip(times["baseline_peft_grouped_mm"], v)] for k, v in times.items()}
    result = {
        "shape": BENCH_SHAPE,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "tokens_per_sec": tps,
        "speedup_per_round_min_max": {k: [min(r), max(r)] for k, r in per_round.items()},
        "trainable_params": trainable,
        "speedup_all_experts": tps["moe_dist_all_experts"] / base,
        "speedup_hot10": tps["moe_dist_hot10"] / base,
        "speedup_all_experts_split_gate_up": tps["moe_dist_all_experts_split_gate_up"] / base,
        "speedup_attention_only": tps["moe_dist_attention_only"] / base,
    }
    print(f"{'variant':<36}{'tok/s':>8}{'x baseline':>12}{'rounds min-max':>16}{'trainable':>12}")
    for k in variants:
        lo, hi = min(per_round[k]), max(per_round[k])
        print(f"{k:<36}{tps[k]:>8.0f}{tps[k] / base:>12.2f}{f'{lo:.2f}-{hi:.2f}':>16}{trainable[k]:>12,}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
