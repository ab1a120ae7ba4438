"""Activation checkpointing (moe_dist/recompute.py) changes memory, not numbers: with
every decoder layer recomputed in backward, under expert parallelism (the recompute repeats
the all-to-alls) and data parallelism, a DeepSpeed ZeRO-2 engine trains to the same per-step
losses, the adapters get the same gradients, and the routing counters count each token once."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed
from reference import build_hf, set_b_values
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.adapters.lora_moe import lora_moe_modules
from moe_dist.models.arch import moe_layer_indices
from moe_dist.models.convert import adapter_grads, adapter_params, apply_lora_moe, convert_model
from moe_dist.recompute import checkpointed_layers, enable_activation_checkpointing, recomputing
from moe_dist.optim import adamw
from moe_dist.plan import AdapterPlan

STEPS = 3


def _tokens(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(100 * step + rank))


def _model(hf, ep_size: int, checkpointing: bool):
    layers = moe_layer_indices(hf.config)
    plan = AdapterPlan.uniform(layers, 8, 4, attention_layers=list(range(hf.config.num_hidden_layers)))
    model = convert_model(copy.deepcopy(hf), plan, ep_size=ep_size, lora=LoRAConfig(alpha=8.0))
    set_b_values(adapter_params(model))
    if checkpointing:
        assert enable_activation_checkpointing(model) == hf.config.num_hidden_layers
    else:
        assert checkpointed_layers(model) == 0
    return model.train()


def _routing(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("routed_tokens_E")}


def _run(rank: int, world: int, ep_size: int) -> None:
    import deepspeed

    hf = build_hf("olmoe")
    results = {}
    for checkpointing in (False, True):
        model = _model(hf, ep_size, checkpointing)
        params = adapter_params(model)
        # the gradients of one forward/backward, before any engine
        loss = model(input_ids=_tokens(rank, 0), labels=_tokens(rank, 0)).loss
        loss.backward()
        grads = {k: g.clone() for k, g in adapter_grads(model).items()}
        counts = _routing(model)
        model.zero_grad(set_to_none=True)
        for b in _routing(model):
            model.get_buffer(b).zero_()
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10**6,
                  "gradient_clipping": 1.0}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model, 1e-2), config=config)
        losses = []
        for step in range(STEPS):
            loss = engine(input_ids=_tokens(rank, step), labels=_tokens(rank, step)).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        results[checkpointing] = (grads, counts, losses, _routing(model))
        engine.destroy()
    (g0, c0, l0, r0), (g1, c1, l1, r1) = results[False], results[True]
    assert not recomputing()
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"rank {rank} grad {k}: {m}")
    for name in c0:  # each token counted once: the recompute does not add to the counters
        assert torch.equal(c1[name], c0[name]), f"rank {rank} {name}: {c1[name]} vs {c0[name]}"
        assert torch.equal(r1[name], r0[name]), f"rank {rank} {name} over {STEPS} engine steps"
        assert c0[name].sum() == 2 * 12 * hf.config.num_experts_per_tok
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=0,
                               msg=lambda m: f"rank {rank} losses {l1} vs {l0}: {m}")


@pytest.mark.parametrize("ep_size", [2, 1], ids=["ep2", "ep1_dp2"])
def test_recompute_same_losses_gradients_and_counts(ep_size):
    run_distributed(_run, 2, ep_size)


def test_lora_moe_counts_once_under_recompute():
    """DMEP's LoRA-MoE modules (on attention, inside the checkpointed layers) count their
    expert selections once per token, and their gradients are unchanged."""
    hf = build_hf("olmoe")
    layers = list(range(hf.config.num_hidden_layers))
    runs = []
    for checkpointing in (False, True):
        model = copy.deepcopy(hf)
        model = convert_model(model, AdapterPlan(), lora=LoRAConfig(alpha=8.0))
        targets = {(l, p): (0, 1, 2, 3) for l in layers for p in ("self_attn.q_proj", "self_attn.v_proj")}
        apply_lora_moe(model, AdapterPlan(lora_moe=targets, lora_moe_rank=4, lora_moe_top_k=2), LoRAConfig(alpha=8.0))
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        for p in adapter_params(model).values():
            if p.dim() == 2 and p.shape[1] == 4 and p.shape[0] != 4:  # B: make the delta matter
                torch.nn.init.normal_(p, 0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        out = model(input_ids=_tokens(0, 0), labels=_tokens(0, 0))
        balance = sum(m.aux_loss for m in lora_moe_modules(model))  # DMEP's balancing loss, backward too
        (out.loss + 0.1 * balance).backward()
        counts = {n: b.clone() for n, b in model.named_buffers() if n.endswith("selected_N")}
        grads = {k: g.clone() for k, g in adapter_grads(model).items()}
        runs.append((out.loss.item() + 0.1 * balance.item(), counts, grads))
    (l0, c0, g0), (l1, c1, g1) = runs
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert c0 and all(torch.equal(c0[n], c1[n]) for n in c0), (c0, c1)
    assert all(c.sum() == 2 * 12 * 2 for c in c0.values())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)
