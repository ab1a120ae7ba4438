"""act(gate) * up on the fused gate_up rows, with a backward that writes both halves of the
gradient into one buffer.

Autograd's version of `silu(gate_up[:, :F]) * gate_up[:, F:]` ends with a `cat` of the two
half-gradients (one more full pass over M x 2F); here the halves are written in place with
the same ops (bit-identical results). Other activations take the plain autograd path.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.activations import SiLUActivation

SILU_TYPES = (nn.SiLU, SiLUActivation)  # transformers' ACT2FN['silu'] is its own class


class _SiLUGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up_M2F: torch.Tensor) -> torch.Tensor:
        gate_MF, up_MF = gate_up_M2F.chunk(2, dim=-1)
        silu_MF = nn.functional.silu(gate_MF)
        ctx.save_for_backward(gate_up_M2F, silu_MF)
        return silu_MF * up_MF

    @staticmethod
    def backward(ctx, g_MF: torch.Tensor) -> torch.Tensor:
        gate_up_M2F, silu_MF = ctx.saved_tensors
        gate_MF, up_MF = gate_up_M2F.chunk(2, dim=-1)
        grad_M2F = torch.empty_like(gate_up_M2F)
        grad_gate_MF, grad_up_MF = grad_M2F.chunk(2, dim=-1)
        torch.mul(g_MF, silu_MF, out=grad_up_MF)
        torch.ops.aten.silu_backward.grad_input(g_MF * up_MF, gate_MF, grad_input=grad_gate_MF)
        return grad_M2F


def gated_act(gate_up_M2F: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """act(gate) * up for rows laid out [gate | up] (transformers' fused gate_up_proj)."""
    if isinstance(act_fn, SILU_TYPES):
        return _SiLUGLU.apply(gate_up_M2F)
    gate_MF, up_MF = gate_up_M2F.chunk(2, dim=-1)  # split, not slices: backward is one cat, no zero-fill
    return act_fn(gate_MF) * up_MF
