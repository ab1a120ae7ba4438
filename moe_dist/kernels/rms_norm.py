"""RMSNorm in one compiled pass forward and one backward, on CPU in fp32 (csrc/rms_norm.cpp).

transformers' RMSNorm modules are six elementwise ATen ops forward and about as many backward;
a MoE layer has two (input and post-attention) to four (OLMoE and Qwen3 add q/k norms), and
at small hidden sizes they cost more than the attention projections.

`use_norm_kernel` swaps the forward of each RMSNorm module of the model, instance by instance
(other models in the process keep transformers' own), and only where the module computes
exactly `weight * (x * rsqrt(mean(x^2) + eps))`: each is checked against its own forward on a
random input first, so variants (Gemma-style `1 + weight`, extra parameters, other
formulas) keep theirs. The swapped forward falls back to the module's own on GPU or in
other dtypes.
"""

from __future__ import annotations

import types

import torch

from moe_dist.kernels.expert_loop import native_loop

KERNELS = ("auto", "fused", "hf")


class FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x_ND = x.reshape(-1, x.shape[-1]).contiguous()
        y, r = native_loop().rms_norm_forward(x_ND, weight.contiguous(), eps)
        ctx.save_for_backward(x_ND, weight, r)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_ND, weight, r = ctx.saved_tensors
        dx, dw = native_loop().rms_norm_backward(g.reshape(x_ND.shape).contiguous(), x_ND, weight.contiguous(), r,
                                                 ctx.needs_input_grad[1])
        return dx.view(g.shape), (dw if ctx.needs_input_grad[1] else None), None


def _eps(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(module, name, None), float):
            return getattr(module, name)
    return None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.device.type != "cpu" or hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32:
        return type(self).forward(self, hidden_states)
    return FusedRMSNorm.apply(hidden_states, self.weight, self._moe_dist_eps)


def swappable(module: torch.nn.Module) -> bool:
    """An RMSNorm whose forward is exactly the fused kernel's formula (checked numerically)."""
    weight = getattr(module, "weight", None)
    eps = _eps(module)
    if not type(module).__name__.endswith("RMSNorm") or eps is None or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 1 or len(list(module.parameters(recurse=False))) != 1 or weight.device.type != "cpu" \
            or weight.dtype != torch.float32:
        return False
    x = torch.randn(5, weight.numel(), generator=torch.Generator().manual_seed(0), device="cpu") * 3
    with torch.no_grad():
        want = type(module).forward(module, x)
        got = FusedRMSNorm.apply(x, weight, eps)
    return want.shape == got.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def use_norm_kernel(model: torch.nn.Module, kernel: str, device: torch.device, dtype: torch.dtype) -> int:
    """Apply `kernels.rms_norm` (auto / fused: the compiled kernel on CPU fp32 where a module
    matches it, fused raising where none can; hf: transformers' own). Returns how many
    modules were swapped."""
    if kernel not in KERNELS:
        raise ValueError(f"kernels.rms_norm must be one of {KERNELS}, got {kernel!r}")
    if kernel == "hf":
        return 0
    why = None
    if device.type != "cpu" or dtype != torch.float32:
        why = f"it is a CPU fp32 kernel and the model is {dtype} on {device.type}"
    elif native_loop() is None:
        why = "the compiled CPU kernels are unavailable"
    swapped = 0
    for module in model.modules() if why is None else ():
        if swappable(module):
            module._moe_dist_eps = _eps(module)
            module.forward = types.MethodType(_fused_forward, module)
            swapped += 1
    if kernel == "fused" and not swapped:
        raise ValueError(f"kernels.rms_norm=fused cannot run here: {why or 'no RMSNorm module matches its formula'}")
    return swapped
