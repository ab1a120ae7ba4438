"""How a frozen weight is stored: codecs from a checkpoint's `quantization_config` or `base.quantize`.

Shape legend: O out-features, I in-features; `...` leading dims (experts of a stack).

A codec names the tensors one (O, I) weight is stored as (its *parts*, each with a per-weight
shape and dtype), turns a dense weight into them and back. Stacks of experts keep the parts
slot-major, so an expert is `part[slot]` for every part and a move or a slot permutation is
the same code as for a dense weight (moe_dist/parallel/move.py).

What each does, and whose code it runs:

- `fp8_block` (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8): float8_e4m3fn weight and one
  fp32 `weight_scale_inv` per block (128 x 128 on the hub; ceil-divided at the edges, as
  DeepSeek's 576-row kv_a_proj needs). Dequantized by transformers' own
  `finegrained_fp8._dequantize_fp8_weight` (in fp32, then cast: a bf16 scale has 8 bits);
  quantized (checkpoint writing, the re-quantization figure) by transformers' `Fp8Quantize`.
- `mxfp4` (gpt-oss experts): e2m1 values packed two per byte in blocks of 32 along I, one e8m0
  exponent per block (`*_blocks` (O, I/32, 16) uint8, `*_scales` (O, I/32) uint8).
  Dequantized by transformers' `mxfp4.convert_moe_packed_tensors`; quantized here (nothing in
  transformers writes MXFP4 on CPU).
- `nf4` (`base.quantize: nf4`, QLoRA): bitsandbytes' 4-bit NormalFloat, blocks of 64 with an
  fp32 absmax each (0.5625 B a weight), its CUDA / CPU kernels for both directions.
- `int8` (`base.quantize: int8`): symmetric per-output-row int8 with an fp32 scale (by hand:
  two torch ops; no library call is simpler).
"""

from __future__ import annotations

import abc
import math
import types
from dataclasses import dataclass
from typing import Mapping

import torch

FP8 = torch.float8_e4m3fn
FP32_CHUNK_BYTES = 256 * 2**20  # the fp32 temporary of a bf16 FP8 dequantization, at most
Parts = dict[str, tuple[tuple[int, ...], torch.dtype]]


