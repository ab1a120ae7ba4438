"""Expert weight layouts: transformers' storage vs moe_dist's one canonical layout.

moe_dist computes every architecture's experts in one layout: `gate_up` e x 2F x D with the
gate rows first, `down` e x D x F, optional biases (2F and D), and `act(gate) * up` or the
architecture's own gate function on the [gate | up] halves. transformers stores most MoEs
that way already; gpt-oss stores `gate_up_proj` transposed (E x D x 2F) with gate and up
columns interleaved (g0 u0 g1 u1 ...), `down_proj` as E x F x D, and biases. The conversion
happens here, at the boundary (conversion, loading, export), so kernels and adapters never see
a second layout. Adapters are W + s B A on the canonical (out, in) weight; an export maps the
delta back with `to_storage_*`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertsLayout:
    transposed: bool = False  # stored (E, in, out) instead of (E, out, in)
    interleaved: bool = False  # gate/up columns alternate instead of [gate | up]
    biases: bool = False  # gate_up_proj_bias (E, 2F), down_proj_bias (E, D)
    gate: str = "act"  # "act": act_fn(gate) * up; "gpt_oss": clamped (up + 1) * gate * sigmoid(alpha gate)

    @property
    def canonical(self) -> bool:
        return not (self.transposed or self.interleaved)


COMMON = ExpertsLayout()
GPT_OSS = ExpertsLayout(transposed=True, interleaved=True, biases=True, gate="gpt_oss")


def _interleaved_rows(two_f: int, device=None) -> torch.Tensor:
    """Storage position of each canonical row: gate i -> 2i, up i -> 2i + 1."""
    F = two_f // 2
    i = torch.arange(F, device=device)
    return torch.cat([2 * i, 2 * i + 1])


def gate_up_to_canonical(w: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """One expert's (or a stack's) stored gate_up -> (..., 2F, D) gate rows first."""
    if layout.transposed:
        w = w.transpose(-1, -2)
    if layout.interleaved:
        w = w.index_select(-2, _interleaved_rows(w.shape[-2], w.device))
    return w.contiguous()


def gate_up_bias_to_canonical(b: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    return b.index_select(-1, _interleaved_rows(b.shape[-1], b.device)).contiguous() if layout.interleaved else b


def down_to_canonical(w: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """Stored down -> (..., D, F)."""
    return w.transpose(-1, -2).contiguous() if layout.transposed else w


def gate_up_delta_to_storage(delta_2FD: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """A canonical (2F, D) delta in the stored layout of one expert's gate_up weight."""
    out = delta_2FD
    if layout.interleaved:
        out = torch.empty_like(delta_2FD)
        out[_interleaved_rows(delta_2FD.shape[0], delta_2FD.device)] = delta_2FD
    return out.transpose(0, 1) if layout.transposed else out


def down_delta_to_storage(delta_DF: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    return delta_DF.transpose(0, 1) if layout.transposed else delta_DF


def gate_up_rows_to_storage(B_OR: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """B's output rows (canonical gate|up order) in the stored column order (PEFT on gpt-oss)."""
    if not layout.interleaved:
        return B_OR
    out = torch.empty_like(B_OR)
    out[_interleaved_rows(B_OR.shape[0], B_OR.device)] = B_OR
    return out


def gpt_oss_gate(gate_up_M2F: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation (transformers' GptOssExperts._apply_gate) on [gate | up] rows."""
    gate, up = gate_up_M2F.chunk(2, dim=-1)
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
