"""Frozen weights kept in a codec's storage, dequantized only inside the kernels that read them.

`QuantizedWeight` holds one (O, I) weight or a slot-major stack (e, O, I) as its codec's parts
(non-persistent buffers: never in a state dict or a checkpoint; buffers, so DeepSpeed neither
casts nor broadcasts them as parameters). A cast of the model (`.to(bf16)`, `.float()`)
changes the dtype it is dequantized *to*, never its storage; a device move moves the parts.

The kernels (moe_dist/kernels/expert_loop.py, expert_mlp.py, grouped.py) take a
`QuantizedWeight` wherever they take a frozen weight: forward dequantizes the layer's local
experts into a temporary, backward dequantizes them again for the input gradient; autograd
keeps only the quantized storage between the two (`materialize` below). `QuantizedLinear`
does the same for one nn.Linear (FP8 attention, shared experts, dense layers), so attention
LoRA wraps it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.quant.codecs import Codec


class QuantizedWeight(nn.Module):
    """A frozen weight (or stack) in `codec`'s storage; `dtype` is what it dequantizes to."""

    def __init__(self, codec: Codec, shape: tuple[int, ...], dtype: torch.dtype, device=None):
        super().__init__()
        *lead, O, I = shape  # noqa: E741
        problem = codec.check(O, I)
        if problem:
            raise ValueError(f"{codec.name} cannot store a ({O}, {I}) weight: {problem}")
        self.codec, self.shape, self.compute_dtype = codec, torch.Size(shape), dtype
        self.out_features, self.in_features = O, I
        for name, (part_shape, part_dtype) in codec.parts(O, I).items():
            self.register_buffer(name, torch.empty(*lead, *part_shape, dtype=part_dtype, device=device),
                                 persistent=False)

    @property
    def dtype(self) -> torch.dtype:  # what HF code reading `proj.weight.dtype` should see
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    @property
    def requires_grad(self) -> bool:
        return False

    def parts(self) -> dict[str, torch.Tensor]:
        return dict(self._buffers)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def dense(self, dtype: torch.dtype | None = None, contiguous: bool = True) -> torch.Tensor:
        """The dequantized weight (a fresh tensor the caller drops after use)."""
        w = self.codec.dequantize(self._buffers, self.out_features, self.in_features, dtype or self.compute_dtype)
        return w.contiguous() if contiguous else w

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(probe.device)  # the storage dtypes are the format: never cast
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.codec.name}, shape={tuple(self.shape)}, dequantized to {self.compute_dtype}"


def materialize(w: torch.Tensor | QuantizedWeight, dtype: torch.dtype, contiguous: bool = True) -> torch.Tensor:
    """A kernel's frozen operand as a dense tensor: itself, or its dequantized temporary."""
    return w.dense(dtype, contiguous) if isinstance(w, QuantizedWeight) else w


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again for the input gradient."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight, bias):
        ctx.weight = weight
        return nn.functional.linear(x, weight.dense(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        grad_x = g @ ctx.weight.dense(g.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight stays quantized (FP8 checkpoints' non-expert linears)."""

    def __init__(self, codec: Codec, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = QuantizedWeight(codec, (out_features, in_features), dtype, device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.codec.name}"
