"""Where a distributed training step's time goes: phase times and torch.profiler's top ops,
for moe_dist's trainer or the HF + PEFT + DeepSpeed alternative (bench/e2e_baseline.py).

    deepspeed --num_gpus 2 bench/profile_step.py moe_dist [key=value ...]   (tiny_lora recipe overrides)
    deepspeed --num_gpus 2 bench/profile_step.py baseline --model DIR [--seq-len 128 --micro-batch 8]

Rank 0 prints, over the profiled steps, the mean time of each phase (data, forward, backward,
ZeRO step, the trainer's per-step checks) and the ops with the most self CPU time.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import launch.train  # noqa: E402,F401  (first: it sets OMP_NUM_THREADS before torch loads)

import torch  # noqa: E402
from torch.profiler import record_function

WARMUP, PROFILED = 10, 5


def timed_step(engine, batch_fn, after_fn) -> list[float]:
    """Seconds of each phase of one step: data, forward, backward, ZeRO step, per-step checks."""
    t = [time.perf_counter()]
    batch = batch_fn()
    t.append(time.perf_counter())
    loss = engine(**batch, use_cache=False).loss
    t.append(time.perf_counter())
    with record_function("phase:backward"):
        engine.backward(loss)
    t.append(time.perf_counter())
    with record_function("phase:zero_step"):
        engine.step()
    t.append(time.perf_counter())
    after_fn(loss)
    t.append(time.perf_counter())
    return [b - a for a, b in zip(t, t[1:])]


def moe_dist_step_fns(overrides: list[str]):
    """Step phases of a moe_dist Trainer built as launch/train.py builds it, and a function
    giving the rows its dispatchers sent to other ranks so far."""
    from launch.train import parse
    from moe_dist.train.trainer import Trainer

    cfg = parse(["--recipe", str(ROOT / "launch/recipes/tiny_lora.yaml"), "data.eval=", "export.formats=[]",
                 "output_dir=bench/out/profile_step", *overrides])
    from moe_dist.parallel.device import init_distributed

    device = init_distributed(cfg.dist_timeout_s)
    torch.manual_seed(cfg.seed)
    tr = Trainer(cfg, device, bf16=False)
    tr.setup()

    def after(loss):
        tr.step += 1
        tr.after_step(loss.item())
        tr.decide()  # as Trainer.run: method decisions and the EP rebalance (every 10 steps in the recipe)

    def phases():
        return timed_step(tr.ds.engine, lambda: {k: v.to(tr.device) for k, v in tr.batches.next_batch().items()},
                          after)

    def rows_sent() -> dict[str, int]:
        from moe_dist.routing import experts_modules

        out = {"pairs": 0, "slots": 0, "hidden": tr.hf_config.hidden_size, "top_k": tr.hf_config.num_experts_per_tok}
        for mod in experts_modules(tr.model).values():
            for k, v in getattr(mod.dispatcher, "rows_sent", {}).items():
                out[k] += v
        return out

    return phases, rows_sent


def baseline_step_fns(argv: list[str]):
    import deepspeed
    import json
    from e2e_baseline import ATTN_TARGETS, EXPERT_TARGETS, packed_batches
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    args, _ = ap.parse_known_args(argv)
    from moe_dist.parallel.device import select_device

    select_device()  # this rank's accelerator before the process group, as launch/train.py
    deepspeed.init_distributed(verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, experts_implementation="grouped_mm")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ATTN_TARGETS,
                                             target_parameters=EXPERT_TARGETS))
    model.train()  # from_pretrained gives eval mode: e2e_baseline.py trains in train mode
    ds = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_clipping=1.0,
              zero_allow_untested_optimizer=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    batches = packed_batches(args.model, args.seq_len, args.micro_batch, rank, world, 0)

    def phases():
        return timed_step(engine, batches.next_batch, lambda loss: loss.item())

    return phases, None


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    system, rest = args[0], args[1:]
    phases, rows_sent = moe_dist_step_fns(rest) if system == "moe_dist" else baseline_step_fns(rest)
    for _ in range(WARMUP):
        phases()
    before = rows_sent() if rows_sent else None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    times = [phases() for _ in range(PROFILED)]
    print(f"rank {torch.distributed.get_rank()}: {(time.perf_counter() - t0) / PROFILED * 1000:.1f} ms per step "
          f"unprofiled, minor page faults per step "
          f"{(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / PROFILED:.0f}", flush=True)
    if before is not None and before["slots"]:
        after = rows_sent()
        per_step = {k: (after[k] - before[k]) / PROFILED for k in ("pairs", "slots")}
        # a row crosses twice forward (out and back) and twice backward (the mirrors), fp32 here;
        # a pair also carries 2K floats of slot metadata (local expert, gate) out, and their gradient back
        D, K = after["hidden"], after["top_k"]
        mib = {"pairs": per_step["pairs"] * (4 * D + 4 * K) * 4 / 2**20, "slots": per_step["slots"] * 4 * D * 4 / 2**20}
        print(f"rank {torch.distributed.get_rank()}: rows sent to other ranks per step: {per_step['pairs']:.0f} "
              f"(one per token and rank) vs {per_step['slots']:.0f} (one per routed slot): all-to-all volume "
              f"{mib['pairs']:.2f} vs {mib['slots']:.2f} MiB per step", flush=True)
    if os.environ.get("CPROFILE"):  # Python-level view: where the interpreter spends the step
        import cProfile
        import pstats

        with cProfile.Profile() as cp:
            for _ in range(PROFILED):
                phases()
        if torch.distributed.get_rank() == int(os.environ.get("PROFILE_RANK", "0")):
            pstats.Stats(cp).sort_stats(os.environ["CPROFILE"]).print_stats(int(os.environ.get("ROWS", "30")))
        return
    from torch.profiler import ProfilerActivity, profile

    shapes = bool(os.environ.get("SHAPES"))  # group the op table by input shapes too
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for _ in range(PROFILED):
            phases()
    names = ["data", "forward", "backward", "zero step", "per-step checks"]
    mean = [sum(c) / len(c) * 1000 for c in zip(*times)]
    print(f"\n{system} rank {torch.distributed.get_rank()}: threads {torch.get_num_threads()}, mean ms per step "
          f"{sum(mean):.1f}: " + ", ".join(f"{n} {m:.1f}" for n, m in zip(names, mean)), flush=True)
    if torch.distributed.get_rank() == 0:
        print(prof.key_averages(group_by_input_shape=shapes).table(sort_by="self_cpu_time_total",
                                                                   row_limit=int(os.environ.get("ROWS", "30"))))
        if os.environ.get("TRACE"):
            prof.export_chrome_trace(os.environ["TRACE"])


if __name__ == "__main__":
    main()
