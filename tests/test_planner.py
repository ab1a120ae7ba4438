"""launch/plan.py counts parameters from the real config on the meta device: Mixtral-8x7B
(transformers' default Mixtral config) must come out at the published 46.7B."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _planner():
    spec = importlib.util.spec_from_file_location("planner", ROOT / "launch" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mixtral_total_and_per_rank_split():
    out = _planner().main(["--recipe", str(ROOT / "launch/recipes/mixtral_8x7b_lora.yaml"), "--model-type", "mixtral",
                           "--world", "8"])
    assert abs(out["total_params"] / 46.7e9 - 1) < 0.01
    r = out["per_rank"]
    # EP 8: each rank holds the non-expert weights and 1/8 of the experts
    expected = out["total_params"] - out["expert_params"] * 7 / 8
    assert abs(r["frozen_weight_params"] - expected) <= 1
    # LoRA r=16 on 8 experts x 3 projections x 32 layers + q,k,v,o
    per_expert = 16 * ((4096 + 14336) * 2 + (14336 + 4096))
    attention = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2) * 32
    assert out["trainable_params_total"] == per_expert * 8 * 32 + attention


def _shipped() -> list[str]:
    import json

    from moe_dist.models.loading import SHIPPED_CONFIGS

    return sorted(k for k in json.loads((SHIPPED_CONFIGS / "published.json").read_text()) if not k.startswith("_"))


@pytest.mark.parametrize("name", _shipped())
def test_shipped_configs_match_the_published_parameter_counts(name):
    """The published config.json values shipped for the recipes' models give their published totals."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from moe_dist.models.loading import SHIPPED_CONFIGS, load_hf_config

    published = json.loads((SHIPPED_CONFIGS / "published.json").read_text())[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_hf_config(name))
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / published - 1) < 0.01, (name, total, published)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "launch/recipes").glob("*.yaml")
                                          if not p.name.startswith("tiny_")))
def test_every_real_model_recipe_plans_offline(recipe, monkeypatch):
    """No hub access: every real-model recipe plans from the shipped config, and its plan's
    attention targets exist in that architecture (DeepSeek's MLA included)."""
    import yaml

    from moe_dist.parallel.elastic import parse_ep_size

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = yaml.safe_load((ROOT / "launch/recipes" / recipe).read_text())
    world = parse_ep_size(data.get("ep_size", "auto"))[1] or 8  # the recipe's EP size (auto:N or N)
    out = _planner().main(["--recipe", str(ROOT / "launch/recipes" / recipe), "--world", str(world)])
    assert out["total_params"] > 1e9 and out["trainable_params_total"] > 0
    # real sequence lengths: every real-model recipe recomputes its layers, and is planned so
    assert data["train"].get("activation_checkpointing") is True, f"{recipe}: train.activation_checkpointing"
    r = out["per_rank"]
    assert r["activations_gib_estimate"] == r["activations_gib_with_checkpointing"]
    assert r["activations_gib_with_checkpointing"] < r["activations_gib_without_checkpointing"] / 4


# ---- frozen weights counted from their storage (issue 29: planner and recipes) ------------------

def _model(recipe: str, *overrides: str, unquantized: bool = False, bf16: bool = True):
    from moe_dist.config import load_config

    cfg = load_config(str(ROOT / "launch/recipes" / recipe), list(overrides))
    return _planner().inventory(None, cfg, bf16, {}, unquantized)


def test_fp8_deepseek_v3_frozen_bytes_from_the_architecture():
    """DeepSeek-V3 as shipped: experts and every non-expert linear (MLA, shared experts, the 3
    dense layers) are e4m3 + one fp32 scale per 128 x 128 block; embeddings, LM head, routers and
    norms stay bf16. The expected bytes are counted here from the published architecture alone."""
    m = _model("deepseek_v3_fp8_lora.yaml")
    D, V, L, dense, E, F, F_dense = 7168, 129280, 61, 3, 256, 2048, 18432
    moe = L - dense
    expert = moe * E * 3 * D * F
    mla = D * 1536 + 1536 * 128 * 192 + D * (512 + 64) + 512 * 128 * (128 + 128) + 128 * 128 * D
    linears = L * mla + dense * 3 * D * F_dense + moe * 3 * D * F  # attention, dense MLPs, shared experts
    norms = L * (2 * D + 1536 + 512) + D
    unquantized = 2 * V * D + moe * E * D + norms  # embeddings + LM head, routers, norms
    assert m.expert == expert and m.total == expert + linears + unquantized  # the architecture is the one counted
    fp8 = 1 + 4 / 128**2
    assert m.expert_bytes == pytest.approx(expert * fp8, rel=1e-9)  # 2048 and 7168 are whole blocks
    assert m.non_expert_bytes == pytest.approx(linears * fp8 + unquantized * 2, rel=0.002)  # kv_a's 576 rows: 5 blocks
    assert m.format.startswith("fp8")
    r = _planner().per_rank(m, 8, 8, 2, True)
    assert r["frozen_expert_gib"] == pytest.approx(expert * fp8 / 8 / 2**30, rel=1e-9)
    assert r["weights_gib"] == pytest.approx(r["frozen_expert_gib"] + r["frozen_non_expert_gib"])
    # its bf16 copy: 2 B a weight everywhere, the 50.9 GiB a rank at EP 64
    bf16 = _model("deepseek_v3_fp8_lora.yaml", unquantized=True)
    assert bf16.expert_bytes + bf16.non_expert_bytes == 2 * bf16.total and bf16.format == "bf16"
    assert _planner().per_rank(bf16, 64, 64, 2, True)["weights_gib"] == pytest.approx(50.9, abs=0.05)


