"""Turn a transformers MoE model into the expert-parallel model with adapters from a plan.

Only each MoE block's `experts` module is swapped (and attention projections wrapped with
LoRA); routers, shared experts, norms and attention stay HF's own modules, so the
unconverted model is the numerical oracle.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from moe_dist.adapters.lora_moe import LoRAMoELinear
from moe_dist.adapters.lora import LoRAConfig, LoRALinear, link_shared_input
from moe_dist.models.arch import ArchSpec, arch_spec, decoder_layers, moe_blocks
from moe_dist.models.layout import (ExpertsLayout, down_to_canonical, gate_up_bias_to_canonical, gate_up_to_canonical,
                                    gpt_oss_gate)
from moe_dist.moe.experts import ExpertParallelExperts
from moe_dist.parallel.groups import expert_groups
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.param_views import grad_of
from moe_dist.plan import AdapterPlan
from moe_dist.quant.codecs import Codec
from moe_dist.quant.frozen import QuantizedLinear

FROZEN_LINEARS = (nn.Linear, QuantizedLinear)  # what LoRA wraps: plain, or kept quantized (FP8 checkpoints)
# attention projections that every supported architecture computes from the same hidden states
SHARED_INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class ConversionInfo:
    """What a converted model was built from (attached as `model.moe_dist_info`)."""

    spec: ArchSpec
    plan: AdapterPlan
    placements: Mapping[int, ExpertPlacement]
    ep_size: int
    lora: LoRAConfig


def convert_model(
    model: nn.Module,
    plan: AdapterPlan,
    ep_size: int = 1,
    placements: Mapping[int, ExpertPlacement] | None = None,
    lora: LoRAConfig = LoRAConfig(),
    device: torch.device | str | None = None,
    codec: Codec | None = None,
) -> nn.Module:
    """Swap every MoE block's experts for `ExpertParallelExperts` holding only this rank's
    experts, add adapters per `plan`, freeze everything else. In place; returns `model`.

    If the HF experts hold real weights, the owned experts' slices are copied (quantized with
    `codec` where given: moe_dist/quant); if they are on the meta device (sharded loading), the
    new module's base weights are left for the loader.
    """
    spec = arch_spec(model.config)
    groups = expert_groups(ep_size)
    blocks = moe_blocks(model, spec)
    num_experts = spec.num_experts
    placements = dict(placements or {})
    for layer in blocks:
        placements.setdefault(layer, ExpertPlacement.contiguous(num_experts, ep_size))
    stray = sorted({l for (l, _e, _p) in plan.expert_ranks} - set(blocks))
    if stray:
        raise ValueError(f"plan has expert adapters on layer(s) {stray}, which are not MoE layers ({sorted(blocks)})")
    for param in model.parameters():
        param.requires_grad_(False)

    layout = spec.layout
    for layer, block in blocks.items():
        old = block.experts
        src_meta = old.gate_up_proj.is_meta
        dev = device if device is not None else (None if src_meta else old.gate_up_proj.device)
        new = ExpertParallelExperts(
            layer=layer,
            num_experts=num_experts,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            act_fn=getattr(old, "act_fn", None),
            placement=placements[layer],
            groups=groups,
            ranks=plan.expert_ranks_of_layer(layer),
            lora=lora,
            lori=plan.lori,
            dtype=old.gate_up_proj.dtype,
            device=dev,
            biases=layout.biases,
            gate_fn=gate_function(old, layout),
            codec=codec,
        )
        if not src_meta:
            with torch.no_grad():
                idx = torch.tensor(new.local_experts, dtype=torch.long, device=old.gate_up_proj.device)
                new.load_base_("gate_up_proj", gate_up_to_canonical(old.gate_up_proj.index_select(0, idx), layout))
                new.load_base_("down_proj", down_to_canonical(old.down_proj.index_select(0, idx), layout))
                if layout.biases:
                    new.gate_up_bias.copy_(gate_up_bias_to_canonical(old.gate_up_proj_bias.index_select(0, idx),
                                                                     layout))
                    new.down_bias.copy_(old.down_proj_bias.index_select(0, idx))
        block.experts = new
        del old

    _wrap_attention(model, spec, plan, lora, device)
    apply_lora_moe(model, plan, lora, device)
    model.moe_dist_info = ConversionInfo(spec, plan, placements, ep_size, lora)
    return model


def gate_function(hf_experts: nn.Module, layout: ExpertsLayout):
    """The architecture's own gate activation on [gate | up] rows, or None for act_fn(gate) * up."""
    if layout.gate == "gpt_oss":
        return functools.partial(gpt_oss_gate, alpha=float(hf_experts.alpha), limit=float(hf_experts.limit))
    return None


