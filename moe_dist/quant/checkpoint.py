"""Which codec a checkpoint's weights are stored in, and reading them without dequantizing.

The checkpoint decides: `quantization_config.quant_method` names the format (fp8 block-wise,
mxfp4), and within an FP8 checkpoint a linear is FP8 exactly when the checkpoint has its
`weight_scale_inv` (embeddings, norms, routers and the LM head ship unquantized). For an
unquantized checkpoint `base.quantize` (nf4, int8) quantizes the experts as they are read.
Every method we do not read is refused before any work, naming the field; an FP8 tensor
without its scales (or with scales of another shape) is an error naming tensor and file,
never a silent cast.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from moe_dist.quant.codecs import AT_LOAD, FP8, Codec, Fp8Block, Mxfp4

READABLE = {"fp8": "block-wise float8_e4m3fn + weight_scale_inv (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8, GLM-4.5-FP8)",
            "mxfp4": "gpt-oss's MXFP4 experts (*_blocks + *_scales)"}
QUANTIZE_CHOICES = ("none", *AT_LOAD)


class QuantizationConfigError(ValueError):
    pass


def quantization_config(config: Any) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)


def checkpoint_codec(config: Any, where: str = "config.json") -> Codec | None:
    """The codec a checkpoint's quantized weights use (None: not quantized). Refuses, naming
    `quantization_config.<field>`, anything this loader would read wrongly."""
    qc = quantization_config(config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    supported = "; ".join(f"{k}: {v}" for k, v in READABLE.items())
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationConfigError(f"{where}: quantization_config.fmt={fmt!r}: only e4m3 FP8 is read")
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise QuantizationConfigError(
                f"{where}: quantization_config.weight_block_size={block!r}: block-wise FP8 needs two positive ints "
                "(the hub's [128, 128]); per-tensor FP8 is not read")
        return Fp8Block((int(block[0]), int(block[1])))
    if method == "mxfp4":
        return Mxfp4()
    raise QuantizationConfigError(
        f"{where}: quantization_config.quant_method={method!r} is not read by moe_dist (supported: {supported}). "
        "Use the unquantized checkpoint, optionally with base.quantize=nf4 for 4-bit experts")


def load_codec(config: Any, quantize: str = "none", where: str = "config.json") -> tuple[Codec | None, Codec | None]:
    """(the checkpoint's codec, the experts' storage codec): what is read, what is kept."""
    if quantize not in QUANTIZE_CHOICES:
        raise QuantizationConfigError(f"base.quantize={quantize!r}: one of {QUANTIZE_CHOICES}")
    stored = checkpoint_codec(config, where)
    if stored is not None and quantize != "none":
        raise QuantizationConfigError(f"base.quantize={quantize}: {where} is already quantized "
                                      f"({stored.name}); its experts stay as shipped, set base.quantize=none")
    return stored, stored if stored is not None else AT_LOAD.get(quantize)


def read_fp8(ckpt, key: str, codec: Fp8Block, error: Callable[[str], Exception], index: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 weight_scale_inv) of `key`, checked against each other."""
    scale_key = key[: -len(".weight")] + ".weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"
    w = ckpt.read(key, None, index=index)
    if scale_key not in ckpt:
        raise error(f"tensor {key!r} in {ckpt.file_of[key].name} is {w.dtype} with no {scale_key!r}: an FP8 "
                    "checkpoint's quantized weights need their block scales")
    if w.dtype != FP8:
        raise error(f"tensor {key!r} in {ckpt.file_of[key].name} is {w.dtype}, has {scale_key!r}: expected float8_e4m3fn")
    s = ckpt.read(scale_key, torch.float32, index=index)
    want = codec.parts(*w.shape[-2:])["weight_scale_inv"][0]
    if tuple(s.shape[-2:]) != want:
        raise error(f"tensor {scale_key!r} in {ckpt.file_of[scale_key].name} has shape {tuple(s.shape)}, "
                    f"{key!r} {tuple(w.shape)} with weight_block_size {list(codec.block)} needs {want}")
    return w, s


def dequantized_load_kwargs(directory) -> dict:
    """`from_pretrained` kwargs that give a plain dense model of a quantized checkpoint, through
    transformers' own dequantization (inference after training, exports); {} if unquantized."""
    from transformers import AutoConfig, FineGrainedFP8Config, Mxfp4Config

    codec = checkpoint_codec(AutoConfig.from_pretrained(directory), f"{directory}/config.json")
    if codec is None:
        return {}
    if isinstance(codec, Mxfp4):
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {"quantization_config": FineGrainedFP8Config(dequantize=True, weight_block_size=codec.block)}