def test_nf4_and_mxfp4_expert_bytes():
    from moe_dist.quant.codecs import Mxfp4, Nf4

    nf4 = _model("qwen3_235b_a22b_nf4_lora.yaml")
    assert Nf4().bytes_per_weight(3072, 4096) == 0.5625
    assert nf4.expert_bytes == nf4.expert * 0.5625  # Qwen3's experts have no biases
    assert nf4.non_expert_bytes == (nf4.total - nf4.expert) * 2
    bf16 = _model("qwen3_235b_a22b_lora.yaml")
    assert bf16.expert_bytes == 2 * bf16.expert and bf16.non_expert_bytes == nf4.non_expert_bytes
    int8 = _model("qwen3_235b_a22b_lora.yaml", "base.quantize=int8")
    assert int8.expert_bytes == pytest.approx(94 * 128 * (2 * 1536 * (4096 + 4) + 4096 * (1536 + 4)), rel=1e-12)

    oss = _model("gpt_oss_120b_lora.yaml")
    D = F = 2880
    E, L = 128, 36
    weights, biases = L * E * (2 * F * D + D * F), L * E * (2 * F + D)
    assert oss.expert == weights + biases
    per_weight = Mxfp4().bytes_per_weight(2 * F, D)
    assert per_weight == Mxfp4().bytes_per_weight(D, F) == 17 / 32  # 16 B of e2m1 + 1 B exponent per 32
    assert oss.expert_bytes == pytest.approx(weights * per_weight + biases * 2, rel=1e-12)
    assert oss.non_expert_bytes == (oss.total - oss.expert) * 2  # attention, router, embeddings: bf16
    assert _model("gpt_oss_120b_lora.yaml", unquantized=True).expert_bytes == 2 * oss.expert


def test_quantize_on_a_quantized_config_is_refused():
    from moe_dist.quant.checkpoint import QuantizationConfigError

    with pytest.raises(QuantizationConfigError, match=r"base.quantize=nf4.*already quantized \(fp8_block\)"):
        _planner().main(["--recipe", str(ROOT / "launch/recipes/deepseek_v3_fp8_lora.yaml"), "base.quantize=nf4"])
    with pytest.raises(QuantizationConfigError, match="already quantized"):
        _model("gpt_oss_120b_lora.yaml", "base.quantize=int8")
    # its bf16 copy takes NF4 experts
    assert _model("gpt_oss_120b_lora.yaml", "base.quantize=nf4", unquantized=True).format.startswith("nf4")


@pytest.mark.parametrize("arch,fmt,quantize", [("deepseek_v3", "fp8_block", "none"), ("gpt_oss", "mxfp4", "none"),
                                               ("qwen3_moe", None, "nf4"), ("qwen3_moe", None, "int8")])
def test_planned_frozen_bytes_equal_the_loaded_models(arch, fmt, quantize, tmp_path):
    """The planner's bytes are what the loader keeps: a tiny checkpoint in each format, loaded at
    EP 1 in fp32 (CPU), measured by the run's own `frozen_bytes`."""
    from reference import build_hf

    from moe_dist.config import load_config
    from moe_dist.models.loading import load_model
    from moe_dist.plan import AdapterPlan
    from moe_dist.quant.write import write_quantized_checkpoint
    from moe_dist.train.memory import frozen_bytes

    hf = build_hf(arch)
    if fmt is None:
        hf.save_pretrained(tmp_path)
    else:
        write_quantized_checkpoint(hf, tmp_path, fmt, (8, 8))
    cfg = load_config(None, [f"model={tmp_path}", f"base.quantize={quantize}", "lora.attention=false"])
    m = _planner().inventory(None, cfg, False, {})
    measured = frozen_bytes(load_model(tmp_path, AdapterPlan(), quantize=quantize))
    assert m.format.split()[0] == {"fp8_block": "fp8", "mxfp4": "mxfp4", None: quantize}[fmt]
    assert (m.expert_bytes, m.non_expert_bytes) == (measured["expert"], measured["non_expert"])
    assert m.expert_bytes < 2 * m.expert  # quantized: not the 4 B of an fp32 expert


def test_smallest_launch():
    """DeepSeek-V3 LoRA in FP8 fits one node of 8 x 141 GB (EP 8); in bf16 it needs two (EP 16).
    The answer is the first candidate world that fits: the one before it does not."""
    plan = _planner()
    out = plan.main(["--recipe", str(ROOT / "launch/recipes/deepseek_v3_fp8_lora.yaml"), "--smallest"])
    fp8 = out["smallest"]
    assert (fp8["141 GB"]["world"], fp8["141 GB"]["ep_size"]) == (8, 8)
    assert (fp8["80 GB"]["world"], fp8["80 GB"]["ep_size"]) == (16, 16)
    bf16 = plan.main(["--recipe", str(ROOT / "launch/recipes/deepseek_v3_fp8_lora.yaml"), "--smallest",
                      "--unquantized"])["smallest"]
    assert (bf16["141 GB"]["world"], bf16["80 GB"]["world"]) == (16, 64)
    m = _model("deepseek_v3_fp8_lora.yaml")
    for name, gib in plan.GPUS.items():
        fit = fp8[name]
        assert fit["per_rank"]["total_gib"] <= gib * (1 - plan.HEADROOM)
        worlds = list(plan.worlds())
        before = worlds[worlds.index(fit["world"]) - 1]
        assert plan.per_rank(m, before, plan.largest_ep(before, 256), 2, True)["total_gib"] > gib * (1 - plan.HEADROOM)
    assert list(plan.worlds(32)) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32]
    assert [plan.largest_ep(w, 256) for w in (6, 24, 64)] == [2, 8, 64]
