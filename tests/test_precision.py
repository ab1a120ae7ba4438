"""The bf16 path as a GPU runs it, exercised on CPU: the grouped expert kernel on a bf16
frozen base, DeepSpeed's bf16 engine with fp32 masters (`train.precision=bf16`), activation
checkpointing on.

The rank rule: any adapter rank is accepted everywhere ranks come from (recipes, HELLoRA's
rank, EPnG's growth by rank_unit up to max_rank); the grouped kernel zero-pads each rank
bucket to grouped_mm's 16-byte stride (a multiple of 4 in fp32, 8 in bf16; exact zeros, so
the numbers are the unpadded ones). torch._grouped_mm enforces that stride on CPU as CUDA
does, so odd ranks in bf16 here fail if any path skips the padding."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PRETRAIN_STEPS
from reference import build_hf, set_b_values
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.kernels.grouped import grouped_mm_alignment
from moe_dist.models.arch import moe_layer_indices
from moe_dist.models.convert import adapter_grads, adapter_params, convert_model
from moe_dist.plan import AdapterPlan
from moe_dist.routing import experts_modules

ROOT = Path(__file__).resolve().parent.parent


def test_grouped_mm_rejects_unpadded_bf16_ranks_on_cpu():
    """The premise of the rank tests below: CPU's grouped_mm enforces CUDA's stride rule."""
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    offs = torch.tensor([7, 16], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="16 bytes"):
        torch._grouped_mm(x, torch.randn(2, 32, 6, dtype=torch.bfloat16), offs=offs)
    assert grouped_mm_alignment(torch.bfloat16) == 8 and grouped_mm_alignment(torch.float32) == 4


def _run(model, tokens, kernel: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for experts in experts_modules(model).values():
        experts.set_kernel(kernel)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    return out.logits.detach().float(), {k: g.float() for k, g in adapter_grads(model).items()}


def test_bf16_grouped_kernel_matches_loop_for_every_rank():
    """Ranks 1..9 (most not multiples of 8) on the experts, fused and split projections: the
    grouped kernel in bf16 gives the loop kernel's logits and adapter gradients (bf16
    tolerance), and both track the fp32 model."""
    hf = build_hf("olmoe")
    E = hf.config.num_experts
    ranks = {}
    for l in moe_layer_indices(hf.config):
        for e in range(E):
            r = 1 + (e + l) % 9
            if e % 2:
                ranks[(l, e, "gate_up_proj")] = r
            else:
                ranks.update({(l, e, "gate_proj"): r, (l, e, "up_proj"): r + 1})
            ranks[(l, e, "down_proj")] = 10 - r
    plan = AdapterPlan(expert_ranks=ranks, attention_ranks={(0, "q_proj"): 3})
    fp32 = convert_model(copy.deepcopy(hf), plan, lora=LoRAConfig(alpha=8.0)).train()
    set_b_values(adapter_params(fp32))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)  # what DeepSpeed's bf16 engine does to the module
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    ref_logits, ref_grads = _run(fp32, tokens, "loop")
    loop_logits, loop_grads = _run(bf16, tokens, "loop")
    grouped_logits, grouped_grads = _run(bf16, tokens, "grouped")
    scale = ref_logits.abs().max()
    assert (grouped_logits - loop_logits).abs().max() <= 2e-2 * scale
    assert (grouped_logits - ref_logits).abs().max() <= 5e-2 * scale
    assert grouped_grads.keys() == loop_grads.keys() == ref_grads.keys()
    for k in ref_grads:  # same bf16 routing: per tensor
        g_scale = ref_grads[k].abs().max() + 1e-6
        assert (grouped_grads[k] - loop_grads[k]).abs().max() <= 5e-2 * g_scale, k
    # against fp32 a bf16 router may pick another expert for a token: over all gradients at once
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])  # noqa: E731
    assert (flat(grouped_grads) - flat(ref_grads)).norm() <= 5e-2 * flat(ref_grads).norm()


def _train(out: Path, cache: Path, *extra: str, env: dict | None = None) -> list[float]:
    args = ["--recipe", str(ROOT / "launch/recipes/tiny_lora.yaml"), f"output_dir={out}", f"cache_dir={cache}",
            f"embedded_pretrain_steps={PRETRAIN_STEPS}", "train.steps=6", "train.warmup_steps=1", "train.log_every=1",
            "checkpoint.every=0", "data.eval=", "export.formats=[]", "train.lr=0.01", *extra]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29571",
           str(ROOT / "launch" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_bf16_engine_trains_and_tracks_fp32(tmp_path, cache_dir):
    """EP 2 on 2 ranks: bf16 (grouped kernel, bf16 engine, activation checkpointing) against
    the fp32 default; the first steps agree within bf16 tolerance and the loss falls. A NaN
    loss on rank 0 at step 4 is skipped by bf16's engine too (nothing applied, counted)."""
    fp32 = _train(tmp_path / "fp32", cache_dir)
    bf16 = _train(tmp_path / "bf16", cache_dir, "train.precision=bf16", "moe.kernel=grouped",
                  "train.activation_checkpointing=true", env={"MOE_DIST_NAN_AT": "0:4:1"})
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["activation_checkpointing"] is True and summary["ep_size"] == 2
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert len(bf16) == len(fp32) == 6 and bf16[3] != bf16[3]  # the NaN step is logged as it was
    bf16 = bf16[:3] + bf16[4:]
    fp32 = fp32[:3] + fp32[4:]
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2)
    for a, b in zip(bf16[:3], fp32[:3]):
        assert a == pytest.approx(b, rel=5e-2)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0], (bf16, fp32)
    assert bf16[0] - bf16[-1] > 0.5 * (fp32[0] - fp32[-1]), (bf16, fp32)  # it learns about as fast


