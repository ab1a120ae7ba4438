"""The run summary's frozen-base bytes (moe_dist/train/memory.py `frozen_bytes`) on tiny models.

The expected figures come from the shapes and each codec's `parts` (its own stored-bytes
arithmetic), not from the modules measured: if quantized experts were silently kept dense (or
dequantized copies kept), the exact equalities and the ratio floors fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference import build_hf
from moe_dist.models.arch import moe_layer_indices
from moe_dist.models.convert import convert_model
from moe_dist.models.loading import load_model
from moe_dist.plan import AdapterPlan
from moe_dist.quant.codecs import Codec, Fp8Block, Int8, Nf4
from moe_dist.quant.write import UNQUANTIZED_SUFFIXES, write_quantized_checkpoint
from moe_dist.train.memory import frozen_bytes

NO_ADAPTERS = AdapterPlan(expert_ranks={}, attention_ranks={})


def _lori_plan(config) -> AdapterPlan:
    """LoRA (LoRI: frozen A) on every expert projection and on attention: all must be left out."""
    ranks = {(layer, e, p): 4 for layer in moe_layer_indices(config) for e in range(8)
             for p in ("gate_proj", "up_proj", "down_proj")}
    return AdapterPlan(expert_ranks=ranks, attention_ranks={(l, "q_proj"): 4 for l in range(2)}, lori=True)


def _codec_bytes(codec: Codec, O: int, I: int) -> int:  # noqa: E741
    """One (O, I) weight's stored bytes from the codec's part shapes."""
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in codec.parts(O, I).values())


def _expert_weights(config) -> list[tuple[int, int]]:
    """(O, I) of every routed expert weight of the model: gate_up (2F, D) and down (D, F) per expert."""
    D, F = config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return [(2 * F, D), (D, F)] * 8 * len(moe_layer_indices(config))


# floor on bf16 / stored expert bytes: NF4 0.5625 B a weight (3.56x); int8's fp32 row scale on
# the tiny rows of 64 and 32 makes 1.08 B a weight (1.85x; 1.98x at the bench's rows of 256)
@pytest.mark.parametrize("codec, floor", [(Nf4(), 3.2), (Int8(), 1.75)], ids=["nf4", "int8"])
def test_quantized_at_load_counts_stored_bytes(codec, floor):
    hf = build_hf("olmoe")
    dense = frozen_bytes(convert_model(build_hf("olmoe"), _lori_plan(hf.config)))
    quant = frozen_bytes(convert_model(hf, _lori_plan(hf.config), codec=codec))
    weights = _expert_weights(hf.config)
    assert dense["expert"] == sum(4 * O * I for O, I in weights)  # fp32, adapters (LoRI's frozen A too) left out
    assert quant["expert"] == sum(_codec_bytes(codec, O, I) for O, I in weights)
    assert quant["expert"] == pytest.approx(sum(codec.bytes_per_weight(O, I) * O * I for O, I in weights))
    assert quant["non_expert"] == dense["non_expert"] > 0  # only the experts are quantized at load
    bf16_expert = dense["expert"] / 2
    assert bf16_expert / quant["expert"] >= floor
    assert frozen_bytes(convert_model(build_hf("olmoe"), NO_ADAPTERS, codec=codec)) == quant


def test_fp8_checkpoint_keeps_experts_and_linears_quantized(tmp_path):
    hf, block = build_hf("qwen3_moe"), (16, 16)
    codec = Fp8Block(block)
    dense = frozen_bytes(convert_model(build_hf("qwen3_moe"), NO_ADAPTERS))
    # the non-expert linears the FP8 checkpoint ships quantized (attention, the dense layer's MLP)
    linears = [tuple(p.shape) for k, p in hf.state_dict().items()
               if p.dim() == 2 and k.endswith(".weight") and ".experts." not in k and not k.endswith(UNQUANTIZED_SUFFIXES)]
    write_quantized_checkpoint(hf, tmp_path, "fp8_block", block)
    got = frozen_bytes(load_model(str(tmp_path), NO_ADAPTERS))
    assert got["expert"] == sum(_codec_bytes(codec, O, I) for O, I in _expert_weights(hf.config))
    assert got["non_expert"] == dense["non_expert"] - sum(4 * O * I - _codec_bytes(codec, O, I) for O, I in linears)
    assert dense["expert"] / 2 / got["expert"] >= 1.9
