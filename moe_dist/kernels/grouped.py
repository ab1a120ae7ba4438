"""Grouped-matmul pieces of the expert kernel (the GPU path; torch._grouped_mm also runs on CPU).

Shape legend: M rows sorted by local expert slot, I in-features, O out-features, G experts in
one rank bucket, R adapter rank, e local experts.

CUDA's rules for torch._grouped_mm, and what moe_dist does about each (torch 2.13:
aten/src/ATen/native/GroupedMMUtils.h, cuda/GroupedBlas.cpp, cuda/GroupMMCommon.cuh):

- Every operand's data pointer 16-byte aligned: checked on CUDA only (`is_cpu ||
  data_ptr % 16 == 0`), so CPU runs never saw a violation. ZeRO-1/2 packs parameters into one
  flat buffer at any element offset unless `zero_optimization.parameter_alignment` is on
  (moe_dist/train/engine.py turns it on); DeepSpeed's bf16 optimizer at stage 0 has no such
  switch, so adapter operands pass through `aligned` (a copy only when misaligned).
- One of the last two dims unit-stride, the other stride a multiple of 16 bytes: checked on
  every platform (adapter ranks are zero-padded to it: `grouped_mm_alignment`).
- Offsets 1-D int32; read on the device by the fast path: built on the device here from the
  dispatcher's counts (no host-to-device copy, no sync).
- The fast CUTLASS path runs only for bf16 on sm90 / sm100 ("no d2h sync needed"); fp32,
  fp16 and other GPUs (A100: sm80) take `_grouped_mm_fallback`, a loop over groups that copies
  the offsets to the host (one sync per call). moe.kernel=auto keeps grouped on GPU: on an
  A100 bf16 run that is ~3 syncs per projection; `moe.kernel=loop` is the alternative there.
- Per-group row counts: CUTLASS needs them in multiples of 16 bytes only where a group's
  address advances along a contiguous dim (2D x 2D with the contracted token dim contiguous).
  The weight-gradient products here contract `a.T` (column-major, tokens strided) with a
  row-major gradient, so any count works and tokens are not padded (torchtitan dropped its
  8-row padding for bf16 for the same reason).
- Groups with no rows: torch issue #172439 (open) reports garbage weight gradients for them on
  B200 (sm100: CUTLASS leaves the accumulator uninitialised when K = 0). Experts with no
  tokens are routine, so the backward below zeroes those groups' weight gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moe_dist.quant.frozen import QuantizedWeight

ALIGN_BYTES = 16
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_GROUPS = 1024  # GroupMM.cu: "Can't process more than 1024 groups"


class GroupedMMOperandError(RuntimeError):
    """An operand CUDA's torch._grouped_mm would refuse (or, for alignment, CPU silently takes)."""


def grouped_mm_alignment(dtype: torch.dtype) -> int:
    """torch._grouped_mm wants 16-byte strides: rank multiple of 4 in fp32, 8 in bf16."""
    return max(1, ALIGN_BYTES // torch.empty((), dtype=dtype, device="cpu").element_size())


def _stride_problem(t: torch.Tensor) -> str | None:
    """GroupedMMUtils.h check_valid_strides_and_return_transposed, as CUDA applies it."""
    align = grouped_mm_alignment(t.dtype)
    s, n = t.stride(), t.shape
    if s[-2] == 1 and s[-1] >= max(1, n[-2]):
        return None if s[-1] % align == 0 else f"stride {s[-1]} of its last dim is not a multiple of 16 bytes"
    if s[-1] == 1 and s[-2] >= max(1, n[-1]):
        return None if s[-2] % align == 0 else f"stride {s[-2]} of dim -2 is not a multiple of 16 bytes"
    return f"strides {tuple(s)} for sizes {tuple(n)}: neither of the last two dims is unit-stride"


def grouped_mm_problems(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None) -> list[str]:
    """What CUDA's torch._grouped_mm(a, b, offs=offs) would refuse, whatever the platform."""
    out = []
    for name, t in (("mat_a", a), ("mat_b", b)):
        if t.dtype not in DTYPES:
            out.append(f"{name} dtype {t.dtype} (bf16, fp16 or fp32)")
        if t.data_ptr() % ALIGN_BYTES:
            out.append(f"{name} data pointer {t.data_ptr():#x} is not 16-byte aligned")
        problem = _stride_problem(t)
        if problem:
            out.append(f"{name} {problem}")
    if a.dtype != b.dtype:
        out.append(f"mat_a {a.dtype} and mat_b {b.dtype} differ")
    if a.device != b.device:
        out.append(f"mat_a on {a.device}, mat_b on {b.device}")
    if offs is None:
        if a.dim() == 2 or b.dim() == 2:
            out.append("a 2-D operand needs offsets")
        return out
    if offs.dim() != 1 or offs.dtype != torch.int32:
        out.append(f"offsets must be 1-D int32, got {offs.dim()}-D {offs.dtype}")
    if offs.device != a.device:
        out.append(f"offsets on {offs.device}, operands on {a.device} (the fast path reads them on the device)")
    if offs.numel() >= MAX_GROUPS:
        out.append(f"{offs.numel()} groups (at most {MAX_GROUPS - 1})")
    if a.dim() == 2 and b.dim() == 2 and (a.stride(-1) == 1 or b.stride(-2) == 1):
        out.append("2-D x 2-D with the grouped dim contiguous: CUTLASS would need 16-byte group sizes")
    return out


def check_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None) -> None:
    problems = grouped_mm_problems(a, b, offs)
    if problems:
        raise GroupedMMOperandError("torch._grouped_mm operands break CUDA's rules: " + "; ".join(problems))


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy (a fresh, 16-byte-aligned allocation) where its data pointer or
    strides break grouped_mm's rules. Autograd-transparent."""
    if t.data_ptr() % ALIGN_BYTES == 0 and _stride_problem(t) is None:
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _GroupedMM(torch.autograd.Function):
    """torch._grouped_mm(a_MI, b_GIO, offs) with CUDA's rules checked on every operand, forward
    and backward, and the weight gradient of groups without rows zeroed (#172439)."""

    @staticmethod
    def forward(ctx, a_MI, b_GIO, offs_G):
        # a quantized frozen b (e, O, I storage): dequantized here and again for grad_a
        ctx.quantized = b_GIO if isinstance(b_GIO, QuantizedWeight) else None
        if ctx.quantized is not None:
            b_GIO = _dequantized_operand(ctx.quantized, a_MI.dtype)
        check_grouped_mm(a_MI, b_GIO, offs_G)
        # each operand only where the other's gradient needs it (a frozen base weight's input
        # is not kept for it), as torch's own derivative saves them
        keep_b = ctx.needs_input_grad[0] and ctx.quantized is None
        ctx.save_for_backward(a_MI if ctx.needs_input_grad[1] else None, b_GIO if keep_b else None, offs_G)
        return torch._grouped_mm(a_MI, b_GIO, offs=offs_G)

    @staticmethod
    def backward(ctx, g_MO):
        a_MI, b_GIO, offs_G = ctx.saved_tensors
        if ctx.quantized is not None and ctx.needs_input_grad[0]:
            b_GIO = _dequantized_operand(ctx.quantized, g_MO.dtype)
        g_MO = aligned(g_MO)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            b_GOI = b_GIO.transpose(-2, -1)
            check_grouped_mm(g_MO, b_GOI, offs_G)
            grad_a = torch._grouped_mm(g_MO, b_GOI, offs=offs_G)
        if ctx.needs_input_grad[1]:
            a_IM = a_MI.t()
            check_grouped_mm(a_IM, g_MO, offs_G)
            grad_b = torch._grouped_mm(a_IM, g_MO, offs=offs_G)
            rows_G = torch.diff(offs_G, prepend=offs_G.new_zeros(1))
            grad_b = grad_b.masked_fill((rows_G == 0).view(-1, 1, 1), 0)
        return grad_a, grad_b, None


