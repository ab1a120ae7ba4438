"""Will it fit? Per-rank parameters and a memory estimate for a recipe, with no weights loaded.

    python launch/plan.py --recipe launch/recipes/mixtral_8x7b_lora.yaml --world 8 [key=value ...]
    python launch/plan.py --model-type mixtral --world 8 ep_size=8      # transformers' default config
                                                                        # (= Mixtral-8x7B), offline

Recipes' hub models are planned offline from their published config.json values, shipped in
moe_dist/models/configs (a local model dir or any other hub name is read as usual).

The model is instantiated from its real config on the meta device (exact parameter counts,
no memory), split into expert and non-expert weights; adapters come from the recipe's plan
(uniform LoRA, or DMEP's LoRA-MoE; HELLoRA/EPnG change it at run time within the LoRA
budget). Memory per rank: frozen weights in bf16 (GPU) or fp32, adapters + their gradients +
fp32 master and Adam moments partitioned by ZeRO over each tensor's data-parallel group
(world for dense adapters, world/EP for expert adapters), and a rough activation estimate
(per layer ~34 x tokens x hidden bytes in bf16 without recomputation, plus the routed expert
activations; with `train.activation_checkpointing`, each layer's input plus one layer's full
activations while it is recomputed). Activation figures are estimates; parameter counts are exact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GiB = 2**30


def count(model_type: str | None, cfg, world: int, zero_stage: int, bf16: bool, hf_overrides: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_dist.models.arch import arch_spec, expert_sizes, moe_layer_indices
    from moe_dist.plan import expert_proj_layout
    from moe_dist.methods import method_class
    from moe_dist.models.arch import is_moe

    from moe_dist.models.loading import load_hf_config

    hf_config = AutoConfig.for_model(model_type, **hf_overrides) if model_type else load_hf_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for k, p in model.named_parameters() if ".experts." in k and "shared" not in k)
    ep = cfg.ep_size or world
    plan = method_class(cfg.method)(cfg).plan_from_config(hf_config)
    D = hf_config.hidden_size
    spec = arch_spec(hf_config) if is_moe(hf_config) else None
    dense_adapters = 0
    for (layer, proj), r in plan.attention_ranks.items():
        lin = getattr(getattr(model.model.layers[layer], spec.attention_module(layer)), proj)
        dense_adapters += r * (lin.in_features + lin.out_features)
    for (layer, path), experts in plan.lora_moe.items():
        lin = model.model.layers[layer].get_submodule(path)
        dense_adapters += len(experts) * (plan.lora_moe_rank * (lin.in_features + lin.out_features) + lin.in_features)
    expert_adapters, top_k, F = 0, 1, 0
    if is_moe(hf_config):
        _, _, F, top_k = expert_sizes(hf_config)
        expert_adapters = sum(r * sum(expert_proj_layout(p, D, F)[:2]) for (_, _, p), r in plan.expert_ranks.items())
    wbytes = 2 if bf16 else 4
    dp_dense, dp_expert = world, world // ep
    shard = lambda n, dp, stage_min: n / dp if zero_stage >= stage_min else n  # noqa: E731
    per_rank_adapters = dense_adapters + expert_adapters / ep
    optimizer = 12 * (shard(dense_adapters, dp_dense, 1) + shard(expert_adapters / ep, dp_expert, 1))  # fp32 + 2 moments
    grads = wbytes * (shard(dense_adapters, dp_dense, 2) + shard(expert_adapters / ep, dp_expert, 2))
    tokens = cfg.train.micro_batch * cfg.data.seq_len
    layers = hf_config.num_hidden_layers
    moe_layers = len(moe_layer_indices(hf_config)) if is_moe(hf_config) else 0
    # in bf16 bytes (scaled to the weights' dtype below): one layer's activations, dense + routed
    layer_dense, layer_moe = 34 * tokens * D, (tokens * top_k * (3 * F + D) * 2 if moe_layers else 0)
    kept = layers * layer_dense + moe_layers * layer_moe
    recomputed = layers * 2 * tokens * D + layer_dense + layer_moe  # layer inputs + one layer live again
    act_scale = (2 if bf16 else 4) / 2 / GiB
    weights = (total - expert + expert / ep) * wbytes
    return {
        "model_type": hf_config.model_type, "total_params": total, "expert_params": expert,
        "world": world, "ep_size": ep, "zero_stage": zero_stage, "method": cfg.method,
        "per_rank": {
            "frozen_weight_params": int(total - expert + expert / ep),
            "adapter_params": int(per_rank_adapters),
            "weights_gib": weights / GiB,
            "adapters_gib": per_rank_adapters * wbytes / GiB,
            "gradients_gib": grads / GiB,
            "optimizer_gib": optimizer / GiB,
            "activations_gib_estimate": (recomputed if cfg.train.activation_checkpointing else kept) * act_scale,
            "activations_gib_without_checkpointing": kept * act_scale,
            "activations_gib_with_checkpointing": recomputed * act_scale,
        },
        "trainable_params_total": int(dense_adapters + expert_adapters),
    }


def main(argv: list[str] | None = None) -> dict:
    from moe_dist.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--model-type", default=None, help="use transformers' default config of this model type")
    parser.add_argument("--hf", action="append", default=[], help="config override for --model-type, key=value")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="frozen weights in fp32 (CPU)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.recipe, overrides)
    hf = {k: int(v) if v.isdigit() else v for k, v in (item.split("=", 1) for item in args.hf)}
    out = count(args.model_type, cfg, args.world, args.zero_stage, not args.fp32, hf)
    r = out["per_rank"]
    print(f"{out['model_type']}: {out['total_params'] / 1e9:.2f}B params ({out['expert_params'] / 1e9:.2f}B in experts); "
          f"world {out['world']}, EP {out['ep_size']}, ZeRO-{out['zero_stage']}, method {out['method']}, "
          f"{out['trainable_params_total']:,} trainable")
    print(f"per rank: {r['frozen_weight_params'] / 1e9:.2f}B frozen params = {r['weights_gib']:.1f} GiB, adapters "
          f"{r['adapters_gib']:.2f} GiB, grads {r['gradients_gib']:.2f} GiB, optimizer {r['optimizer_gib']:.2f} GiB, "
          f"activations ~{r['activations_gib_estimate']:.1f} GiB (activation checkpointing "
          f"{'on' if cfg.train.activation_checkpointing else 'off'}; "
          f"{r['activations_gib_without_checkpointing']:.1f} off, {r['activations_gib_with_checkpointing']:.1f} on); "
          f"total ~{sum(v for k, v in r.items() if k.endswith('gib') or k.endswith('estimate')):.1f} GiB")
    return out


if __name__ == "__main__":
    main()
