"""Per-step losses of each tiny recipe, fixed seed, EP 2: the behaviour fingerprint a refactor
must keep. Every method's structure change happens inside the short run (HELLoRA's profiled
plan and spread placement, HELLoRI's stage 2, two EPnG prune/grow updates, two DMEP prunes,
a forced repartition in the LoRA run), so the trace covers every path a change goes through.

    python bench/loss_trace.py --out before.json            # run (the real deepspeed launcher)
    python bench/loss_trace.py --compare before.json after.json [--rtol 1e-6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["train.steps=60", "train.log_every=1", "eval.before=false", "data.eval=", "checkpoint.every=0",
          "export.formats=[]", "ep_size=2"]
RUNS = {  # name -> (recipe, overrides that bring its decisions inside 60 steps)
    "lora": ("tiny_lora.yaml", ["repartition.force_step=30", "repartition.every=0"]),  # one forced move only
    "hellora": ("tiny_hellora.yaml", []),
    "hellori": ("tiny_hellori.yaml", ["hellori.stage1_steps=30"]),
    "epng": ("tiny_epng.yaml", ["epng.warmup_steps=20", "epng.interval=20"]),
    "dmep": ("tiny_dmep.yaml", ["dmep.prune_start=20", "dmep.prune_interval=20", "dmep.prune_times=2"]),
}


def trace(name: str, work: Path, port: int) -> dict:
    recipe, extra = RUNS[name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(ROOT / "launch" / "train.py"), "--recipe", str(ROOT / "launch" / "recipes" / recipe),
           f"output_dir={out}", *COMMON, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in lines if "loss" in r}
    events = [r["event"] for r in lines if "event" in r]
    print(f"  {name}: {len(losses)} steps in {time.time() - t0:.0f}s, final loss {losses[max(losses)]:.6f}, "
          f"{len(events)} events", flush=True)
    return {"losses": [losses[s] for s in sorted(losses)], "events": events, "overrides": COMMON + extra}


def compare(a: dict, b: dict, rtol: float) -> bool:
    ok = True
    print(f"{'method':10s} {'steps':>5s} {'max rel diff':>13s}  verdict")
    for name in [n for n in a if n in b]:
        la, lb = a[name]["losses"], b[name]["losses"]
        if len(la) != len(lb):
            print(f"{name:10s} step counts differ: {len(la)} vs {len(lb)}")
            ok = False
            continue
        worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb))
        same = worst <= rtol
        ok &= same
        print(f"{name:10s} {len(la):5d} {worst:13.3e}  {'same' if same else 'DIFFERENT'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--work", default="/tmp/moe_dist_loss_trace")
    ap.add_argument("--methods", default=",".join(RUNS))
    ap.add_argument("--compare", nargs=2)
    ap.add_argument("--rtol", type=float, default=1e-6)
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        raise SystemExit(0 if compare(a, b, args.rtol) else 1)
    work = Path(args.work)
    results = {name: trace(name, work, 29600 + i) for i, name in enumerate(args.methods.split(","))}
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
