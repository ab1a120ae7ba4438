"""The expert-parallel replacement for a transformers MoE block's `experts` module.

Shape legend: T tokens on this rank, D hidden, F expert intermediate, K top-k, M rows this
rank computes (after the exchange), e experts this rank owns, G experts in a rank bucket,
R adapter rank.

transformers v5 MoE blocks all call `self.experts(hidden_TD, top_k_index_TK,
top_k_weights_TK)` and keep router and shared experts outside; swapping this module in keeps
each architecture's routing exact. Compute is dropless and grouped: one grouped matmul per
base projection over all rows, and per adapter rank bucket two small grouped matmuls whose
result is added in place to the base output rows of those experts (W + BA never exists).
"""

from __future__ import annotations

import itertools

from typing import Callable, Mapping

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from moe_dist.adapters.expert_bank import ExpertLoRABank, RankBucket
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.moe.activation import gated_act
from moe_dist.moe.dispatch import AllToAllDispatcher, LocalDispatcher
from moe_dist.moe.expert_loop import ExpertLoopLinear, SlotAdapter
from moe_dist.parallel.groups import ExpertGroups, mark_expert_param
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import EXPERT_PROJECTIONS, expert_proj_layout


def grouped_mm(x_MI: torch.Tensor, w_GIO: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x_MI, w_GIO, offs=offs_G)


def _slot_rows(bucket: RankBucket, starts: list[int], counts: list[int], device) -> torch.Tensor:
    idx = [torch.arange(starts[s], starts[s] + counts[s]) for s in bucket.slots]
    return torch.cat(idx).to(device)


