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


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}")
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
