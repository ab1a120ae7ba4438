"""Getting a trained run out of moe_dist: `export(checkpoint, fmt, out)` writes

- `merged`: a full HF checkpoint (W + s B A folded in, shard by shard) for plain transformers;
- `peft`: a PEFT adapter (`target_parameters` on fused experts, `target_modules` on attention);
- `vllm`: vLLM's per-expert 2-D MoE LoRA layout;
- `moe_dist`: the adapters in moe_dist's own format, for `load_for_inference` (what DMEP's
  LoRA-MoE, which no fixed W + BA represents, exports to).

One process, no process group, any world / EP size the checkpoint was written with. The output
appears complete under `out` or not at all (written into a temp dir, renamed at the end).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from moe_dist.config import EXPORT_FORMATS
from moe_dist.export.base import check_plan_fits, describe_base
from moe_dist.export.inference import export_native, load_for_inference
from moe_dist.export.output import EXPORT_INFO, check_output_dir, staged_dir, write_info
from moe_dist.export.trained import ExportError, TrainedCheckpoint

FORMATS = EXPORT_FORMATS
UNMERGEABLE = ("merged", "peft", "vllm")
DTYPES = {"": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}

__all__ = ["FORMATS", "ExportError", "export", "load_for_inference", "EXPORT_INFO"]


def refusal(fmt: str, method_has_lora_moe: bool) -> str | None:
    """Why `fmt` cannot carry a plan, or None."""
    if method_has_lora_moe and fmt in UNMERGEABLE:
        return (f"--format {fmt}: this checkpoint holds DMEP LoRA-MoE adapters, where a router in every module picks "
                "top-k of its LoRA experts per token; that is not one fixed W + s*B*A, so no merged weight, PEFT LoRA "
                "or vLLM LoRA can represent it. Use --format moe_dist and "
                "moe_dist.export.load_for_inference(base, dir) (or launch/eval.py / launch/generate.py --adapter dir)")
    return None


def export(checkpoint: str | Path, fmt: str, out: str | Path, base: str | None = None, dtype: str = "",
           log=print, replace_previous: bool = False) -> dict:
    """Export one checkpoint to one format. Returns what was written (and how long it took).
    `out` must be new or empty (or, with `replace_previous`, hold an earlier export)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {FORMATS}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {sorted(k for k in DTYPES if k)}")
    out = Path(out)
    check_output_dir(out, replace_previous)
    t0 = time.perf_counter()
    ckpt = TrainedCheckpoint(checkpoint)
    why = refusal(fmt, bool(ckpt.plan.lora_moe))
    if why:
        raise ExportError(why)
    base_dir = ckpt.base_model_dir(base)
    info = describe_base(base_dir)
    check_plan_fits(ckpt, info)
    base_name = base or ckpt.config.model
    if base_name.startswith("embedded:"):
        base_name = str(base_dir.resolve())
    with staged_dir(out, replace_previous) as tmp:
        if fmt == "merged":
            from moe_dist.export.merged import export_merged

            result = export_merged(ckpt, info, tmp, DTYPES[dtype])
        elif fmt == "peft":
            from moe_dist.export.peft_adapter import export_peft

            result = export_peft(ckpt, info, tmp, base_name)
        elif fmt == "vllm":
            from moe_dist.export.vllm_adapter import export_vllm

            result = export_vllm(ckpt, info, tmp, base_name)
        else:
            result = export_native(ckpt, tmp)
        # a merged export of a quantized base says it was dequantized, beside the weights too
        write_info(tmp, {**ckpt.metadata(fmt, base_dir), **({"note": result["note"]} if result.get("note") else {})})
    result.update(format=fmt, out=str(out), seconds=round(time.perf_counter() - t0, 3))
    log(f"exported {ckpt.path} ({ckpt.method}, step {ckpt.step}) as {fmt} to {out} in {result['seconds']:.1f}s"
        + (f": {result['note']}" if result.get("note") else ""))
    return result


