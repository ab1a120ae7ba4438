"""Train-step throughput of moe_dist's expert layer against transformers grouped_mm + PEFT.

Shape (issue 2): OLMoE config, vocab 2048, hidden 256, 4 layers, 4 heads, 64 experts, top-8,
expert intermediate 128, batch 4 x 256, LoRA r=8 on q,k,v,o and every expert projection, full
step (forward, backward, AdamW). Single process, EP 1, CPU fp32 (or the GPU when present).
"Every expert projection" as the baseline defines it: PEFT's target_parameters puts one
adapter on each expert's fused gate_up weight and one on down, so moe_dist's headline
variants use lora.expert_targets=gate_up_proj,down_proj (same trainable parameters); the
variant with separate gate and up adapters (moe_dist's default) is reported beside them, and
so is the headline variant on the per-projection loop kernel (`moe.kernel=loop`, the CPU
default before the fused expert MLP).
Variants are interleaved round-robin so machine noise hits them alike; the figure is each
variant's median tok/s over the baseline's median in the same run.

    python bench/moe_layer.py [--rounds 11] [--out bench/results/moe_layer.json]

Options for other precisions and devices (bench/gpu_check.sh runs `--dtype bf16 --device
cuda`): `--dtype bf16` puts both systems' frozen base in bf16 (adapters and AdamW stay fp32,
as each trains in bf16: PEFT keeps its adapters fp32, moe_dist's engine keeps fp32 masters);
`--device cuda` moves both there and synchronises before each clock read; `--variants`,
`--batch`, `--seq`, `--warmup` shrink a run (a smoke test). The defaults are the CPU fp32
figures above.
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

from moe_dist.models.convert import convert_model  # noqa: E402
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
    # the Parameters (expert adapters are stored per rank bucket; trainable_params gives views by key)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    return model, opt


def with_kernel(built, kernel: str):
    """A built moe_dist variant with every expert layer's kernel forced (moe.kernel)."""
    from moe_dist.moe.experts import ExpertParallelExperts

    model, opt = built
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            m.set_kernel(kernel)
    return model, opt


BASELINE = "baseline_peft_grouped_mm"
VARIANTS = {  # name -> builder; the baseline is always built (every figure is relative to it)
    BASELINE: lambda: build_baseline(seed=0),
    "moe_dist_all_experts": lambda: build_moe_dist(None),
    "moe_dist_hot10": lambda: build_moe_dist(10),
    "moe_dist_all_experts_split_gate_up": lambda: build_moe_dist(None, SPLIT_TARGETS),
    "moe_dist_attention_only": lambda: build_moe_dist(0),
    # the CPU default is the fused expert MLP; the per-projection loop kernel it replaced, same targets
    "moe_dist_all_experts_loop_kernel": lambda: with_kernel(build_moe_dist(None), "loop"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """On `device`, the frozen parameters in `dtype`, trainable ones (adapters) left fp32:
    the same treatment for both systems. In place: the optimizer built with the model keeps
    the same parameter objects (its state is created at the first step)."""
    model.to(device)
    if dtype != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer.json"))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="frozen base weights' dtype")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (the baseline always runs)")
    ap.add_argument("--batch", type=int, default=BENCH_SHAPE["batch"])
    ap.add_argument("--seq", type=int, default=BENCH_SHAPE["seq"])
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    ids = random_batch()[: args.batch, : args.seq].to(device)
    tokens = ids.numel()
    names = [n for n in VARIANTS if n == BASELINE or n in args.variants.split(",")]
    variants = {}
    for name in names:
        model, opt = VARIANTS[name]()
        variants[name] = (place(model, device, dtype), opt)
        stray = [p.device for g in opt.param_groups for p in g["params"] if p.device.type != device.type]
        assert not stray, f"{name}: optimizer parameters left on {stray[0]} (the move replaced them)"

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the queued kernels are part of the step
        return time.perf_counter()

    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in variants.items()}
    for m, o in variants.values():  # warm-up
        for _ in range(args.warmup):
            train_step(m, o, ids)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (m, o) in variants.items():
            t0 = clock()
            for _ in range(args.steps):
                train_step(m, o, ids)
            times[name].append((clock() - t0) / args.steps)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    base = tps[BASELINE]
    # Per-round ratios (baseline and variant measured back to back): their spread shows how
    # much of a figure is machine noise.
    per_round = {k: [b / t for b, t in zip(times[BASELINE], v)] for k, v in times.items()}
    shape = BENCH_SHAPE if (args.batch, args.seq) == (BENCH_SHAPE["batch"], BENCH_SHAPE["seq"]) else \
        dict(BENCH_SHAPE, batch=ids.shape[0], seq=ids.shape[1])
    result = {
        "shape": shape,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "tokens_per_sec": tps,
        "speedup_per_round_min_max": {k: [min(r), max(r)] for k, r in per_round.items()},
        "trainable_params": trainable,
    }
    for key, name in (("speedup_all_experts", "moe_dist_all_experts"), ("speedup_hot10", "moe_dist_hot10"),
                      ("speedup_all_experts_split_gate_up", "moe_dist_all_experts_split_gate_up"),
                      ("speedup_attention_only", "moe_dist_attention_only"),
                      ("speedup_all_experts_loop_kernel", "moe_dist_all_experts_loop_kernel")):
        if name in tps:
            result[key] = tps[name] / base
    if (args.dtype, args.device) != ("fp32", "cpu"):  # (the default run's file keeps its old fields)
        result.update(dtype=args.dtype, steps_per_round=args.steps, torch=torch.__version__,
                      device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    print(f"{'variant':<36}{'tok/s':>8}{'x baseline':>12}{'rounds min-max':>16}{'trainable':>12}")
    for k in variants:
        lo, hi = min(per_round[k]), max(per_round[k])
        print(f"{k:<36}{tps[k]:>8.0f}{tps[k] / base:>12.2f}{f'{lo:.2f}-{hi:.2f}':>16}{trainable[k]:>12,}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
