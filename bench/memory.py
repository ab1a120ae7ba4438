"""Peak step memory with and without activation checkpointing, at a shape where activations
dominate: the bench OLMoE shape (hidden 256, 64 experts top-8) at seq 1024, through the real
entry point (`launch/train.py`, a world of one, fp32 on CPU; `--world 2` runs it under the
deepspeed launcher at EP 2), beside launch/plan.py's estimate for the same config.

The measured figure is the trainer's `step_peak_memory_gib` (moe_dist/train/memory.py): the
steps' peak above the memory held after the first step, i.e. activations and what else
exists only inside a step (gradients in flight, logits, the optimizer's temporaries). The
planner estimates activations only, so it is expected to be below the measured peak.

    python bench/memory.py [--seq-len 1024 --micro-batch 4 --steps 5 --world 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from e2e import RECIPE, bench_shape_dir  # noqa: E402


def run(model: Path, ckpt: bool, args, work: Path) -> dict:
    out = work / f"ckpt_{'on' if ckpt else 'off'}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"model={model}", f"output_dir={out}", f"train.steps={args.steps}", f"train.micro_batch={args.micro_batch}",
                 f"data.seq_len={args.seq_len}", "data.eval=", "export.formats=[]", "checkpoint.every=0",
                 f"train.log_every={args.steps}", "train.warmup_steps=1", "lora.expert_targets=[gate_up_proj,down_proj]", "repartition.every=0",
                 f"train.activation_checkpointing={str(ckpt).lower()}", f"ep_size={args.world}"]
    launch = ["python", "launch/train.py"] if args.world == 1 else ["deepspeed", "--num_gpus", str(args.world),
                                                                     "launch/train.py"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = work / f"{out.name}.log"
    with log.open("w") as fh:
        rc = subprocess.run([*launch, "--recipe", str(RECIPE), *overrides], cwd=ROOT, env=env, stdout=fh,
                            stderr=subprocess.STDOUT, timeout=3600).returncode
    if rc != 0:
        raise SystemExit(f"run failed (rc {rc}); see {log}\n{log.read_text()[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"step_peak_memory_gib": s["step_peak_memory_gib"], "tokens_per_sec": s["tokens_per_sec"],
            "first_loss": s["first_loss"], "final_loss": s["final_loss"], "overrides": overrides}


def planned(model: Path, ckpt: bool, args) -> dict:
    import importlib.util

    from moe_dist.config import load_config

    spec = importlib.util.spec_from_file_location("planner", ROOT / "launch" / "plan.py")
    planner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planner)
    cfg = load_config(str(RECIPE), [f"model={model}", f"train.micro_batch={args.micro_batch}",
                                    f"data.seq_len={args.seq_len}", "lora.expert_targets=[gate_up_proj,down_proj]",
                                    f"train.activation_checkpointing={str(ckpt).lower()}", f"ep_size={args.world}"])
    return planner.count(None, cfg, args.world, 2, False, {})["per_rank"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "memory"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = bench_shape_dir()
    rows = {}
    for ckpt in (False, True):
        r = run(model, ckpt, args, work)
        r["planner_activations_gib"] = planned(model, ckpt, args)["activations_gib_estimate"]
        rows["on" if ckpt else "off"] = r
    off, on = rows["off"], rows["on"]
    result = {"shape": "bench OLMoE h256 e64 top8", "seq_len": args.seq_len, "micro_batch": args.micro_batch,
              "world": args.world, "steps": args.steps, "runs": rows,
              "memory_ratio_off_over_on": off["step_peak_memory_gib"] / on["step_peak_memory_gib"],
              "throughput_ratio_on_over_off": on["tokens_per_sec"] / off["tokens_per_sec"]}
    print(f"\n{'checkpointing':<15}{'step peak GiB':>15}{'planner act. GiB':>18}{'tok/s':>9}{'first loss':>12}")
    for k, r in rows.items():
        print(f"{k:<15}{r['step_peak_memory_gib']:>15.3f}{r['planner_activations_gib']:>18.3f}"
              f"{r['tokens_per_sec']:>9.0f}{r['first_loss']:>12.5f}")
    print(f"memory off/on {result['memory_ratio_off_over_on']:.2f}x, "
          f"throughput on/off {result['throughput_ratio_on_over_off']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
