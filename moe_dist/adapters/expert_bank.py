"""Ragged per-expert LoRA for the experts one rank owns, stored as one tensor per rank bucket.

Shape legend: e local experts, G experts in one rank bucket, I in-features, O out-features,
R adapter rank (Rp: R padded to grouped-mm alignment).

Each (expert, projection) adapter has a logical key and PEFT's layout (A is R x I, B is O x R),
so prune, grow, move, export and checkpoint act on one adapter at a time. The adapters of a
projection that share a rank form a bucket, and a bucket is *stored* as one Parameter per
side (A: G x R x I, B: G x O x R); `adapter_params()` hands out each adapter as a view of its
bucket (`bucket[i]`). Why: DeepSpeed's ZeRO works per Parameter (a gradient hook, a reduce, a
norm, a copy each), and one Parameter per adapter made that per-tensor code ~10% of a step
(1,056 tensors at the bench shape against PEFT's 48); a bucket is one. The grouped kernel
uses a bucket as it is; the CPU loop kernel unbinds it (one autograd node, whose backward
stacks the per-expert gradients into the bucket's one gradient). Experts with rank 0 are in
no bucket and cost nothing. moe_dist/train/zero_state.py resolves the views to their bucket
for the optimizer's state, so checkpoints stay per logical key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from moe_dist.adapters.lora import LoRAConfig, init_lora_A
from moe_dist.kernels.expert_loop import SlotAdapter
from moe_dist.kernels.grouped import aligned, grouped_mm_alignment
from moe_dist.plan import expert_param_key


@dataclass(frozen=True)
class RankBucket:
    """Local slots of one projection's adapters that share a rank: stored, and run, together."""

    proj: str
    rank: int
    slots: tuple[int, ...]
    experts: tuple[int, ...]  # in slot order: row i of the bucket's tensors is experts[i]
    name: str  # ParameterDict key of its A and B
    scale: float


