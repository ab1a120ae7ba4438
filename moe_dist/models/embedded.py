"""The embedded default base model: a tiny OLMoE-shaped MoE, built once and cached as a real
HF checkpoint directory (config + safetensors), then loaded through the same code as a hub
model. Deterministic: the same seed gives the same bytes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_NAME = "embedded:tiny-olmoe"

TINY_OLMOE = dict(vocab_size=256, hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, max_position_embeddings=512,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def ensure_embedded_model(cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Path of the cached checkpoint, building it (atomically: temp dir, then rename) if absent."""
    target = Path(cache_dir) / "tiny-olmoe"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM

    from moe_dist.models.tiny import tiny_config

    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("olmoe", **TINY_OLMOE))
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-olmoe-"))
    model.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another rank won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target
