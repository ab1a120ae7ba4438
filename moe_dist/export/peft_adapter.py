"""`peft`: an adapter directory that plain `peft.PeftModel.from_pretrained(base, dir)` loads.

PEFT 0.21.2 puts LoRA on a fused 3-D expert weight through `target_parameters` (ParamWrapper,
peft/tuners/lora/layer.py): one rank r per targeted parameter, lora_A (r*E x in) expert-major
(rows e*r .. e*r+r-1 are expert e), lora_B (out x r*E) rank-major (column j*E + e is expert e's
j-th rank), delta_e = scaling * B_e @ A_e on the (E, out, in) weight. moe_dist's adapters are
per (expert, projection) with their own ranks, so per parameter every expert is zero-padded to
the layer's largest rank (zero rows/columns add exact zeros), experts without an adapter are
all zeros, each expert's own alpha/r_e (and LoRI mask) is folded into its B, and the config says
lora_alpha = r for every target (scaling exactly 1). Separate gate and up adapters become one
gate_up_proj adapter with A stacked along the rank and B block-diagonal (as PEFT's own
conversion in peft/utils/transformers_weight_conversion.py does).

The tensor names and shapes are PEFT's own: the adapter is injected into a meta-device
skeleton of the base (no memory), and each LoRA module PEFT created names its tensors; which
of two parameters of one module becomes the inner `base_layer` wrapper is whatever PEFT did.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_dist.export.base import BaseModel
from moe_dist.export.trained import ExportError, TrainedCheckpoint
from moe_dist.models.layout import gate_up_rows_to_storage

ADAPTER_NAME = "default"


def _targets(ckpt: TrainedCheckpoint, base: BaseModel) -> tuple[dict[str, int], dict[str, int]]:
    """({fused parameter path: rank}, {attention module path: rank}) with the padded ranks."""
    params: dict[str, int] = {}
    for layer in ckpt.expert_layers():
        for param in ("gate_up_proj", "down_proj"):
            r = max(ckpt.target_rank(layer, e, param) for e in range(base.num_experts))
            if r:
                params[f"{base.spec.experts_path(layer)}.{param}"] = r
    modules = {f"model.layers.{layer}.{base.spec.attention_module(layer)}.{proj}": r
               for (layer, proj), r in ckpt.plan.attention_ranks.items()}
    return params, modules


def peft_config(ckpt: TrainedCheckpoint, base: BaseModel, base_name: str, single_rank: bool = False):
    """`single_rank`: every target padded to the largest rank, no rank_pattern (vLLM's 3-D MoE
    LoRA reads PEFT's layout but one rank per adapter)."""
    from peft import LoraConfig

    params, modules = _targets(ckpt, base)
    ranks = {**params, **modules}
    if not ranks:
        raise ExportError(f"{ckpt.path}: the plan has no LoRA adapters to export")
    if single_rank:
        ranks = {k: max(ranks.values()) for k in ranks}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {k: v for k, v in ranks.items() if v != r}
    return LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", target_modules=sorted(modules) or None,
                      target_parameters=sorted(params) or None, base_model_name_or_path=base_name)


def _fill_param_wrapper(ckpt: TrainedCheckpoint, base: BaseModel, layer: int, param: str, r: int, A_shape, B_shape
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    E = base.num_experts
    A = torch.zeros(A_shape, device="cpu")  # (E*r, in): expert-major
    B = torch.zeros(B_shape, device="cpu")  # (out, r*E): rank-major
    if A.shape[0] != E * r or B.shape[1] != E * r:
        raise ExportError(f"PEFT built {param} of layer {layer} as {tuple(A.shape)}/{tuple(B.shape)}, expected "
                          f"{E} experts x rank {r}")
    B_ORE = B.view(B.shape[0], r, E)
    for e in range(E):
        f = ckpt.expert_factors(layer, e, param, base.hidden, base.intermediate)
        if f is None:
            continue
        A[e * r:e * r + f.rank] = f.A_RI
        # B's rows are the weight's output features in its stored order (gpt-oss: gate/up interleaved)
        B_ORE[:, :f.rank, e] = gate_up_rows_to_storage(f.B_OR, base.spec.layout) if param == "gate_up_proj" else f.B_OR
    return A, B


def export_peft(ckpt: TrainedCheckpoint, base: BaseModel, out: Path, base_name: str, single_rank: bool = False
                ) -> dict:
    import re

    from peft import get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoModelForCausalLM

    config = peft_config(ckpt, base, base_name, single_rank)
    with torch.device("meta"), warnings.catch_warnings():
        # peft 0.21.2 checks rank_pattern keys against targeted *modules* only and calls the
        # target_parameters ones "ignored"; they are applied (the shapes below prove it).
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        skeleton = AutoModelForCausalLM.from_config(base.config)
        peft_model = get_peft_model(skeleton, config)
    tensors: dict[str, torch.Tensor] = {}
    layer_of = re.compile(r"model\.layers\.(\d+)\.")
    for name, module in peft_model.named_modules():
        if not isinstance(module, (ParamWrapper, LoraLinear)) or ADAPTER_NAME not in module.lora_A:
            continue
        key = name + ".{}.weight"
        r = module.r[ADAPTER_NAME]
        A_shape = tuple(module.lora_A[ADAPTER_NAME].weight.shape)
        B_shape = tuple(module.lora_B[ADAPTER_NAME].weight.shape)
        layer = int(layer_of.search(name).group(1))
        if isinstance(module, ParamWrapper):
            if bool(getattr(module.get_base_layer(), "is_transposed", False)) != base.spec.layout.transposed:
                raise ExportError(f"{name}: PEFT sees is_transposed={module.get_base_layer().is_transposed}, the "
                                  f"architecture table says {base.spec.layout}")
            A, B = _fill_param_wrapper(ckpt, base, layer, module.parameter_name, r, A_shape, B_shape)
        else:
            proj = name.rsplit(".", 1)[1]
            f = ckpt.attention_factors(layer, proj)
            if f is None or f.rank > r or (f.B_OR.shape[0], f.A_RI.shape[1]) != (B_shape[0], A_shape[1]):
                raise ExportError(f"{name}: PEFT built rank {r} {B_shape[0]}x{A_shape[1]}, the checkpoint has "
                                  f"{None if f is None else (f.rank, *f.B_OR.shape, f.A_RI.shape[1])}")
            A, B = torch.zeros(A_shape, device="cpu"), torch.zeros(B_shape, device="cpu")  # zero-padded to r where single_rank asks
            A[:f.rank], B[:, :f.rank] = f.A_RI, f.B_OR
        tensors[key.format("lora_A")] = A.contiguous()
        tensors[key.format("lora_B")] = B.contiguous()
    params, modules = _targets(ckpt, base)
    if len(tensors) != 2 * (len(params) + len(modules)):
        raise ExportError(f"PEFT created {len(tensors) // 2} LoRA modules, the checkpoint has "
                          f"{len(params) + len(modules)} targets")
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"targets": len(tensors) // 2, "r": config.r, "rank_pattern": len(config.rank_pattern)}
