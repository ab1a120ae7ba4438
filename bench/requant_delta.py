"""How much of a trained adapter delta survives re-quantizing the merged weights to block FP8.

A `merged` export of an FP8 base is written dequantized (bf16 / the export dtype). Writing it
back in FP8 instead would keep the checkpoint's size, but FP8 rounding then decides what is
left of W + s B A. Per expert weight (one expert's gate, up or down of one layer), with Q the
block-FP8 round trip of moe_dist.quant.codecs.Fp8Block (transformers' `Fp8Quantize`, then
`_dequantize_fp8_weight`; fresh scales from the merged weight's own block maxima, as any
re-quantizer computes them):

  ratio = ||Q(W + sBA) - Q(W)|| / ||sBA||         how much change re-quantization keeps (1 = as much)
  err   = ||Q(W + sBA) - Q(W) - sBA|| / ||sBA||   how far the kept change is from the delta (0 = exact)
  cos   = cosine(Q(W + sBA) - Q(W), sBA)
  codes = fraction of FP8 codes that differ between Q(W + sBA) and Q(W)

next to ||sBA|| / ||W|| and FP8's own rounding of the base, ||Q(W) - W|| / ||W||. Overall and
per projection figures pool the tensors (root of summed squares). Two bases: `bf16` takes W as
the checkpoint stores it (a bf16 / fp32 base exported merged in FP8), `fp8` takes W = Q(W) (an
FP8 base: the merge starts from the dequantized shipped weights, as this export's does).

W is the run's base checkpoint, W + sBA its merged export (fp32, written by moe_dist.export into a
temp dir). The block is the hub's 128 x 128 where it divides the expert weights, else the largest
square power-of-two block that does (tiny-olmoe: F = 64, D = 128 -> 64 x 64); the 128 x 128 figure
(zero-padded at the edges, moe_dist/quant/write.py) is reported beside it. A sweep scales the
trained delta down (same directions, smaller ||sBA|| / ||W||) on the FP8 base: the tiny run's
adapters are large next to its weights, a fine-tune of a big model moves them far less.

    deepspeed --num_gpus 2 launch/train.py --recipe launch/recipes/tiny_lora.yaml output_dir=/tmp/run_bf16
    python bench/requant_delta.py --checkpoint /tmp/run_bf16 [--out bench/results/requant_delta.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROJS = ("gate_proj", "up_proj", "down_proj")
SWEEP = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def expert_weights(directory: Path, spec, num_experts: int, F: int):
    """{(layer, expert, proj): (O, I) fp64 weight in the canonical layout} of a checkpoint dir."""
    from safetensors import safe_open

    from moe_dist.models.layout import down_to_canonical, gate_up_to_canonical

    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys() if ".experts." in k})
    out = {}
    for layer in spec.moe_layers:
        path = spec.experts_path(layer)
        fused = next((k for k in spec.hub.checkpoint_candidates(f"{path}.gate_up_proj") if k in tensors), None)
        for e in range(num_experts):
            if fused is not None:
                gate_up = gate_up_to_canonical(tensors[fused][e], spec.layout)
                down_key = next(k for k in spec.hub.checkpoint_candidates(f"{path}.down_proj") if k in tensors)
                ws = (gate_up[:F], gate_up[F:], down_to_canonical(tensors[down_key][e], spec.layout))
            else:
                keys = [spec.hub.checkpoint_candidates(f"{path}.{e}.{n}.weight") for n in spec.hub_expert_names]
                ws = tuple(tensors[next(k for k in cands if k in tensors)] for cands in keys)
            out.update({(layer, e, p): w.double() for p, w in zip(PROJS, ws)})
    return out


def fp8_round_trip(w_OI: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q(w) in fp64, its e4m3 codes as bytes): quantize then dequantize, zero-padded edges."""
    from moe_dist.quant.codecs import Fp8Block
    from moe_dist.quant.write import fp8_quantize_padded

    parts = fp8_quantize_padded(w_OI.float(), block)
    return Fp8Block(block).dequantize(parts, *w_OI.shape, torch.float32).double(), parts["weight"].view(torch.uint8)


def measure(base: dict, merged: dict, block: tuple[int, int], start_fp8: bool, scale: float = 1.0
            ) -> tuple[dict, list]:
    """Pooled figures {overall, per projection} and per-tensor rows; `scale` multiplies the
    trained delta (the sweep: how the figures move as ||sBA|| / ||W|| shrinks)."""
    sums: dict[str, dict[str, float]] = {}
    rows = []
    for key, W in base.items():
        delta = scale * (merged[key] - W)
        if start_fp8:  # an FP8 base: W is what the shipped weights dequantize to
            W = fp8_round_trip(W, block)[0]
        merged_w = W + delta
        if not delta.any():
            continue  # no adapter on this expert
        q_w, codes_w = fp8_round_trip(W, block)
        q_m, codes_m = fp8_round_trip(merged_w, block)
        kept = q_m - q_w
        s = {"delta2": delta.square().sum().item(), "kept2": kept.square().sum().item(),
             "err2": (kept - delta).square().sum().item(), "dot": (kept * delta).sum().item(),
             "w2": W.square().sum().item(), "qerr2": (q_w - W).square().sum().item(),
             "changed": (codes_w != codes_m).sum().item(), "n": W.numel()}
        for group in ("overall", key[2]):
            acc = sums.setdefault(group, dict.fromkeys(s, 0.0))
            for k, v in s.items():
                acc[k] += v
        rows.append((key, _figures(s)))
    return {g: _figures(s) for g, s in sums.items()}, rows


