"""Expert projections with their LoRA fused in, one expert at a time: the CPU kernel.

Shape legend: M rows (sorted by local expert), I in-features, O out-features, R adapter
rank, n rows of one expert.

On CPU, torch._grouped_mm is a loop over groups anyway, and the grouped formulation makes
every pass (base GEMM, x A, t B, the add into the base output) stream all M rows through
memory, with stacked/padded adapter copies and zero-filled buffers in backward. Here each
expert's rows are handled while they are in cache: y_e = x_e W_e^T, then t = x_e A^T and
y_e[:, cols] += s t B^T *in place* (addmm_), so no delta tensor exists; backward mirrors it
(grad_x_e = g_e W_e + s (g_e B) A in place, grad_A and grad_B per expert). Each adapter
is its own input: the bank passes its rank bucket unbound into per-expert views
(moe_dist/adapters/expert_bank.py), and autograd stacks their gradients into the bucket's one
gradient, once per bucket.
GPUs keep the grouped path (moe_dist/moe/experts.py), where grouped_mm is one kernel.

The same loop also exists in C++ (csrc/expert_loop.cpp, built on first use with
torch.utils.cpp_extension and cached, in one extension with the fused expert MLP of
csrc/expert_mlp.cpp): it spreads experts over the intra-op threads instead of running every
small GEMM on all of them. Without a compiler (or with
MOE_DIST_NATIVE_LOOP=0) the Python loop below runs; both compute the same products.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_dist.quant.frozen import QuantizedWeight, materialize

log = logging.getLogger(__name__)
_native_module: object | None = None
_native_tried = False


def native_loop():
    """The compiled CPU kernels (this loop, the fused expert MLP, packed attention, RMSNorm,
    the host exchange's flags: one extension), or None where they cannot be built (no compiler, or
    disabled)."""
    global _native_module, _native_tried
    if not _native_tried:
        _native_tried = True
        if os.environ.get("MOE_DIST_NATIVE_LOOP", "1") != "0":
            try:
                from torch.utils.cpp_extension import load

                log.info("loading the CPU expert kernel (built once, cached by torch.utils.cpp_extension)")
                csrc = Path(__file__).parent / "csrc"
                _native_module = load(name="moe_dist_expert_loop",
                                      sources=[str(csrc / f) for f in ("bindings.cpp", "expert_loop.cpp",
                                                                       "expert_mlp.cpp", "packed_attention.cpp",
                                                                       "rms_norm.cpp", "host_sync.cpp")],
                                      extra_include_paths=[str(csrc)],
                                      extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
            except Exception as exc:  # no compiler, no ninja, ...: the Python loop is the same math
                warnings.warn(f"moe_dist: compiled CPU expert loop unavailable ({type(exc).__name__}: {exc}); "
                              "using the Python loop", stacklevel=2)
    return _native_module


@dataclass(frozen=True)
class SlotAdapter:
    """One adapter of one local expert: indices into the adapter tensor list, the output
    columns it adds to, its scale."""

    a: int
    b: int
    lo: int
    hi: int
    scale: float


class ExpertLoopLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MI: torch.Tensor, w_EOI: torch.Tensor | QuantizedWeight, counts: list[int],
                slot_adapters: list[list[SlotAdapter]], *adapters: torch.Tensor) -> torch.Tensor:
        ctx.n_adapters, ctx.counts, ctx.slot_adapters = len(adapters), counts, slot_adapters
        # a quantized base: dequantized here and again in backward; only its storage is kept
        ctx.quantized = w_EOI if isinstance(w_EOI, QuantizedWeight) else None
        w_EOI = materialize(w_EOI, x_MI.dtype)
        saved_w = None if ctx.quantized is not None else w_EOI
        native = native_loop() if x_MI.device.type == "cpu" else None
        ctx.native = native is not None
        if native is not None:
            e = ctx.entries = _Entries(slot_adapters)
            y_MO, *ts = native.loop_forward(x_MI, w_EOI, counts, e.ptr, *e.tensors(adapters), e.lo, e.hi, e.scale)
            ctx.save_for_backward(x_MI, saved_w, *adapters, *ts)
            return y_MO
        M, O = x_MI.shape[0], w_EOI.shape[1]
        y_MO = x_MI.new_empty(M, O)
        ts: list[torch.Tensor] = []  # s * t^T = s A x_e^T of every adapter, in slot order
        zero = x_MI.new_zeros(())  # addmm's ignored input (beta=0): the scale rides on alpha, no extra pass
        start = 0
        for slot, n in enumerate(counts):
            x_nI, y_nO = x_MI[start:start + n], y_MO[start:start + n]
            start += n
            torch.mm(x_nI, w_EOI[slot].t(), out=y_nO)
            for ad in slot_adapters[slot]:
                # Rank-R products are computed with R as the row dimension (t^T = A x^T, not
                # x A^T): MKL runs these 1.5-3x faster than the N=R orientation on CPU.
                tT_Rn = torch.addmm(zero, adapters[ad.a], x_nI.t(), beta=0, alpha=ad.scale)
                y_nP = y_nO if ad.hi - ad.lo == O else y_nO[:, ad.lo:ad.hi]
                y_nP.addmm_(tT_Rn.t(), adapters[ad.b].t())
                ts.append(tT_Rn)
        ctx.save_for_backward(x_MI, saved_w, *adapters, *ts)
        return y_MO

    @staticmethod
    def backward(ctx, g_MO: torch.Tensor):
        x_MI, w_EOI, *rest = ctx.saved_tensors
        if ctx.quantized is not None:
            w_EOI = ctx.quantized.dense(x_MI.dtype)
        adapters, ts = rest[:ctx.n_adapters], iter(rest[ctx.n_adapters:])
        need_x = ctx.needs_input_grad[0]
        need = ctx.needs_input_grad[4:]
        g_MO = g_MO.contiguous()
        O = g_MO.shape[1]
        grads: list[torch.Tensor | None] = [None] * len(adapters)
        if ctx.native:
            e = ctx.entries
            need_A, need_B = [need[i] for i in e.a], [need[i] for i in e.b]
            grad_x, *rest = native_loop().loop_backward(x_MI, w_EOI, g_MO, ctx.counts, e.ptr, *e.tensors(adapters),
                                                        list(ts), e.lo, e.hi, e.scale, need_x, need_A, need_B)
            n = len(e.a)
            for j in range(n):
                grads[e.a[j]], grads[e.b[j]] = rest[j], rest[n + j]
            return (grad_x, None, None, None, *_fill_missing(grads, adapters, need))
        grad_x = x_MI.new_empty(x_MI.shape) if need_x else None
        zero = g_MO.new_zeros(())
        start = 0
        for slot, n in enumerate(ctx.counts):
            x_nI, g_nO = x_MI[start:start + n], g_MO[start:start + n]
            gx_nI = grad_x[start:start + n] if need_x else None
            start += n
            if need_x:
                torch.mm(g_nO, w_EOI[slot], out=gx_nI)
            for ad in ctx.slot_adapters[slot]:
                tT_Rn = next(ts)  # already scaled by s
                A_RI, B_OR = adapters[ad.a], adapters[ad.b]
                g_nP = g_nO if ad.hi - ad.lo == O else g_nO[:, ad.lo:ad.hi]
                uT_Rn = torch.addmm(zero, B_OR.t(), g_nP.t(), beta=0, alpha=ad.scale)  # grad w.r.t. s*t, transposed
                if need_x:
                    gx_nI.addmm_(uT_Rn.t(), A_RI)
                if need[ad.a]:
                    grads[ad.a] = torch.mm(uT_Rn, x_nI)
                if need[ad.b]:
                    grads[ad.b] = torch.mm(tT_Rn, g_nP).t()
        return (grad_x, None, None, None, *_fill_missing(grads, adapters, need))


def _fill_missing(grads: list, adapters: tuple[torch.Tensor, ...], need: tuple[bool, ...]) -> list:
    """A trainable input no product touched (an expert that got no rows, the ZeRO anchor)
    still gets a zero gradient: DeepSpeed's gradient hooks expect one."""
    for i, p in enumerate(adapters):
        if need[i] and grads[i] is None:
            grads[i] = torch.zeros_like(p)
    return grads


class _Entries:
    """The adapters of all slots flattened for the compiled loop: slot s owns entries
    ptr[s]:ptr[s+1]; a[j], b[j] index the adapter tensors."""

    def __init__(self, slot_adapters: list[list[SlotAdapter]]):
        flat = [ad for slot in slot_adapters for ad in slot]
        self.ptr = [0]
        for slot in slot_adapters:
            self.ptr.append(self.ptr[-1] + len(slot))
        self.a, self.b = [ad.a for ad in flat], [ad.b for ad in flat]
        self.lo, self.hi, self.scale = [ad.lo for ad in flat], [ad.hi for ad in flat], [ad.scale for ad in flat]

    def tensors(self, adapters) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(A of each entry, B of each entry); in backward, from the saved tensors."""
        return [adapters[i] for i in self.a], [adapters[i] for i in self.b]