def _lora_delta(
    A_GIR: torch.Tensor,
    B_GRO: torch.Tensor,
    bucket: RankBucket,
    x_MI: torch.Tensor,
    out_MO: torch.Tensor,
    starts: list[int],
    counts: list[int],
) -> None:
    """out[rows of bucket experts] += x[rows] @ A^T @ B^T (scale is in B), in place, grouped."""
    offs_G = torch.tensor([counts[s] for s in bucket.slots], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    offs_G = offs_G.to(x_MI.device)
    if bucket.contiguous:
        lo = starts[bucket.slots[0]]
        hi = starts[bucket.slots[-1]] + counts[bucket.slots[-1]]
        delta = grouped_mm(grouped_mm(x_MI[lo:hi], A_GIR, offs_G), B_GRO, offs_G)
        out_MO[lo:hi] += delta
    else:
        rows = _slot_rows(bucket, starts, counts, x_MI.device)
        delta = grouped_mm(grouped_mm(x_MI.index_select(0, rows), A_GIR, offs_G), B_GRO, offs_G)
        out_MO.index_add_(0, rows, delta)


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


class ExpertParallelExperts(MoE):
    """Holds the base weights of this rank's experts and their adapters; dispatches tokens.

    Subclasses deepspeed.moe.layer.MoE only so the DeepSpeed engine detects a MoE model and
    reduces expert gradients over the expert-data-parallel group (detection is an isinstance
    check); none of MoE's own machinery is used.
    """

    def __init__(
        self,
        layer: int,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        placement: ExpertPlacement,
        groups: ExpertGroups,
        ranks: Mapping[tuple[int, str], int],
        lora: LoRAConfig,
        lori: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        adapter_dtype: torch.dtype = torch.float32,
        biases: bool = False,
        gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """`biases`: frozen per-expert biases after each projection (gpt-oss); `gate_fn`: the
        architecture's own activation on the [gate | up] rows instead of act_fn(gate) * up."""
        nn.Module.__init__(self)
        if placement.num_experts != num_experts:
            raise ValueError(f"layer {layer}: placement covers {placement.num_experts} experts, layer has {num_experts}")
        if placement.ep_size != groups.ep_size:
            raise ValueError(f"layer {layer}: placement is for ep_size {placement.ep_size}, groups for {groups.ep_size}")
        # Attributes DeepSpeed's engine reads from MoE layers.
        self.num_experts = num_experts
        self.ep_size = groups.ep_size
        self.expert_group_name = groups.name
        self.enable_expert_tensor_parallelism = False
        self.layer = layer
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.act_fn = act_fn
        self.placement = placement
        self.groups = groups
        self.lora, self.lori, self.adapter_dtype = lora, lori, adapter_dtype
        self.experts_by_rank = self._slot_order(ranks)
        self.local_experts = self.experts_by_rank[groups.ep_rank]
        self.num_local_experts = len(self.local_experts)
        e, F, D = self.num_local_experts, intermediate_size, hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * F, D, dtype=dtype, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, D, F, dtype=dtype, device=device), requires_grad=False)
        self.gate_up_bias = self.down_bias = None
        if biases:
            self.gate_up_bias = nn.Parameter(torch.empty(e, 2 * F, dtype=dtype, device=device), requires_grad=False)
            self.down_bias = nn.Parameter(torch.empty(e, D, dtype=dtype, device=device), requires_grad=False)
        self.gate_fn = gate_fn
        for w in self.base_weights().values():
            mark_expert_param(w, self.ep_size)
        self._build_adapters(ranks, device)
        # Counters live in the model, decisions outside it (moe_dist.routing reads and resets).
        # Integer, so a bf16 cast of the module leaves it exact; no host sync to update it.
        self.register_buffer("routed_tokens_E", torch.zeros(num_experts, dtype=torch.long, device=device),
                             persistent=False)
        self.dispatcher = self._make_dispatcher(device)

    def base_weights(self) -> dict[str, nn.Parameter]:
        """The frozen per-expert tensors (slot-major), by name: what a move carries."""
        out = {"gate_up_proj": self.gate_up_proj, "down_proj": self.down_proj}
        if self.gate_up_bias is not None:
            out.update(gate_up_bias=self.gate_up_bias, down_bias=self.down_bias)
        return out

    def _slot_order(self, ranks: Mapping[tuple[int, str], int]) -> list[list[int]]:
        """Local slot order groups experts with equal adapter ranks, so rank buckets are
        contiguous row ranges (no gather) in the common case. It is derived from the plan,
        identical on every rank, so all ranks agree on every rank's slot order."""
        signature = lambda e: (tuple(-ranks.get((e, p), 0) for p in EXPERT_PROJECTIONS), e)  # noqa: E731
        return [sorted(self.placement.experts_of(r), key=signature) for r in range(self.placement.ep_size)]

    def _build_adapters(self, ranks: Mapping[tuple[int, str], int], device) -> None:
        dims = {p: expert_proj_layout(p, self.hidden_size, self.intermediate_size)[:2] for p in EXPERT_PROJECTIONS}
        self.adapters = ExpertLoRABank(self.layer, self.local_experts, ranks, dims, self.lora, self.lori, device=device)
        self.adapters.to(self.adapter_dtype)
        # ZeRO needs >= 1 trainable expert parameter on every rank; a rank whose experts carry
        # no adapter gets a one-element anchor that takes part in forward with weight 0.
        self.anchor = None
        if not self.adapters.trainable:
            self.anchor = nn.Parameter(torch.zeros(1, device=device, dtype=self.adapter_dtype))
            mark_expert_param(self.anchor, self.ep_size)
        for p in self.adapters.parameters():
            mark_expert_param(p, self.ep_size)
        self._loop_layouts: dict = {}  # projections -> per-slot adapter entries (compute_loop)

    def set_adapter_ranks(self, ranks: Mapping[tuple[int, str], int]) -> None:
        """Replace this layer's adapters by fresh ones of the given ranks (a structure change).

        The experts a rank owns stay; their local slot order follows the new ranks, so the
        base weights are permuted to match and the dispatcher is rebuilt. New adapters start
        at their initialisation (A seeded by key, B zero): the caller carries surviving values
        over by logical key."""
        self.set_placement(self.placement, ranks, {})

    def set_placement(self, placement: ExpertPlacement, ranks: Mapping[tuple[int, str], int],
                      arriving: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Own the experts `placement` gives this rank, with adapters of the given ranks.

        `arriving[e]` = {base weight name: tensor} (see `base_weights`) of each expert that
        comes from another rank.
        Base weights change in place (leaving experts' slots take arriving ones, then a cycle
        permutation into the new slot order), so the extra memory is one expert's slice.
        Adapters are rebuilt fresh, as in set_adapter_ranks."""
        if placement.num_experts != self.num_experts or placement.ep_size != self.ep_size:
            raise ValueError(f"layer {self.layer}: placement for {placement.num_experts} experts / EP "
                             f"{placement.ep_size}, layer has {self.num_experts} / EP {self.ep_size}")
        device = self.gate_up_proj.device
        self.placement = placement
        self.experts_by_rank = self._slot_order(ranks)
        new_local = self.experts_by_rank[self.groups.ep_rank]
        if len(new_local) != len(self.local_experts):
            raise ValueError(f"layer {self.layer}: EP rank {self.groups.ep_rank} would own {len(new_local)} experts, "
                             f"it holds {len(self.local_experts)}; placements keep the count per rank")
        slot_of = {e: s for s, e in enumerate(self.local_experts)}
        leaving = [s for s, e in enumerate(self.local_experts) if e not in new_local]
        coming = [e for e in new_local if e not in slot_of]
        missing = [e for e in coming if e not in arriving]
        if missing:
            raise ValueError(f"layer {self.layer}: EP rank {self.groups.ep_rank} gets experts {missing} without weights")
        weights = self.base_weights()
        with torch.no_grad():
            for s, e in zip(leaving, coming, strict=True):
                for name, w in weights.items():
                    w[s].copy_(arriving[e][name])
                slot_of[e] = s
            src = [slot_of[e] for e in new_local]
            for w in weights.values():
                permute_slots_(w.data, src)
        self.local_experts = new_local
        self._build_adapters(ranks, device)
        self.dispatcher = self._make_dispatcher(device)

    def _make_dispatcher(self, device) -> LocalDispatcher | AllToAllDispatcher:
        if self.ep_size == 1:
            return LocalDispatcher(self.local_experts, self.num_experts, device=device)
        return AllToAllDispatcher(self.experts_by_rank, self.groups.ep_rank, self.groups.ep_group, device)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine; our groups already exist (created in conversion)."""

    def _apply(self, fn, recurse=True):  # keep dispatcher index tensors on the module's device
        out = super()._apply(fn, recurse)
        self.dispatcher.to(self.gate_up_proj.device)
        self._loop_layouts = {}  # casts may replace the mask buffers
        return out

    # ---- compute ----------------------------------------------------------------------
    kernel = "auto"  # "auto": the per-expert loop on CPU, grouped matmuls elsewhere; or "loop" / "grouped"

    def compute(self, x_MD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        use_loop = self.kernel == "loop" or (self.kernel == "auto" and x_MD.device.type == "cpu")
        if use_loop:
            return self.compute_loop(x_MD, tokens_per_expert)
        return self.compute_grouped(x_MD, tokens_per_expert)

    def _loop_adapters(self, projs: tuple[str, ...], dtype: torch.dtype
                       ) -> tuple[list[list[SlotAdapter]], list[torch.Tensor]]:
        """Per-slot adapter entries and the tensors they index. The structure is built once
        per adapter layout (it changes only with `_build_adapters` or a move/cast); each call
        only collects the current tensors, with LoRI's mask applied."""
        layout = self._loop_layouts.get(projs)
        if layout is None:
            layout = self._loop_layouts[projs] = self._build_loop_layout(projs)
        slots, pairs = layout
        tensors = []
        for A, B, mask in pairs:
            if mask is not None:
                B = B * mask
            tensors += [A if A.dtype == dtype else A.to(dtype), B if B.dtype == dtype else B.to(dtype)]
        return slots, tensors

    def _build_loop_layout(self, projs: tuple[str, ...]):
        bank = self.adapters
        cols = {p: expert_proj_layout(p, self.hidden_size, self.intermediate_size)[2:] for p in projs}
        slots, pairs = [], []
        for expert in self.local_experts:
            mine = []
            for proj in projs:
                name = f"{expert}_{proj}"
                if name not in bank.lora_A:
                    continue
                A, B = bank.lora_A[name], bank.lora_B[name]
                pairs.append((A, B, getattr(bank, f"mask_{name}") if bank.lori else None))
                mine.append(SlotAdapter(2 * len(pairs) - 2, 2 * len(pairs) - 1, *cols[proj], bank.config.scale(A.shape[0])))
            slots.append(mine)
        return slots, pairs

    def compute_loop(self, x_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Per local expert, base GEMM with its LoRA added in place (moe_dist/moe/expert_loop.py)."""
        x_MD = x_MD.to(self.gate_up_proj.dtype).contiguous()
        slots, tensors = self._loop_adapters(("gate_proj", "up_proj", "gate_up_proj"), x_MD.dtype)
        gate_up_M2F = ExpertLoopLinear.apply(x_MD, self.gate_up_proj, counts, slots, *tensors)
        h_MF = self._activate(self._add_bias(gate_up_M2F, self.gate_up_bias, counts))
        slots, tensors = self._loop_adapters(("down_proj",), h_MF.dtype)
        if self.anchor is not None:  # an input no adapter reads: its gradient is zero, at no cost
            tensors.append(self.anchor)
        return self._add_bias(ExpertLoopLinear.apply(h_MF, self.down_proj, counts, slots, *tensors), self.down_bias,
                              counts)

    def _activate(self, gate_up_M2F: torch.Tensor) -> torch.Tensor:
        return self.gate_fn(gate_up_M2F) if self.gate_fn is not None else gated_act(gate_up_M2F, self.act_fn)

    @staticmethod
    def _add_bias(y_MO: torch.Tensor, bias_eO: torch.Tensor | None, counts: list[int]) -> torch.Tensor:
        """Rows are grouped by local slot: each slot's bias over its rows (frozen: no grad)."""
        if bias_eO is None:
            return y_MO
        reps = torch.tensor(counts, device=y_MO.device)
        return y_MO + bias_eO.to(y_MO.dtype).repeat_interleave(reps, dim=0, output_size=y_MO.shape[0])

    def compute_grouped(self, x_MD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Local experts on rows sorted by local slot: grouped base matmuls + adapter buckets."""
        F = self.intermediate_size
        counts = tokens_per_expert
        starts = [0, *itertools.accumulate(counts)][:-1]
        offs_e = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_MD.device)
        x_MD = x_MD.to(self.gate_up_proj.dtype)
        if torch.is_grad_enabled() and not x_MD.requires_grad and self.adapters.trainable:
            # Adapter deltas are added in place into the base output rows; autograd allows
            # that only on a non-leaf. Happens when nothing upstream trains (frozen
            # embeddings, no attention LoRA): costs one unused input-gradient matmul.
            x_MD = x_MD.detach().requires_grad_()
        gate_up_M2F = grouped_mm(x_MD, self.gate_up_proj.transpose(1, 2), offs_e)
        bank = self.adapters
        for gate, up in bank.gate_up_pairs:
            A, B = bank.stacked_gate_up(gate, up, x_MD.dtype)
            _lora_delta(A, B, gate, x_MD, gate_up_M2F, starts, counts)
        for bucket in bank.gate_up_singles:
            lo, hi = expert_proj_layout(bucket.proj, self.hidden_size, F)[2:]
            cols = slice(lo, hi)
            _lora_delta(*bank.stacked(bucket, x_MD.dtype), bucket, x_MD, gate_up_M2F[:, cols], starts, counts)
        h_MF = self._activate(self._add_bias(gate_up_M2F, self.gate_up_bias, counts))
        y_MD = grouped_mm(h_MF, self.down_proj.transpose(1, 2), offs_e)
        for bucket in bank.buckets["down_proj"]:
            _lora_delta(*bank.stacked(bucket, h_MF.dtype), bucket, h_MF, y_MD, starts, counts)
        if self.anchor is not None:
            y_MD = y_MD + (self.anchor * 0).to(y_MD.dtype)
        return self._add_bias(y_MD, self.down_bias, counts)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.training:  # training and routing profiling (train mode under no_grad), not generation
            self.count_routing(top_k_index, top_k_weights)
        x_MD, meta = self.dispatcher.dispatch(hidden_states, top_k_index)
        y_MD = self.compute(x_MD, meta.tokens_per_expert)
        return self.dispatcher.combine(y_MD.to(hidden_states.dtype), top_k_weights, meta)

    def count_routing(self, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor) -> None:
        """Top-k selections and router probability mass per expert, on the device, no sync.

        The mass is the router's weight for each selection as the block hands it over (the
        softmax or sigmoid score; renormalised over the top-k where the architecture does).
        It is a plain fp64 attribute, not a buffer, so casting the module to bf16 leaves it."""
        idx_N = top_k_index_TK.reshape(-1)
        self.routed_tokens_E += torch.bincount(idx_N, minlength=self.num_experts)
        if getattr(self, "routed_mass_E", None) is None or self.routed_mass_E.device != idx_N.device:
            self.routed_mass_E = torch.zeros(self.num_experts, dtype=torch.float64, device=idx_N.device)
        self.routed_mass_E.index_add_(0, idx_N, top_k_weights_TK.detach().reshape(-1).to(torch.float64))

    # ---- adapters & loading -----------------------------------------------------------
    def adapter_params(self) -> dict[str, nn.Parameter]:
        return self.adapters.adapter_params()
