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
from deepspeed.moe.ep_count import count_tokens_per_expert
from torch import nn

from moe_dist.adapters.expert_bank import ExpertLoRABank
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.kernels.expert_loop import ExpertLoopLinear, native_loop
from moe_dist.kernels.expert_mlp import MLPEntries, fused_expert_mlp
from moe_dist.kernels.grouped import add_lora_delta_, aligned, grouped_mm, offsets
from moe_dist.recompute import recomputing
from moe_dist.moe.activation import SILU_TYPES, gated_act
from moe_dist.moe.dispatch import AllToAllDispatcher, LocalDispatcher, Routes
from moe_dist.parallel.groups import DeepSpeedExpertLayer, ExpertGroups, mark_expert_param, zero_anchor
from moe_dist.parallel.placement import ExpertPlacement, slot_order
from moe_dist.plan import EXPERT_PROJECTIONS, expert_proj_layout
from moe_dist.quant.codecs import Codec
from moe_dist.quant.frozen import QuantizedWeight


class ExpertParallelExperts(DeepSpeedExpertLayer):
    """Holds the base weights of this rank's experts and their adapters; dispatches tokens.
    (DeepSpeedExpertLayer: the one seam the engine needs to reduce expert gradients over the
    expert-data-parallel group.)"""

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
        kernel: str = "auto",
        codec: Codec | None = None,
    ):
        """`biases`: frozen per-expert biases after each projection (gpt-oss); `gate_fn`: the
        architecture's own activation on the [gate | up] rows instead of act_fn(gate) * up;
        `kernel` (config `moe.kernel`): see `set_kernel`; `codec`: the base weights' storage
        (moe_dist/quant: FP8, MXFP4, NF4, int8), None for plain `dtype` tensors."""
        nn.Module.__init__(self)
        if placement.num_experts != num_experts:
            raise ValueError(f"layer {layer}: placement covers {placement.num_experts} experts, layer has {num_experts}")
        if placement.ep_size != groups.ep_size:
            raise ValueError(f"layer {layer}: placement is for ep_size {placement.ep_size}, groups for {groups.ep_size}")
        self._register_with_deepspeed(num_experts, groups)
        self.layer = layer
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.act_fn = act_fn
        self.placement = placement
        self.groups = groups
        self.lora, self.lori, self.adapter_dtype = lora, lori, adapter_dtype
        self.experts_by_rank = slot_order(placement, ranks)
        self.local_experts = self.experts_by_rank[groups.ep_rank]
        self.num_local_experts = len(self.local_experts)
        e, F, D = self.num_local_experts, intermediate_size, hidden_size
        self.codec = codec
        if codec is None:
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * F, D, dtype=dtype, device=device), requires_grad=False)
            self.down_proj = nn.Parameter(torch.empty(e, D, F, dtype=dtype, device=device), requires_grad=False)
        else:  # quantized: dequantized inside the kernels only (moe_dist/quant/frozen.py)
            self.gate_up_proj = QuantizedWeight(codec, (e, 2 * F, D), dtype, device)
            self.down_proj = QuantizedWeight(codec, (e, D, F), dtype, device)
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
        self.set_kernel(kernel)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The frozen per-expert tensors (slot-major), by name: what a move carries. A quantized
        weight carries its stored parts (`gate_up_proj:weight_scale_inv`, ...), never a dequantized copy."""
        out: dict[str, torch.Tensor] = {}
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            if isinstance(w, QuantizedWeight):
                out.update({f"{name}:{part}": t for part, t in w.parts().items()})
            else:
                out[name] = w
        if self.gate_up_bias is not None:
            out.update(gate_up_bias=self.gate_up_bias, down_bias=self.down_bias)
        return out

    @torch.no_grad()
    def load_base_(self, name: str, dense: torch.Tensor, slot: int | None = None) -> None:
        """Write a dense base weight (canonical layout) into slot `slot` (None: all slots) of
        `name` (gate_up_proj, down_proj), quantizing it where that weight is stored quantized."""
        w = getattr(self, name)
        if isinstance(w, QuantizedWeight):
            for part, t in w.codec.quantize(dense.to(w.device)).items():
                (w.parts()[part] if slot is None else w.parts()[part][slot]).copy_(t)
        else:
            (w if slot is None else w[slot]).copy_(dense)

    @torch.no_grad()
    def load_base_parts_(self, name: str, parts: dict[str, torch.Tensor], slot: int) -> None:
        """Write one expert's stored parts (as the checkpoint ships them) into slot `slot`."""
        stored = getattr(self, name).parts()
        for part, t in parts.items():
            if tuple(t.shape) != tuple(stored[part].shape[1:]) or t.dtype != stored[part].dtype:
                raise ValueError(f"layer {self.layer} {name}:{part}: got {t.dtype} {tuple(t.shape)}, stored as "
                                 f"{stored[part].dtype} {tuple(stored[part].shape[1:])}")
            stored[part][slot].copy_(t)

    def _build_adapters(self, ranks: Mapping[tuple[int, str], int], device) -> None:
        layouts = {p: expert_proj_layout(p, self.hidden_size, self.intermediate_size) for p in EXPERT_PROJECTIONS}
        self.adapters = ExpertLoRABank(self.layer, self.local_experts, ranks, layouts, self.lora, self.lori,
                                       device=device)
        self.adapters.to(self.adapter_dtype)
        self.anchor = zero_anchor(self.adapters.trainable, self.ep_size, device, self.adapter_dtype)
        for p in self.adapters.parameters():
            mark_expert_param(p, self.ep_size)
        self._loop_layouts: dict = {}  # projections -> the bank's loop_layout (compute_loop)
        self._fused_entries: MLPEntries | None = None  # both projections' loop layouts (compute_fused)

    def reassign(self, placement: ExpertPlacement, ranks: Mapping[tuple[int, str], int]) -> None:
        """Own the experts `placement` gives this rank, with fresh adapters of the given ranks
        (A seeded by key, B zero: the caller carries values over by logical key).

        The base weights must already be in the new slot order (`slot_order(placement,
        ranks)`): moe_dist.parallel.move.rehome_experts moves and permutes them, then calls this."""
        if placement.num_experts != self.num_experts or placement.ep_size != self.ep_size:
            raise ValueError(f"layer {self.layer}: placement for {placement.num_experts} experts / EP "
                             f"{placement.ep_size}, layer has {self.num_experts} / EP {self.ep_size}")
        new_order = slot_order(placement, ranks)
        if len(new_order[self.groups.ep_rank]) != len(self.local_experts):
            raise ValueError(f"layer {self.layer}: EP rank {self.groups.ep_rank} would own "
                             f"{len(new_order[self.groups.ep_rank])} experts, it holds {len(self.local_experts)}; "
                             "placements keep the count per rank")
        device = self.gate_up_proj.device
        self.placement, self.experts_by_rank = placement, new_order
        self.local_experts = new_order[self.groups.ep_rank]
        self._build_adapters(ranks, device)
        self.dispatcher = self._make_dispatcher(device)

    def _make_dispatcher(self, device) -> LocalDispatcher | AllToAllDispatcher:
        if self.ep_size == 1:
            return LocalDispatcher(self.local_experts, self.num_experts, device=device)
        return AllToAllDispatcher(self.experts_by_rank, self.groups.ep_rank, self.groups.ep_group, device)

    def _apply(self, fn, recurse=True):  # keep dispatcher index tensors on the module's device
        out = super()._apply(fn, recurse)
        self.dispatcher.to(self.gate_up_proj.device)
        self._loop_layouts, self._fused_entries = {}, None  # casts may replace the mask buffers
        return out

    # ---- compute ----------------------------------------------------------------------
    KERNELS = ("auto", "fused", "loop", "grouped")

    def set_kernel(self, kernel: str) -> None:
        """`fused`: gather, both projections with their LoRA, the activation and the weighted
        combine per expert in one compiled pass (moe_dist/kernels/expert_mlp.py: CPU, fp32,
        SiLU-gated experts without biases); `loop`: per expert, LoRA added in place, between the
        dispatcher's gather and combine (moe_dist/kernels/expert_loop.py); `grouped`: grouped
        matmuls over rank buckets (one kernel each on GPU); `auto`: fused where it applies, else
        loop for CPU tensors, grouped otherwise, by where the rows are."""
        if kernel not in self.KERNELS:
            raise ValueError(f"moe.kernel must be one of {self.KERNELS}, got {kernel!r}")
        if kernel == "fused" and self._fused_unsupported():
            raise ValueError(f"moe.kernel=fused: layer {self.layer} {self._fused_unsupported()}")
        self.kernel = kernel

    def _fused_unsupported(self) -> str | None:
        """Why the fused kernel cannot run these experts (None: it can)."""
        if self.gate_fn is not None or self.gate_up_bias is not None:
            return "has expert biases or its own gate activation (gpt-oss): use loop or grouped"
        if not isinstance(self.act_fn, SILU_TYPES):
            return f"activation is {type(self.act_fn).__name__}, the fused kernel computes SiLU-GLU"
        if native_loop() is None:
            return "needs the compiled CPU kernel, which did not build"
        return None

    def _use_fused(self, x_TD: torch.Tensor, weights_TK: torch.Tensor) -> bool:
        if self.kernel not in ("auto", "fused"):
            return False
        dtypes = {x_TD.dtype, weights_TK.dtype, self.gate_up_proj.dtype, self.adapter_dtype}
        runnable = x_TD.device.type == "cpu" and dtypes == {torch.float32}
        if self.kernel == "fused" and not runnable:
            raise ValueError(f"moe.kernel=fused runs fp32 on CPU; layer {self.layer} got {sorted(map(str, dtypes))} "
                             f"on {x_TD.device.type}")
        return runnable and self._fused_unsupported() is None

    def compute(self, x_MD: torch.Tensor, tokens_per_expert: list[int],
                counts_e: torch.Tensor | None = None) -> torch.Tensor:
        """Rows sorted by local slot -> expert outputs. `tokens_per_expert`: rows per slot on the
        host; `counts_e`: the same on the rows' device (the dispatcher's; built here if None)."""
        if self.kernel == "loop" or (self.kernel == "auto" and x_MD.device.type == "cpu"):
            return self.compute_loop(x_MD, tokens_per_expert)
        if counts_e is None:
            counts_e = torch.tensor(tokens_per_expert, dtype=torch.long, device=x_MD.device)
        return self.compute_grouped(x_MD, tokens_per_expert, counts_e)

    def _loop_adapters(self, projs: tuple[str, ...], dtype: torch.dtype) -> tuple[list, list[torch.Tensor]]:
        """The bank's loop layout for `projs` (built once per bank, device move or cast) and its
        current tensors."""
        layout = self._loop_layouts.get(projs)
        if layout is None:
            layout = self._loop_layouts[projs] = self.adapters.loop_layout(projs)
        slots, triples = layout
        return slots, self.adapters.loop_tensors(triples, dtype)

    def compute_fused(self, x_RD: torch.Tensor, routes: Routes) -> torch.Tensor:
        """Per local expert: gather its rows, both projections with their LoRA, SiLU-GLU, and the
        gate-weighted sum into the source rows (moe_dist/kernels/expert_mlp.py)."""
        gu_slots, gu_tensors = self._loop_adapters(("gate_proj", "up_proj", "gate_up_proj"), x_RD.dtype)
        dn_slots, dn_tensors = self._loop_adapters(("down_proj",), x_RD.dtype)
        if self._fused_entries is None:
            self._fused_entries = MLPEntries.of(gu_slots, dn_slots, len(gu_tensors))
        tensors = gu_tensors + dn_tensors + ([self.anchor] if self.anchor is not None else [])
        return fused_expert_mlp(x_RD, routes.row_Q, routes.weight_Q, self.gate_up_proj, self.down_proj,
                                routes.tokens_per_expert, self._fused_entries, tensors)

    def compute_loop(self, x_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Per local expert, base GEMM with its LoRA added in place (moe_dist/kernels/expert_loop.py)."""
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
    def _add_bias(y_MO: torch.Tensor, bias_eO: torch.Tensor | None, counts: list[int] | torch.Tensor
                  ) -> torch.Tensor:
        """Rows are grouped by local slot: each slot's bias over its rows (frozen: no grad).
        `counts`: rows per slot, host ints or a tensor on the rows' device (no copy, no sync)."""
        if bias_eO is None:
            return y_MO
        reps = counts if isinstance(counts, torch.Tensor) else torch.tensor(counts, device=y_MO.device)
        return y_MO + bias_eO.to(y_MO.dtype).repeat_interleave(reps, dim=0, output_size=y_MO.shape[0])

    def compute_grouped(self, x_MD: torch.Tensor, counts: list[int], counts_e: torch.Tensor) -> torch.Tensor:
        """Local experts on rows sorted by local slot: grouped base matmuls + adapter buckets.
        Offsets and row indices come from `counts_e` on the device; `counts` (the same on the
        host) only sizes slices: this adds no host sync to the dispatcher's one."""
        starts = [0, *itertools.accumulate(counts)][:-1]
        offs_e = offsets(counts_e)
        x_MD = aligned(x_MD.to(self.gate_up_proj.dtype))
        if torch.is_grad_enabled() and not x_MD.requires_grad and self.adapters.trainable:
            # Adapter deltas are added in place into the base output rows; autograd allows
            # that only on a non-leaf. Happens when nothing upstream trains (frozen
            # embeddings, no attention LoRA): costs one unused input-gradient matmul.
            x_MD = x_MD.detach().requires_grad_()
        bank = self.adapters
        slot_of_row_M = None
        if any(len(b.slots) != b.slots[-1] - b.slots[0] + 1 for bs in bank.buckets.values() for b in bs):
            slot_of_row_M = torch.arange(len(counts), device=x_MD.device).repeat_interleave(
                counts_e, output_size=x_MD.shape[0])  # for buckets of scattered slots

        def add_delta_(A, B, bucket, x, out):
            add_lora_delta_(A, B, bucket.slots, bank.slot_index(bucket), x, out, starts, counts, counts_e,
                            slot_of_row_M)

        gate_up_M2F = grouped_mm(x_MD, _grouped_operand(self.gate_up_proj), offs_e)
        for gate, up in bank.gate_up_pairs:
            add_delta_(*bank.stacked_gate_up(gate, up, x_MD.dtype), gate, x_MD, gate_up_M2F)
        for bucket in bank.gate_up_singles:
            lo, hi = bank.columns[bucket.proj]
            add_delta_(*bank.stacked(bucket, x_MD.dtype), bucket, x_MD, gate_up_M2F[:, lo:hi])
        h_MF = self._activate(self._add_bias(gate_up_M2F, self.gate_up_bias, counts_e))
        y_MD = grouped_mm(h_MF, _grouped_operand(self.down_proj), offs_e)
        for bucket in bank.buckets["down_proj"]:
            add_delta_(*bank.stacked(bucket, h_MF.dtype), bucket, h_MF, y_MD)
        if self.anchor is not None:
            y_MD = y_MD + (self.anchor * 0).to(y_MD.dtype)
        return self._add_bias(y_MD, self.down_bias, counts_e)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # training and routing profiling (train mode under no_grad), not generation, and once
        # per token: not again when activation checkpointing recomputes the layer
        if self.training and not recomputing():
            self.count_routing(top_k_index, top_k_weights)
        if self._use_fused(hidden_states, top_k_weights):
            x_RD, routes = self.dispatcher.route(hidden_states, top_k_index, top_k_weights)
            return self.dispatcher.finish(self.compute_fused(x_RD, routes), routes)
        x_MD, meta = self.dispatcher.dispatch(hidden_states, top_k_index, top_k_weights)
        y_MD = self.compute(x_MD, meta.tokens_per_expert, meta.counts_e)
        return self.dispatcher.combine(y_MD.to(hidden_states.dtype), meta)

    def count_routing(self, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor) -> None:
        """Top-k selections and router probability mass per expert, on the device, no sync.

        The mass is the router's weight for each selection as the block hands it over (the
        softmax or sigmoid score; renormalised over the top-k where the architecture does).
        It is a plain fp64 attribute, not a buffer, so casting the module to bf16 leaves it."""
        idx_N = top_k_index_TK.reshape(-1)
        self.routed_tokens_E += count_tokens_per_expert(idx_N, self.num_experts)  # bincount would sync
        if getattr(self, "routed_mass_E", None) is None or self.routed_mass_E.device != idx_N.device:
            self.routed_mass_E = torch.zeros(self.num_experts, dtype=torch.float64, device=idx_N.device)
        self.routed_mass_E.index_add_(0, idx_N, top_k_weights_TK.detach().reshape(-1).to(torch.float64))

    # ---- adapters & loading -----------------------------------------------------------
    def adapter_params(self) -> dict[str, nn.Parameter]:
        return self.adapters.adapter_params()


def _grouped_operand(w: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    """A base weight as grouped_mm's (e, I, O) operand; a quantized one is dequantized inside it."""
    return w if isinstance(w, QuantizedWeight) else aligned(w.transpose(1, 2))