@pytest.mark.parametrize("method", ["hellora"])  # hellori (stage 2): bench/gpu_check.sh --dry runs it
def test_bf16_grouped_anchor_and_lori_stage2(tmp_path, cache_dir, method):
    """The GPU path's rules on CPU, end to end (issue 28 findings 2 and 3): EP 2, bf16 engine,
    grouped kernel, one hot expert per layer (so some rank holds no adapter in some layer:
    ZeRO's 1-element anchor parameter shifts the adapter buckets after it in the flat buffer;
    HELLoRA's A is trainable, so the grouped kernel reads it in place there), and for HELLoRI
    through stage 2 (LoRI's global threshold: all-reduced statistics), over torch's
    all_to_all_single (the path NCCL runs). Every grouped_mm operand is checked against CUDA's
    alignment and stride rules (moe_dist/kernels/grouped.py), every collective input against
    the backend's device. Without ZeRO's parameter_alignment and `aligned` the HELLoRA run
    hands grouped_mm a misaligned A and fails."""
    out = tmp_path / method
    extra = ["hellori.stage1_steps=2"] if method == "hellori" else []
    args = ["--recipe", str(ROOT / f"launch/recipes/tiny_{method}.yaml"), f"output_dir={out}", f"cache_dir={cache_dir}",
            f"embedded_pretrain_steps={PRETRAIN_STEPS}", "train.steps=4", "train.warmup_steps=1", "train.log_every=1",
            "hellora.profile_steps=2", "hellora.top_k=1", "train.micro_batch=4", "checkpoint.every=0", "data.eval=",
            "export.formats=[]", "train.precision=bf16", "moe.kernel=grouped", *extra]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29573",
           str(ROOT / "launch" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", MOE_DIST_HOST_EXCHANGE="0"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ep_size"] == 2
    if method == "hellori":
        events = (out / "metrics.jsonl").read_text()
        assert "LoRI stage 2" in events, events  # the stage-2 collectives ran