class ExpertLoRABank(nn.Module):
    def __init__(
        self,
        layer: int,
        local_experts: Sequence[int],
        ranks: Mapping[tuple[int, str], int],
        layouts: Mapping[str, tuple[int, int, int, int]],
        config: LoRAConfig,
        lori: bool = False,
        device: torch.device | str | None = None,
    ):
        """`layouts[proj]` = (in, out, lo, hi): the adapter's shape and the output columns it adds to
        in its base projection (moe_dist.plan.expert_proj_layout)."""
        super().__init__()
        self.layer = layer
        self.columns = {p: (lo, hi) for p, (_, _, lo, hi) in layouts.items()}
        dims = {p: (in_f, out_f) for p, (in_f, out_f, _, _) in layouts.items()}
        self.local_experts = list(local_experts)
        self.config = config
        self.lori = lori
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        members: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for slot, expert in enumerate(self.local_experts):
            for proj in dims:
                r = ranks.get((expert, proj), 0)
                if r > 0:
                    members.setdefault((proj, r), []).append((slot, expert))
        self.buckets: dict[str, list[RankBucket]] = {p: [] for p in dims}
        self._where: dict[tuple[int, str], tuple[RankBucket, int]] = {}  # (expert, proj) -> (bucket, row)
        for (proj, r), group in sorted(members.items()):
            in_f, out_f = dims[proj]
            bucket = RankBucket(proj, r, tuple(s for s, _ in group), tuple(e for _, e in group), f"{proj}_r{r}",
                                config.scale(r))
            self.buckets[proj].append(bucket)
            A_GRI = torch.stack([init_lora_A(r, in_f, expert_param_key(layer, e, proj, "lora_A"), config.seed)
                                 for e in bucket.experts])
            self.lora_A[bucket.name] = nn.Parameter(A_GRI.to(device), requires_grad=not lori)
            self.lora_B[bucket.name] = nn.Parameter(torch.zeros(len(group), out_f, r, device=device))
            # the bucket's local slots on the device: the grouped kernel's offsets come from them
            self.register_buffer(f"slots_{bucket.name}", torch.tensor(bucket.slots, dtype=torch.long, device=device),
                                 persistent=False)
            if lori:
                self.register_buffer(f"mask_{bucket.name}", torch.ones(len(group), out_f, r, device=device),
                                     persistent=False)
            for i, e in enumerate(bucket.experts):
                self._where[(e, proj)] = (bucket, i)
        self.gate_up_pairs, self.gate_up_singles = self._pair_gate_up()
        self.trainable = any(p.requires_grad for p in self.parameters())

    def _mask(self, bucket: RankBucket) -> torch.Tensor:
        return getattr(self, f"mask_{bucket.name}")

    def slot_index(self, bucket: RankBucket) -> torch.Tensor:
        """`bucket.slots` as a long tensor on the bank's device."""
        return getattr(self, f"slots_{bucket.name}")

    def _pair_gate_up(self) -> tuple[list[tuple[RankBucket, RankBucket]], list[RankBucket]]:
        """Gate and up buckets with the same rank over the same experts run fused (one A
        matmul for both, one block-diagonal B matmul); the rest run alone. Fixed at build
        time, like the buckets."""
        up_by_key = {(b.rank, b.slots): b for b in self.buckets.get("up_proj", [])}
        pairs, single = [], []
        for g in self.buckets.get("gate_proj", []):
            u = up_by_key.pop((g.rank, g.slots), None)
            if u is None:
                single.append(g)
            else:
                pairs.append((g, u))
        return pairs, single + list(up_by_key.values()) + self.buckets.get("gate_up_proj", [])

    def stacked_gate_up(self, gate: RankBucket, up: RankBucket, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_GI(2Rp), B_G(2Rp)(2F)): both A stacked along rank, B block-diagonal, so the
        delta for the fused gate|up output rows is one pair of grouped matmuls."""
        A_g, B_g = self.stacked(gate, dtype)  # G I Rp, G Rp F
        A_u, B_u = self.stacked(up, dtype)
        G, Rp, F = B_g.shape
        zeros = B_g.new_zeros(G, Rp, F)
        B_G2R2F = torch.cat([torch.cat([B_g, zeros], dim=2), torch.cat([zeros, B_u], dim=2)], dim=1)
        return torch.cat([A_g, A_u], dim=2), B_G2R2F

    def _effective_B(self, bucket: RankBucket) -> torch.Tensor:
        B_GOR = self.lora_B[bucket.name]
        return B_GOR * self._mask(bucket) if self.lori else B_GOR

    def stacked(self, bucket: RankBucket, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_GIRp, B_GRpO) for grouped matmul, scale folded into B, LoRI mask applied,
        rank zero-padded to the grouped-mm alignment (padding adds exact zeros). A may be the
        Parameter itself, a view into ZeRO's flat buffer: `aligned` copies it where that view is
        not 16-byte aligned (DeepSpeed's bf16 optimizer at stage 0 packs at any offset)."""
        A_GRI = self.lora_A[bucket.name].to(dtype)
        B_GOR = self._effective_B(bucket).to(dtype) * bucket.scale
        pad = -bucket.rank % grouped_mm_alignment(dtype)
        if pad:
            A_GRI = nn.functional.pad(A_GRI, (0, 0, 0, pad))
            B_GOR = nn.functional.pad(B_GOR, (0, pad))
        return aligned(A_GRI.transpose(1, 2)), B_GOR.transpose(1, 2)

    def ranks(self) -> dict[tuple[int, str], int]:
        """{(expert, projection): rank} of the adapters this bank holds."""
        return {key: bucket.rank for key, (bucket, _) in self._where.items()}

    # ---- the CPU kernel's layout (moe_dist/kernels/expert_loop.py) ---------------------------
    def loop_layout(self, projs: tuple[str, ...]) -> tuple[list[list[SlotAdapter]], list[tuple[RankBucket, int]]]:
        """Per local slot, its adapters among `projs` as kernel entries, and the (bucket, row)
        each entry reads (entry j is tensors 2j, 2j+1 of `loop_tensors`). Fixed for the bank's
        lifetime."""
        slots, entries = [], []
        for expert in self.local_experts:
            mine = []
            for proj in projs:
                if (expert, proj) not in self._where:
                    continue
                bucket, row = self._where[(expert, proj)]
                entries.append((bucket, row))
                mine.append(SlotAdapter(2 * len(entries) - 2, 2 * len(entries) - 1, *self.columns[proj], bucket.scale))
            slots.append(mine)
        return slots, entries

    def loop_tensors(self, entries: list[tuple[RankBucket, int]], dtype: torch.dtype) -> list[torch.Tensor]:
        """The current (A, B) of each `loop_layout` entry, in `dtype`, LoRI's mask applied to B:
        each bucket is cast and unbound once, so autograd accumulates one gradient per bucket."""
        rows: dict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        tensors = []
        for bucket, row in entries:
            if bucket.name not in rows:
                A, B = self.lora_A[bucket.name], self._effective_B(bucket)
                rows[bucket.name] = ((A if A.dtype == dtype else A.to(dtype)).unbind(0),
                                     (B if B.dtype == dtype else B.to(dtype)).unbind(0))
            As, Bs = rows[bucket.name]
            tensors += [As[row], Bs[row]]
        return tensors

    def adapter_params(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (trainable or LoRI-frozen A) under its logical key, as a view of
        its bucket: writes under no_grad land in the bucket. Take them anew after an engine is
        built (DeepSpeed moves each Parameter's storage into its flat buffer)."""
        out = {}
        for (expert, proj), (bucket, i) in sorted(self._where.items()):
            out[expert_param_key(self.layer, expert, proj, "lora_A")] = self.lora_A[bucket.name][i]
            out[expert_param_key(self.layer, expert, proj, "lora_B")] = self.lora_B[bucket.name][i]
        return out

    def lori_masks(self) -> dict[str, torch.Tensor]:
        """LoRI's B masks (views of the bucket buffers, set in place) under the logical key of their B."""
        if not self.lori:
            return {}
        return {expert_param_key(self.layer, e, p, "lora_B"): self._mask(bucket)[i]
                for (e, p), (bucket, i) in sorted(self._where.items())}

    def flops_per_token(self, expert: int) -> int:
        """Adapter multiply-adds (x2) one routed token costs at `expert`: 2 R (I + O) per projection."""
        total = 0
        for (e, _proj), (bucket, _) in self._where.items():
            if e == expert:
                _, r, in_f = self.lora_A[bucket.name].shape
                total += 2 * r * (in_f + self.lora_B[bucket.name].shape[1])
        return total
