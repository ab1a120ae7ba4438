"""Quantized frozen bases: memory and speed of each storage format on the 64-expert bench base.

The bench OLMoE shape (hidden 256, 64 experts top-8, 4 layers; bench/e2e.py builds it once
under .cache/) at EP 2 through the real entry point (`deepspeed --num_gpus 2 launch/train.py`),
the same short LoRA run with the base stored as:

- fp32: the CPU default (the speed reference), and bf16 (`train.precision=bf16`);
- fp8: an FP8 copy of the base written once (moe_dist/quant/write.py; block 128 x 128 where
  every quantized dim divides, else the largest power of two that does), loaded as shipped:
  experts and the attention linears stay FP8;
- nf4 / int8: `base.quantize=nf4|int8`, the experts quantized as they are read;
- mxfp4: not run. It is gpt-oss's expert format and OLMoE checkpoints ship none; its row
  holds the bytes the codec gives this shape's experts.

Per format: the summary's per-rank frozen bytes (`frozen_bytes_per_rank`: experts, the rest;
moe_dist/train/memory.py), the steps' peak memory (`step_peak_memory_gib`), tokens/s after
warm-up and its ratio to fp32 in the same repeat (runs are interleaved), and beside them
launch/plan.py's per-rank frozen bytes for the same config. bf16 runs BF16_STEPS steps only:
this CPU has no fast bf16 GEMM, so its speed is not a GPU's and its row is for memory.
Where the time goes: the kernels dequantize each layer's local experts twice a step (forward,
and again for the input gradient in backward). Timed two ways on one thread (a rank's share of
this machine's cores): `Codec.dequantize` alone on one layer's local experts (e = 32; FP8: and
its attention linears) x 2 x layers; and inside one forward + backward of one micro batch in
this process (EP 1), the time spent in `Codec.dequantize` against the whole.

    python bench/quant.py [--steps 16 --warmup 4 --repeats 3]     # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from e2e import CACHE, RECIPE, SHAPES, bench_shape_dir, tokens_per_sec  # noqa: E402

from moe_dist.models.loading import load_hf_config  # noqa: E402
from moe_dist.quant.codecs import Codec, Fp8Block, Int8, Mxfp4, Nf4  # noqa: E402
from moe_dist.quant.write import write_quantized_checkpoint  # noqa: E402

EP = 2
MiB, GiB = 2**20, 2**30
BF16_STEPS = 3  # bf16 on this CPU has no fast GEMM (~16x slower than fp32): a memory row, 1 warm-up step
FLOORS = {"fp8": 1.9, "nf4": 3.2}  # bf16 frozen-expert bytes over the format's, at least


def fp8_block(config) -> tuple[int, int]:
    """128 x 128 where every FP8-quantized dim (expert and attention) divides, else the largest
    power of two that divides them all."""
    D, F = config.hidden_size, config.intermediate_size
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, D // config.num_attention_heads
    dims = {D, F, 2 * F, heads * hd, kv * hd}
    b = 128
    while any(d % b for d in dims):
        b //= 2
    return b, b


def fp8_base_dir(src: Path) -> tuple[Path, tuple[int, int]]:
    """An FP8 copy of the bench base (tokenizer and task files alongside), written once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    block = fp8_block(AutoConfig.from_pretrained(src))
    target = CACHE / f"{src.name}-fp8-b{block[0]}x{block[1]}"
    if (target / "config.json").is_file():
        return target, block
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_quantized_checkpoint(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), tmp, "fp8_block", block)
    for f in src.iterdir():
        if not (tmp / f.name).exists():
            (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp / f.name)
    try:
        os.replace(tmp, target)
    except OSError:  # another writer won: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return target, block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, model: Path, extra: list[str], steps: int, warmup: int, work: Path, env: dict) -> dict:
    mb, seq, _, _ = SHAPES["bench"]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["deepspeed", "--num_gpus", str(EP), "--master_port", str(free_port()), "launch/train.py",
           "--recipe", str(RECIPE), f"model={model}", f"output_dir={out}", f"ep_size={EP}", f"train.steps={steps}",
           f"train.micro_batch={mb}", f"data.seq_len={seq}", "data.eval=", "export.formats=[]", "checkpoint.every=0",
           f"train.log_every={steps}", "train.warmup_steps=1", "repartition.every=0",
           "lora.expert_targets=[gate_up_proj,down_proj]", *extra]
    log = work / f"{name}.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1800).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed (rc {rc}); see {log}\n{log.read_text()[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"frozen_bytes_per_rank": s["frozen_bytes_per_rank"], "step_peak_memory_gib": s["step_peak_memory_gib"],
            "tokens_per_sec": tokens_per_sec(s["step_ends_s"], s["tokens_per_step"], warmup), "steps": steps,
            "step_s": [b - a for a, b in zip(s["step_ends_s"][warmup - 1:], s["step_ends_s"][warmup:])],
            "tokens_per_step": s["tokens_per_step"], "first_loss": s["first_loss"], "final_loss": s["final_loss"]}


