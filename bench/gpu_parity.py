"""Parity of the converted model with the HF + LoRA reference on one device (issue 17 item 4).

For each architecture (default: every supported model type, as tests/test_architectures.py
classifies them), the tiny HF model of tests/reference.py with the mixed adapter plan of
tests/test_parity_distributed.py (ranks 4, 8, 6, 0; one fused gate_up adapter; attention
LoRA), on `--device`, world 1, EP 1, under a one-process group (NCCL on CUDA, gloo on CPU),
as the launcher would set it up:

  reference  HF's own model with LoRA applied the plain way (tests/reference.py), fp32,
             on the same device (TF32 off, so fp32 means fp32)
  fp32       the converted model in fp32; logits and every adapter gradient tight
             (the distributed parity test's tolerances)
  bf16       the converted model cast to bf16 (frozen base and adapters: what a bf16 base
             under DeepSpeed's bf16 engine computes with), judged per expert layer: each
             layer, on the hidden states and routing it got in that forward, against its
             fp32 twin (the same bf16-rounded weights upcast, loop kernel, which the fp32
             case ties to the reference): output, input gradient and adapter gradients
             within bf16 tolerance. The whole model's logits and gradients against the fp32
             reference are recorded, not judged: on these random tiny models a bf16 rounding
             flips a near-tied top-k choice somewhere and that token's logits move by O(1)
             (HF's own model without adapters is up to 0.3 off in bf16 on afmoe, gpt_oss,
             kolibri1).

each with the expert kernel forced to `grouped` (the GPU path: torch._grouped_mm) and to
`loop`. Errors are normalised by the reference's largest magnitude (logits; each gradient
tensor): `rel` = max |got - want| / max |want|. Writes a JSON report and exits 1 on any
failure (a case that raises counts as one).

    python bench/gpu_parity.py [--device cuda] [--archs olmoe,gpt_oss] [--dtypes fp32,bf16]
                               [--kernels grouped,loop] [--out bench/results/gpu_parity.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from reference import RefLoRALinear, build_hf, build_reference, set_b_values  # noqa: E402
from test_parity_distributed import mixed_plan  # noqa: E402

from moe_dist.adapters.lora import LoRAConfig  # noqa: E402
from moe_dist.param_views import grad_of  # noqa: E402
from moe_dist.models.convert import adapter_grads, adapter_params, convert_model  # noqa: E402
from moe_dist.routing import experts_modules  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNELS = ("grouped", "loop")
# fp32 logits: max |got - want| <= logits * max |want|; a gradient: |got - want| <= atol * max
# |want| + rtol * |want| elementwise (torch.testing.assert_close's rule, the parity tests' values).
# bf16, per expert layer against its fp32 twin: output within layer_out * max |want|, input and
# adapter gradients within layer_grad * max |want| (CPU, 38 types: worst 1.5e-2 and 3.3e-2).
TOLERANCES = {"fp32": dict(logits=1e-5, grad_atol=1e-5, grad_rtol=1e-4),
              "bf16": dict(layer_out=4e-2, layer_grad=8e-2)}


def supported_types() -> list[str]:
    """Every model type on transformers' experts interface that moe_dist converts (the
    classification of tests/test_architectures.py, without its pytest import)."""
    from transformers import CONFIG_MAPPING

    from moe_dist.models.arch import QUIRKS, UnsupportedModelError, arch_spec, interface_model_types
    from moe_dist.models.tiny import tiny_config

    out = []
    for mt in interface_model_types():
        if mt in QUIRKS or mt not in CONFIG_MAPPING:
            continue
        try:
            arch_spec(tiny_config(mt))
        except UnsupportedModelError:
            continue
        out.append(mt)
    return sorted(out)


def init_world_of_one(device: torch.device) -> str:
    """A one-process group the way the deepspeed launcher sets one up (env://); NCCL on CUDA.
    Returns the backend. Converting at EP 1 then creates DeepSpeed's expert groups on it."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend()
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in dict(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        os.environ.setdefault(k, v)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)  # the backend really runs a collective on this device
    assert probe.item() == 1.0, probe
    return backend


def tokens(device: torch.device) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1000)).to(device)


def reference_on(hf, plan, lora: LoRAConfig, device: torch.device):
    """tests/reference.py's reference, moved to `device` (its adapter tensors are plain leaf
    tensors that .to() does not move: replaced here in the dict the expert modules share and
    on each attention wrapper)."""
    ref, tensors = build_reference(hf, plan, lora)
    moved = {k: t.detach().to(device).requires_grad_(t.requires_grad) for k, t in tensors.items()}
    by_id = {id(t): moved[k] for k, t in tensors.items()}
    for m in ref.modules():
        if isinstance(m, RefLoRALinear):
            m.A, m.B = by_id[id(m.A)], by_id[id(m.B)]
    tensors.update(moved)
    return ref.to(device), tensors


