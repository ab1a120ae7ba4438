"""The whole expert MLP of one MoE layer on CPU, gather and weighted combine included, in one
compiled pass per local expert (csrc/expert_mlp.cpp).

Shape legend: R source rows (this rank's tokens at EP 1, the rows it received under EP), D
hidden, F expert intermediate, Q computed slots in local-expert-major order, e local experts.

    out_RD[row[q]] += w[q] * down_q(silu(gate_q(x_RD[row[q]])) * up_q(x_RD[row[q]]))

with each expert's LoRA added in place, as the loop kernel does. Where the unfused path
gathers x into a Q x D copy, runs the two projections and the activation over all Q rows, and
then gathers the outputs back per token, this keeps an expert's rows in cache from the gather
to the weighted scatter-add; backward recomputes the gathered rows and the activation from the
saved pre-activation (Q x 2F) instead of keeping them.

It covers the SiLU-gated experts without biases (Mixtral, OLMoE, Qwen-MoE, DeepSeek, GLM, ...)
in fp32; other experts (gpt-oss's biases and clamped gate, bf16) take the loop or grouped path
(moe_dist/moe/experts.py decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_dist.kernels.expert_loop import SlotAdapter, _fill_missing, native_loop
from moe_dist.quant.frozen import QuantizedWeight, materialize


@dataclass(frozen=True)
class MLPEntries:
    """The adapters of both projections flattened for the compiled kernel: gate_up entries
    first, then down's; slot s owns entries ptr_gu[s]:ptr_gu[s+1] and ptr_dn[s]:ptr_dn[s+1].
    a[j], b[j] index the adapter tensor list (gate_up's tensors, then down's)."""

    ptr_gu: list[int]
    ptr_dn: list[int]
    a: list[int]
    b: list[int]
    lo: list[int]
    hi: list[int]
    scale: list[float]

    @staticmethod
    def of(gate_up: list[list[SlotAdapter]], down: list[list[SlotAdapter]], n_gate_up_tensors: int) -> "MLPEntries":
        """`gate_up` / `down`: per slot, its adapters as the bank's loop layout gives them
        (indices into each projection's own tensor list)."""
        flat: list[tuple[SlotAdapter, int]] = []
        ptrs: list[list[int]] = []
        for slots, offset in ((gate_up, 0), (down, n_gate_up_tensors)):
            ptr = [len(flat)]
            for slot in slots:
                flat += [(ad, offset) for ad in slot]
                ptr.append(len(flat))
            ptrs.append(ptr)
        return MLPEntries(ptrs[0], ptrs[1], [ad.a + o for ad, o in flat], [ad.b + o for ad, o in flat],
                          [ad.lo for ad, _ in flat], [ad.hi for ad, _ in flat], [ad.scale for ad, _ in flat])

    def tensors(self, adapters) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [adapters[i] for i in self.a], [adapters[i] for i in self.b]


class FusedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, row_Q: torch.Tensor, w_Q: torch.Tensor, w_gu_E2FD: torch.Tensor,
                w_dn_EDF: torch.Tensor, counts: list[int], entries: MLPEntries, *adapters: torch.Tensor) -> torch.Tensor:
        native = native_loop()
        e = entries
        # quantized bases: dequantized here and again in backward; only their storage is kept
        ctx.quantized = [w if isinstance(w, QuantizedWeight) else None for w in (w_gu_E2FD, w_dn_EDF)]
        w_gu_E2FD, w_dn_EDF = materialize(w_gu_E2FD, x_RD.dtype), materialize(w_dn_EDF, x_RD.dtype)
        out_RD, gu_Q2F, y_QD = native.mlp_forward(x_RD, row_Q, w_Q, counts, w_gu_E2FD, w_dn_EDF, e.ptr_gu, e.ptr_dn,
                                                  *e.tensors(adapters), e.lo, e.hi, e.scale)
        ctx.counts, ctx.entries = counts, entries
        ctx.save_for_backward(x_RD, row_Q, w_Q, *(None if q is not None else w for q, w in
                                                  zip(ctx.quantized, (w_gu_E2FD, w_dn_EDF))), gu_Q2F, y_QD, *adapters)
        return out_RD

    @staticmethod
    def backward(ctx, g_RD: torch.Tensor):
        x_RD, row_Q, w_Q, w_gu, w_dn, gu_Q2F, y_QD, *adapters = ctx.saved_tensors
        q_gu, q_dn = ctx.quantized
        w_gu = q_gu.dense(x_RD.dtype) if q_gu is not None else w_gu
        w_dn = q_dn.dense(x_RD.dtype) if q_dn is not None else w_dn
        e = ctx.entries
        need = ctx.needs_input_grad[7:]
        need_A, need_B = [need[i] for i in e.a], [need[i] for i in e.b]
        grad_x, grad_w, *rest = native_loop().mlp_backward(
            g_RD.contiguous(), x_RD, row_Q, w_Q, gu_Q2F, y_QD, ctx.counts, w_gu, w_dn, e.ptr_gu, e.ptr_dn,
            *e.tensors(adapters), e.lo, e.hi, e.scale, ctx.needs_input_grad[0], ctx.needs_input_grad[2], need_A, need_B)
        grads: list[torch.Tensor | None] = [None] * len(adapters)
        n = len(e.a)
        for j in range(n):
            grads[e.a[j]], grads[e.b[j]] = rest[j], rest[n + j]
        return (grad_x, None, grad_w, None, None, None, None, *_fill_missing(grads, adapters, need))


def fused_expert_mlp(x_RD: torch.Tensor, row_Q: torch.Tensor, w_Q: torch.Tensor, w_gu_E2FD: torch.Tensor,
                     w_dn_EDF: torch.Tensor, counts: list[int], entries: MLPEntries,
                     adapters: list[torch.Tensor]) -> torch.Tensor:
    """out_RD = sum over slots q of w_Q[q] * expert_q(x_RD[row_Q[q]]) (autograd-aware); see the module
    docstring. `counts`: slots per local expert (host ints); `adapters`: gate_up's loop tensors,
    then down's (and any input that must get a zero gradient, like the ZeRO anchor)."""
    return FusedExpertMLP.apply(x_RD.contiguous(), row_Q, w_Q.contiguous(), w_gu_E2FD, w_dn_EDF, counts, entries,
                                *adapters)