def planned(model: Path, extra: list[str], bf16: bool) -> dict[str, float]:
    """launch/plan.py's per-rank frozen bytes for the same run (as the loader stores them) and its
    dequantized temporary (one layer's local experts, plus the largest quantized linear)."""
    import importlib.util

    from moe_dist.config import load_config

    spec = importlib.util.spec_from_file_location("planner", ROOT / "launch" / "plan.py")
    planner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planner)
    cfg = load_config(str(RECIPE), [f"model={model}", f"ep_size={EP}", "lora.expert_targets=[gate_up_proj,down_proj]",
                                    *extra])
    r = planner.count(None, cfg, EP, 2, bf16, {})["per_rank"]
    return {"expert": r["frozen_expert_gib"] * GiB, "non_expert": r["frozen_non_expert_gib"] * GiB,
            "dequant_temporary": r["dequant_gib"] * GiB}


def codec_expert_bytes(codec: Codec, config) -> float:
    """Per-rank routed-expert bytes in `codec` from the shapes (for a format not run here)."""
    D, F, E = config.hidden_size, config.intermediate_size, config.num_experts
    per_layer = sum(O * I * codec.bytes_per_weight(O, I) for O, I in ((2 * F, D), (D, F)))  # noqa: E741
    return per_layer * E / EP * config.num_hidden_layers