def forward_backward(model, ids: torch.Tensor, leaves: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and gradients by key: of `leaves` (the reference's tensors), or of a moe_dist
    model's adapters (`adapter_grads`: expert adapters are views of their rank bucket)."""
    if leaves is None:
        model.zero_grad(set_to_none=True)
    for t in (leaves or {}).values():
        t.grad = None
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = adapter_grads(model) if leaves is None else {k: t.grad for k, t in leaves.items() if t.grad is not None}
    return out.logits.detach().float(), {k: g.float() for k, g in grads.items()}


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(max abs error, that over max |want|, whether |got - want| <= atol * max |want| + rtol * |want|
    everywhere: torch.testing.assert_close's rule with atol scaled to the tensor)."""
    scale = max(want.abs().max().item(), 1e-6)
    diff = (got - want).abs()
    excess = (diff - atol * scale - rtol * want.abs()).max().item()
    return diff.max().item(), diff.max().item() / scale, excess <= 0  # (NaN fails)


def compare(logits, grads, want_logits, want_grads, tol: dict | None) -> tuple[dict, list[str]]:
    """Logits and every adapter gradient (an adapter no token reached has a zero gradient,
    which one side may leave as None): the errors, and what exceeds `tol` (None: report only)."""
    tol = tol or dict(logits=float("inf"), grad_atol=float("inf"), grad_rtol=0.0)
    err, rel, ok = _close(logits, want_logits, tol["logits"], 0.0)
    row = dict(logits_max_abs=err, logits_max_rel=rel, grad_max_abs=0.0, grad_max_rel=0.0, worst_grad="")
    problems = [] if ok else [f"logits rel {rel:.2e} > {tol['logits']:g}"]
    for k in sorted(want_grads.keys() | grads.keys()):
        want = want_grads.get(k, torch.zeros_like(grads.get(k, want_grads.get(k))))
        err, rel, ok = _close(grads.get(k, torch.zeros_like(want)), want, tol["grad_atol"], tol["grad_rtol"])
        if rel >= row["grad_max_rel"]:
            row.update(grad_max_abs=err, grad_max_rel=rel, worst_grad=k)
        if not ok:
            problems.append(f"grad {k}: rel {rel:.2e}")
    return row, problems


def capture_expert_inputs(model) -> tuple[dict, list]:
    """What each expert layer is called with in the next forward: (hidden, top_k_index,
    top_k_weights) by layer, via forward pre-hooks (returns the dict and the hook handles)."""
    seen: dict = {}
    handles = []
    for layer, experts in experts_modules(model).items():
        def hook(_mod, args, layer=layer):
            seen[layer] = tuple(a.detach().clone() for a in args)
        handles.append(experts.register_forward_pre_hook(hook))
    return seen, handles


def layer_parity(experts, inputs: tuple, tol: dict) -> dict:
    """One expert layer in bf16 against its fp32 twin (the same bf16-rounded weights and
    adapters, upcast; loop kernel) on the same hidden states and the same routing: output,
    input gradient and adapter gradients for one fixed output cotangent. With routing fixed
    no top-k choice can flip, so this isolates the kernel's own bf16 rounding."""
    twin = copy.deepcopy(experts, memo={id(experts.groups): experts.groups}).float()  # (process groups shared)
    twin.set_kernel("loop")
    hidden, index, weights = inputs
    cot = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7)).to(hidden.device)
    outs = {}
    for name, mod, dtype in (("got", experts, hidden.dtype), ("want", twin, torch.float32)):
        mod.zero_grad(set_to_none=True)
        x = hidden.detach().to(dtype).requires_grad_()
        y = mod(x, index, weights.to(dtype) if weights.is_floating_point() else weights)
        (y.float() * cot).sum().backward()
        outs[name] = (y.detach().float(), x.grad.float(),
                      {k: grad_of(p).float() for k, p in mod.adapter_params().items() if grad_of(p) is not None})
    (y, dx, g), (y_ref, dx_ref, g_ref) = outs["got"], outs["want"]
    row = dict(problems=[])
    for what, got, want, atol in (("output", y, y_ref, tol["layer_out"]),
                                  ("input grad", dx, dx_ref, tol["layer_grad"])):
        err, rel, ok = _close(got, want, atol, 0.0)
        row[f"{what.replace(' ', '_')}_max_rel"] = rel
        if not ok:
            row["problems"].append(f"{what} rel {rel:.2e} > {atol:g}")
    worst = 0.0
    for k in sorted(g_ref.keys() | g.keys()):
        want = g_ref.get(k, torch.zeros_like(g.get(k, g_ref.get(k))))
        err, rel, ok = _close(g.get(k, torch.zeros_like(want)), want, tol["layer_grad"], 0.0)
        worst = max(worst, rel)
        if not ok:
            row["problems"].append(f"grad {k}: rel {rel:.2e}")
    row["adapter_grad_max_rel"] = worst
    return row


def check_arch(arch: str, device: torch.device, dtypes, kernels) -> dict:
    lora = LoRAConfig(alpha=8.0)
    hf = build_hf(arch)
    plan = mixed_plan(hf.config)
    ids = tokens(device)
    ref, ref_tensors = reference_on(hf, plan, lora, device)
    want_logits, want_grads = forward_backward(ref, ids, ref_tensors)
    del ref
    out: dict = {}
    for dname in dtypes:
        model = convert_model(copy.deepcopy(hf).to(device), plan, lora=lora)
        params = adapter_params(model)
        if params.keys() != ref_tensors.keys():
            differ = sorted(params.keys() ^ ref_tensors.keys())[:4]
            raise AssertionError(f"adapter keys differ from the reference's: {differ}")
        set_b_values(params)
        if DTYPES[dname] != torch.float32:
            model.to(DTYPES[dname])  # the whole module, as tests/test_precision.py casts it
        tol = TOLERANCES[dname]
        out[dname] = {}
        for kernel in kernels:
            try:
                for experts in experts_modules(model).values():
                    experts.set_kernel(kernel)
                seen, handles = capture_expert_inputs(model)
                logits, grads = forward_backward(model, ids)
                for h in handles:
                    h.remove()
                judged = dname == "fp32"  # bf16: the whole model is reported, its expert layers judged
                model_row, problems = compare(logits, grads, want_logits, want_grads, tol if judged else None)
                row = dict(model=model_row)
                if not judged:
                    if not (torch.isfinite(logits).all() and all(torch.isfinite(g).all() for g in grads.values())):
                        problems.append("non-finite logits or gradients")
                    row["layers"] = {}
                    for layer, experts in experts_modules(model).items():
                        row["layers"][layer] = layer_parity(experts, seen[layer], tol)
                        problems += [f"layer {layer}: {p}" for p in row["layers"][layer].pop("problems")]
                row.update(passed=not problems, problems=problems[:5])
                out[dname][kernel] = row
            except Exception as exc:  # a kernel that raises on this device is a failure to report
                out[dname][kernel] = dict(passed=False, problems=[f"{type(exc).__name__}: {exc}"[:500]])
        del model, params
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--archs", default="", help="comma-separated model types (default: every supported one)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_parity.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device wants an index
            device = torch.device("cuda", 0)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 tolerances are fp32's, not TF32's
        torch.backends.cudnn.allow_tf32 = False
    archs = [a for a in args.archs.split(",") if a] or supported_types()
    dtypes = [d for d in args.dtypes.split(",") if d]
    kernels = [k for k in args.kernels.split(",") if k]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: {d!r} is not one of {sorted(DTYPES)}")
    backend = init_world_of_one(device)
    t0 = time.perf_counter()
    results, failed = {}, []
    print(f"{'arch':<18}{'dtype':<6}{'kernel':<9}{'logits rel':>11}{'grad rel':>10}{'layer rel':>10}  result")
    for arch in archs:
        try:
            results[arch] = check_arch(arch, device, dtypes, kernels)
        except Exception as exc:  # building the model or the reference failed on this device
            results[arch] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            failed.append(arch)
            print(f"{arch:<18}{'':<15}{'':>21}  ERROR {results[arch]['error']}")
            continue
        for dname, by_kernel in results[arch].items():
            for kernel, row in by_kernel.items():
                if not row["passed"]:
                    failed.append(f"{arch}/{dname}/{kernel}")
                nums = (f"{row['model']['logits_max_rel']:>11.1e}{row['model']['grad_max_rel']:>10.1e}"
                        if "model" in row else f"{'-':>11}{'-':>10}")
                if "layers" in row:
                    worst = max(max(l.values()) for l in row["layers"].values())
                    nums += f"{worst:>10.1e}"
                else:
                    nums += f"{'':>10}"
                verdict = "ok" if row["passed"] else "FAIL " + "; ".join(row["problems"])
                print(f"{arch:<18}{dname:<6}{kernel:<9}{nums}  {verdict}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    report = dict(
        device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, backend=backend, world_size=1, ep_size=1,
        tolerances=TOLERANCES, seconds=round(time.perf_counter() - t0, 1), archs=archs, results=results,
        failed=failed, passed=not failed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(archs)} architectures, {len(failed)} failure(s) in {report['seconds']}s; wrote {args.out}")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
