"""The repartitioner on the embedded default, against the contiguous placement it replaces.

1. Balance: routing counts recorded by real runs (HELLoRA and EPnG recipes, 2 CPU ranks,
   the final checkpoint's routing.safetensors and plan.json) -> expected max/mean per-rank
   cost (sum over layers of the slowest rank / of the mean, moe_dist.parallel.balance) under
   the contiguous placement and under the balanced one, at EP 2 (the run's), 4 and 8.
2. Cost: a LoRA run with a forced repartition at step `--move-at` (log every step): the
   repartition's seconds (snapshot, all-to-all, engine rebuild) as a multiple of the median
   step time of the same run, the extra time of the logged interval that contains it (the
   move plus the first step on the new engine), and the bytes moved. The EPnG run's
   prune/grow + move rebuilds are reported alike.

Every figure is a ratio within one run (machine noise cancels). Writes
bench/results/repartition.json and prints a table.

    python bench/repartition.py [--nprocs 2] [--steps 300] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def launch(name: str, recipe: str, out: Path, nprocs: int, overrides: list[str], reuse: bool) -> Path:
    run_dir = out / name
    if reuse and (run_dir / "summary.json").is_file():
        return run_dir
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port", "29561",
           str(ROOT / "launch" / "train.py"), "--recipe", str(ROOT / "launch" / "recipes" / recipe),
           f"output_dir={run_dir}", "checkpoint.every=0", *overrides]
    t0 = time.time()
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"  {name}: {time.time() - t0:.0f}s", flush=True)
    return run_dir


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def balance_rows(run_dir: Path, method: str, ep_sizes: list[int]) -> list[dict]:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from moe_dist.models.arch import expert_sizes
    from moe_dist.models.embedded import ensure_embedded_model
    from moe_dist.parallel.balance import balanced_placements, imbalance, layer_costs
    from moe_dist.parallel.placement import ExpertPlacement
    from moe_dist.plan import AdapterPlan

    final = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    plan = AdapterPlan.from_json((final / "plan.json").read_text())
    routing = load_file(str(final / "routing.safetensors"))
    tokens_LE, layers = routing["tokens_LE"], routing["layers"].tolist()
    num_experts, D, F, _ = expert_sizes(AutoConfig.from_pretrained(ensure_embedded_model(ROOT / ".cache/moe_dist", 0)))
    costs = layer_costs(plan, tokens_LE, layers, D, F)
    rows = []
    for ep in ep_sizes:
        contiguous = {l: ExpertPlacement.contiguous(num_experts, ep) for l in layers}
        balanced = balanced_placements(costs, ep, contiguous)
        moved = sum(a != b for l in layers for a, b in zip(contiguous[l].owner, balanced[l].owner))
        rows.append({"method": method, "ep_size": ep, "imbalance_contiguous": imbalance(costs, contiguous),
                     "imbalance_balanced": imbalance(costs, balanced), "experts_moved": moved,
                     "adapted_experts": len({(l, e) for (l, e, _p) in plan.expert_ranks}),
                     "routed_slots": int(tokens_LE.sum())})
    return rows


def move_cost(run_dir: Path, reason_prefix: str) -> list[dict]:
    """Each repartition's seconds against the run's median step time (from tokens/s of the
    logged intervals without a move; every step has the same tokens)."""
    rows = records(run_dir)
    tps = {r["step"]: r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r}
    logged = sorted(tps)
    log_every = min(b - a for a, b in zip(logged, logged[1:]))
    tokens = _tokens_per_step(run_dir) * log_every
    seconds = {s: tokens / v for s, v in tps.items()}  # per logged interval
    moves = [r for r in rows if r.get("event") == "repartition"]
    with_move = {m["step"] + log_every for m in moves}
    step_s = statistics.median(v for s, v in seconds.items() if s not in with_move and s > logged[1]) / log_every
    out = []
    for m in (m for m in moves if m["reason"].startswith(reason_prefix)):
        extra = seconds.get(m["step"] + log_every, float("nan")) - step_s * log_every
        out.append({"step": m["step"], "reason": m["reason"], "seconds": m["seconds"], "step_seconds": step_s,
                    "seconds_in_steps": m["seconds"] / step_s, "interval_extra_in_steps": extra / step_s,
                    "experts_moved": m["experts_moved"], "bytes_moved": m["bytes_moved"],
                    "imbalance_before": m["imbalance_before"], "imbalance_after": m["imbalance_after"]})
    return out


def _tokens_per_step(run_dir: Path) -> int:
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())["config"]
    return cfg["train"]["micro_batch"] * cfg["data"]["seq_len"] * cfg["train"]["grad_accum"] * summary["world_size"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300, help="steps of the HELLoRA / EPnG runs")
    ap.add_argument("--move-at", type=int, default=30, help="forced repartition step of the timing run")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs under bench/out/repartition")
    args = ap.parse_args()
    out = ROOT / "bench" / "out" / "repartition"
    out.mkdir(parents=True, exist_ok=True)
    print("runs (deepspeed, CPU ranks):", flush=True)
    hellora = launch("hellora", "tiny_hellora.yaml", out, args.nprocs, [f"train.steps={args.steps}"], args.reuse)
    epng = launch("epng", "tiny_epng.yaml", out, args.nprocs, [f"train.steps={args.steps}"], args.reuse)
    timing = launch("lora_forced_move", "tiny_lora.yaml", out, args.nprocs,
                    [f"train.steps={2 * args.move_at}", "train.log_every=1", f"repartition.force_step={args.move_at}",
                     "eval.before=false", "eval.samples=20"], args.reuse)
    ep_sizes = [2, 4, 8]  # offline: any EP size divides 16 experts
    balance = balance_rows(hellora, "hellora", ep_sizes) + balance_rows(epng, "epng", ep_sizes)
    forced = move_cost(timing, "step")
    epng_moves = move_cost(epng, "epng")
    result = {"nprocs": args.nprocs, "balance": balance, "forced_move": forced, "epng_rebuilds": epng_moves,
              "hellora_summary_imbalance": json.loads((hellora / "summary.json").read_text())["expert_imbalance"],
              "epng_summary_imbalance": json.loads((epng / "summary.json").read_text())["expert_imbalance"]}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "repartition.json").write_text(json.dumps(result, indent=2))
    print("\nexpected max/mean per-rank cost on recorded routing (1.00 = even)")
    print(f"{'method':8} {'EP':>3} {'contiguous':>11} {'balanced':>9} {'moved':>6}")
    for r in balance:
        print(f"{r['method']:8} {r['ep_size']:>3} {r['imbalance_contiguous']:>11.3f} {r['imbalance_balanced']:>9.3f} "
              f"{r['experts_moved']:>6}")
    print("\nforced repartition (LoRA on every expert, EP = world)")
    for r in forced:
        print(f"step {r['step']}: {r['seconds']:.3f}s = {r['seconds_in_steps']:.2f} steps "
              f"(step {r['step_seconds']:.3f}s; with the first step after it {r['interval_extra_in_steps']:.2f}); "
              f"{r['experts_moved']} experts, {r['bytes_moved'] / 2**20:.2f} MiB; imbalance "
              f"{r['imbalance_before']:.3f} -> {r['imbalance_after']:.3f}")
    print("\nEPnG prune/grow + rebalance, one rebuild each")
    for r in epng_moves:
        print(f"step {r['step']}: {r['seconds']:.3f}s = {r['seconds_in_steps']:.2f} steps, {r['experts_moved']} experts, "
              f"{r['bytes_moved'] / 2**20:.2f} MiB, "
              f"imbalance {r['imbalance_before']:.3f} -> {r['imbalance_after']:.3f}")
    print("\nwrote bench/results/repartition.json")


if __name__ == "__main__":
    main()