class Codec(abc.ABC):
    """One storage format of a frozen (O, I) weight. Subclasses are frozen dataclasses."""

    name = "dense"

    @abc.abstractmethod
    def parts(self, O: int, I: int) -> Parts:  # noqa: E741
        """Per-weight shape and dtype of each stored tensor, by part name."""

    @abc.abstractmethod
    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., O, I) -> its parts, leading dims kept."""

    @abc.abstractmethod
    def dequantize(self, parts: Mapping[str, torch.Tensor], O: int, I: int, dtype: torch.dtype) -> torch.Tensor:  # noqa: E741
        """Parts -> the (..., O, I) weight in `dtype` (a fresh tensor)."""

    def check(self, O: int, I: int) -> str | None:  # noqa: E741
        """Why an (O, I) weight cannot be stored this way (None: it can)."""
        return None

    def bytes_per_weight(self, O: int, I: int) -> float:  # noqa: E741
        """Stored bytes per weight element, parts included (the planner's figure)."""
        nbytes = sum(math.prod(shape) * torch.empty((), dtype=dt, device="meta").element_size()
                     for shape, dt in self.parts(O, I).values())
        return nbytes / (O * I)


@dataclass(frozen=True)
class Fp8Block(Codec):
    block: tuple[int, int] = (128, 128)
    name = "fp8_block"

    def parts(self, O, I):  # noqa: E741
        return {"weight": ((O, I), FP8),
                "weight_scale_inv": ((math.ceil(O / self.block[0]), math.ceil(I / self.block[1])), torch.float32)}

    def quantize(self, w):
        from transformers.integrations.finegrained_fp8 import Fp8Quantize

        problem = self.check_divisible(*w.shape[-2:])
        if problem:
            raise ValueError(f"fp8_block quantize: {problem}")
        config = types.SimpleNamespace(weight_block_size=list(self.block), scale_fmt=None)
        out = Fp8Quantize(types.SimpleNamespace(quantization_config=config))._quantize_one("w.weight", w)
        return {"weight": out["w.weight"], "weight_scale_inv": out["w.weight_scale_inv"]}

    def check_divisible(self, O, I):  # noqa: E741
        if O % self.block[0] or I % self.block[1]:
            return f"shape ({O}, {I}) is not a multiple of the block {self.block}"
        return None

    def dequantize(self, parts, O, I, dtype):  # noqa: E741
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        w, s = parts["weight"], parts["weight_scale_inv"]
        if dtype == torch.float32 or w.dim() == 2:
            return _dequantize_fp8_weight(w, s, list(self.block), torch.float32).to(dtype)
        # a bf16 result through fp32 math, a few experts at a time: the fp32 temporary stays
        # under FP32_CHUNK_BYTES (one DeepSeek-V3 expert projection is 56 MiB in fp32)
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
        step = max(1, FP32_CHUNK_BYTES // (4 * w[0].numel()))
        for i in range(0, w.shape[0], step):
            out[i:i + step] = _dequantize_fp8_weight(w[i:i + step], s[i:i + step], list(self.block), torch.float32)
        return out


@dataclass(frozen=True)
class Mxfp4(Codec):
    name = "mxfp4"
    BLOCK = 32

    def parts(self, O, I):  # noqa: E741
        return {"blocks": ((O, I // self.BLOCK, self.BLOCK // 2), torch.uint8), "scales": ((O, I // self.BLOCK), torch.uint8)}

    def check(self, O, I):  # noqa: E741
        return None if I % self.BLOCK == 0 else f"in-features {I} not a multiple of MXFP4's block of {self.BLOCK}"

    def dequantize(self, parts, O, I, dtype):  # noqa: E741
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        blocks, scales = parts["blocks"], parts["scales"]
        single = blocks.dim() == 3
        if single:
            blocks, scales = blocks.unsqueeze(0), scales.unsqueeze(0)
        w_EIO = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # transformers' (E, I, O) storage
        w_EOI = w_EIO.transpose(-1, -2)  # a view: grouped_mm reads (E, I, O) without a copy
        return w_EOI[0] if single else w_EOI

    def quantize(self, w):
        """Round each value to the nearest e2m1 number under its block's power-of-two scale (the
        OCP MX rule: scale = 2^(floor(log2 amax) - 2), e2m1's largest exponent being 2)."""
        from transformers.integrations.mxfp4 import FP4_VALUES

        *lead, O, I = w.shape  # noqa: E741
        problem = self.check(O, I)
        if problem:
            raise ValueError(f"mxfp4 quantize: {problem}")
        w_B32 = w.detach().to(torch.float32).reshape(*lead, O, I // self.BLOCK, self.BLOCK)
        amax = w_B32.abs().amax(-1)
        exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2, torch.zeros_like(amax))
        exp = exp.clamp(-127, 127)
        scaled = w_B32 / torch.exp2(exp).unsqueeze(-1)
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=w.device)
        codes = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # nearest; +0 before -0
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return {"blocks": packed.contiguous(), "scales": (exp + 127).to(torch.uint8)}


@dataclass(frozen=True)
class Nf4(Codec):
    name = "nf4"
    BLOCK = 64

    def parts(self, O, I):  # noqa: E741
        return {"packed": ((O * I // 2,), torch.uint8), "absmax": ((O * I // self.BLOCK,), torch.float32)}

    def check(self, O, I):  # noqa: E741
        return None if (O * I) % self.BLOCK == 0 else f"{O} x {I} weights not a multiple of NF4's block of {self.BLOCK}"

    def quantize(self, w):
        import bitsandbytes.functional as bnb

        *lead, O, I = w.shape  # noqa: E741
        packed, state = bnb.quantize_4bit(w.detach().contiguous(), blocksize=self.BLOCK, quant_type="nf4")
        return {"packed": packed.reshape(*lead, O * I // 2), "absmax": state.absmax.reshape(*lead, O * I // self.BLOCK)}

    def dequantize(self, parts, O, I, dtype):  # noqa: E741
        import bitsandbytes.functional as bnb

        packed, absmax = parts["packed"], parts["absmax"]
        lead = tuple(packed.shape[:-1])
        state = bnb.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((*lead, O, I)), code=_nf4_code(packed.device),
                               blocksize=self.BLOCK, quant_type="nf4", dtype=dtype)
        return bnb.dequantize_4bit(packed.reshape(-1, 1), state)


_NF4_CODES: dict[torch.device, torch.Tensor] = {}


def _nf4_code(device: torch.device) -> torch.Tensor:
    if device not in _NF4_CODES:
        import bitsandbytes.functional as bnb

        _NF4_CODES[device] = bnb.get_4bit_type("nf4", device=device)
    return _NF4_CODES[device]


@dataclass(frozen=True)
class Int8(Codec):
    name = "int8"

    def parts(self, O, I):  # noqa: E741
        return {"weight": ((O, I), torch.int8), "scale": ((O,), torch.float32)}

    def quantize(self, w):
        w = w.detach().to(torch.float32)
        scale = w.abs().amax(-1).clamp(min=1e-12) / 127
        return {"weight": torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), "scale": scale}

    def dequantize(self, parts, O, I, dtype):  # noqa: E741
        return (parts["weight"].to(torch.float32) * parts["scale"].unsqueeze(-1)).to(dtype)


AT_LOAD = {"nf4": Nf4(), "int8": Int8()}  # base.quantize choices for unquantized checkpoints
