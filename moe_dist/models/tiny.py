"""Tiny configurations of every supported architecture, for tests and benchmarks.

Small enough to run forward and backward in well under a second on one CPU core, but with
every structural feature of the real model: shared experts and their gate (Qwen2-MoE), dense
first layers, grouped top-k, sigmoid scores and correction bias (DeepSeek-V3).
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(_COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(_COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(_COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[0], use_sliding_window=False),
    "qwen3_moe": dict(_COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[0], head_dim=16, norm_topk_prob=True),
    "deepseek_v3": dict(_COMMON, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
                        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        n_group=4, topk_group=2, rope_interleave=True, first_k_dense_replace=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),
}


# Any other model type: its config class's defaults shrunk by these (where the class has the
# field), then its own entry in TINY_OVERRIDES (hybrid layer patterns, MLA sizes, ...).
GENERIC_TINY = dict(
    _COMMON, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=8, num_local_experts=8,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, shared_expert_intermediate_size=48,
    q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
    first_k_dense_replace=1)
_LINEAR_FULL = ["linear_attention", "full_attention"]  # hybrids: one linear-attention, one softmax layer
TINY_OVERRIDES: dict[str, dict] = {
    "qwen3_next": dict(layer_types=_LINEAR_FULL, linear_key_head_dim=16, linear_value_head_dim=16,
                       linear_num_key_heads=2, linear_num_value_heads=4, decoder_sparse_step=1, mlp_only_layers=[]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    "kimi_linear": dict(layer_types=_LINEAR_FULL, mlp_layer_types=["sparse", "sparse"], linear_head_dim=16,
                        linear_num_heads=4, qk_head_dim=16, head_dim=16, num_key_value_heads=4),
    "glm4_moe_lite": dict(mlp_layer_types=["dense", "sparse"], qk_head_dim=16, num_key_value_heads=4),
    "deepseek_v32": dict(mlp_layer_types=["dense", "sparse"], layer_types=["indexed_attention"] * 2, index_head_dim=16,
                         index_n_heads=2, index_topk=4, qk_head_dim=16, num_key_value_heads=4),
    "glm_moe_dsa": dict(mlp_layer_types=["dense", "sparse"], index_head_dim=16, index_n_heads=2, index_topk=4,
                        qk_head_dim=16, num_key_value_heads=4),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8),
    "bailing_hybrid": dict(layer_types=_LINEAR_FULL, mlp_layer_types=["sparse", "sparse"], linear_head_dim=16,
                           linear_num_heads=4, qk_head_dim=16, num_key_value_heads=4, layer_group_size=2),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "qwen3_5_moe": dict(text_config=dict(
        _COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        head_dim=16, layer_types=_LINEAR_FULL, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4)),
    "axk1": dict(qk_head_dim=16, num_key_value_heads=4),
    "axk2": dict(qk_head_dim=16, num_key_value_heads=4),
}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny config of `model_type`: hand-made for the original five, generic otherwise."""
    if model_type in TINY_CONFIGS:
        return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"no config class for model_type {model_type!r} in this transformers")
    defaults = CONFIG_MAPPING[model_type]()
    shrink = {k: v for k, v in GENERIC_TINY.items() if hasattr(defaults, k)}
    return AutoConfig.for_model(model_type, **{**shrink, **TINY_OVERRIDES.get(model_type, {}), **overrides})
