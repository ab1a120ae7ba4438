"""Write a checkpoint in a hub quantized layout, from an unquantized transformers model.

For tests, benchmarks and the FP8 copy of the embedded base (no hub weights can be fetched
here): the model is saved by transformers in the hub's own names (`save_original_format`:
per-expert for DeepSeek / Qwen3, fused for gpt-oss), then each tensor the hub ships quantized
is replaced by its quantized parts, and `quantization_config` is added to config.json as the
hub has it.

- `fp8_block`: every 2-D `*.weight` except embeddings, the LM head, routers (`mlp.gate`) and
  gates becomes float8_e4m3fn + `weight_scale_inv` (ceil-divided blocks, padded at the edges
  like DeepSeek-V3's 576-row kv_a_proj_with_mqa).
- `mxfp4` (gpt-oss): `mlp.experts.gate_up_proj` / `down_proj` become `*_blocks` / `*_scales`
  over the output rows as gpt-oss ships them; attention, router, biases stay.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_dist.quant.codecs import Fp8Block, Mxfp4

UNQUANTIZED_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "shared_expert_gate.weight",
                        "router.weight")


def fp8_quantize_padded(w_OI: torch.Tensor, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Block FP8 of any (O, I): zero-padded to whole blocks, cropped back (scales stay ceil-sized)."""
    O, I = w_OI.shape  # noqa: E741
    Op, Ip = math.ceil(O / block[0]) * block[0], math.ceil(I / block[1]) * block[1]
    padded = torch.zeros(Op, Ip, dtype=torch.float32, device=w_OI.device)
    padded[:O, :I] = w_OI.float()
    q = Fp8Block(block).quantize(padded)
    return {"weight": q["weight"][:O, :I].contiguous(), "weight_scale_inv": q["weight_scale_inv"]}


def _fp8_tensors(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith(".weight") and not name.endswith(UNQUANTIZED_SUFFIXES):
            q = fp8_quantize_padded(t, block)
            out[name], out[name[: -len("weight")] + "weight_scale_inv"] = q["weight"], q["weight_scale_inv"]
        else:
            out[name] = t
    return out


def _mxfp4_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            q = Mxfp4().quantize(t.transpose(1, 2))  # stored (E, in, out): blocks run along `in`, per out row
            out[name + "_blocks"], out[name + "_scales"] = q["blocks"], q["scales"]
        else:
            out[name] = t
    return out


def write_quantized_checkpoint(model, out_dir: str | Path, fmt: str, block: tuple[int, int] = (128, 128)) -> Path:
    """Save `model` (an unconverted transformers model) to `out_dir` in `fmt` (fp8_block, mxfp4)."""
    if fmt not in ("fp8_block", "mxfp4"):
        raise ValueError(f"fmt must be fp8_block or mxfp4, got {fmt!r}")
    if fmt == "mxfp4" and model.config.model_type != "gpt_oss":
        raise ValueError(f"mxfp4 is gpt-oss's expert format; {model.config.model_type} ships no MXFP4 checkpoint")
    out = Path(out_dir)
    model.save_pretrained(out, save_original_format=True)
    renamed: dict[str, str] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        new = _fp8_tensors(tensors, block) if fmt == "fp8_block" else _mxfp4_tensors(tensors)
        renamed.update({k: f.name for k in new})
        save_file(new, f, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = renamed
        index.write_text(json.dumps(data, indent=2))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block)} if fmt == "fp8_block" else
                                     {"quant_method": "mxfp4", "modules_to_not_convert": [
                                         "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                         "lm_head"]})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    """python -m moe_dist.quant.write SRC OUT --fmt fp8_block [--block 128 128]: a quantized copy
    of a local checkpoint (tokenizer and other files copied beside it)."""
    import argparse
    import shutil

    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--fmt", choices=("fp8_block", "mxfp4"), required=True)
    parser.add_argument("--block", type=int, nargs=2, default=(128, 128), help="FP8 block (rows, cols)")
    args = parser.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    write_quantized_checkpoint(model, out, args.fmt, tuple(args.block))
    for f in src.iterdir():  # tokenizer, chat template, task files: everything but weights and config
        if not (out / f.name).exists() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)
    print(out)


if __name__ == "__main__":
    main()
