"""Will it fit? Per-rank parameters and a memory estimate for a recipe, with no weights loaded.

    python launch/plan.py --recipe launch/recipes/mixtral_8x7b_lora.yaml --world 8 [key=value ...]
    python launch/plan.py --model-type mixtral --world 8 ep_size=8      # transformers' default config
                                                                        # (= Mixtral-8x7B), offline
    python launch/plan.py --recipe launch/recipes/deepseek_v3_fp8_lora.yaml --smallest   # fewest 80 / 141 GB GPUs
    python launch/plan.py --recipe launch/recipes/deepseek_v3_fp8_lora.yaml --smallest --unquantized  # its bf16 copy

Recipes' hub models are planned offline from their published config.json values, shipped in
moe_dist/models/configs (a local model dir or any other hub name is read as usual).

The model is instantiated from its real config on the meta device (exact parameter counts,
no memory), split into expert and non-expert weights; adapters come from the recipe's plan
(uniform LoRA, or DMEP's LoRA-MoE; HELLoRA/EPnG change it at run time within the LoRA
budget).

Frozen weights are counted as the loader stores them. The checkpoint's `quantization_config`
decides first: block FP8 (DeepSeek-V3) keeps every linear but the embeddings, LM head and
routers in e4m3 (1 B) plus an fp32 scale per block (moe_dist/quant/write.py's
UNQUANTIZED_SUFFIXES are the ones left in bf16); MXFP4 (gpt-oss) keeps the experts in 17/32 B.
For an unquantized checkpoint `base.quantize` does: nf4 experts 0.5625 B (blocks of 64 + an
fp32 absmax), int8 experts 1 B + an fp32 scale per row. Everything else is bf16 (GPU) or fp32
(`--fp32`, CPU). Non-expert weights are replicated on every rank, experts split over EP. A
quantized expert layer runs on a temporary dequantized copy of its local experts (one layer at
a time), counted as `dequant`. `--unquantized` plans a bf16 copy of a quantized checkpoint.

Memory per rank: frozen weights as above, adapters + their gradients + fp32 master and Adam
moments partitioned by ZeRO over each tensor's data-parallel group (world for dense adapters,
world/EP for expert adapters), a rough activation estimate (per layer ~34 x tokens x hidden
bytes in bf16 without recomputation, plus the routed expert activations; with
`train.activation_checkpointing`, each layer's input plus one layer's full activations while it
is recomputed), and the logits for the loss (bf16 logits, their fp32 copy and log-softmax: 10 B
per token and vocabulary entry). Activation and logit figures are estimates; parameter and
weight byte counts are exact.

`--smallest`: the fewest GPUs of 80 GB and of 141 GB whose every rank fits, with activation
checkpointing on: worlds 1..8 on one node, then whole 8-GPU nodes; EP the largest size dividing
both the world and the expert count; a rank fits when the estimate is at most (1 - --headroom)
of the card's memory (nvidia-smi's total: 79.6 GiB for an H100 80 GB, 140.4 GiB for an H200).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NamedTuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_dist.parallel.elastic import resolve_ep_size  # noqa: E402

GiB = 2**30
# total memory (nvidia-smi) of the cards --smallest sizes for: H100 / A100 80 GB 81,559 MiB, H200 143,771 MiB
GPUS = {"80 GB": 81559 / 1024, "141 GB": 143771 / 1024}
# left out of the estimate: CUDA context, NCCL and DeepSpeed buffers, allocator fragmentation, estimate error
HEADROOM = 0.10
GPUS_PER_NODE = 8
LOGIT_BYTES = 10  # per token and vocabulary entry: bf16 logits + fp32 copy + fp32 log-softmax kept for backward


class Model(NamedTuple):
    """What a plan needs of a model and recipe, counted once; worlds and EP sizes vary (a
    NamedTuple: this file is also loaded by path, outside sys.modules, where dataclasses fail)."""

    model_type: str
    method: str
    total: int
    expert: int  # routed expert parameters (weights and biases)
    num_experts: int
    format: str
    expert_bytes: float  # all routed experts as stored; split over EP
    non_expert_bytes: float  # replicated on every rank
    expert_dense_bytes: float  # all routed expert weights in the compute dtype (the dequantized temporary, per layer)
    linear_dense_bytes: float  # the largest quantized non-expert linear in the compute dtype
    moe_layers: int
    dense_adapters: int
    expert_adapters: int
    wbytes: int
    tokens: int
    hidden: int
    layer_dense: int
    layer_moe: int
    layers: int
    vocab: int


def frozen_storage(model, hf_config, quantize: str, wbytes: int) -> dict:
    """Bytes of every frozen weight of a meta `model` as moe_dist's loader stores it: `expert`
    (routed experts, all of them), `non_expert`, the format's name, and the dense sizes of what
    the kernels dequantize. Refuses (QuantizationConfigError) what the loader refuses."""
    from torch import nn

    from moe_dist.models.arch import expert_sizes, is_moe
    from moe_dist.plan import expert_proj_layout
    from moe_dist.quant.checkpoint import load_codec
    from moe_dist.quant.codecs import Fp8Block
    from moe_dist.quant.write import UNQUANTIZED_SUFFIXES

    stored, expert_codec = load_codec(hf_config, quantize, where=f"{hf_config.model_type} config")
    D, F = expert_sizes(hf_config)[1:3] if is_moe(hf_config) else (0, 0)
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = {"expert": 0.0, "non_expert": 0.0, "expert_dense": 0.0, "linear_dense": 0.0}
    for name, p in model.named_parameters():
        proj = name.rsplit(".", 1)[-1]
        if is_expert(name) and expert_codec is not None and proj in ("gate_up_proj", "down_proj"):
            I, O = expert_proj_layout(proj, D, F)[:2]  # noqa: E741
            E = p.shape[0]
            if p.numel() != E * O * I:
                raise ValueError(f"{name}: shape {tuple(p.shape)} is not {E} experts of {O} x {I}")
            problem = expert_codec.check(O, I)
            if problem:
                raise ValueError(f"{name}: {expert_codec.name} cannot store it: {problem}")
            out["expert"] += E * O * I * expert_codec.bytes_per_weight(O, I)
            out["expert_dense"] += p.numel() * wbytes
        elif is_expert(name):
            out["expert"] += p.numel() * wbytes
        elif isinstance(stored, Fp8Block) and name in linears and not name.endswith(UNQUANTIZED_SUFFIXES):
            O, I = p.shape  # noqa: E741
            out["non_expert"] += O * I * stored.bytes_per_weight(O, I)
            out["linear_dense"] = max(out["linear_dense"], p.numel() * wbytes)
        else:
            out["non_expert"] += p.numel() * wbytes
    dense = "bf16" if wbytes == 2 else "fp32"
    if isinstance(stored, Fp8Block):
        out["format"] = f"fp8 e4m3, {stored.block[0]}x{stored.block[1]} blocks (experts + linears; rest {dense})"
    elif expert_codec is not None:
        how = "as shipped" if stored is not None else "base.quantize"
        out["format"] = f"{expert_codec.name} experts ({how}; rest {dense})"
    else:
        out["format"] = dense
    return out


def is_expert(name: str) -> bool:
    return ".experts." in name and "shared" not in name


def inventory(model_type: str | None, cfg, bf16: bool, hf_overrides: dict, unquantized: bool = False) -> Model:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_dist.methods import method_class
    from moe_dist.models.arch import arch_spec, expert_sizes, is_moe, moe_layer_indices
    from moe_dist.models.loading import load_hf_config
    from moe_dist.plan import expert_proj_layout

    hf_config = AutoConfig.for_model(model_type, **hf_overrides) if model_type else load_hf_config(cfg.model)
    if unquantized and getattr(hf_config, "quantization_config", None) is not None:
        del hf_config.quantization_config  # its bf16 copy: the same model, no quantized storage
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for k, p in model.named_parameters() if is_expert(k))
    wbytes = 2 if bf16 else 4
    storage = frozen_storage(model, hf_config, cfg.base.quantize, wbytes)
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
    expert_adapters, num_experts, top_k, F = 0, 0, 1, 0
    if is_moe(hf_config):
        num_experts, _, F, top_k = expert_sizes(hf_config)
        expert_adapters = sum(r * sum(expert_proj_layout(p, D, F)[:2]) for (_, _, p), r in plan.expert_ranks.items())
    tokens = cfg.train.micro_batch * cfg.data.seq_len
    moe_layers = len(moe_layer_indices(hf_config)) if is_moe(hf_config) else 0
    # in bf16 bytes (scaled to the weights' dtype later): one layer's activations, dense + routed
    layer_dense, layer_moe = 34 * tokens * D, (tokens * top_k * (3 * F + D) * 2 if moe_layers else 0)
    return Model(hf_config.model_type, cfg.method, total, expert, num_experts, storage["format"], storage["expert"],
                 storage["non_expert"], storage["expert_dense"], storage["linear_dense"], moe_layers, dense_adapters,
                 expert_adapters, wbytes, tokens, D, layer_dense, layer_moe, hf_config.num_hidden_layers,
                 hf_config.vocab_size)


def per_rank(m: Model, world: int, ep: int, zero_stage: int, checkpointing: bool) -> dict:
    """One rank's memory at `world` ranks, EP `ep` (all figures in GiB but the counts)."""
    dp_dense, dp_expert = world, world // ep
    shard = lambda n, dp, stage_min: n / dp if zero_stage >= stage_min else n  # noqa: E731
    per_rank_adapters = m.dense_adapters + m.expert_adapters / ep
    # fp32 master + 2 Adam moments
    optimizer = 12 * (shard(m.dense_adapters, dp_dense, 1) + shard(m.expert_adapters / ep, dp_expert, 1))
    grads = m.wbytes * (shard(m.dense_adapters, dp_dense, 2) + shard(m.expert_adapters / ep, dp_expert, 2))
    kept = m.layers * m.layer_dense + m.moe_layers * m.layer_moe
    recomputed = m.layers * 2 * m.tokens * m.hidden + m.layer_dense + m.layer_moe  # layer inputs + one layer live again
    act_scale = m.wbytes / 2 / GiB
    frozen_expert, frozen_non_expert = m.expert_bytes / ep / GiB, m.non_expert_bytes / GiB
    dequant = (m.expert_dense_bytes / max(m.moe_layers, 1) / ep + m.linear_dense_bytes) / GiB
    r = {
        "frozen_weight_params": int(m.total - m.expert + m.expert / ep),
        "adapter_params": int(per_rank_adapters),
        "weights_gib": frozen_expert + frozen_non_expert,
        "frozen_expert_gib": frozen_expert,
        "frozen_non_expert_gib": frozen_non_expert,
        "dequant_gib": dequant,
        "adapters_gib": per_rank_adapters * m.wbytes / GiB,
        "gradients_gib": grads / GiB,
        "optimizer_gib": optimizer / GiB,
        "activations_gib_estimate": (recomputed if checkpointing else kept) * act_scale,
        "activations_gib_without_checkpointing": kept * act_scale,
        "activations_gib_with_checkpointing": recomputed * act_scale,
        "logits_gib_estimate": m.tokens * m.vocab * LOGIT_BYTES / GiB,
    }
    r["total_gib"] = sum(r[k] for k in ("weights_gib", "dequant_gib", "adapters_gib", "gradients_gib", "optimizer_gib",
                                        "activations_gib_estimate", "logits_gib_estimate"))
    return r