def _figures(s: dict) -> dict:
    return {"ratio": math.sqrt(s["kept2"] / s["delta2"]), "err": math.sqrt(s["err2"] / s["delta2"]),
            "cos": s["dot"] / math.sqrt(s["kept2"] * s["delta2"]) if s["kept2"] else 0.0,
            "codes_changed": s["changed"] / s["n"], "delta_over_w": math.sqrt(s["delta2"] / s["w2"]),
            "fp8_rounding_of_w": math.sqrt(s["qerr2"] / s["w2"])}


def largest_block(dims: list[int]) -> int:
    b = 128
    while any(d % b for d in dims):
        b //= 2
    return b


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/run_bf16", help="a run's output_dir or a step-N checkpoint")
    parser.add_argument("--out", default=str(ROOT / "bench/results/requant_delta.json"))
    args = parser.parse_args(argv)

    from moe_dist.export import export
    from moe_dist.export.base import describe_base
    from moe_dist.export.trained import TrainedCheckpoint

    ckpt = TrainedCheckpoint(args.checkpoint)
    base_dir = ckpt.base_model_dir()
    info = describe_base(base_dir)
    F, D = info.intermediate, info.hidden
    with tempfile.TemporaryDirectory() as tmp:
        export(ckpt.path, "merged", Path(tmp) / "merged", dtype="fp32", log=lambda _: None)
        merged = expert_weights(Path(tmp) / "merged", info.spec, info.num_experts, F)
    base = expert_weights(base_dir, info.spec, info.num_experts, F)
    b = largest_block([F, D])
    blocks = {f"{b}x{b}": (b, b)} | ({"128x128_padded": (128, 128)} if b != 128 else {})
    result = {"checkpoint": str(ckpt.path), "base": str(base_dir), "method": ckpt.method, "step": ckpt.step,
              "recipe_model": ckpt.config.model,
              "train": {k: getattr(ckpt.config.train, k) for k in ("steps", "lr", "precision")},
              "base_quantize": getattr(getattr(ckpt.config, "base", None), "quantize", "none"),
              "lora": {"rank": ckpt.config.lora.rank, "alpha": ckpt.config.lora.alpha},
              "dims": {"hidden": D, "intermediate": F, "experts": info.num_experts, "moe_layers": len(info.moe_layers)},
              "block": f"{b}x{b}",
              "block_note": "the largest square power-of-two block dividing F and D (hub: 128x128)",
              "results": {}}
    print(f"{ckpt.path} ({ckpt.method}, step {ckpt.step}), base {base_dir}: D={D} F={F} E={info.num_experts}")
    header = f"{'block':>16} {'base':>5} {'proj':>10} {'ratio':>7} {'err':>7} {'cos':>6} {'codes':>7} " \
             f"{'|sBA|/|W|':>10} {'|Q(W)-W|/|W|':>13}"
    print(header)
    for bname, block in blocks.items():
        for start in ("bf16", "fp8"):
            pooled, rows = measure(base, merged, block, start == "fp8")
            ratios = sorted(r["ratio"] for _k, r in rows)
            entry = {"pooled": pooled, "tensors": len(rows),
                     "per_tensor_ratio": {"min": ratios[0], "median": ratios[len(ratios) // 2], "max": ratios[-1]}}
            if bname == result["block"] and start == "fp8":
                columns = list(rows[0][1])
                entry["per_tensor"] = {"columns": ["layer", "expert", "proj", *columns],
                                       "rows": [[*k, *(round(r[c], 5) for c in columns)] for k, r in rows]}
            result["results"][f"{bname}/{start}"] = entry
            for group in ("overall", *PROJS):
                r = pooled[group]
                print(f"{bname:>16} {start:>5} {group:>10} {r['ratio']:7.3f} {r['err']:7.3f} {r['cos']:6.3f} "
                      f"{r['codes_changed']:7.4f} {r['delta_over_w']:10.4f} {r['fp8_rounding_of_w']:13.4f}")
    print(f"\nsweep ({result['block']}, fp8 base): the trained delta scaled by c")
    print(f"{'c':>7} {'|sBA|/|W|':>10} {'ratio':>7} {'err':>7} {'cos':>6} {'codes':>7}")
    result["sweep"] = {}
    for c in SWEEP:
        r = measure(base, merged, blocks[result["block"]], True, c)[0]["overall"]
        result["sweep"][str(c)] = r
        print(f"{c:7g} {r['delta_over_w']:10.5f} {r['ratio']:7.3f} {r['err']:7.3f} {r['cos']:6.3f} "
              f"{r['codes_changed']:7.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)  # a list of scalars on one line (the per-tensor rows)
    Path(args.out).write_text(re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]",
                                     text) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
