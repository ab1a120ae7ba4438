"""AdapterPlan: which adapters exist and at what rank, as plain data.

The plan is the one thing policies (HELLoRA, EPnG, DMEP) produce and the model builder
consumes. Keeping it free of tensors and process groups lets a policy be a pure function,
lets every rank compare a hash before acting, and lets a checkpoint say exactly which
adapters it holds. Entries absent from the plan have rank 0 (no adapter, zero extra cost).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping

EXPERT_PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
# `gate_up_proj` is one adapter on the fused gate|up weight (what transformers v5 stores and
# PEFT's `target_parameters` trains): one A shared by both halves, half the LoRA matmuls of
# separate gate and up adapters. An expert has either it or gate/up adapters, not both.
DEFAULT_EXPERT_TARGETS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


def expert_proj_layout(proj: str, hidden: int, intermediate: int) -> tuple[int, int, int, int]:
    """(in_features, out_features, first, last output column in the gate_up / down output)
    of an expert projection; the one place its shapes are defined."""
    D, F = hidden, intermediate
    return {"gate_proj": (D, F, 0, F), "up_proj": (D, F, F, 2 * F), "gate_up_proj": (D, 2 * F, 0, 2 * F),
            "down_proj": (F, D, 0, D)}[proj]
ATTENTION_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

ExpertKey = tuple[int, int, str]  # (layer, expert, projection)
AttentionKey = tuple[int, str]  # (layer, projection)


def expert_param_key(layer: int, expert: int, proj: str, part: str) -> str:
    """Logical name of an expert adapter tensor: independent of rank, slot and layout."""
    return f"layers.{layer}.experts.{expert}.{proj}.{part}"


def attention_param_key(layer: int, proj: str, part: str) -> str:
    """Logical name of an attention adapter tensor."""
    return f"layers.{layer}.self_attn.{proj}.{part}"


@dataclass(frozen=True)
class AdapterPlan:
    """Ranks for every adapted (layer, expert, projection) and (layer, attention projection).

    `lori` switches every expert adapter to LoRI: A frozen at its seeded random value, B
    trained under a sparse mask (HELLoRI). Ranks of 0 are never stored.
    """

    expert_ranks: Mapping[ExpertKey, int] = field(default_factory=dict)
    attention_ranks: Mapping[AttentionKey, int] = field(default_factory=dict)
    lori: bool = False
    # DMEP's LoRA-MoE: (layer, module path in the layer, e.g. "self_attn.q_proj") -> the LoRA
    # experts alive there (ids stay stable through pruning), each of lora_moe_rank, top-k routed.
    lora_moe: Mapping[tuple[int, str], tuple[int, ...]] = field(default_factory=dict)
    lora_moe_rank: int = 0
    lora_moe_top_k: int = 0

    def __post_init__(self) -> None:
        # Attention projection names vary by architecture (DeepSeek's MLA has q_a_proj, ...):
        # they are checked against the model at conversion. Expert projections are canonical.
        for table in (self.expert_ranks, self.attention_ranks):
            for key, rank in table.items():
                if table is self.expert_ranks and key[-1] not in EXPERT_PROJECTIONS:
                    raise ValueError(f"AdapterPlan: projection {key[-1]!r} in {key} is not one of {EXPERT_PROJECTIONS}")
                if not isinstance(rank, int) or rank < 0:
                    raise ValueError(f"AdapterPlan: rank of {key} must be an int >= 0, got {rank!r}")
        fused = {(l, e) for (l, e, p), r in self.expert_ranks.items() if p == "gate_up_proj" and r}
        split = {(l, e) for (l, e, p), r in self.expert_ranks.items() if p in ("gate_proj", "up_proj") and r}
        if fused & split:
            raise ValueError(f"AdapterPlan: (layer, expert) {sorted(fused & split)[0]} has both a gate_up_proj "
                             "adapter and gate_proj/up_proj ones")
        # Canonical form: drop zeros so equal plans compare and hash equal.
        object.__setattr__(self, "expert_ranks", {k: r for k, r in sorted(self.expert_ranks.items()) if r})
        object.__setattr__(self, "attention_ranks", {k: r for k, r in sorted(self.attention_ranks.items()) if r})
        object.__setattr__(self, "lora_moe", {k: tuple(sorted(v)) for k, v in sorted(self.lora_moe.items()) if v})
        for key, experts in self.lora_moe.items():
            if len(experts) < self.lora_moe_top_k:
                raise ValueError(f"AdapterPlan: {key} keeps {len(experts)} LoRA experts, fewer than top-k "
                                 f"{self.lora_moe_top_k}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        moe_layers: Iterable[int],
        num_experts: int,
        rank: int,
        expert_projections: Iterable[str] = DEFAULT_EXPERT_TARGETS,
        attention_layers: Iterable[int] = (),
        attention_rank: int | None = None,
        attention_projections: Iterable[str] = ATTENTION_PROJECTIONS,
        experts: Mapping[int, Iterable[int]] | None = None,
        lori: bool = False,
    ) -> "AdapterPlan":
        """The baseline plan: the same rank on every expert (or on `experts[layer]` only)."""
        expert_projections = tuple(expert_projections)
        ranks: dict[ExpertKey, int] = {}
        for layer in moe_layers:
            chosen = range(num_experts) if experts is None else experts.get(layer, ())
            for e in chosen:
                for p in expert_projections:
                    ranks[(layer, int(e), p)] = rank
        att_rank = rank if attention_rank is None else attention_rank
        att = {(layer, p): att_rank for layer in attention_layers for p in attention_projections}
        return cls(expert_ranks=ranks, attention_ranks=att, lori=lori)

    # ---- queries ------------------------------------------------------------------------
    def rank(self, layer: int, expert: int, proj: str) -> int:
        return self.expert_ranks.get((layer, expert, proj), 0)

    def attention_rank(self, layer: int, proj: str) -> int:
        return self.attention_ranks.get((layer, proj), 0)

    def expert_ranks_of_layer(self, layer: int) -> dict[tuple[int, str], int]:
        return {(e, p): r for (l, e, p), r in self.expert_ranks.items() if l == layer}

    def experts_with_adapters(self, layer: int) -> list[int]:
        return sorted({e for (l, e, _), _r in self.expert_ranks.items() if l == layer})

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "expert_ranks": [[l, e, p, r] for (l, e, p), r in self.expert_ranks.items()],
            "attention_ranks": [[l, p, r] for (l, p), r in self.attention_ranks.items()],
            "lori": self.lori,
            "lora_moe": [[l, m, list(es)] for (l, m), es in self.lora_moe.items()],
            "lora_moe_rank": self.lora_moe_rank,
            "lora_moe_top_k": self.lora_moe_top_k,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "AdapterPlan":
        unknown = set(data) - {"expert_ranks", "attention_ranks", "lori", "lora_moe", "lora_moe_rank", "lora_moe_top_k"}
        if unknown:
            raise ValueError(f"AdapterPlan: unknown field(s) {sorted(unknown)}")
        return cls(
            expert_ranks={(int(l), int(e), str(p)): int(r) for l, e, p, r in data.get("expert_ranks", [])},
            attention_ranks={(int(l), str(p)): int(r) for l, p, r in data.get("attention_ranks", [])},
            lori=bool(data.get("lori", False)),
            lora_moe={(int(l), str(m)): tuple(int(e) for e in es) for l, m, es in data.get("lora_moe", [])},
            lora_moe_rank=int(data.get("lora_moe_rank", 0)),
            lora_moe_top_k=int(data.get("lora_moe_top_k", 0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "AdapterPlan":
        return cls.from_dict(json.loads(text))

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def diff(self, other: "AdapterPlan") -> list[str]:
        """Human-readable differences, first differing entries first (for error messages)."""
        out = []
        for key in sorted(set(self.expert_ranks) | set(other.expert_ranks)):
            a, b = self.expert_ranks.get(key, 0), other.expert_ranks.get(key, 0)
            if a != b:
                out.append(f"layer {key[0]} expert {key[1]} {key[2]}: rank {a} -> {b}")
        for key in sorted(set(self.attention_ranks) | set(other.attention_ranks)):
            a, b = self.attention_ranks.get(key, 0), other.attention_ranks.get(key, 0)
            if a != b:
                out.append(f"layer {key[0]} self_attn {key[1]}: rank {a} -> {b}")
        for key in sorted(set(self.lora_moe) | set(other.lora_moe)):
            a, b = self.lora_moe.get(key, ()), other.lora_moe.get(key, ())
            if a != b:
                out.append(f"layer {key[0]} {key[1]} LoRA experts: {list(a)} -> {list(b)}")
        if self.lori != other.lori:
            out.append(f"lori: {self.lori} -> {other.lori}")
        return out