def report(m: Model, world: int, ep: int, zero_stage: int, checkpointing: bool) -> dict:
    return {"model_type": m.model_type, "total_params": m.total, "expert_params": m.expert, "format": m.format,
            "frozen_gib_total": (m.expert_bytes + m.non_expert_bytes) / GiB, "world": world, "ep_size": ep,
            "zero_stage": zero_stage, "method": m.method, "per_rank": per_rank(m, world, ep, zero_stage, checkpointing),
            "trainable_params_total": int(m.dense_adapters + m.expert_adapters)}


def count(model_type: str | None, cfg, world: int, zero_stage: int, bf16: bool, hf_overrides: dict,
          unquantized: bool = False) -> dict:
    m = inventory(model_type, cfg, bf16, hf_overrides, unquantized)
    return report(m, world, resolve_ep_size(cfg.ep_size, world, m.num_experts or None)[0], zero_stage,
                  cfg.train.activation_checkpointing)


def worlds(limit: int = 4096):
    """Candidate world sizes: every size on one node, then whole nodes."""
    yield from range(1, GPUS_PER_NODE + 1)
    yield from range(2 * GPUS_PER_NODE, limit + 1, GPUS_PER_NODE)


def largest_ep(world: int, num_experts: int) -> int:
    """The largest EP size dividing both the world and the expert count (1 for a dense model: no experts)."""
    return math.gcd(world, num_experts) if num_experts else 1


