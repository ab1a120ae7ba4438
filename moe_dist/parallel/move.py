"""Moving experts between expert-parallel ranks without changing the math.

    decide   balanced_placements (pure, moe_dist/parallel/balance.py) from all-reduced counts
    move     one all-to-all per EP group carries each moved expert's base weights, adapter
             values, moments and LoRI mask to its new owner (moe_dist/parallel/migrate.py);
             base weights change in place (arriving experts take leaving experts' slots,
             then a cycle permutation into the new slot order: one expert of scratch)

Nothing but ownership changes: an expert's tensors keep their logical keys, so the restored
optimizer state, checkpoints and the loss curve are the same as without the move. The engine
around it (snapshot, rebuild) is moe_dist/train/structure.py's; this module sees only the
experts modules (`mods`: layer -> ExpertParallelExperts) and tensors by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch

from moe_dist.optim import OPTIM_KEYS
from moe_dist.parallel.balance import balanced_placements, imbalance, layer_costs, moved_experts
from moe_dist.parallel.migrate import TensorSpec, exchange
from moe_dist.parallel.placement import ExpertPlacement, slot_order
from moe_dist.parallel.reduce import global_sum
from moe_dist.plan import EXPERT_PROJECTIONS, AdapterPlan, expert_param_key, expert_proj_layout

if TYPE_CHECKING:
    from moe_dist.moe.experts import ExpertParallelExperts

Experts = Mapping[int, "ExpertParallelExperts"]


@dataclass
class MoveReport:
    experts_moved: int = 0  # (layer, expert) pairs that changed owner
    bytes_sent: int = 0  # by this rank
    bytes_moved: int = 0  # by all ranks (filled by the caller's all-reduce)
    imbalance_before: float = 1.0
    imbalance_after: float = 1.0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"repartition: imbalance {self.imbalance_before:.3f} -> {self.imbalance_after:.3f}, "
                f"{self.experts_moved} experts moved, {self.bytes_moved / 2**20:.2f} MiB, {self.seconds:.2f}s")


def current_placements(mods: Experts) -> dict[int, ExpertPlacement]:
    return {layer: mod.placement for layer, mod in mods.items()}


def plan_placements(mods: Experts, plan: AdapterPlan, tokens_LE: torch.Tensor, layers: list[int],
                    min_gain: float = 0.01) -> tuple[dict[int, ExpertPlacement], float, float]:
    """(new placements, expected imbalance now, after) for `plan` under the measured counts."""
    any_mod = next(iter(mods.values()))
    current = current_placements(mods)
    costs = layer_costs(plan, tokens_LE, layers, any_mod.hidden_size, any_mod.intermediate_size)
    new = balanced_placements(costs, any_mod.ep_size, current, min_gain)
    return new, imbalance(costs, current), imbalance(costs, new)


def permute_slots_(w_e__: torch.Tensor, src: list[int]) -> None:
    """In place, w[i] <- w[src[i]] for a permutation `src`, one slot of scratch per cycle."""
    done = [False] * len(src)
    for i in range(len(src)):
        if done[i] or src[i] == i:
            done[i] = True
            continue
        scratch = w_e__[i].clone()
        j = i
        while True:
            done[j] = True
            k = src[j]
            if k == i:
                w_e__[j].copy_(scratch)
                break
            w_e__[j].copy_(w_e__[k])
            j = k


def rehome_experts(mod: "ExpertParallelExperts", placement: ExpertPlacement, ranks: Mapping[tuple[int, str], int],
                   arriving: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
    """Put `mod` on `placement` with adapters of `ranks` (fresh; values are carried by key).

    `arriving[e]` = {base weight name: tensor} (see `base_weights`) of each expert that comes
    from another rank. Leaving experts' slots take arriving ones, then one cycle permutation
    puts every slot where the new slot order wants it (a new plan alone reorders slots too)."""
    ep_rank = mod.groups.ep_rank
    new_local = slot_order(placement, ranks)[ep_rank]
    slot_of = {e: s for s, e in enumerate(mod.local_experts)}
    leaving = [s for s, e in enumerate(mod.local_experts) if e not in new_local]
    coming = [e for e in new_local if e not in slot_of]
    missing = [e for e in coming if e not in arriving]
    if missing:
        raise ValueError(f"layer {mod.layer}: EP rank {ep_rank} gets experts {missing} without weights")
    if len(leaving) != len(coming):
        raise ValueError(f"layer {mod.layer}: EP rank {ep_rank} would own {len(new_local)} experts, it holds "
                         f"{len(mod.local_experts)}; placements keep the count per rank")
    weights = mod.base_weights()
    with torch.no_grad():
        for s, e in zip(leaving, coming):
            for name, w in weights.items():
                w[s].copy_(arriving[e][name])
            slot_of[e] = s
        src = [slot_of[e] for e in new_local]
        for w in weights.values():
            permute_slots_(w.data, src)
    mod.reassign(placement, ranks)


def _expert_manifest(mod: "ExpertParallelExperts", plan: AdapterPlan, expert: int, with_moments: bool
                     ) -> list[TensorSpec]:
    """Everything an expert owns, in a fixed order both sides derive from the plan."""
    D, F, layer = mod.hidden_size, mod.intermediate_size, mod.layer
    specs = [TensorSpec(f"layers.{layer}.experts.{expert}.base.{name}", tuple(w.shape[1:]), w.dtype)
             for name, w in mod.base_weights().items()]  # (+ biases, gpt-oss)
    ranks = plan.expert_ranks_of_layer(layer)
    for proj in EXPERT_PROJECTIONS:
        r = ranks.get((expert, proj), 0)
        if not r:
            continue
        in_f, out_f, _, _ = expert_proj_layout(proj, D, F)
        a, b = expert_param_key(layer, expert, proj, "lora_A"), expert_param_key(layer, expert, proj, "lora_B")
        specs += [TensorSpec(a, (r, in_f), torch.float32), TensorSpec(b, (out_f, r), torch.float32)]
        if with_moments:
            trained = [(b, (out_f, r))] if plan.lori else [(a, (r, in_f)), (b, (out_f, r))]  # LoRI's A is frozen
            for key, shape in trained:
                specs += [TensorSpec(f"{key}/{n}", shape, torch.float32) for n in OPTIM_KEYS]
        if plan.lori:
            specs.append(TensorSpec(f"{b}.mask", (out_f, r), torch.float32))
    return specs


def move_experts(mods: Experts, plan: AdapterPlan, placements: dict[int, ExpertPlacement], values: dict,
                 optim: dict, with_moments: bool) -> tuple[dict, dict, MoveReport]:
    """Collective over each EP group: switch the experts modules to `placements` (and the
    plan's ranks), moving the base weights of experts that change owner in place and their
    adapter values / moments (`values`, `optim`: this rank's, by logical key, fp32 on the CPU)
    along.

    Returns this rank's values and moments for its new experts (plus every non-expert key);
    the adapters are rebuilt fresh, the caller writes the values in. A moved adapter with no
    entry in `values` travels as the module holds it; missing moments travel as zeros (what a
    fresh Adam state is)."""
    report = MoveReport()
    if not mods:
        return values, optim, report
    any_mod = next(iter(mods.values()))
    ep_size, ep_rank, device = any_mod.ep_size, any_mod.groups.ep_rank, any_mod.gate_up_proj.device
    old = current_placements(mods)
    for layer, new in placements.items():  # checked before any collective: every rank raises alike
        counts = lambda p: [len(p.experts_of(r)) for r in range(p.ep_size)]  # noqa: E731
        if new.ep_size != ep_size or counts(new) != counts(old[layer]):
            raise ValueError(f"layer {layer}: a move keeps each EP rank's expert count {counts(old[layer])}; "
                             f"the new placement has {counts(new)} over EP {new.ep_size}")
    moving = {layer: experts for layer, experts in moved_experts(old, placements).items() if experts}
    report.experts_moved = sum(len(v) for v in moving.values())
    params, masks = {}, {}
    for mod in mods.values():
        params.update(mod.adapter_params())
        masks.update(mod.adapters.lori_masks())
    send_specs = [[] for _ in range(ep_size)]
    outgoing = [[] for _ in range(ep_size)]
    recv_specs = [[] for _ in range(ep_size)]
    for layer, experts in sorted(moving.items()):
        mod = mods[layer]
        for e in experts:
            src, dst = old[layer].owner[e], placements[layer].owner[e]
            specs = _expert_manifest(mod, plan, e, with_moments)
            if src == ep_rank:
                send_specs[dst] += specs
                outgoing[dst] += [_local_tensor(mod, spec.name, values, optim, params, masks) for spec in specs]
            elif dst == ep_rank:
                recv_specs[src] += specs
    report.bytes_sent = sum(s.nbytes for specs in send_specs for s in specs)
    report.bytes_moved = int(global_sum(report.bytes_sent, device))  # EDP replicas each move their own copy
    received = exchange(outgoing, send_specs, recv_specs, any_mod.groups.ep_group, device)
    del outgoing
    arriving: dict[int, dict[int, dict]] = {}
    new_values, new_optim = dict(values), dict(optim)
    for specs, tensors in zip(recv_specs, received):
        for spec, t in zip(specs, tensors):
            _, layer, _, expert, *rest = spec.name.split(".")
            if rest[0] == "base":
                arriving.setdefault(int(layer), {}).setdefault(int(expert), {})[rest[1]] = t
            elif "/" in spec.name:
                new_optim[spec.name] = t.cpu().clone()
            elif spec.name.endswith(".mask"):
                masks[spec.name[: -len(".mask")]] = t.cpu().clone()
            else:
                new_values[spec.name] = t.cpu().clone()
    for layer, mod in mods.items():
        if layer in moving:
            rehome_experts(mod, placements[layer], plan.expert_ranks_of_layer(layer), arriving.get(layer, {}))
    del received, arriving
    owned = {k for mod in mods.values() for k in mod.adapter_params()}
    gone = {k for k in params if k not in owned}  # adapters that left this rank
    new_values = {k: v for k, v in new_values.items() if k not in gone}
    new_optim = {k: v for k, v in new_optim.items() if k.rsplit("/", 1)[0] not in gone}
    with torch.no_grad():
        for mod in mods.values():
            for k, m in mod.adapters.lori_masks().items():
                if k in masks:
                    m.copy_(masks[k])
    return new_values, new_optim, report


def _local_tensor(mod: "ExpertParallelExperts", name: str, values: dict, optim: dict, params: dict, masks: dict
                  ) -> torch.Tensor:
    parts = name.split(".")
    if parts[4] == "base":
        slot = mod.local_experts.index(int(parts[3]))
        return mod.base_weights()[parts[5]][slot]
    if name.endswith(".mask"):
        return masks[name[: -len(".mask")]]
    if "/" in name:
        key = name.rsplit("/", 1)[0]
        return optim[name] if name in optim else torch.zeros(params[key].shape, dtype=torch.float32, device="cpu")
    return values[name] if name in values else params[name].detach().float()
