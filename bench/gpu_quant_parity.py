"""Quantized bases on one device (issue 29): FP8-block and MXFP4 checkpoints kept quantized,
against transformers' own model on the weights transformers dequantizes, on `--device`.

For each tiny checkpoint in a hub quantized layout (FP8 deepseek_v3 with MLA, shared expert and
a dense layer all FP8; FP8 qwen3_moe; MXFP4 gpt_oss), written here by moe_dist.quant.write:

  reference  `from_pretrained(quantization_config=FineGrainedFP8Config / Mxfp4Config(
             dequantize=True))` in fp32 on the device, with tests/reference.py's LoRA
  fp32       moe_dist's model loaded by the sharded loader (experts and FP8 linears stay
             quantized, dequantized inside the kernels), expert kernel forced to grouped (the
             GPU path: torch._grouped_mm with a dequantized operand) and to loop; logits and
             every adapter gradient within bench/gpu_parity.py's fp32 tolerances
  bf16       the same loaded in bf16 (what a GPU run computes with); errors recorded, not judged
             (a bf16 rounding flips near-tied top-k choices on these random tiny models)

It also records the device's peak memory of one fp32 forward + backward beside the bytes of the
quantized experts and of their dequantized stacks. NF4 is skipped where bitsandbytes is not
installed (the device image has none, and its wheel does not fit the kit's 64 MiB carry).

    python bench/gpu_quant_parity.py [--device cuda] [--archs deepseek_v3,qwen3_moe,gpt_oss]
                                     [--out bench/results/gpu_quant_parity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_parity import DTYPES, KERNELS, TOLERANCES, compare, forward_backward, init_world_of_one, reference_on, tokens  # noqa: E402,I001
from reference import build_hf, set_b_values  # noqa: E402
from test_parity_distributed import mixed_plan  # noqa: E402

from moe_dist.adapters.lora import LoRAConfig  # noqa: E402
from moe_dist.models.convert import adapter_params  # noqa: E402
from moe_dist.models.loading import load_model  # noqa: E402
from moe_dist.quant.write import write_quantized_checkpoint  # noqa: E402
from moe_dist.routing import experts_modules  # noqa: E402

# bench/gpu_parity.py's fp32 tolerances with tests/test_quantized.py's gradient atol (2e-5:
# gpt_oss's gate_proj lora_A comes 1.97e-5 off on CPU, BLAS rounding in its clamped gate)
FP32 = dict(TOLERANCES["fp32"], grad_atol=2e-5)
CASES = [("deepseek_v3", "fp8_block", (8, 8)), ("qwen3_moe", "fp8_block", (16, 16)), ("gpt_oss", "mxfp4", (128, 128))]


def dequantized_reference(directory: Path, fmt: str, device: torch.device):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    qc = Mxfp4Config(dequantize=True) if fmt == "mxfp4" else FineGrainedFP8Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=qc, dtype=torch.float32).to(device).eval()


def check_case(arch: str, fmt: str, block, device: torch.device, work: Path) -> dict:
    directory = write_quantized_checkpoint(build_hf(arch), work / f"{arch}_{fmt}", fmt, block)
    lora = LoRAConfig(alpha=8.0)
    hf = dequantized_reference(directory, fmt, device)
    plan = mixed_plan(hf.config)
    ref, leaves = reference_on(hf, plan, lora, device)
    ids = tokens(device)
    want_logits, want_grads = forward_backward(ref, ids, leaves)
    out: dict = {"arch": arch, "format": fmt, "block": list(block) if fmt == "fp8_block" else None, "cases": {}}
    failures: list[str] = []
    for dtype_name, dtype in DTYPES.items():
        for kernel in KERNELS:
            name = f"{dtype_name}/{kernel}"
            try:
                model = load_model(directory, plan, lora=lora, dtype=dtype, device=device)
                for m in experts_modules(model).values():
                    m.set_kernel(kernel)
                set_b_values(adapter_params(model))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                logits, grads = forward_backward(model, ids)
                row, bad = compare(logits, grads, want_logits, want_grads,
                                   FP32 if dtype_name == "fp32" else None)
                mods = experts_modules(model).values()
                row["quantized_expert_bytes"] = sum(w.storage_bytes() for m in mods for w in (m.gate_up_proj, m.down_proj))
                row["dequantized_expert_bytes"] = sum(w.shape.numel() * torch.empty((), dtype=dtype).element_size()
                                                      for m in mods for w in (m.gate_up_proj, m.down_proj))
                if device.type == "cuda":
                    row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
                failures += [f"{arch}/{name}: {b}" for b in bad]
            except Exception as exc:  # a case that raises counts as a failure, the others still run
                row = {"error": f"{type(exc).__name__}: {exc}"}
                failures.append(f"{arch}/{name}: raised {row['error'][:300]}")
            out["cases"][name] = row
    out["failures"] = failures
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default=",".join(a for a, _, _ in CASES), help="a subset of " +
                        ",".join(a for a, _, _ in CASES))
    parser.add_argument("--out", default="bench/results/gpu_quant_parity.json")
    args = parser.parse_args()
    cases = [c for c in CASES if c[0] in args.archs.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    backend = init_world_of_one(device)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = [check_case(arch, fmt, block, device, Path(tmp)) for arch, fmt, block in cases]
    try:
        import bitsandbytes  # noqa: F401

        nf4 = "installed: covered by tests/test_quantized.py on CPU; not run here"
    except ImportError:
        nf4 = "skipped: bitsandbytes is not installed"
    failures = [f for r in results for f in r["failures"]]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "backend": backend,
              "torch": torch.__version__, "seconds": round(time.time() - t0, 1), "nf4": nf4, "results": results,
              "failures": failures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for r in results:
        for name, row in r["cases"].items():
            print(f"{r['arch']:12s} {r['format']:9s} {name:13s} " + (row.get("error") or
                  f"logits rel {row['logits_max_rel']:.2e}  grads worst rel {row['grad_max_rel']:.2e}"))
    print(f"gpu_quant_parity: {len(failures)} failure(s); {args.out}")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
