"""launch/plan.py counts parameters from the real config on the meta device: Mixtral-8x7B
(transformers' default Mixtral config) must come out at the published 46.7B."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
