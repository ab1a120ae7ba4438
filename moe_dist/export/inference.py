"""`moe_dist` format and `load_for_inference`: the trained adapters on a plain HF model, with no
DeepSpeed and no process group.

What does not merge (DMEP's LoRA-MoE: a router per module picks its LoRA experts per token,
so the update is not one fixed W + BA) is exported in moe_dist's own format: plan.json, the
adapter tensors under their logical keys (LoRI masks kept beside their B), and a manifest with
the run's config. `load_for_inference(base, dir)` loads the base with plain transformers,
folds every plain LoRA adapter into its weight in memory (experts and attention), and attaches
the LoRA-MoE modules (moe_dist.adapters.lora_moe.LoRAMoELinear) with their trained values. It
reads a training checkpoint directory just as well.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from moe_dist.export.base import BaseModel, check_plan_fits, describe_base
from moe_dist.export.trained import NATIVE_FILE, ExportError, TrainedCheckpoint


def export_native(ckpt: TrainedCheckpoint, out: Path) -> dict:
    from safetensors.torch import save_file

    keys = ckpt.plan_keys()
    tensors = {k: ckpt.tensor(k).contiguous() for k in keys}
    tensors.update({f"{k}.mask": ckpt.tensor(f"{k}.mask") for k in keys if ckpt.has(f"{k}.mask")})
    save_file(tensors, str(out / "adapters.safetensors"), metadata={"format": "pt"})
    shutil.copy2(ckpt.path / "plan.json", out / "plan.json")
    manifest = {k: ckpt.state[k] for k in ("step", "method", "config", "model_dir", "base_shape") if k in ckpt.state}
    (out / NATIVE_FILE).write_text(json.dumps(manifest, indent=2))
    return {"tensors": len(tensors)}


@torch.no_grad()
def merge_into(model: nn.Module, ckpt: TrainedCheckpoint, base: BaseModel) -> int:
    """Fold every plain LoRA adapter of `ckpt` into the in-memory HF model (transformers v5's
    fused expert parameters, attention linears). Returns the number of weights changed."""
    from moe_dist.models.arch import decoder_layers

    from moe_dist.models.layout import down_delta_to_storage, gate_up_delta_to_storage

    layers = decoder_layers(model)
    changed = 0
    for layer in ckpt.expert_layers():
        experts = getattr(layers[layer], base.spec.block_name).experts
        for param, to_storage in (("gate_up_proj", gate_up_delta_to_storage), ("down_proj", down_delta_to_storage)):
            W = getattr(experts, param)
            for e in range(base.num_experts):
                f = ckpt.expert_factors(layer, e, param, base.hidden, base.intermediate)
                if f is not None:
                    W[e] = (W[e].double() + to_storage(f.delta(), base.spec.layout).to(W.device)).to(W.dtype)
                    changed += 1
    for (layer, proj) in ckpt.plan.attention_ranks:
        linear = getattr(getattr(layers[layer], base.spec.attention_module(layer) if base.spec else "self_attn"), proj)
        delta = ckpt.attention_factors(layer, proj).delta().to(linear.weight.device)  # factors are read on CPU
        linear.weight.copy_(linear.weight.double() + delta)
        changed += 1
    return changed


def load_for_inference(base: str | Path | None, adapters: str | Path, dtype: torch.dtype | None = None,
                       device: torch.device | str = "cpu") -> nn.Module:
    """A plain transformers model (eval mode) with the adapters of `adapters` (a `--format
    moe_dist` export or a training checkpoint) applied. `base`: the base model dir or hub
    name; None = the one the run trained on."""
    from transformers import AutoModelForCausalLM

    from moe_dist.adapters.lora import LoRAConfig
    from moe_dist.models.convert import apply_lora_moe

    ckpt = TrainedCheckpoint(adapters)
    base_dir = ckpt.base_model_dir(str(base) if base is not None else None)
    info = describe_base(base_dir)
    check_plan_fits(ckpt, info)
    from moe_dist.quant.checkpoint import dequantized_load_kwargs

    # a quantized base (FP8, MXFP4) is dequantized by transformers, then the adapters fold in
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or torch.float32,
                                                 **dequantized_load_kwargs(base_dir)).to(device)
    merge_into(model, ckpt, info)
    if ckpt.plan.lora_moe:
        lora = LoRAConfig(alpha=ckpt.lora.alpha, rslora=ckpt.lora.rslora, seed=ckpt.lora.seed)
        apply_lora_moe(model, ckpt.plan, lora, device)
        from moe_dist.models.convert import adapter_params

        params = adapter_params(model)
        missing = sorted(set(ckpt.plan_keys()) - set(params))
        if missing:
            raise ExportError(f"{ckpt.path}: LoRA-MoE tensors {missing[:3]} found no module in the model")
        with torch.no_grad():
            for key, p in params.items():
                value = ckpt.tensor(key)
                if value.shape != p.shape:
                    raise ExportError(f"{ckpt.path}: {key} is {tuple(value.shape)}, the module wants {tuple(p.shape)}")
                p.copy_(value.to(p.dtype))
        for m in model.modules():
            if hasattr(m, "lb_enabled"):
                m.lb_enabled = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
