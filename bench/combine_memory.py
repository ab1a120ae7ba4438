"""Memory and time of the expert-parallel combine at a real recipe's layer shape (issue 28).

One rank of Qwen3-30B-A3B's recipe (launch/recipes/qwen3_30b_a3b_lora.yaml: micro-batch 2 x
2048 tokens, hidden 2048, top-8 of 128 experts, EP 8: 16 experts here) in bf16: the rows this
rank receives (one per token and rank it reaches, ~5.3 of 8 ranks per token), their slots on
this rank's experts, and the three fixed-order sums of moe_dist/moe/dispatch.py that run on
every non-CPU-fp32 path:
  combine   each received row's weighted expert outputs (forward of _ScatterWeightedSum)
  expand    the gradient of the rows expanded to their slots (backward of _GatherRows)
  return    each token's rows from the ranks it reached (forward of _SumPairs)
Before issue 28 each scattered its rows into a zero-filled (rows x K) grid and summed it (the
code is below, as it was); now `sum_rows_into` sorts the rows and sums segments. Each variant
runs in a fresh process; the figure is its peak resident memory above the inputs (VmHWM), and
the time of one call (min of 3).

    python bench/combine_memory.py [--tokens 4096] [--out bench/results/combine_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

D, K, E, P = 2048, 8, 128, 8


def routing(tokens: int, seed: int = 0):
    """Uniform top-K routing of `tokens` over E experts; this is EP rank 0 (experts 0..E/P-1),
    every rank sending it what this rank sends (balanced load)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx_TK = torch.rand(tokens, E, generator=g, device="cpu").argsort(1)[:, :K]
    rank_TK = idx_TK // (E // P)
    hit_TP = torch.zeros(tokens, P, dtype=torch.bool, device="cpu").scatter_(1, rank_TK, True)
    J = int(hit_TP.sum(1).max())
    # rows received: P sources x the tokens reaching rank 0 (a source's view of rank 0)
    mine_T = hit_TP[:, 0]
    local_TK = torch.where(rank_TK == 0, idx_TK, -1)[mine_T]
    local_RK = local_TK.repeat(P, 1)
    R = local_RK.shape[0]
    order_Q = torch.argsort(torch.where(local_RK >= 0, local_RK, E).reshape(-1), stable=True)
    order_Q = order_Q[: int((local_RK >= 0).sum())]
    pair_pos_S = (torch.arange(tokens, device="cpu") * J).repeat_interleave(hit_TP.sum(1)) + torch.cat(
        [torch.arange(int(n), device="cpu") for n in hit_TP.sum(1)])
    pair_token_S = torch.arange(tokens, device="cpu").repeat_interleave(hit_TP.sum(1))
    return R, J, order_Q, pair_token_S, pair_pos_S


def grid_sum(y_ND, index_N, pos_N, T, J):
    """Before issue 28: scatter into a zero-filled (T x J) grid and sum it."""
    return y_ND.new_zeros(T * J, y_ND.shape[1]).index_copy_(0, pos_N, y_ND).view(T, J, -1).sum(1)


def run_one(variant: str, case: str, tokens: int) -> dict:
    from moe_dist.moe.row_sums import sum_rows_into
    from moe_dist.train.memory import StepMemory

    R, J, order_Q, pair_token_S, pair_pos_S = routing(tokens)
    if case == "combine":  # fp32: the promoted dtype of the weighted outputs (fp32 gates)
        index, pos, rows, width, dtype = order_Q // K, order_Q, R, K, torch.float32
        n = order_Q.numel()
    elif case == "expand":  # bf16 gradients of the expanded rows
        index, pos, rows, width, dtype = order_Q // K, order_Q, R, K, torch.bfloat16
        n = order_Q.numel()
    else:  # return: fp32 rows back from each rank
        index, pos, rows, width, dtype = pair_token_S, pair_pos_S, tokens, J, torch.float32
        n = pair_token_S.numel()
    y = torch.randn(n, D, device="cpu").to(dtype)
    best = float("inf")
    memory = StepMemory(torch.device("cpu"))
    memory.start()
    for _ in range(3):
        t0 = time.perf_counter()
        out = grid_sum(y, index, pos, rows, width) if variant == "grid" else sum_rows_into(y, index, pos, rows)
        best = min(best, time.perf_counter() - t0)
        del out
    return {"variant": variant, "case": case, "rows_in": n, "rows_out": rows, "K_or_J": width, "dtype": str(dtype),
            "peak_above_inputs_mib": memory.peak_gib() * 1024, "seconds": best}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "bench/results/combine_memory.json"))
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one, args.tokens)))
        return
    rows = []
    for case in ("combine", "expand", "return"):
        for variant in ("grid", "segment"):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--one", variant, case],
                                 capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "2"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'case':8} {'rows in':>8} {'rows out':>8} {'dtype':>15} {'grid MiB':>9} {'segment MiB':>12} "
          f"{'grid s':>7} {'segment s':>9}")
    for case in ("combine", "expand", "return"):
        g, s = [r for r in rows if r["case"] == case]
        print(f"{case:8} {g['rows_in']:8d} {g['rows_out']:8d} {g['dtype']:>15} {g['peak_above_inputs_mib']:9.0f} "
              f"{s['peak_above_inputs_mib']:12.0f} {g['seconds']:7.3f} {s['seconds']:9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"shape": {"tokens": args.tokens, "hidden": D, "top_k": K, "experts": E,
                                                    "ep_size": P, "recipe": "qwen3_30b_a3b_lora.yaml"},
                                          "rows": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
