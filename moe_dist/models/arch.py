"""Per-architecture knowledge, as one table.

transformers v5 gives every supported MoE the same experts interface (3-D `gate_up_proj`
E x 2F x D with gate first, `down_proj` E x D x F, forward(hidden, top_k_index,
top_k_weights)), so an architecture is described by a few names: where its MoE blocks and
experts are, the config fields for sizes, the per-expert names of hub checkpoints, and how
its router scores experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    experts_class: str  # transformers class of block.experts that we replace
    num_experts_attr: str
    intermediate_attr: str
    top_k_attr: str
    router_scores: str  # "softmax" | "sigmoid": how the router turns logits into probabilities
    hub_block: str  # per-expert hub checkpoints: model.layers.{i}.{hub_block}.experts.{e}.{name}.weight
    hub_expert_names: tuple[str, str, str]  # hub names of (gate, up, down)
    attention_projections: tuple[str, ...]


ARCHITECTURES: dict[str, ArchSpec] = {
    s.model_type: s
    for s in (
        ArchSpec("mixtral", "MixtralExperts", "num_local_experts", "intermediate_size", "num_experts_per_tok",
                 "softmax", "block_sparse_moe", ("w1", "w3", "w2"), ("q_proj", "k_proj", "v_proj", "o_proj")),
        ArchSpec("olmoe", "OlmoeExperts", "num_experts", "intermediate_size", "num_experts_per_tok",
                 "softmax", "mlp", ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
        ArchSpec("qwen2_moe", "Qwen2MoeExperts", "num_experts", "moe_intermediate_size", "num_experts_per_tok",
                 "softmax", "mlp", ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
        ArchSpec("qwen3_moe", "Qwen3MoeExperts", "num_experts", "moe_intermediate_size", "num_experts_per_tok",
                 "softmax", "mlp", ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
        ArchSpec("deepseek_v3", "DeepseekV3Experts", "n_routed_experts", "moe_intermediate_size",
                 "num_experts_per_tok", "sigmoid", "mlp", ("gate_proj", "up_proj", "down_proj"),
                 ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
    )
}


class UnsupportedModelError(ValueError):
    pass


def arch_spec(config) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported MoE architectures: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a *ForCausalLM (or base) model."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layer list at .model.layers")
    return layers


def moe_blocks(model: nn.Module, spec: ArchSpec) -> dict[int, nn.Module]:
    """Layer index -> MoE block (the module whose `.experts` we replace). Dense layers (DeepSeek's
    first_k_dense_replace, Qwen2-MoE's mlp_only_layers) are skipped."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        if experts is not None and type(experts).__name__ in (spec.experts_class, "ExpertParallelExperts"):
            out[i] = block
    return out


def moe_layer_indices(config) -> list[int]:
    """MoE layer indices from the config alone (no model needed: planning, meta builds)."""
    spec = arch_spec(config)
    n = config.num_hidden_layers
    if spec.model_type == "deepseek_v3":
        return [i for i in range(n) if i >= config.first_k_dense_replace]
    if spec.model_type == "qwen2_moe" or spec.model_type == "qwen3_moe":
        only = set(getattr(config, "mlp_only_layers", []) or [])
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return [i for i in range(n) if i not in only and (i + 1) % step == 0]
    return list(range(n))


def expert_sizes(config) -> tuple[int, int, int, int]:
    """(num_experts, hidden, expert intermediate, top_k)."""
    spec = arch_spec(config)
    return (
        getattr(config, spec.num_experts_attr),
        config.hidden_size,
        getattr(config, spec.intermediate_attr),
        getattr(config, spec.top_k_attr),
    )