def dequant_ms(codec: Codec, config, linears: bool, repeats: int = 20) -> float:
    """One layer's local experts (gate_up + down of E / EP experts), and with `linears` its
    attention projections (FP8 checkpoints keep them quantized too), dequantized to fp32, in ms."""
    e, D, F = config.num_experts // EP, config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * (D // config.num_attention_heads), config.num_key_value_heads * (
        D // config.num_attention_heads)
    shapes = [(e, 2 * F, D), (e, D, F)] + ([(q, D), (kv, D), (kv, D), (D, q)] if linears else [])
    torch.manual_seed(0)
    parts = [(codec.quantize(torch.randn(*shape) * 0.02), *shape[-2:]) for shape in shapes]
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        for p, O, I in parts:  # noqa: E741
            codec.dequantize(p, O, I, torch.float32)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def step_profile(model_dir: Path, quantize: str, codec: Codec | None, repeats: int = 4) -> dict[str, float]:
    """One micro batch's forward + backward in this process (EP 1: 64 local experts for one
    rank's tokens, about a rank's expert work at EP 2; one thread), with the time inside the
    codec's `dequantize` summed: the dequantization's share of a real step's compute."""
    from moe_dist.models.loading import load_model
    from moe_dist.plan import AdapterPlan

    mb, seq, _, _ = SHAPES["bench"]
    config = load_hf_config(model_dir)
    ranks = {(layer, e, p): 8 for layer in range(config.num_hidden_layers) for e in range(config.num_experts)
             for p in ("gate_up_proj", "down_proj")}
    plan = AdapterPlan(expert_ranks=ranks, attention_ranks={(layer, p): 8 for layer in range(config.num_hidden_layers)
                                                            for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
    model = load_model(str(model_dir), plan, ep_size=1, quantize=quantize)
    x = torch.randint(3, config.vocab_size, (mb, seq), generator=torch.Generator().manual_seed(0))
    inside = [0.0]
    original = type(codec).dequantize if codec else None
    if codec:
        def timed(self, *a, **k):
            t0 = time.perf_counter()
            out = original(self, *a, **k)
            inside[0] += time.perf_counter() - t0
            return out
        type(codec).dequantize = timed  # this process only, restored below
    try:
        steps, dequant = [], []
        for _ in range(repeats + 1):
            inside[0] = 0.0
            t0 = time.perf_counter()
            model(x, labels=x).loss.backward()
            steps.append(time.perf_counter() - t0)
            dequant.append(inside[0])
    finally:
        if codec:
            type(codec).dequantize = original
    return {"fwd_bwd_s": statistics.median(steps[1:]), "dequantize_s": statistics.median(dequant[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="fp32,bf16,fp8,nf4,int8")
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "quant"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quant.json"))
    args = ap.parse_args()
    from transformers import AutoConfig

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    base = bench_shape_dir()
    fp8_dir, block = fp8_base_dir(base)
    config = AutoConfig.from_pretrained(base)
    setups = {  # name -> (model dir, overrides, codec of the experts)
        "fp32": (base, ["train.precision=fp32"], None),
        "bf16": (base, ["train.precision=bf16"], None),
        "fp8": (fp8_dir, ["train.precision=fp32"], Fp8Block(block)),
        "nf4": (base, ["train.precision=fp32", "base.quantize=nf4"], Nf4()),
        "int8": (base, ["train.precision=fp32", "base.quantize=int8"], Int8()),
    }
    names = args.formats.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: drift does not favour one
        for n in order:
            model, extra, *_ = setups[n]
            steps, warm = (BF16_STEPS, 1) if n == "bf16" else (args.steps, args.warmup)
            runs[n].append(run(f"{n}_r{rep}", model, extra, steps, warm, work, env))
            print(f"repeat {rep} {n}: {runs[n][-1]['tokens_per_sec']:.0f} tok/s", flush=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // EP))
    profiles = {n: step_profile(setups[n][0], n if n in ("nf4", "int8") else "none", setups[n][2])
                for n in names if n != "bf16"}  # bf16: this CPU's bf16 GEMMs, nothing a GPU would show
    rows = {}
    for n in names:
        model, extra, codec = setups[n]
        r = runs[n]
        best = min(t for x in r for t in x["step_s"])  # the least disturbed step: the box is shared
        deq = dequant_ms(codec, config, linears=n == "fp8") if codec else 0.0
        per_step = deq * 2 * config.num_hidden_layers  # forward + backward, every MoE layer
        rows[n] = {
            "frozen_expert_bytes": r[0]["frozen_bytes_per_rank"]["expert"],
            "frozen_non_expert_bytes": r[0]["frozen_bytes_per_rank"]["non_expert"],
            "planner_bytes": planned(model, extra, n == "bf16"),
            "step_peak_memory_gib": statistics.median(x["step_peak_memory_gib"] for x in r),
            "tokens_per_sec": statistics.median(x["tokens_per_sec"] for x in r),
            "best_step_s": best,
            "ratio_to_fp32": statistics.median(x["tokens_per_sec"] / f["tokens_per_sec"]
                                               for x, f in zip(r, runs["fp32"])) if "fp32" in runs else None,
            "dequant_ms_per_layer": deq, "dequant_ms_per_step": per_step,
            "dequant_share_of_best_step": per_step / 1e3 / best, "in_process_step": profiles.get(n),
            "final_loss": statistics.median(x["final_loss"] for x in r), "runs": r}
    bf16_expert = rows["bf16"]["frozen_expert_bytes"] if "bf16" in rows else rows["fp32"]["frozen_expert_bytes"] / 2
    for n, row in rows.items():
        row["expert_memory_vs_bf16"] = bf16_expert / row["frozen_expert_bytes"]
        row["best_step_vs_fp32"] = rows["fp32"]["best_step_s"] / row["best_step_s"] if "fp32" in rows else None
    mx = codec_expert_bytes(Mxfp4(), config)
    floors = {n: {"floor": f, "got": rows[n]["expert_memory_vs_bf16"], "ok": rows[n]["expert_memory_vs_bf16"] >= f}
              for n, f in FLOORS.items() if n in rows}
    print(f"\nbench OLMoE h256 e64 top8, EP {EP}; frozen MiB per rank as stored (launch/plan.py's in brackets); "
          f"FP8 block {block[0]}x{block[1]}")
    print(f"{'format':<7}{'experts':>17}{'vs bf16':>9}{'rest':>17}{'step peak GiB':>15}")
    for n, row in rows.items():
        p = row["planner_bytes"]
        experts = f"{row['frozen_expert_bytes'] / MiB:.2f} ({p['expert'] / MiB:.2f})"
        rest = f"{row['frozen_non_expert_bytes'] / MiB:.2f} ({p['non_expert'] / MiB:.2f})"
        print(f"{n:<7}{experts:>17}{row['expert_memory_vs_bf16']:>8.2f}x{rest:>17}{row['step_peak_memory_gib']:>15.3f}")
    print(f"{'mxfp4':<7}{f'({mx / MiB:.2f})':>17}{bf16_expert / mx:>8.2f}x   not run: gpt-oss's expert format, "
          "no OLMoE checkpoint ships it (bytes from the codec)")
    print(f"\nspeed: {args.steps} steps, {args.warmup} warm-up (bf16 {BF16_STEPS}, 1), median of {args.repeats} "
          "interleaved repeats; dequantize: one layer's local experts x 2 (fwd, bwd) x layers; "
          "in-process: EP 1 fwd+bwd")
    print(f"{'format':<7}{'tok/s':>7}{'vs fp32':>9}{'best step s':>13}{'vs fp32':>9}{'dequant ms/step':>17}"
          f"{'in-process fwd+bwd ms':>23}{'of it dequantize':>18}")
    for n, row in rows.items():
        prof = row["in_process_step"]
        inside = (f"{1e3 * prof['fwd_bwd_s']:>23.0f}{1e3 * prof['dequantize_s']:>12.0f}"
                  f" ({100 * prof['dequantize_s'] / prof['fwd_bwd_s']:.0f}%)") if prof else f"{'-':>23}{'-':>12}"
        print(f"{n:<7}{row['tokens_per_sec']:>7.0f}{row['ratio_to_fp32'] or 0:>8.2f}x{row['best_step_s']:>13.3f}"
              f"{row['best_step_vs_fp32'] or 0:>8.2f}x{row['dequant_ms_per_step']:>17.1f}{inside}")
    for n, f in floors.items():
        print(f"floor {n}: {f['got']:.2f}x less frozen-expert memory than bf16 (>= {f['floor']}x) "
              f"{'ok' if f['ok'] else 'FAILED'}")
    result = {"shape": "bench OLMoE h256 e64 top8", "ep_size": EP, "device": "cpu", "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "fp8_block": list(block), "formats": rows,
              "mxfp4": {"run": False, "why": "gpt-oss's expert format; OLMoE checkpoints ship none",
                        "codec_expert_bytes": mx, "expert_memory_vs_bf16": bf16_expert / mx},
              "floors": floors}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if not all(f["ok"] for f in floors.values()):
        raise SystemExit("a frozen-expert memory floor failed")


if __name__ == "__main__":
    main()
