"""Ragged per-expert LoRA for the experts one rank owns.

Shape legend: e local experts, G experts in one rank bucket, I in-features, O out-features,
R adapter rank (Rp: R padded to grouped-mm alignment).

Each (expert, projection) adapter is its own pair of Parameters (PEFT layout: A is R x I,
B is O x R) with a logical key, so prune, grow, move and checkpoint act on one adapter at a
time and ZeRO keeps per-parameter optimizer state. For compute, the adapters of a projection
are grouped by rank into buckets; each bucket runs as two grouped matmuls over the rows of
its experts. Experts with rank 0 are in no bucket and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from moe_dist.adapters.lora import LoRAConfig, init_lora_A
from moe_dist.kernels.expert_loop import SlotAdapter
from moe_dist.kernels.grouped import grouped_mm_alignment
from moe_dist.plan import expert_param_key


@dataclass(frozen=True)
class RankBucket:
    """Local slots of one projection's adapters that share a rank (so they stack)."""

    proj: str
    rank: int
    slots: tuple[int, ...]
    names: tuple[str, ...]  # ParameterDict keys, in slot order
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
        self._keys: dict[str, tuple[int, str]] = {}
        buckets: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for slot, expert in enumerate(self.local_experts):
            for proj, (in_f, out_f) in dims.items():
                r = ranks.get((expert, proj), 0)
                if r == 0:
                    continue
                name = f"{expert}_{proj}"
                a = init_lora_A(r, in_f, expert_param_key(layer, expert, proj, "lora_A"), config.seed)
                self.lora_A[name] = nn.Parameter(a.to(device), requires_grad=not lori)
                self.lora_B[name] = nn.Parameter(torch.zeros(out_f, r, device=device))
                if lori:
                    self.register_buffer(f"mask_{name}", torch.ones(out_f, r, device=device), persistent=False)
                self._keys[name] = (expert, proj)
                buckets.setdefault((proj, r), []).append((slot, name))
        self.buckets: dict[str, list[RankBucket]] = {p: [] for p in dims}
        for (proj, r), members in sorted(buckets.items()):
            self.buckets[proj].append(
                RankBucket(proj, r, tuple(s for s, _ in members), tuple(n for _, n in members), config.scale(r))
            )
        self.gate_up_pairs, self.gate_up_singles = self._pair_gate_up()
        self.trainable = any(p.requires_grad for p in self.parameters())

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

    def stacked(self, bucket: RankBucket, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_GIRp, B_GRpO) for grouped matmul, scale folded into B, LoRI mask applied,
        rank zero-padded to the grouped-mm alignment (padding adds exact zeros)."""
        A_GRI = torch.stack([self.lora_A[n] for n in bucket.names]).to(dtype)
        Bs = [self.lora_B[n] for n in bucket.names]
        if self.lori:
            Bs = [b * getattr(self, f"mask_{n}") for b, n in zip(Bs, bucket.names)]
        B_GOR = torch.stack(Bs).to(dtype) * bucket.scale
        pad = -bucket.rank % grouped_mm_alignment(dtype)
        if pad:
            A_GRI = nn.functional.pad(A_GRI, (0, 0, 0, pad))
            B_GOR = nn.functional.pad(B_GOR, (0, pad))
        return A_GRI.transpose(1, 2), B_GOR.transpose(1, 2)

    def ranks(self) -> dict[tuple[int, str], int]:
        """{(expert, projection): rank} of the adapters this bank holds."""
        return {key: self.lora_A[name].shape[0] for name, key in self._keys.items()}

    # ---- the CPU kernel's layout (moe_dist/kernels/expert_loop.py) ---------------------------
    def loop_layout(self, projs: tuple[str, ...]) -> tuple[list[list[SlotAdapter]], list[tuple]]:
        """Per local slot, its adapters among `projs` as kernel entries, and the (A, B, mask)
        triples they index (entry j reads tensors 2j, 2j+1). Fixed for the bank's lifetime."""
        slots, triples = [], []
        for expert in self.local_experts:
            mine = []
            for proj in projs:
                name = f"{expert}_{proj}"
                if name not in self.lora_A:
                    continue
                A, B = self.lora_A[name], self.lora_B[name]
                triples.append((A, B, getattr(self, f"mask_{name}") if self.lori else None))
                mine.append(SlotAdapter(2 * len(triples) - 2, 2 * len(triples) - 1, *self.columns[proj],
                                        self.config.scale(A.shape[0])))
            slots.append(mine)
        return slots, triples

    @staticmethod
    def loop_tensors(triples: list[tuple], dtype: torch.dtype) -> list[torch.Tensor]:
        """The current tensors of a `loop_layout`, in `dtype`, LoRI's mask applied to B."""
        tensors = []
        for A, B, mask in triples:
            if mask is not None:
                B = B * mask
            tensors += [A if A.dtype == dtype else A.to(dtype), B if B.dtype == dtype else B.to(dtype)]
        return tensors

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """Every adapter tensor (trainable or LoRI-frozen A) under its logical key."""
        out = {}
        for name, (expert, proj) in self._keys.items():
            out[expert_param_key(self.layer, expert, proj, "lora_A")] = self.lora_A[name]
            out[expert_param_key(self.layer, expert, proj, "lora_B")] = self.lora_B[name]
        return out

    def lori_masks(self) -> dict[str, torch.Tensor]:
        """LoRI's B masks (buffers, set in place) under the logical key of their B."""
        if not self.lori:
            return {}
        return {expert_param_key(self.layer, e, p, "lora_B"): getattr(self, f"mask_{name}")
                for name, (e, p) in self._keys.items()}

    def flops_per_token(self, expert: int) -> int:
        """Adapter multiply-adds (x2) one routed token costs at `expert`: 2 R (I + O) per projection."""
        total = 0
        for name, (e, _proj) in self._keys.items():
            if e == expert:
                r, in_f = self.lora_A[name].shape
                total += 2 * r * (in_f + self.lora_B[name].shape[0])
        return total
