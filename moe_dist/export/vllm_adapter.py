"""`vllm`: the per-expert 2-D LoRA layout vLLM's MoE LoRA loads for most model classes.

vLLM (vllm/lora/model_manager.py `_create_merged_loras_inplace`, vllm/lora/lora_weights.py
`PackedLoRALayerWeights.pack_moe`) reads one 2-D LoRA per expert and projection, under the
names of the model's per-expert hub checkpoint (its expert mapping comes from
`make_expert_params_mapping(ckpt_gate_proj_name, ...)`):

    base_model.model.model.layers.{L}.{block}.experts.{e}.{gate|up|down name}.lora_{A|B}.weight

(`mlp` and gate_proj/up_proj/down_proj for most models; `block_sparse_moe` and w1/w3/w2 for
Mixtral), stacks them per layer in (gate, down, up) order for every expert, and asserts that
all three exist for every expert (a TODO there for experts without LoRA). Its LoRA buffers
hold one rank per adapter. So: every expert of every MoE layer is written, zeros where the
plan has no adapter (cold, pruned), every adapter zero-padded to the file's largest rank, the
scale (and LoRI mask) folded into B, lora_alpha = r (vLLM's scaling alpha/r is then 1). A fused
gate_up adapter is written as its gate and up halves (same A, the halves of B's rows).

The model classes vLLM marks `is_3d_moe_weight` (gpt-oss, Qwen3.5-MoE) read PEFT's fused
`target_parameters` layout instead: for them the PEFT export is written with one rank for all
targets.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_dist.export.base import BaseModel
from moe_dist.export.safetensors_stream import ShardWriter
from moe_dist.export.trained import ExportError, Factors, TrainedCheckpoint

PREFIX = "base_model.model."
# Model classes vLLM marks `is_3d_moe_weight`: their MoE LoRA is read in PEFT's fused layout
# (`experts.base_layer.lora_*` = gate_up_proj, `experts.lora_*` = down_proj, A (E*r, in) expert-major,
# B (out, r*E) rank-major; vllm/lora/model_manager.py `_stack_moe_lora_weights`), one rank per file.
VLLM_3D_TYPES = frozenset({"gpt_oss", "qwen3_5_moe"})
HALVES = ("gate_proj", "up_proj", "down_proj")


def vllm_names(base: BaseModel) -> tuple[str, dict[str, str]]:
    """(MoE block name, {gate_proj|up_proj|down_proj: vLLM's per-expert name})."""
    spec = base.spec
    return spec.hub_block, dict(zip(HALVES, spec.hub_expert_names))


def _padded(f: Factors | None, r: int, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = torch.zeros(r, in_f, device="cpu"), torch.zeros(out_f, r, device="cpu")
    if f is not None:
        A[:f.rank] = f.A_RI
        B[:, :f.rank] = f.B_OR
    return A, B


def export_vllm(ckpt: TrainedCheckpoint, base: BaseModel, out: Path, base_name: str) -> dict:
    """Streams the file: ranks come from the plan, each adapter is read, padded and written
    in turn (memory: one adapter)."""
    from peft import LoraConfig

    D, F = base.hidden, base.intermediate
    if ckpt.plan.expert_ranks and not base.spec.hub.per_expert:
        if base.config.model_type not in VLLM_3D_TYPES:
            raise ExportError(f"--format vllm: {base.config.model_type} hub checkpoints store experts fused (no "
                              "per-expert conversion mapping in transformers) and it is not one of the model classes "
                              f"vLLM reads in its 3-D MoE LoRA layout ({sorted(VLLM_3D_TYPES)}); use --format peft "
                              "or merged")
        from moe_dist.export.peft_adapter import export_peft

        result = export_peft(ckpt, base, out, base_name, single_rank=True)
        return dict(result, layout="3-D (PEFT target_parameters, one rank)")
    shapes = {"gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}  # (out, in)
    experts = ([(layer, e, half) for layer in base.moe_layers for e in range(base.num_experts) for half in HALVES]
               if ckpt.plan.expert_ranks else [])
    ranks = [ckpt.target_rank(*k) for k in experts] + list(ckpt.plan.attention_ranks.values())
    if not any(ranks):
        raise ExportError(f"{ckpt.path}: the plan has no LoRA adapters to export")
    r = max(ranks)
    block, names = vllm_names(base) if experts else ("mlp", {})
    entries = []  # (key, (out, in), factors thunk)
    for (layer, e, half) in experts:
        entries.append((f"{PREFIX}model.layers.{layer}.{block}.experts.{e}.{names[half]}", shapes[half],
                        lambda k=(layer, e, half): ckpt.expert_factors(*k, D, F)))
    for (layer, proj) in ckpt.plan.attention_ranks:
        f = ckpt.attention_factors(layer, proj)  # attention adapters are small: read for their shape
        attr = base.spec.attention_module(layer)
        entries.append((f"{PREFIX}model.layers.{layer}.{attr}.{proj}", (f.B_OR.shape[0], f.A_RI.shape[1]),
                        lambda f=f: f))
    specs = {}
    for key, (out_f, in_f), _ in entries:
        specs[f"{key}.lora_A.weight"] = ("F32", (r, in_f))
        specs[f"{key}.lora_B.weight"] = ("F32", (out_f, r))
    writer = ShardWriter(out / "adapter_model.safetensors", specs, {"format": "pt"})
    for key, (out_f, in_f), factors in entries:
        A, B = _padded(factors(), r, out_f, in_f)
        writer.write(f"{key}.lora_A.weight", A)
        writer.write(f"{key}.lora_B.weight", B)
    writer.close()
    targets = sorted({*names.values(), *(p for (_l, p) in ckpt.plan.attention_ranks)})
    LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
               base_model_name_or_path=base_name).save_pretrained(str(out))
    return {"r": r, "expert_adapters": len(experts), "attention_adapters": len(ckpt.plan.attention_ranks)}
