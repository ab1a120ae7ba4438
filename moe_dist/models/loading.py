"""Sharded loading: each rank reads only its own experts from the safetensors files.

The model skeleton is built on the meta device (no memory), its experts are swapped for
expert-parallel modules that allocate only this rank's experts, and then every tensor is read
from the checkpoint with `safe_open(...).get_slice`, so a rank's peak memory is the
non-expert weights plus its own experts, never the whole model.

Both naming families are read: the per-expert names of hub checkpoints
(`model.layers.3.block_sparse_moe.experts.5.w1.weight`, `...mlp.experts.5.gate_proj.weight`)
and the fused 3-D names transformers 5 writes with `save_original_format=False`
(`model.layers.3.mlp.experts.gate_up_proj`, gate rows first).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moe_dist.adapters.lora import LoRAConfig
from moe_dist.models.arch import ArchSpec, arch_spec, moe_blocks
from moe_dist.models.convert import convert_model
from moe_dist.models.layout import down_to_canonical, gate_up_bias_to_canonical, gate_up_to_canonical
from moe_dist.moe.experts import ExpertParallelExperts
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan
from moe_dist.quant.checkpoint import QuantizationConfigError, load_codec, read_fp8
from moe_dist.quant.codecs import FP8, Codec, Fp8Block, Mxfp4
from moe_dist.quant.frozen import QuantizedLinear


class CheckpointError(RuntimeError):
    pass


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub name, fetched (config, safetensors, tokenizer)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as exc:  # offline, missing repo, auth: say which model and why
        raise CheckpointError(f"cannot find model {name_or_path!r} locally or on the hub: {exc}") from exc


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_config_path(name: str) -> Path | None:
    """The published config.json of a hub model the recipes name, shipped in moe_dist/models/configs."""
    path = SHIPPED_CONFIGS / (name.replace("/", "__") + ".json")
    return path if path.is_file() else None


def load_hf_config(name_or_path: str | os.PathLike):
    """A model's transformers config without its weights: a local dir's config.json, else the
    shipped copy of a published one (offline), else the hub's."""
    path = Path(name_or_path)
    if path.is_dir():
        return AutoConfig.from_pretrained(path)
    shipped = shipped_config_path(str(name_or_path))
    if shipped is not None:
        data = json.loads(shipped.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(str(name_or_path))
    except Exception as exc:  # offline, missing repo, auth
        raise CheckpointError(f"no config for model {name_or_path!r}: not a local dir, not shipped in "
                              f"{SHIPPED_CONFIGS}, and the hub said: {exc}") from exc


class SafetensorsIndex:
    """Tensor name -> file, over a single file or a sharded `model.safetensors.index.json`."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {k: directory / f for k, f in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files (only safetensors checkpoints are read)")
            self.file_of = {}
            for f in files:
                with safe_open(f, "pt") as fh:
                    self.file_of.update({k: f for k in fh.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def read(self, key: str, dtype: torch.dtype | None, index: int | None = None) -> torch.Tensor:
        """The tensor (in `dtype`, or as stored for None), or only row `index` of its first
        dimension (reads just that slice).

        The file is opened per read: pages read through safetensors' mmap count in the RSS
        until the file is closed, so keeping handles open would double a rank's peak (our
        copy plus the mapped pages). A header parse per tensor is cheap by comparison."""
        if key not in self.file_of:
            raise CheckpointError(f"{self.directory}: tensor {key!r} not found in the checkpoint")
        with safe_open(self.file_of[key], "pt") as handle:
            t = handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
        if dtype is not None and t.dtype in (FP8, torch.float8_e5m2) and dtype != t.dtype:
            raise CheckpointError(f"tensor {key!r} in {self.file_of[key]} is {t.dtype} and would be read as {dtype} "
                                  "without its scales: an FP8 weight needs its weight_scale_inv and the config's "
                                  "quantization_config (quant_method fp8, weight_block_size)")
        return t if dtype is None else t.to(dtype)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    name_or_path: str | os.PathLike,
    plan: AdapterPlan,
    ep_size: int = 1,
    placements: Mapping[int, ExpertPlacement] | None = None,
    lora: LoRAConfig = LoRAConfig(),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantize: str = "none",
) -> nn.Module:
    """Build the expert-parallel model from a local HF directory or hub name, reading only
    this rank's experts. Frozen base weights in `dtype` (bf16 on GPU, fp32 on CPU by default);
    adapters are fp32. A quantized checkpoint (FP8 block, MXFP4) keeps its quantized weights
    as shipped, computing in `dtype`; `quantize` (nf4, int8) quantizes an unquantized one's
    experts as they are read (moe_dist/quant)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or default_dtype(device)
    path = resolve_checkpoint(name_or_path)
    config = AutoConfig.from_pretrained(path)
    try:
        stored, expert_codec = load_codec(config, quantize, where=str(path / "config.json"))
    except QuantizationConfigError as exc:
        raise CheckpointError(str(exc)) from None
    spec = arch_spec(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ckpt = SafetensorsIndex(path)
    if isinstance(stored, Fp8Block):
        _keep_fp8_linears(model, spec, ckpt, stored, dtype)
    convert_model(model, plan, ep_size=ep_size, placements=placements, lora=lora, device=device, codec=expert_codec)
    _load_experts(model, spec, ckpt, dtype, stored)
    _load_dense(model, spec, ckpt, dtype, device)
    if isinstance(stored, Fp8Block):
        _load_fp8_linears(model, spec, ckpt, stored, device)
    _rebuild_meta_buffers(model, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no value for {leftover[:5]} ({len(leftover)} tensors)")
    return model


def _checkpoint_key(model_key: str, spec: ArchSpec, ckpt: SafetensorsIndex) -> str:
    """Checkpoint name of a non-expert tensor: the model name without our `.base` wrappers, or
    the name transformers' conversion mapping renames from (Mixtral hub checkpoints call the
    MoE block `block_sparse_moe`, PhiMoE the router `gate`)."""
    key = model_key.replace(".base.", ".")
    return next((k for k in spec.hub.checkpoint_candidates(key) if k in ckpt), key)


def _load_dense(model: nn.Module, spec: ArchSpec, ckpt: SafetensorsIndex, dtype, device) -> None:
    persistent = {n for n, _ in model.named_buffers() if _is_persistent(model, n)}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in list(model.named_parameters()) + [b for b in model.named_buffers() if b[0] in persistent]:
        if not tensor.is_meta:
            continue
        if tied and name == "lm_head.weight" and "lm_head.weight" not in ckpt:
            continue
        key = _checkpoint_key(name, spec, ckpt)
        want_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        want_dtype = want_dtype if "correction_bias" not in name else torch.float32
        parts = spec.hub.checkpoint_parts(name.replace(".base.", ".")) if key not in ckpt else None
        if parts is not None:  # stored in pieces (a Concatenate in transformers' conversion mapping)
            names, dim = parts
            keys = [next((k for k in cands if k in ckpt), cands[0]) for cands in names]
            value = torch.cat([ckpt.read(k, want_dtype) for k in keys], dim=dim).to(device)
        else:
            value = ckpt.read(key, want_dtype).to(device)
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{ckpt.directory}: {key!r} has shape {tuple(value.shape)}, model expects {tuple(tensor.shape)}")
        _set_tensor(model, name, value)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight


def _load_experts(model: nn.Module, spec: ArchSpec, ckpt: SafetensorsIndex, dtype, stored: Codec | None) -> None:
    layout = spec.layout
    for layer, block in moe_blocks(model, spec).items():
        experts: ExpertParallelExperts = block.experts
        F = experts.intermediate_size
        if isinstance(stored, Fp8Block):
            _load_fp8_experts(experts, spec, ckpt, layer, stored)
            continue
        if isinstance(stored, Mxfp4):
            _load_mxfp4_experts(experts, spec, ckpt, layer, dtype)
            continue
        fused, fused_down = (fused_checkpoint_key(spec, ckpt, layer, p) for p in ("gate_up_proj", "down_proj"))
        if fused is None and f"{spec.experts_path(layer)}.gate_up_proj_blocks" in ckpt:
            raise CheckpointError(
                f"{ckpt.directory}: layer {layer}'s experts are MXFP4 (gate_up_proj_blocks / _scales) but config.json "
                "has no quantization_config {\"quant_method\": \"mxfp4\"}")
        if experts.codec is not None:
            dtype = torch.float32  # quantized at load from the checkpoint's full precision
        with torch.no_grad():
            for slot, e in enumerate(experts.local_experts):
                if fused is not None and fused_down is not None:
                    gate_up = gate_up_to_canonical(ckpt.read(fused, dtype, index=e), layout)
                    down = down_to_canonical(ckpt.read(fused_down, dtype, index=e), layout)
                    if layout.biases:
                        bias_keys = [fused_checkpoint_key(spec, ckpt, layer, f"{p}_bias") for p in ("gate_up_proj", "down_proj")]
                        if None in bias_keys:
                            raise CheckpointError(f"{ckpt.directory}: layer {layer} has no expert biases "
                                                  f"'{spec.experts_path(layer)}.gate_up_proj_bias' / 'down_proj_bias'")
                        experts.gate_up_bias[slot].copy_(gate_up_bias_to_canonical(ckpt.read(bias_keys[0], dtype, index=e),
                                                                                   layout))
                        experts.down_bias[slot].copy_(ckpt.read(bias_keys[1], dtype, index=e))
                else:
                    g, u, d = (_hub_expert_key(spec, ckpt, layer, e, n) for n in spec.hub_expert_names)
                    gate_up = torch.cat([ckpt.read(g, dtype), ckpt.read(u, dtype)], dim=0)
                    down = ckpt.read(d, dtype)
                if gate_up.shape != experts.gate_up_proj.shape[1:] or down.shape != experts.down_proj.shape[1:]:
                    raise CheckpointError(
                        f"{ckpt.directory}: layer {layer} expert {e} has shapes {tuple(gate_up.shape)}/"
                        f"{tuple(down.shape)}, expected {tuple(experts.gate_up_proj.shape[1:])}/{tuple(experts.down_proj.shape[1:])} (F={F})"
                    )
                experts.load_base_("gate_up_proj", gate_up, slot)
                experts.load_base_("down_proj", down, slot)


def _load_fp8_experts(experts: ExpertParallelExperts, spec: ArchSpec, ckpt: SafetensorsIndex, layer: int,
                      codec: Fp8Block) -> None:
    """Each local expert's e4m3 gate / up / down and their block scales, as stored: gate and up
    stack into gate_up along rows, whole blocks each (F a multiple of the block's rows)."""
    F = experts.intermediate_size
    if F % codec.block[0]:
        raise CheckpointError(f"{ckpt.directory}: layer {layer}: expert intermediate size {F} is not a multiple of "
                              f"weight_block_size[0]={codec.block[0]}, so gate and up cannot share one gate_up stack")
    error = lambda msg: CheckpointError(f"{ckpt.directory}: {msg}")  # noqa: E731
    for slot, e in enumerate(experts.local_experts):
        g, u, d = (read_fp8(ckpt, _hub_expert_key(spec, ckpt, layer, e, n), codec, error) for n in spec.hub_expert_names)
        experts.load_base_parts_("gate_up_proj", {"weight": torch.cat([g[0], u[0]]),
                                                  "weight_scale_inv": torch.cat([g[1], u[1]])}, slot)
        experts.load_base_parts_("down_proj", {"weight": d[0], "weight_scale_inv": d[1]}, slot)


def _load_mxfp4_experts(experts: ExpertParallelExperts, spec: ArchSpec, ckpt: SafetensorsIndex, layer: int,
                        dtype) -> None:
    """gpt-oss: each local expert's packed blocks and exponents, rows put in canonical order
    (gate rows first: the stored rows interleave gate and up), biases in `dtype`."""
    path = spec.experts_path(layer)
    keys = {n: f"{path}.{n}" for n in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks",
                                        "down_proj_scales", "gate_up_proj_bias", "down_proj_bias")}
    missing = [k for k in keys.values() if k not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt.directory}: MXFP4 checkpoint without {missing[:3]}")
    rows = None
    with torch.no_grad():
        for slot, e in enumerate(experts.local_experts):
            parts = {n: ckpt.read(k, None, index=e) for n, k in keys.items() if not n.endswith("bias")}
            if rows is None:
                n_rows = parts["gate_up_proj_blocks"].shape[0]
                rows = gate_up_bias_to_canonical(torch.arange(n_rows, device="cpu"), spec.layout)
            experts.load_base_parts_("gate_up_proj", {"blocks": parts["gate_up_proj_blocks"][rows],
                                                      "scales": parts["gate_up_proj_scales"][rows]}, slot)
            experts.load_base_parts_("down_proj", {"blocks": parts["down_proj_blocks"],
                                                   "scales": parts["down_proj_scales"]}, slot)
            experts.gate_up_bias[slot].copy_(gate_up_bias_to_canonical(ckpt.read(keys["gate_up_proj_bias"], dtype,
                                                                                 index=e), spec.layout))
            experts.down_bias[slot].copy_(ckpt.read(keys["down_proj_bias"], dtype, index=e))


def _keep_fp8_linears(model: nn.Module, spec: ArchSpec, ckpt: SafetensorsIndex, codec: Fp8Block, dtype) -> None:
    """Every nn.Linear whose weight the checkpoint ships in FP8 (it has a weight_scale_inv)
    becomes a QuantizedLinear on the meta device, before LoRA wraps the attention ones."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        key = _checkpoint_key(f"{name}.weight", spec, ckpt)
        if key[: -len("weight")] + "weight_scale_inv" not in ckpt:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                QuantizedLinear(codec, module.in_features, module.out_features, module.bias is not None, dtype,
                                device="meta"))


def _load_fp8_linears(model: nn.Module, spec: ArchSpec, ckpt: SafetensorsIndex, codec: Fp8Block, device) -> None:
    error = lambda msg: CheckpointError(f"{ckpt.directory}: {msg}")  # noqa: E731
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            key = _checkpoint_key(f"{name}.weight", spec, ckpt)
            w, s = read_fp8(ckpt, key, codec, error)
            if tuple(w.shape) != (module.out_features, module.in_features):
                raise error(f"{key!r} has shape {tuple(w.shape)}, model expects {(module.out_features, module.in_features)}")
            module.weight._buffers.update(weight=w.to(device), weight_scale_inv=s.to(device))


def fused_checkpoint_key(spec: ArchSpec, ckpt: SafetensorsIndex, layer: int, param: str) -> str | None:
    """The checkpoint name of a layer's fused (E, ...) expert tensor, if the checkpoint has one."""
    return next((k for k in spec.hub.checkpoint_candidates(f"{spec.experts_path(layer)}.{param}") if k in ckpt), None)


def _hub_expert_key(spec: ArchSpec, ckpt: SafetensorsIndex, layer: int, expert: int, name: str) -> str:
    for key in spec.hub.checkpoint_candidates(f"{spec.experts_path(layer)}.{expert}.{name}.weight"):
        if key in ckpt:
            return key
    raise CheckpointError(
        f"{ckpt.directory}: expert {expert} of layer {layer} not found: neither the fused "
        f"'{spec.experts_path(layer)}.gate_up_proj' nor per-expert "
        f"'{spec.hub.checkpoint_candidates(f'{spec.experts_path(layer)}.{expert}.{name}.weight')[-1]}' "
        f"({spec.model_type} checkpoints name experts {spec.hub_expert_names}, per transformers' conversion mapping)"
    )


def _is_persistent(model: nn.Module, name: str) -> bool:
    mod_name, _, buf = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    return buf not in module._non_persistent_buffers_set


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) are computed at construction, not stored:
    rebuild the modules that own them on the real device."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            with torch.device(device):
                fresh = type(module)(config=module.config)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
