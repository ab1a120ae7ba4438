"""The converted model under a real DeepSpeed engine (ZeRO-1 and ZeRO-2, world 4, EP 2):
one SGD step moves every adapter exactly by the global-mean gradient of the reference, so
expert gradients are reduced over the expert-data-parallel group and dense ones over the
world, and frozen expert weights are not overwritten by rank 0's."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed
from reference import build_hf, build_reference, set_b_values
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.models.arch import moe_layer_indices
from moe_dist.models.convert import adapter_params, convert_model
from moe_dist.optim import moe_param_groups
from moe_dist.plan import AdapterPlan

LR = 0.5


def _tokens(rank: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7 + rank))


def _one_step(rank: int, world: int, stage: int) -> None:
    import deepspeed

    hf = build_hf("qwen2_moe")
    layers = moe_layer_indices(hf.config)
    plan = AdapterPlan.uniform(layers, 8, 4, attention_layers=[0, 1], experts={l: [0, 2, 3, 5, 6] for l in layers})
    lora = LoRAConfig(alpha=8.0)
    ref, ref_tensors = build_reference(hf, plan, lora)
    grads = {k: torch.zeros_like(t) for k, t in ref_tensors.items()}
    for src in range(world):
        out = ref(_tokens(src), labels=_tokens(src))
        (out.loss / world).backward()  # global mean over the 4 data-parallel ranks
    for k, t in ref_tensors.items():
        if t.grad is not None:
            grads[k] = t.grad

    model = convert_model(copy.deepcopy(hf), plan, ep_size=2, lora=lora)
    params = adapter_params(model)
    set_b_values(params)
    before = {k: p.detach().clone() for k, p in params.items()}
    base_before = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    opt = torch.optim.SGD(moe_param_groups(model, LR), lr=LR)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**6,
              "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    loss = engine(input_ids=_tokens(rank), labels=_tokens(rank)).loss
    engine.backward(loss)
    engine.step()
    assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj, base_before), f"rank {rank}: base experts overwritten"
    for k, p in adapter_params(model).items():  # taken anew: the engine moved the Parameters
        expected = before[k] - LR * grads[k]
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5, msg=lambda m: f"rank {rank} {k}: {m}")
    engine.destroy()


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_step_matches_global_mean_gradient(stage):
    run_distributed(_one_step, 4, stage)