def convert_dense_model(model: nn.Module, plan: AdapterPlan, lora: LoRAConfig = LoRAConfig(),
                        device: torch.device | str | None = None) -> nn.Module:
    """A dense HF causal LM (Llama, Qwen2/3, ...) with the plan's LoRA-MoE adapters (DMEP on
    dense models). Expert adapters make no sense here and are refused."""
    if plan.expert_ranks or plan.attention_ranks:
        raise ValueError("a dense model takes only LoRA-MoE adapters (method: dmep)")
    for param in model.parameters():
        param.requires_grad_(False)
    apply_lora_moe(model, plan, lora, device)
    model.moe_dist_info = ConversionInfo(None, plan, {}, 1, lora)
    return model


def apply_lora_moe(model: nn.Module, plan: AdapterPlan, lora: LoRAConfig, device=None) -> None:
    layers = decoder_layers(model)
    for (layer, path), experts in plan.lora_moe.items():
        if not 0 <= layer < len(layers):
            raise ValueError(f"plan: LoRA-MoE on layer {layer}, model has {len(layers)} layers")
        *parents, name = path.split(".")
        owner = layers[layer]
        for part in parents:
            owner = getattr(owner, part, None)
            if owner is None:
                raise ValueError(f"plan: layer {layer} has no module {path!r}")
        base = getattr(owner, name, None)
        if not isinstance(base, FROZEN_LINEARS):
            raise ValueError(f"plan: layer {layer} {path!r} is not a linear layer ({type(base).__name__})")
        setattr(owner, name, LoRAMoELinear(base, layer, path, experts, plan.lora_moe_rank, plan.lora_moe_top_k, lora,
                                           device))


def _wrap_attention(model: nn.Module, spec: ArchSpec, plan: AdapterPlan, lora: LoRAConfig, device=None) -> None:
    layers = decoder_layers(model)
    for (layer, proj), rank in plan.attention_ranks.items():
        if not 0 <= layer < len(layers):
            raise ValueError(f"plan: attention adapter on layer {layer}, model has {len(layers)} layers")
        attr, _default, linears = spec.attention.get(layer, ("", (), ()))
        if proj not in linears:
            raise ValueError(
                f"plan: attention projection {proj!r} (layer {layer}) is not one of {spec.model_type}'s "
                + (f"layer-{layer} {attr} linears {list(linears)}" if attr else
                   f"(layer {layer} has no softmax attention module: linear attention / SSM layers take no LoRA)"))
        attn = getattr(layers[layer], attr)
        base = getattr(attn, proj, None)
        if not isinstance(base, FROZEN_LINEARS):
            raise ValueError(f"plan: layer {layer} {attr} has no linear {proj!r} (this config does not use it)")
        setattr(attn, proj, LoRALinear(base, rank, lora, f"layers.{layer}.self_attn.{proj}", device=device))
    for layer, (attr, _default, _linears) in spec.attention.items():
        attn = getattr(layers[layer], attr, None) if 0 <= layer < len(layers) else None
        # q, k and v read the layer's hidden states: one kernel call on CPU (adapters/lora.py)
        link_shared_input([p for p in (getattr(attn, name, None) for name in SHARED_INPUT_PROJECTIONS)
                           if isinstance(p, LoRALinear)])


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of a converted model under its logical key (rank-independent).
    On an expert-parallel rank this holds that rank's experts' adapters and all attention ones.
    Expert adapters are views of their bucket's Parameter (moe_dist/adapters/expert_bank.py)."""
    out: dict[str, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, (ExpertParallelExperts, LoRALinear, LoRAMoELinear)):
            out.update(module.adapter_params())
    return out


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient of every adapter tensor that has one, by logical key (an expert adapter's
    is its slice of its bucket's `.grad`; moe_dist/param_views.py)."""
    grads = {k: grad_of(t) for k, t in adapter_params(model).items()}
    return {k: g for k, g in grads.items() if g is not None}


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors that receive gradients (LoRI's frozen A excluded)."""
    return {k: p for k, p in adapter_params(model).items() if p.requires_grad}
