"""The routing-aware methods against LoRA in the papers' terms, over seeds: exact match (mean ±
std), trainable parameters and adapter FLOPs per token (% of LoRA), training throughput (ratio
to LoRA), wall time. DMEP is also compared with uniform LoRA-MoE (`lora_moe`: the same adapters,
never pruned), its paper's baseline.

Accuracy comes from the hard embedded task (`embedded:arithmetic-hard`: 3-5 steps and a
distractor, on which LoRA ends below the ceiling, so a method can be better or worse than it);
every seed fine-tunes the same embedded base model (seeds change adapter init and data order,
not the base). Throughput and FLOP ratios on the embedded model say little about real models
(attention and the LM head dominate its step), so with `--second-base` every method also runs
once on a second base of OLMoE's expert proportions (bench/wide_base.py: hidden 256, 64 experts
top-8, pre-trained like the embedded one; no accuracy) and its ratios are reported beside.

Every run is the real entry point (`deepspeed --num_gpus N launch/train.py`) with the method's
tiny_*.yaml recipe; figures come from each run's summary.json. Runs are sequential, so
throughput ratios carry the machine's noise: each is the median over seeds of the same-seed
ratio (per-seed ratios in the JSON). Writes
bench/results/methods.json (and methods_accuracy.png), prints a table with the papers' claims.

    python bench/methods.py                 # hard task, seeds 0,1,2, + --second-base
    python bench/methods.py --quick         # one seed on today's task (the old bench)
    python bench/methods.py --methods lora,hellora --seeds 0,1 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
TASKS = {
    "base": ["data.train=embedded:arithmetic", "data.eval=embedded:arithmetic"],
    "hard": ["data.train=embedded:arithmetic-hard", "data.eval=embedded:arithmetic-hard", "eval.max_new_tokens=64",
             "train.steps=450"],
}
# The hard task runs 450 steps: LoRA's loss sits on a plateau and drops at a seed-dependent
# step; on a holdout of the train split 300 steps gave 22.5 / 59.0% and 600 steps 84.0 / 67.5%
# (seeds 0 / 2; bench/results/hard_task_calibration.json). Each method's schedule scales by 1.5.
HARD_SCHEDULES = {
    "hellori": ["hellori.stage1_steps=150"],
    "epng": ["epng.warmup_steps=90", "epng.interval=90", "epng.stop_step=361"],
    "dmep": ["dmep.prune_start=120", "dmep.prune_interval=90"],
}
# The second base: throughput only, the methods' schedules scaled to 120 steps.
SECOND_BASE = ["train.steps=120", "data.eval=", "train.micro_batch=4", "data.seq_len=256",
               "epng.warmup_steps=30", "epng.interval=30", "epng.stop_step=91", "dmep.prune_start=40",
               "dmep.prune_interval=30", "hellori.stage1_steps=50"]
PAPER_CLAIMS = {  # ../shared/seeds/ summaries (OLMoE and the papers' own benchmarks)
    "hellora": "15.7% of LoRA's params, -38.7% adapter FLOPs, 1.9x throughput, +9.2% accuracy (OLMoE)",
    "hellori": "competitive with LoRA at extreme parameter budgets (frozen A, 90% sparse B)",
    "epng": "better than LoRA at the same trainable-parameter budget",
    "lora_moe": "(DMEP's baseline)",
    "dmep": "35-43% fewer params than uniform LoRA-MoE, ~10% more throughput, accuracy matched",
}


def run(name: str, nprocs: int, out: Path, overrides: list[str], port: int, reuse: bool = False) -> dict:
    """One method's run through the real entry point -> its summary.json (+ wall_s). With
    `reuse`, a finished run in `out` (from an earlier, interrupted bench) is read back."""
    recipe, extra = RUNS[name]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs)]
    train = [str(ROOT / "launch" / "train.py"), "--recipe", str(ROOT / "launch" / "recipes" / recipe),
             f"output_dir={out}", "checkpoint.every=0", "export.formats=[]", *extra, *overrides]
    cmd = launcher + train  # what a reused run must match (the port is free to differ)
    done = out / "bench_run.json"
    if reuse and done.exists() and json.loads(done.read_text()).get("bench_cmd") == cmd[1:]:
        summary = json.loads(done.read_text())
        print(f"  {out.relative_to(out.parent.parent)}: reused ({summary['wall_s']}s, exact match "
              f"{summary['accuracy_after']})", flush=True)
        return summary
    t0 = time.time()
    proc = subprocess.run(launcher + ["--master_port", str(port)] + train, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["bench_cmd"] = cmd[1:]
    done.write_text(json.dumps(summary))
    print(f"  {out.relative_to(out.parent.parent)}: {summary['wall_s']}s, exact match "
          f"{summary['accuracy_after']}, {summary['tokens_per_sec']:.0f} tok/s", flush=True)
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: dict[str, list[dict]], second: dict[str, dict] | None) -> list[dict]:
    """One row per method: over seeds (paired with LoRA's run of the same seed for ratios)."""
    lora = runs["lora"]
    rows = []
    for name, per_seed in runs.items():
        ref = runs["lora_moe"] if name == "dmep" and "lora_moe" in runs else lora
        acc = [s["accuracy_after"] for s in per_seed if s["accuracy_after"] is not None]
        pairs = list(zip(per_seed, lora))
        row = {
            "method": name, "seeds": len(per_seed), "claim": PAPER_CLAIMS.get(name, "(the reference)"),
            "exact_match_mean": _mean_std(acc)[0] if acc else None, "exact_match_std": _mean_std(acc)[1] if acc else None,
            "exact_match_per_seed": acc,
            "final_loss_mean": _mean_std([s["final_loss"] for s in per_seed])[0],
            "final_loss_std": _mean_std([s["final_loss"] for s in per_seed])[1],
            "trainable_params": statistics.fmean(s["trainable_params"] for s in per_seed),
            "params_pct_of_lora": 100 * statistics.fmean(s["trainable_params"] / b["trainable_params"] for s, b in pairs),
            "flops_pct_of_lora": 100 * statistics.fmean(s["adapter_flops_per_token"] / b["adapter_flops_per_token"]
                                                        for s, b in pairs),
            # median over seeds of the same-seed ratio: one run slowed by a neighbour moves it least
            "throughput_vs_lora": statistics.median(s["tokens_per_sec"] / b["tokens_per_sec"] for s, b in pairs),
            "throughput_vs_lora_per_seed": [s["tokens_per_sec"] / b["tokens_per_sec"] for s, b in pairs],
            "wall_s_mean": statistics.fmean(s["wall_s"] for s in per_seed),
            "params_vs_own_baseline_pct": 100 * statistics.fmean(
                s["trainable_params"] / r["trainable_params"] for s, r in zip(per_seed, ref)),
            "final_throughput_vs_own_baseline": statistics.median(
                s["tokens_per_sec_final"] / r["tokens_per_sec_final"] for s, r in zip(per_seed, ref)),
        }
        if second and name in second:
            s2, b2 = second[name], second["lora"]
            r2 = second.get("lora_moe", b2) if name == "dmep" else b2
            row["second_base"] = {
                "flops_pct_of_lora": 100 * s2["adapter_flops_per_token"] / b2["adapter_flops_per_token"],
                "params_pct_of_lora": 100 * s2["trainable_params"] / b2["trainable_params"],
                "throughput_vs_lora": s2["tokens_per_sec_final"] / b2["tokens_per_sec_final"],
                "throughput_vs_own_baseline": s2["tokens_per_sec_final"] / r2["tokens_per_sec_final"],
                "tokens_per_sec_final": s2["tokens_per_sec_final"]}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    second = any("second_base" in r for r in rows)
    head = ("| method | exact match (mean ± std) | final train loss | params % of LoRA | adapter FLOPs % | tok/s vs LoRA "
            "| wall s |")
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if second:
        head += " wide base: FLOPs % / tok/s vs LoRA |"
        rule += "---:|"
    lines = [head + " paper's claim |", rule + "---|"]
    for r in rows:
        acc = "n/a" if r["exact_match_mean"] is None else \
            f"{100 * r['exact_match_mean']:.1f} ± {100 * r['exact_match_std']:.1f}% ({r['seeds']} seeds)"
        line = (f"| {r['method']} | {acc} | {r['final_loss_mean']:.3f} ± {r['final_loss_std']:.3f} | "
                f"{r['params_pct_of_lora']:.1f}% | {r['flops_pct_of_lora']:.1f}% | {r['throughput_vs_lora']:.2f}x | "
                f"{r['wall_s_mean']:.0f} |")
        if second:
            sb = r.get("second_base")
            line += f" {sb['flops_pct_of_lora']:.1f}% / {sb['throughput_vs_lora']:.2f}x |" if sb else " |"
        lines.append(line + f" {r['claim']} |")
    d = next((r for r in rows if r["method"] == "dmep"), None)
    if d is not None and any(r["method"] == "lora_moe" for r in rows):
        lines.append(f"\nDMEP vs uniform LoRA-MoE: {100 - d['params_vs_own_baseline_pct']:.1f}% fewer trainable params, "
                     f"{d['final_throughput_vs_own_baseline']:.2f}x throughput after pruning (last quarter of steps)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Exact match against trainable params and against adapter FLOPs (% of LoRA): each seed a
    small dot, the mean with std error bars; LoRA's mean ± std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110, sharey=True)
    lora = next((r for r in rows if r["method"] == "lora" and r["exact_match_mean"] is not None), None)
    for ax, key, label in ((axes[0], "params_pct_of_lora", "trainable parameters (% of LoRA)"),
                           (axes[1], "flops_pct_of_lora", "adapter FLOPs per token (% of LoRA)")):
        if lora is not None:
            m, sd = 100 * lora["exact_match_mean"], 100 * lora["exact_match_std"]
            ax.axhspan(m - sd, m + sd, color="C0", alpha=0.12, label="LoRA mean ± std")
        for i, r in enumerate(rows):
            if r["exact_match_mean"] is None:
                continue
            color = f"C{i}"
            ax.scatter([r[key]] * len(r["exact_match_per_seed"]), [100 * a for a in r["exact_match_per_seed"]],
                       s=12, color=color, alpha=0.5)
            ax.errorbar(r[key], 100 * r["exact_match_mean"], yerr=100 * r["exact_match_std"], fmt="o", capsize=4,
                        color=color)
            ax.annotate(r["method"], (r[key], 100 * r["exact_match_mean"]), textcoords="offset points", xytext=(7, 4))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([10, 20, 50, 100, 200, 300]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match (%): seeds (dots), mean ± std")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("methods on the hard embedded task (embedded:arithmetic-hard, 2 CPU ranks, EP 2)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--methods", default=",".join(RUNS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--task", choices=sorted(TASKS), default="hard")
    parser.add_argument("--quick", action="store_true", help="one seed on today's (base) task, no second base")
    parser.add_argument("--second-base", action=argparse.BooleanOptionalAction, default=None,
                        help="also time every method on the 64-expert bench shape (default: on unless --quick)")
    parser.add_argument("--out", default=None, help="default bench/results/methods.json (--quick: methods_quick.json)")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench_methods"))
    parser.add_argument("--reuse", action="store_true", help="read back runs an interrupted bench finished")
    args, overrides = parser.parse_known_args()
    if args.quick:
        args.seeds, args.task = "0", "base"
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("methods_quick.json" if args.quick else "methods.json"))
    second_base = (not args.quick) if args.second_base is None else args.second_base
    names = [n.strip() for n in args.methods.split(",")]
    if "lora" not in names:
        names.insert(0, "lora")
    seeds = [int(s) for s in args.seeds.split(",")]
    sys.path.insert(0, str(ROOT))
    from moe_dist.models.embedded import DEFAULT_PRETRAIN_STEPS, ensure_embedded_model

    base_dir = ensure_embedded_model(ROOT / ".cache" / "moe_dist", 0, DEFAULT_PRETRAIN_STEPS)  # one base for all seeds
    work = Path(args.workdir)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    port = 29700
    for seed in seeds:  # seed-major: a partial run still has every method at the first seeds
        for name in names:
            port += 1
            schedule = HARD_SCHEDULES.get(name, []) if args.task == "hard" else []
            runs[name].append(run(name, args.nprocs, work / args.task / f"seed{seed}" / name,
                                  [f"model={base_dir}", f"seed={seed}", "eval.before=false", *TASKS[args.task],
                                   *schedule, *overrides], port, args.reuse))
    second = None
    if second_base:
        sys.path.insert(0, str(ROOT / "bench"))
        from wide_base import wide_base_dir

        second = {name: run(name, args.nprocs, work / "second_base" / name,
                            [f"model={wide_base_dir()}", *SECOND_BASE, *overrides], 29790 + i, args.reuse)
                  for i, name in enumerate(names)}
    rows = aggregate(runs, second)
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if any(r["exact_match_mean"] is not None for r in rows):
        plot(rows, out.with_name(out.stem + "_accuracy.png"))
    out.write_text(json.dumps({"nprocs": args.nprocs, "task": args.task, "seeds": seeds, "overrides": overrides,
                               "rows": rows, "table": text, "summaries": runs, "second_base": second}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
