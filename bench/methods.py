"""Each routing-aware method on the embedded task against `lora`, in one run, in the papers'
terms: trainable parameters and adapter FLOPs per token (% of LoRA), training throughput
(ratio to LoRA), exact-match accuracy before/after. DMEP is also compared with uniform
LoRA-MoE (the same adapters, never pruned), its paper's baseline.

Every method runs the real entry point (`deepspeed --num_gpus N launch/train.py`) with its
tiny_*.yaml recipe, same steps, data and seed; the figures come from each run's summary.json.
Runs are sequential: throughput ratios carry the machine's noise between runs (reported as
is; rerun on a quiet machine). Writes bench/results/methods.json and prints a table.

    python bench/methods.py [--nprocs 2] [--steps 150] [--methods lora,hellora,...] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name -> (recipe, extra overrides)
    "lora": ("tiny_lora.yaml", []),
    "hellora": ("tiny_hellora.yaml", []),
    "hellori": ("tiny_hellori.yaml", []),
    "epng": ("tiny_epng.yaml", []),
    "lora_moe": ("tiny_dmep.yaml", ["dmep.prune_times=0"]),  # DMEP's baseline: uniform LoRA-MoE
    "dmep": ("tiny_dmep.yaml", []),
}


def run(name: str, nprocs: int, out: Path, overrides: list[str], port: int) -> dict:
    recipe, extra = RUNS[name]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port", str(port),
           str(ROOT / "launch" / "train.py"), "--recipe", str(ROOT / "launch" / "recipes" / recipe),
           f"output_dir={out / name}", "checkpoint.every=0", *extra, *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    summary["wall_s"] = round(time.time() - t0, 1)
    print(f"  {name}: done in {summary['wall_s']}s", flush=True)
    return summary


def table(results: dict) -> tuple[list[dict], str]:
    base = results["lora"]
    rows = []
    for name, s in results.items():
        ref = results["lora_moe"] if name == "dmep" and "lora_moe" in results else base
        rows.append({
            "method": name,
            "trainable_params": s["trainable_params"],
            "params_pct_of_lora": 100 * s["trainable_params"] / base["trainable_params"],
            "flops_pct_of_lora": 100 * s["adapter_flops_per_token"] / base["adapter_flops_per_token"],
            "tokens_per_sec": s["tokens_per_sec"],
            "throughput_vs_lora": s["tokens_per_sec"] / base["tokens_per_sec"],
            "params_vs_own_baseline_pct": 100 * s["trainable_params"] / ref["trainable_params"],
            "final_throughput_vs_own_baseline": s["tokens_per_sec_final"] / ref["tokens_per_sec_final"],
            "accuracy_before": s["accuracy_before"], "accuracy_after": s["accuracy_after"],
            "final_loss": s["final_loss"],
        })
    lines = ["| method | trainable params | % of LoRA | adapter FLOPs/token % of LoRA | tok/s vs LoRA | "
             "exact match before -> after |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        acc = f"{100 * r['accuracy_before']:.1f}% -> {100 * r['accuracy_after']:.1f}%"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['params_pct_of_lora']:.1f}% | "
                     f"{r['flops_pct_of_lora']:.1f}% | {r['throughput_vs_lora']:.2f}x | {acc} |")
    if "dmep" in results and "lora_moe" in results:
        d = next(r for r in rows if r["method"] == "dmep")
        lines.append(f"\nDMEP vs uniform LoRA-MoE: {100 - d['params_vs_own_baseline_pct']:.1f}% fewer trainable params, "
                     f"{d['final_throughput_vs_own_baseline']:.2f}x throughput after pruning (last quarter of steps)")
    return rows, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--methods", default=",".join(RUNS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "methods.json"))
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench_methods"))
    args, overrides = parser.parse_known_args()
    names = [n.strip() for n in args.methods.split(",")]
    if "lora" not in names:
        names.insert(0, "lora")
    results = {}
    for i, name in enumerate(names):
        results[name] = run(name, args.nprocs, Path(args.workdir), overrides, 29700 + i)
    rows, text = table(results)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"nprocs": args.nprocs, "overrides": overrides, "rows": rows, "summaries": results},
                              indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