def smallest(m: Model, gpu_gib: float, zero_stage: int = 2, headroom: float = HEADROOM) -> dict | None:
    """The fewest ranks of `gpu_gib` each whose estimate (activation checkpointing on) fits in
    (1 - headroom) of it; None if no world up to 4096 does."""
    budget = gpu_gib * (1 - headroom)
    for world in worlds():
        ep = largest_ep(world, m.num_experts)
        r = per_rank(m, world, ep, zero_stage, checkpointing=True)
        if r["total_gib"] <= budget:
            return {"world": world, "ep_size": ep, "nodes": math.ceil(world / GPUS_PER_NODE), "budget_gib": budget,
                    "per_rank": r}
    return None


def main(argv: list[str] | None = None) -> dict:
    from moe_dist.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--model-type", default=None, help="use transformers' default config of this model type")
    parser.add_argument("--hf", action="append", default=[], help="config override for --model-type, key=value")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="frozen weights in fp32 (CPU)")
    parser.add_argument("--unquantized", action="store_true",
                        help="plan a bf16 copy of a quantized checkpoint (its quantization_config dropped)")
    parser.add_argument("--smallest", action="store_true",
                        help="the fewest 80 GB and 141 GB GPUs that fit (activation checkpointing on)")
    parser.add_argument("--headroom", type=float, default=HEADROOM, help="fraction of each card left free (--smallest)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.recipe, overrides)
    hf = {k: int(v) if v.isdigit() else v for k, v in (item.split("=", 1) for item in args.hf)}
    m = inventory(args.model_type, cfg, not args.fp32, hf, args.unquantized)
    out = report(m, args.world, resolve_ep_size(cfg.ep_size, args.world, m.num_experts or None)[0], args.zero_stage,
                 cfg.train.activation_checkpointing)
    r = out["per_rank"]
    print(f"{out['model_type']}: {out['total_params'] / 1e9:.2f}B params ({out['expert_params'] / 1e9:.2f}B in "
          f"experts); world {out['world']}, EP {out['ep_size']}, ZeRO-{out['zero_stage']}, method {out['method']}, "
          f"{out['trainable_params_total']:,} trainable")
    print(f"frozen weights: {m.format}; {out['frozen_gib_total']:.1f} GiB in all = experts {m.expert_bytes / GiB:.1f} "
          f"GiB (split over EP) + non-expert {m.non_expert_bytes / GiB:.1f} GiB (every rank)")
    print(f"per rank: {r['frozen_weight_params'] / 1e9:.2f}B frozen params = {r['weights_gib']:.1f} GiB (experts "
          f"{r['frozen_expert_gib']:.1f} + non-expert {r['frozen_non_expert_gib']:.1f}; dequantized temporaries "
          f"{r['dequant_gib']:.1f}), adapters {r['adapters_gib']:.2f} GiB, grads {r['gradients_gib']:.2f} GiB, "
          f"optimizer {r['optimizer_gib']:.2f} GiB, activations ~{r['activations_gib_estimate']:.1f} GiB (activation "
          f"checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}; "
          f"{r['activations_gib_without_checkpointing']:.1f} off, {r['activations_gib_with_checkpointing']:.1f} on), "
          f"logits ~{r['logits_gib_estimate']:.1f} GiB; total ~{r['total_gib']:.1f} GiB")
    if args.smallest:
        out["smallest"] = {}
        print(f"smallest launch (activation checkpointing on, ZeRO-{args.zero_stage}, {args.headroom:.0%} of each card "
              f"left free, {GPUS_PER_NODE} GPUs a node, EP dividing the world and {m.num_experts} experts):")
        for name, gib in GPUS.items():
            fit = smallest(m, gib, args.zero_stage, args.headroom)
            out["smallest"][name] = fit
            if fit is None:
                print(f"  {name}: nothing up to 4096 GPUs fits")
                continue
            f, plural = fit["per_rank"], lambda n: "s" if n > 1 else ""  # noqa: E731
            print(f"  {name} ({gib:.1f} GiB, budget {fit['budget_gib']:.1f}): {fit['world']} GPU{plural(fit['world'])} "
                  f"({fit['nodes']} node{plural(fit['nodes'])}), EP {fit['ep_size']}: ~{f['total_gib']:.1f} GiB a rank "
                  f"(frozen {f['weights_gib']:.1f} = experts {f['frozen_expert_gib']:.1f} + non-expert "
                  f"{f['frozen_non_expert_gib']:.1f}; dequant {f['dequant_gib']:.1f}, adapters+grads+optimizer "
                  f"{f['adapters_gib'] + f['gradients_gib'] + f['optimizer_gib']:.1f}, activations "
                  f"{f['activations_gib_estimate']:.1f}, logits {f['logits_gib_estimate']:.1f})")
    return out


if __name__ == "__main__":
    main()