def _dequantized_operand(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """(e, I, O) from an (e, O, I) quantized stack: MXFP4 dequantizes to (e, I, O) already, so
    the transpose of its (e, O, I) view is contiguous and `aligned` copies nothing."""
    return aligned(w.dense(dtype, contiguous=False).transpose(1, 2))


def grouped_mm(x_MI: torch.Tensor, w_GIO: torch.Tensor | QuantizedWeight, offs_G: torch.Tensor) -> torch.Tensor:
    """x rows grouped by `offs_G` (cumulative row counts, int32, on x's device) times each
    group's w: torch._grouped_mm under CUDA's rules, checked on every platform. `w_GIO` may be
    a frozen `QuantizedWeight` (stored e x O x I), dequantized only inside."""
    return _GroupedMM.apply(x_MI, w_GIO, offs_G)


def offsets(counts: torch.Tensor) -> torch.Tensor:
    """Cumulative int32 group ends from per-group counts, on their device (no host copy)."""
    return counts.cumsum(0, dtype=torch.int32)


def add_lora_delta_(A_GIR: torch.Tensor, B_GRO: torch.Tensor, slots: Sequence[int], slots_G: torch.Tensor,
                    x_MI: torch.Tensor, out_MO: torch.Tensor, starts: list[int], counts: list[int],
                    counts_e: torch.Tensor, slot_of_row_M: torch.Tensor) -> None:
    """out[rows of `slots`] += x[rows] @ A^T @ B^T (scale is in B), in place, grouped.

    `slots` (host) and `slots_G` (the same, on the device) name the bucket's local slots;
    `counts` / `counts_e` rows per local slot on the host / device; `slot_of_row_M` the slot of
    each row. Offsets and row indices are built on the device: no host sync."""
    offs_G = offsets(counts_e.index_select(0, slots_G))
    if tuple(slots) == tuple(range(slots[0], slots[-1] + 1)):  # contiguous rows: no gather
        lo = starts[slots[0]]
        hi = starts[slots[-1]] + counts[slots[-1]]
        out_MO[lo:hi] += grouped_mm(grouped_mm(x_MI[lo:hi], A_GIR, offs_G), B_GRO, offs_G)
    else:  # the bucket's rows, in row order (a stable sort; their number is known on the host)
        in_bucket_e = torch.zeros(counts_e.shape[0], dtype=torch.bool, device=x_MI.device).index_fill_(0, slots_G, True)
        n = sum(counts[s] for s in slots)
        rows = torch.argsort((~in_bucket_e[slot_of_row_M]).to(torch.uint8), stable=True)[:n]
        out_MO.index_add_(0, rows, grouped_mm(grouped_mm(x_MI.index_select(0, rows), A_GIR, offs_G), B_GRO, offs_G))
