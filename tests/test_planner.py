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

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = yaml.safe_load((ROOT / "launch/recipes" / recipe).read_text())
    world = data.get("ep_size") or 8
    out = _planner().main(["--recipe", str(ROOT / "launch/recipes" / recipe), "--world", str(world)])
    assert out["total_params"] > 1e9 and out["trainable_params_total"] > 0
    # real sequence lengths: every real-model recipe recomputes its layers, and is planned so
    assert data["train"].get("activation_checkpointing") is True, f"{recipe}: train.activation_checkpointing"
    r = out["per_rank"]
    assert r["activations_gib_estimate"] == r["activations_gib_with_checkpointing"]
    assert r["activations_gib_with_checkpointing"] < r["activations_gib_without_checkpointing"] / 4
