"""Parity of the expert-parallel model with the unconverted HF model, on 4 gloo processes.

For every architecture and for EP sizes 1, 2, 4 (contiguous) plus non-contiguous placements
at EP 2 and 4: logits match the reference, and the gradient of every adapter tensor matches
the plain single-process reference. Each rank feeds different tokens; an expert adapter's
gradient is the sum over the ranks of its EP group (they all send tokens to it), an
attention adapter's is its own rank's.
"""

from __future__ import annotations

import copy

import torch

from dist_utils import run_distributed
from reference import build_hf, build_reference, set_b_values
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.models.arch import arch_spec, moe_layer_indices
from moe_dist.models.convert import adapter_grads, adapter_params, convert_model
from moe_dist.models.tiny import TINY_CONFIGS
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan

ARCHS = sorted(TINY_CONFIGS)
SETUPS = [
    ("ep1", 1, None),
    ("ep2", 2, None),
    ("ep4", 4, None),
    ("ep2-scattered", 2, [[0, 3, 5, 6], [1, 2, 4, 7]]),
    ("ep4-scattered", 4, [[7, 0], [2, 5], [1, 6], [3, 4]]),
]


def mixed_plan(config) -> AdapterPlan:
    """Ranks 4, 8, 6 (padded for grouped mm) and 0 across experts, one projection-level
    difference (so a bucket is not a contiguous slot range), one fused gate_up adapter, LoRA
    on attention."""
    spec = arch_spec(config)
    ranks = {}
    for layer in moe_layer_indices(config):
        for e in range(8):
            r = (4, 8, 0, 4, 6, 0, 4, 8)[(e + layer) % 8]
            for p in ("gate_proj", "up_proj", "down_proj"):
                ranks[(layer, e, p)] = r
        ranks[(layer, 3, "down_proj")] = 0
        for p in ("gate_proj", "up_proj"):  # expert 5: one adapter on the fused gate|up weight instead
            ranks[(layer, 5, p)] = 0
        ranks[(layer, 5, "gate_up_proj")] = 8
    return AdapterPlan(
        expert_ranks=ranks,
        attention_ranks={(l, p): 4 for l in spec.attention for p in spec.attention_targets(l)},
    )


def _tokens(rank: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1000 + rank))


def reference_runs(ref, ref_tensors: dict, batches: list) -> tuple[dict, dict]:
    """The reference's logits and adapter gradients for each rank's tokens (labels = inputs)."""
    logits, grads = {}, {}
    for src, ids in enumerate(batches):
        for t in ref_tensors.values():
            t.grad = None
        out = ref(ids, labels=ids)
        out.loss.backward()
        logits[src] = out.logits.detach()
        grads[src] = {k: t.grad.clone() for k, t in ref_tensors.items() if t.grad is not None}
    return logits, grads


def _check_rank(rank: int, world: int, archs=tuple(ARCHS), setups=tuple(SETUPS)) -> None:
    lora = LoRAConfig(alpha=8.0)
    for arch in archs:
        hf = build_hf(arch)
        plan = mixed_plan(hf.config)
        ref, ref_tensors = build_reference(hf, plan, lora)
        ref_logits, ref_grads = reference_runs(ref, ref_tensors, [_tokens(src) for src in range(world)])
        for name, ep, lists in setups:
            where = f"{arch}/{name}/rank{rank}"
            placements = None
            if lists is not None:
                placement = ExpertPlacement.from_lists(lists)
                placements = {l: placement for l in moe_layer_indices(hf.config)}
            model = convert_model(copy.deepcopy(hf), plan, ep_size=ep, placements=placements, lora=lora)
            params = adapter_params(model)
            set_b_values(params)
            out = model(_tokens(rank), labels=_tokens(rank))
            out.loss.backward()
            grads = adapter_grads(model)
            scale = ref_logits[rank].abs().max().item()
            torch.testing.assert_close(out.logits, ref_logits[rank], atol=1e-5 * scale, rtol=0, msg=lambda m: f"{where}: logits {m}")
            group = range(rank // ep * ep, rank // ep * ep + ep)
            expected_keys = {k for k in ref_tensors if ".self_attn." in k}
            for k, p in params.items():
                zero = torch.zeros_like(ref_tensors[k])  # an expert no token of that rank reached
                if ".experts." in k:
                    expected = sum(ref_grads[s].get(k, zero) for s in group)
                else:
                    expected = ref_grads[rank].get(k, zero)
                g_scale = max(expected.abs().max().item(), 1e-6)
                # 2e-5: BLAS-dependent fp32 rounding; on an AMD EPYC (AVX2) host gpt_oss's
                # layer-1 q_proj lora_A came 1.46e-7 off against 1.40e-7 allowed at 1e-5
                # (the same on the code before issue 28)
                torch.testing.assert_close(grads.get(k), expected, atol=2e-5 * g_scale, rtol=1e-4, msg=lambda m: f"{where}: grad {k}: {m}")
            # this rank holds exactly its experts' adapters (and all attention adapters)
            layer0 = moe_layer_indices(hf.config)[0]
            owned = set(getattr(model.model.layers[layer0], arch_spec(hf.config).block_name).experts.local_experts)
            want = expected_keys | {k for k in ref_tensors if k.startswith(f"layers.{layer0}.experts.") and int(k.split(".")[3]) in owned}
            have = {k for k in params if ".experts." not in k or k.startswith(f"layers.{layer0}.experts.")}
            assert have == want, f"{where}: adapter keys differ: {sorted(have ^ want)[:4]}"


def test_parity_all_architectures_ep_1_2_4_and_scattered():
    run_distributed(_check_rank, 4)
