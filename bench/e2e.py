"""End-to-end training throughput: `deepspeed launch/train.py` against the pipeline a user
would pick instead (bench/e2e_baseline.py: HF grouped_mm experts + PEFT target_parameters +
a DeepSpeed ZeRO-2 engine, data parallel), both started by the real launcher, same model,
data, micro batch, ZeRO config and LoRA targets (fused gate_up + down, r=8; q,k,v,o).

Two shapes: the embedded default (the README's first command) and the bench shape (OLMoE,
hidden 256, 64 experts top-8, 4 x 256 tokens per rank: a checkpoint of that shape with the
embedded tokenizer and task, written once under .cache/). moe_dist runs at EP = world and at
EP 1 (DP = world). The baseline runs twice, as launched (torch's default threads per rank)
and with OMP_NUM_THREADS = cores / ranks, and the better of the two is the reference.
Runs are interleaved (rotating order per repeat), tokens/s is taken over the steps after
warm-up from each step's wall-clock end (everything in the loop: data, forward, backward,
ZeRO step, the trainer's per-step work), the median over repeats is reported, and beside it
the median of each repeat's ratio to the reference's run in the same repeat (the runs of one
repeat are adjacent in time, so the machine's drift between repeats cancels).

Each row also gets the step's necessary FLOPs (frozen weights: forward + input gradient;
adapters: forward + both gradients; attention scores) and the fraction of the GEMM-bound
limit: the machine's measured fp32 GEMM rate (all cores) over those FLOPs.

    python bench/e2e.py [--repeats 3] [--shapes embedded,bench] [--out bench/results/e2e.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from baseline_peft import BENCH_SHAPE  # noqa: E402

CACHE = ROOT / ".cache" / "moe_dist"
RECIPE = ROOT / "launch" / "recipes" / "tiny_lora.yaml"
LORA_RANK = 8
# shape name -> (micro batch, seq len, steps, warm-up steps)
# (moe_dist's recipe rebalances the expert placement at step 10 under EP: inside the warm-up)
# (runs long enough to average over this box's slow and fast phases of a few seconds each)
SHAPES = {"embedded": (8, 128, 120, 15), "bench": (BENCH_SHAPE["batch"], BENCH_SHAPE["seq"], 48, 12)}


def embedded_dir() -> Path:
    from moe_dist.models.embedded import ensure_embedded_model

    return ensure_embedded_model(CACHE)


def bench_shape_dir() -> Path:
    """OLMoE of BENCH_SHAPE (random init, seed 0) with the embedded tokenizer and task files."""
    target = CACHE / "bench-olmoe-h256-e64-top8"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

    src = embedded_dir()
    tok = AutoTokenizer.from_pretrained(src)
    s = BENCH_SHAPE
    config = OlmoeConfig(vocab_size=len(tok), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], num_experts=s["experts"],
                         num_experts_per_tok=s["top_k"], intermediate_size=s["expert_intermediate"],
                         max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    OlmoeForCausalLM(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copytree(src / "task", tmp / "task")
    os.replace(tmp, target)
    return target


def gemm_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of this machine (all cores, one process)."""
    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best / 1e9


