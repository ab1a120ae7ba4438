"""Baseline for the throughput benchmark: single-process HF OLMoE + PEFT LoRA on CPU.

LoRA (r=8, alpha=16) targets the attention projections as modules and the 3D expert
weights (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``) through PEFT's
``target_parameters``. Experts run through transformers' ``grouped_mm`` (or ``eager``) kernel.

Run ``python bench/baseline_peft.py`` to print the baseline tokens/s for both implementations.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import OlmoeConfig, OlmoeForCausalLM

BENCH_SHAPE: dict[str, int] = dict(vocab=2048, hidden=256, layers=4, heads=4, kv_heads=4, experts=64, top_k=8,
                                   expert_intermediate=128, batch=4, seq=256)

ATTN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def olmoe_config(**overrides) -> OlmoeConfig:
    """OLMoE config of ``BENCH_SHAPE`` in fp32; ``overrides`` are passed to ``OlmoeConfig``."""
    s = BENCH_SHAPE
    kwargs = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], num_experts=s["experts"],
                  num_experts_per_tok=s["top_k"], intermediate_size=s["expert_intermediate"],
                  max_position_embeddings=max(1024, s["seq"]), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False, use_cache=False, dtype=torch.float32)
    return OlmoeConfig(**{**kwargs, **overrides})


def build_baseline(seed: int, rank: int = 8, alpha: int = 16,
                   experts_implementation: str = "grouped_mm") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Randomly initialised OLMoE wrapped with PEFT LoRA, plus AdamW over the trainable (LoRA) params."""
    torch.manual_seed(seed)
    model = OlmoeForCausalLM._from_config(olmoe_config(), experts_implementation=experts_implementation)
    assert model.config._experts_implementation == experts_implementation, model.config._experts_implementation
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=ATTN_TARGETS,
                      target_parameters=EXPERT_TARGETS)
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> float:
    """One causal-LM step (labels = inputs); returns the loss."""
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure_tokens_per_sec(step_fn: Callable[[], object], n_warmup: int = 2, n_steps: int = 5,
                           tokens_per_step: int | None = None) -> float:
    """Tokens/s of ``step_fn`` over ``n_steps`` timed calls after ``n_warmup`` untimed ones.

    ``tokens_per_step`` defaults to ``BENCH_SHAPE`` batch * seq.
    """
    if tokens_per_step is None:
        tokens_per_step = BENCH_SHAPE["batch"] * BENCH_SHAPE["seq"]
    for _ in range(n_warmup):
        step_fn()
    start = time.perf_counter()
    for _ in range(n_steps):
        step_fn()
    return tokens_per_step * n_steps / (time.perf_counter() - start)


def random_batch(seed: int = 0) -> torch.Tensor:
    """A ``(batch, seq)`` batch of random token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, BENCH_SHAPE["vocab"], (BENCH_SHAPE["batch"], BENCH_SHAPE["seq"]), generator=g)


def main() -> None:
    torch.set_num_threads(2)
    input_ids = random_batch()
    for impl in ("grouped_mm", "eager"):
        model, optimizer = build_baseline(seed=0, experts_implementation=impl)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tps = measure_tokens_per_sec(lambda: train_step(model, optimizer, input_ids))
        print(f"baseline peft experts={impl:<10} trainable={n_trainable:,} tok/s={tps:.0f}")


if __name__ == "__main__":
    main()
