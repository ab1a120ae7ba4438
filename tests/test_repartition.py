"""The repartitioner: placement policy (pure), the in-place slot permutation, the move
collective (logits and optimizer state unchanged by a forced move), and the loss curve of a
run with a forced repartition against the same run without it (ZeRO-1/2, world 2 and 4)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from reference import build_hf, set_b_values
from moe_dist.models.arch import moe_layer_indices
from moe_dist.models.convert import adapter_params, convert_model
from moe_dist.parallel.move import permute_slots_
from moe_dist.parallel.balance import balanced_placement, expert_costs_E, imbalance, rank_loads_P
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan

ROOT = Path(__file__).resolve().parent.parent


# ---- policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("experts,ep", [(8, 2), (8, 4), (12, 3)])
def test_balanced_placement_is_optimal_on_small_cases(experts, ep):
    """Equal expert counts per rank, and the max per-rank cost equals the brute-force optimum
    on skewed costs (where it exists within reach of pairwise swaps: these cases)."""
    gen = torch.Generator().manual_seed(experts * 10 + ep)
    for _ in range(5):
        cost = torch.rand(experts, generator=gen, dtype=torch.float64) ** 3
        placement = balanced_placement(cost, ep, min_gain=0.0)
        assert [len(placement.experts_of(r)) for r in range(ep)] == [experts // ep] * ep
        best = min(rank_loads_P(cost, ExpertPlacement(owner, ep)).max().item()
                   for owner in itertools.product(range(ep), repeat=experts)
                   if all(owner.count(r) == experts // ep for r in range(ep)))
        assert rank_loads_P(cost, placement).max().item() <= best * 1.02


def test_balanced_placement_keeps_a_balanced_map_and_moves_few():
    cost = torch.tensor([8.0, 1, 1, 1, 1, 1, 1, 8])  # contiguous is already even: nothing moves
    assert balanced_placement(cost, 2) == ExpertPlacement.contiguous(8, 2)
    cost = torch.tensor([8.0, 7, 1, 1, 1, 1, 2, 3])  # the hot pair sits on rank 0
    new = balanced_placement(cost, 2)
    loads = rank_loads_P(cost, new)
    assert loads.max() / loads.mean() < 1.05
    moved = sum(a != b for a, b in zip(new.owner, ExpertPlacement.contiguous(8, 2).owner))
    assert moved == 2  # one swap, not a relabelled reshuffle


def test_cost_counts_adapters_and_imbalance_sums_layers():
    plan = AdapterPlan(expert_ranks={(0, 1, p): 8 for p in ("gate_proj", "up_proj", "down_proj")})
    cost = expert_costs_E(plan, 0, torch.tensor([10.0, 10, 0, 0]), hidden=16, intermediate=32)
    assert cost[0] == 10 * 12 * 16 * 32 and cost[1] == cost[0] + 10 * 3 * 6 * 8 * (16 + 32)
    assert cost[2] == 0
    even = ExpertPlacement.from_lists([[0, 2], [1, 3]])
    assert imbalance({0: torch.tensor([1.0, 1, 1, 1])}, {0: even}) == 1.0
    skew = {0: torch.tensor([3.0, 0, 1, 0]), 1: torch.tensor([1.0, 1, 1, 1])}
    assert imbalance(skew, {0: even, 1: even}) == pytest.approx((4 + 2) / (2 + 2))


def test_permute_slots_in_place():
    w = torch.arange(6 * 3.0).reshape(6, 3)
    for src in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 2, 0, 4, 5, 3], [2, 0, 1, 3, 5, 4]):
        t = w.clone()
        permute_slots_(t, src)
        assert torch.equal(t, w[src])


# ---- moving experts -------------------------------------------------------------------------
def hot_plan(layers, lori: bool = False) -> AdapterPlan:
    """Adapters on a few experts per layer with different ranks (HELLoRA/EPnG-like)."""
    ranks = {(l, e, p): r for l in layers for e, r in ((1, 8), (2, 4), (6, 12)) for p in ("gate_proj", "up_proj", "down_proj")}
    return AdapterPlan(expert_ranks=ranks, attention_ranks={(l, "q_proj"): 4 for l in layers}, lori=lori)


def shuffled(num_experts: int, ep: int, seed: int) -> ExpertPlacement:
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed)).tolist()
    return ExpertPlacement.from_lists([sorted(perm[r::ep]) for r in range(ep)])


def _move_keeps_logits_and_state(rank: int, world: int, ep: int, arch: str = "olmoe") -> None:
    from moe_dist.parallel.move import move_experts
    from moe_dist.routing import experts_modules

    torch.manual_seed(0)
    hf = build_hf(arch)
    layers = moe_layer_indices(hf.config)
    for lori in (False, True):
        plan = hot_plan(layers, lori)
        model = convert_model(copy.deepcopy(hf), plan, ep_size=ep)
        params = adapter_params(model)
        set_b_values(params)
        masks = {k: m for mod in model.modules() if hasattr(mod, "adapters") for k, m in mod.adapters.lori_masks().items()}
        for k, m in masks.items():  # a mask with holes, the same on every rank
            m.copy_((torch.arange(m.numel()).reshape(m.shape) % 3 != 0).float())
        # "Optimizer state": a function of the key, so every rank knows the truth.
        truth = lambda key, shape: torch.full(shape, float(sum(key.encode())) / 1000)  # noqa: E731
        values = {k: p.detach().clone() for k, p in params.items()}
        optim = {f"{k}/{n}": truth(f"{k}/{n}", p.shape) for k, p in params.items() if p.requires_grad
                 for n in ("exp_avg", "exp_avg_sq")}
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            before = model(input_ids=ids, use_cache=False).logits
        new = {layer: shuffled(8, ep, seed=layer + 10 * lori) for layer in layers}
        values, optim, report = move_experts(experts_modules(model), plan, new, values, optim, with_moments=True)
        assert report.experts_moved > 0
        params = adapter_params(model)
        assert set(values) == set(params), set(values) ^ set(params)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(values[k])
            after = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
        for k, p in params.items():
            if p.requires_grad:
                for n in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(optim[f"{k}/{n}"], truth(f"{k}/{n}", p.shape)), k
            else:
                assert f"{k}/exp_avg" not in optim  # LoRI's frozen A has no moments to carry
        for mod in model.modules():
            if hasattr(mod, "adapters"):
                assert mod.local_experts == sorted(mod.local_experts, key=lambda e: (
                    tuple(-plan.rank(mod.layer, e, p) for p in ("gate_proj", "up_proj", "down_proj")), e))
                assert set(mod.local_experts) == set(new[mod.layer].experts_of(mod.groups.ep_rank))
                for k, m in mod.adapters.lori_masks().items():
                    assert torch.equal(m, (torch.arange(m.numel()).reshape(m.shape) % 3 != 0).float()), k


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)])
def test_forced_move_keeps_logits_base_weights_and_optimizer_state(world, ep):
    run_distributed(_move_keeps_logits_and_state, world, ep)


def test_forced_move_carries_expert_biases():
    """gpt-oss: a moved expert takes its frozen biases along (or the logits would change)."""
    run_distributed(_move_keeps_logits_and_state, 2, 2, "gpt_oss")


# ---- a run with a forced repartition has the same loss curve ---------------------------------
FORCED = {2: [[1, 2, 6, 0], [3, 4, 5, 7]],  # EP rank 1 is left with no adapter: anchor path
          4: [[1, 2], [6, 0], [3, 4], [5, 7]]}  # EP ranks 2 and 3 likewise


def _run(hf, plan, ep: int, stage: int, move_at: int | None, rank: int, check_gather: bool) -> list[float]:
    from moe_dist.config import RunConfig
    from moe_dist.methods import Change
    from moe_dist.train.engine import build_engine
    from moe_dist.train.structure import change_structure, start_engine
    from moe_dist.train.zero_state import fragment_full_state, full_state

    cfg = RunConfig()
    cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.lr = 2, 2, 1e-2
    cfg.train.warmup_steps, cfg.train.steps = 2, 6
    cfg.ds_config = str(ROOT / f"ds_configs/zero{stage}.json")
    model = convert_model(copy.deepcopy(hf), plan, ep_size=ep)
    build = lambda m: build_engine(m, cfg, bf16=False)  # noqa: E731
    ds = start_engine(model, build)
    losses = []
    for step in range(cfg.train.steps):
        if step == move_at:
            if check_gather:  # the one-all-gather snapshot equals DeepSpeed's per-parameter API
                fast, fast_optim = full_state(adapter_params(model), ds.engine)
                slow, slow_optim = fragment_full_state(adapter_params(model), ds.engine)
                assert fast.keys() == slow.keys() and fast_optim.keys() == slow_optim.keys() and fast_optim
                assert all(torch.equal(fast[k], slow[k]) for k in fast)
                assert all(torch.equal(fast_optim[k], slow_optim[k]) for k in fast_optim)
            layers = moe_layer_indices(hf.config)
            ds, change = change_structure(model, ds, Change(placements={l: ExpertPlacement.from_lists(FORCED[ep])
                                                                         for l in layers}), build)
            report = change.move
            assert report.experts_moved == len(layers) * (2 if ep == 2 else 5)
            assert report.bytes_moved > 0
        for micro in range(cfg.train.grad_accum):
            ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank))
            loss = ds.engine(input_ids=ids, labels=ids, use_cache=False).loss
            ds.engine.backward(loss)
            ds.engine.step()
            losses.append(loss.item())
    assert ds.engine.global_steps == cfg.train.steps
    ds.engine.destroy()
    return losses


def _same_loss_curve(rank: int, world: int, ep: int) -> None:
    hf = build_hf("olmoe")
    plan = hot_plan(moe_layer_indices(hf.config))
    for stage in (1, 2):
        reference = _run(hf, plan, ep, stage, None, rank, False)
        moved = _run(hf, plan, ep, stage, 3, rank, True)
        assert reference[5] != reference[6]  # it trains
        torch.testing.assert_close(moved, reference, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"ZeRO-{stage} world {world} EP {ep}: {m}")


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2), (4, 4)])
def test_forced_repartition_keeps_the_loss_curve(world, ep):
    run_distributed(_same_loss_curve, world, ep)