def step_flops(cfg, tokens: int, seq_len: int, mean_doc_len: float, rank: int = LORA_RANK) -> float:
    """Necessary FLOPs of one training step over `tokens` tokens (the whole job).

    Frozen matmuls (attention projections, experts' top-k, LM head): forward + input gradient
    = 2 x 2 x params-touched per token; the first layer's input gradient and the embeddings'
    are not needed but are small. Adapters (r on q,k,v,o and on each routed expert's gate_up
    and down): 3 x forward. Attention scores (QK^T, PV) over each packed document: 3 x forward."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = D // heads
    attn_proj = D * (heads * hd) * 2 + D * (kv * hd) * 2  # q, o + k, v
    experts = cfg.num_experts_per_tok * 3 * D * F
    frozen = L * (attn_proj + experts) + D * cfg.vocab_size
    adapters = L * (4 * rank * (D + D) + cfg.num_experts_per_tok * rank * ((D + 2 * F) + (F + D)))
    scores = L * 2 * 2 * D * (mean_doc_len / 2)  # causal: each token sees half its document on average
    return tokens * (2 * 2 * frozen + 3 * 2 * adapters + 3 * scores)


def mean_document_tokens(model_dir: Path, seq_len: int) -> float:
    """Average tokens per packed document: what the attention scores cost is taken over."""
    import datasets
    from e2e_baseline import packed_batches

    datasets.disable_progress_bars()
    b = packed_batches(str(model_dir), seq_len, 8, 0, 1, 0).next_batch()
    docs = int((b["position_ids"] == 0).sum())
    return b["position_ids"].numel() / max(1, docs)


def run(cmd: list[str], env: dict, log: Path) -> None:
    with log.open("w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1800).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}); see {log}\n{log.read_text()[-3000:]}")


def tokens_per_sec(ends: list[float], tokens_per_step: int, warmup: int) -> float:
    return tokens_per_step * (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def paired_ratio(runs: list[dict], reference: list[dict]) -> dict[str, float]:
    """Median, min and max over repeats of run i's tokens/s over the reference's run i."""
    r = [a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in zip(runs, reference)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def run_moe_dist(model: str, shape: str, ep: int, world: int, work: Path, env: dict) -> dict:
    mb, seq, steps, warm = SHAPES[shape]
    out = work / f"moe_dist_{shape}_ep{ep}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["deepspeed", "--num_gpus", str(world), "launch/train.py", "--recipe", str(RECIPE), f"model={model}",
           f"output_dir={out}", f"ep_size={ep}", f"train.steps={steps}", f"train.micro_batch={mb}",
           f"data.seq_len={seq}", "data.eval=", "export.formats=[]", "checkpoint.every=0", f"train.log_every={steps}",
           "lora.expert_targets=[gate_up_proj,down_proj]", f"lora.rank={LORA_RANK}"]
    run(cmd, env, work / f"{out.name}.log")
    s = json.loads((out / "summary.json").read_text())
    return {"tokens_per_sec": tokens_per_sec(s["step_ends_s"], s["tokens_per_step"], warm),
            "trainable_params": s["trainable_params"], "final_loss": s["final_loss"]}


def run_baseline(model_dir: Path, shape: str, world: int, work: Path, env: dict, tag: str) -> dict:
    mb, seq, steps, warm = SHAPES[shape]
    out = work / f"baseline_{shape}_{tag}.json"
    cmd = ["deepspeed", "--num_gpus", str(world), "bench/e2e_baseline.py", "--model", str(model_dir), "--out", str(out),
           "--seq-len", str(seq), "--micro-batch", str(mb), "--steps", str(steps), "--rank", str(LORA_RANK)]
    run(cmd, env, work / f"baseline_{shape}_{tag}.log")
    s = json.loads(out.read_text())
    return {"tokens_per_sec": tokens_per_sec(s["step_ends_s"], s["tokens_per_step"], warm),
            "trainable_params": s["trainable_params"], "final_loss": sum(s["losses"][-5:]) / 5,
            "threads": s["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--shapes", default="embedded,bench")
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "e2e"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "e2e.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    world, cores = args.world, os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env_threads = dict(env, OMP_NUM_THREADS=str(max(1, cores // world)))
    peak = gemm_peak_gflops()
    print(f"fp32 GEMM peak, {cores} cores: {peak:.0f} GFLOP/s")
    results = {"world": world, "cores": cores, "gemm_peak_gflops": peak, "repeats": args.repeats, "shapes": {}}
    for shape in args.shapes.split(","):
        model_dir = embedded_dir() if shape == "embedded" else bench_shape_dir()
        model = "embedded:tiny-olmoe" if shape == "embedded" else str(model_dir)
        systems = {
            "baseline": lambda: run_baseline(model_dir, shape, world, work, env, "default_threads"),
            f"baseline_omp{max(1, cores // world)}": lambda: run_baseline(model_dir, shape, world, work, env_threads,
                                                                          "omp"),
            f"moe_dist_ep{world}": lambda: run_moe_dist(model, shape, world, world, work, env),
            "moe_dist_ep1": lambda: run_moe_dist(model, shape, 1, world, work, env),
        }
        runs: dict[str, list[dict]] = {k: [] for k in systems}
        names = list(systems)
        for rep in range(args.repeats):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                r = systems[name]()
                runs[name].append(r)
                print(f"  {shape} rep {rep} {name}: {r['tokens_per_sec']:.0f} tok/s", flush=True)
        mb, seq, _, _ = SHAPES[shape]
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(model_dir)
        flops_tok = step_flops(hf, 1, seq, mean_document_tokens(model_dir, seq))
        limit = peak * 1e9 / flops_tok
        tps = {k: statistics.median(r["tokens_per_sec"] for r in v) for k, v in runs.items()}
        ref_name = max((k for k in tps if k.startswith("baseline")), key=tps.get)
        results["shapes"][shape] = {
            "micro_batch": mb, "seq_len": seq, "tokens_per_step": mb * seq * world,
            "step_gflop": flops_tok * mb * seq * world / 1e9, "gemm_bound_tokens_per_sec": limit,
            "reference": ref_name, "tokens_per_sec": tps,
            "ratio_to_reference": {k: v / tps[ref_name] for k, v in tps.items()},
            # each repeat's run over the reference's run in the same repeat (adjacent in time, so
            # the box's drift cancels): the median and the range, beside the ratio of medians
            "paired_ratio": {k: paired_ratio(v, runs[ref_name]) for k, v in runs.items()},
            "fraction_of_gemm_bound": {k: v / limit for k, v in tps.items()},
            "runs": runs,
        }
    print(f"\n{'shape':<10}{'system':<24}{'tok/s':>9}{'x ref':>8}{'of GEMM bound':>15}{'paired x ref':>22}")
    for shape, r in results["shapes"].items():
        for k, v in r["tokens_per_sec"].items():
            mark = " (ref)" if k == r["reference"] else ""
            p = r["paired_ratio"][k]
            print(f"{shape:<10}{k:<24}{v:>9.0f}{r['ratio_to_reference'][k]:>8.2f}"
                  f"{100 * r['fraction_of_gemm_bound'][k]:>14.1f}%{p['median']:>8.2f} ({p['min']:.2f}-{p['max']:.2f}){mark}")
        print(f"{'':<10}step {r['step_gflop']:.1f} GFLOP, GEMM-bound limit {r['gemm_bound_tokens_per_sec']:.0f} tok/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
