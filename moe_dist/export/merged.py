"""`merged`: a complete HF checkpoint with every adapter folded in (W + s B A), written shard by
shard from the base checkpoint's own shards, in the base's own layout and tensor names.

Each base shard is streamed tensor by tensor into a shard of the same name (ShardWriter), so
peak memory is about the largest single tensor plus one expert's delta, not a shard and never
the model. Expert weights are recognised in both layouts transformers reads: the fused 3-D
`...experts.gate_up_proj` / `down_proj` (E x 2F x D gate rows first, E x D x F) and the
per-expert hub names (`model.layers.{l}.{block}.experts.{e}.{w1|gate_proj}.weight`, block
`block_sparse_moe` for Mixtral), as transformers' conversion mapping names them. Every adapter of the plan must land on a tensor: one that finds
none stops the export (the silent drop users meet elsewhere is an error here).

A quantized base (FP8 block, gpt-oss MXFP4: moe_dist/quant) is written dequantized, as a plain
checkpoint: every quantized tensor, adapted or not, becomes a dense one in the export dtype
(default: the config's `dtype`, bf16 for the hub's FP8 / MXFP4 models), its scales are dropped
and `quantization_config` leaves config.json. FP8 weights keep their names (no
`weight_scale_inv` left); MXFP4 `*_blocks` / `*_scales` become the dense `gate_up_proj` /
`down_proj` in gpt-oss's stored layout (E x in x out), what transformers' own dequantize path
loads. Dequantizing is the codec's (transformers' `_dequantize_fp8_weight` /
`convert_moe_packed_tensors`) in fp32, the delta is added in fp64 and rounded once, one expert at
a time (peak: one dense tensor in the export dtype plus one expert in fp64). The result is not
re-quantized: block FP8 keeps a delta only where it is large next to its own rounding of W
(bench/requant_delta.py); an FP8 server takes the `peft` / `vllm` adapter on the base as shipped.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from moe_dist.export.base import BaseModel
from moe_dist.export.safetensors_stream import DTYPE_NAMES, ShardWriter, read_tensor, tensor_specs
from moe_dist.export.trained import ExportError, TrainedCheckpoint
from moe_dist.models.layout import down_delta_to_storage, gate_up_delta_to_storage
from moe_dist.quant.checkpoint import QuantizationConfigError, checkpoint_codec
from moe_dist.quant.codecs import Fp8Block, Mxfp4

log = logging.getLogger(__name__)

SKIP_FILES = re.compile(r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack)$")
HALVES = {"gate_proj": ("gate_proj",), "up_proj": ("up_proj",), "gate_up_proj": ("gate_proj", "up_proj"),
          "down_proj": ("down_proj",)}
FLOATS = ("F32", "F16", "BF16", "F64")


class _Merger:
    """Knows which checkpoint tensors carry adapters and adds their deltas; records what it did.

    The checkpoint names come from the architecture (moe_dist.models.arch): each model tensor's
    own name and the names transformers' conversion mapping renames from, so both the fused
    and the per-expert hub layouts are recognised by lookup, not by pattern."""

    def __init__(self, ckpt: TrainedCheckpoint, base: BaseModel):
        self.ckpt, self.base = ckpt, base
        self.applied: set[tuple] = set()
        self.targets: dict[str, tuple] = {}
        spec = base.spec
        halves = ("gate_proj", "up_proj", "down_proj")
        for layer in ckpt.expert_layers():
            path = spec.experts_path(layer)
            for param in ("gate_up_proj", "down_proj"):
                for key in spec.hub.checkpoint_candidates(f"{path}.{param}"):
                    self.targets[key] = ("fused", layer, param)
            for e in range(base.num_experts):
                for half, name in zip(halves, spec.hub_expert_names):
                    for key in spec.hub.checkpoint_candidates(f"{path}.{e}.{name}.weight"):
                        self.targets[key] = ("expert", layer, e, half)
        for (layer, proj) in ckpt.plan.attention_ranks:
            attr = spec.attention_module(layer) if spec is not None else "self_attn"
            for key in (spec.hub.checkpoint_candidates(f"model.layers.{layer}.{attr}.{proj}.weight") if spec is not None
                        else [f"model.layers.{layer}.{attr}.{proj}.weight"]):
                self.targets[key] = ("attention", layer, proj)

    def transform(self, name: str, W: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """W with its adapters merged (in fp64, rounded once to `dtype`, default W's), or None if
        `name` carries none. A fused stack is merged in place, one expert at a time, in W's dtype."""
        target = self.targets.get(name)
        if target is None:
            return None
        kind, layer = target[0], target[1]
        if kind == "fused":
            changed = False
            for e in range(self.base.num_experts):  # the fp64 copy is one expert's weight
                delta = self.expert_delta(name, e)
                if delta is not None:
                    W[e] = (W[e].double() + delta).to(W.dtype)
                    changed = True
            return W if changed else None
        if kind == "expert":
            f = self.ckpt.expert_factors(layer, target[2], target[3], self.base.hidden, self.base.intermediate)
            if f is None:
                return None
            self.applied.add((layer, target[2], target[3]))
            return (W.double() + f.delta()).to(dtype or W.dtype)
        f = self.ckpt.attention_factors(layer, target[2])
        if tuple(W.shape) != (f.B_OR.shape[0], f.A_RI.shape[1]):
            raise ExportError(f"{name}: base weight {tuple(W.shape)}, adapter delta "
                              f"{(f.B_OR.shape[0], f.A_RI.shape[1])} ({self.ckpt.path})")
        self.applied.add((layer, target[2]))
        return (W.double() + f.delta()).to(dtype or W.dtype)

    def expert_delta(self, name: str, e: int) -> torch.Tensor | None:
        """Expert e's fp64 delta for the fused stack `name`, in the stack's stored layout (None:
        no adapter there)."""
        target = self.targets.get(name)
        if target is None or target[0] != "fused":
            return None
        layer, param = target[1], target[2]
        f = self.ckpt.expert_factors(layer, e, param, self.base.hidden, self.base.intermediate)
        if f is None:
            return None
        self.applied.update((layer, e, h) for h in HALVES[param])
        to_storage = down_delta_to_storage if param == "down_proj" else gate_up_delta_to_storage
        return to_storage(f.delta(), self.base.spec.layout)

    def check_all_applied(self) -> None:
        plan = self.ckpt.plan
        want = {(l, e, h) for (l, e, p) in plan.expert_ranks for h in HALVES[p]} | set(plan.attention_ranks)
        missing = sorted(want - self.applied, key=str)
        if missing:
            raise ExportError(f"{self.base.dir}: {len(missing)} adapters found no weight to merge into, e.g. "
                              f"{missing[:3]} (a checkpoint layout this exporter does not know); nothing was written")


class _Dequantizer:
    """Which plain tensor each tensor of a base shard becomes: as is, or (a quantized base) the
    dense weight of an FP8 weight + `weight_scale_inv` or of MXFP4 `*_blocks` + `*_scales`."""

    def __init__(self, base: BaseModel, weight_map: dict[str, str], dtype: torch.dtype | None):
        try:
            self.codec = checkpoint_codec(base.config, str(base.dir / "config.json"))
        except QuantizationConfigError as exc:
            raise ExportError(str(exc)) from None
        self.dir, self.weight_map = base.dir, weight_map
        self.dtype = dtype or _config_dtype(base.config)  # of the dequantized tensors
        self.tensors = self.dropped = 0

    def shard(self, src: Path, specs: dict) -> dict[str, tuple[str, tuple[int, ...], dict[str, str] | None]]:
        """{output name: (dtype name, shape, {codec part: checkpoint name} or None: as is)}, in
        the shard's order; scale tensors are dropped."""
        fp8, mx = isinstance(self.codec, Fp8Block), isinstance(self.codec, Mxfp4)
        out = {}
        for name, (dt, shape) in specs.items():
            if (fp8 and name.endswith("_scale_inv") and name[: -len("_scale_inv")] in self.weight_map) or \
                    (mx and name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in self.weight_map):
                self.dropped += 1
            elif dt.startswith("F8"):
                if not (fp8 and dt == "F8_E4M3" and name + "_scale_inv" in self.weight_map):
                    raise ExportError(f"{src}: tensor {name!r} is {dt} without a '{name}_scale_inv' and a block-FP8 "
                                      f"quantization_config in {self.dir / 'config.json'}: it cannot be dequantized")
                out[name] = (DTYPE_NAMES[self.dtype], shape, {"weight": name, "weight_scale_inv": name + "_scale_inv"})
            elif mx and name.endswith("_blocks"):
                stem = name[: -len("_blocks")]
                if stem + "_scales" not in self.weight_map or len(shape) != 4:
                    raise ExportError(f"{src}: MXFP4 {name!r} {shape}: expected (E, out, in/32, 16) with a "
                                      f"{stem + '_scales'!r}")
                E, O, G, _ = shape  # noqa: E741
                out[stem] = (DTYPE_NAMES[self.dtype], (E, G * Mxfp4.BLOCK, O),  # gpt-oss's stored (E, in, out)
                             {"blocks": name, "scales": stem + "_scales"})
            else:
                out[name] = (dt, shape, None)
        return out

    def dense(self, name: str, shape: tuple[int, ...], parts: dict[str, str], merger: _Merger
              ) -> tuple[torch.Tensor, bool]:
        """The dequantized tensor `name` with its adapters merged, and whether it had any. A
        stack is done one expert at a time (read, dequantized in fp32, merged, rounded)."""
        self.tensors += 1

        def read(index=None):
            return {p: read_tensor(self.dir / self.weight_map[k], k, index) for p, k in parts.items()}

        if len(shape) == 2:
            W = self.codec.dequantize(read(), *shape, torch.float32)
            merged = merger.transform(name, W, self.dtype)
            return (W.to(self.dtype), False) if merged is None else (merged, True)
        out, changed = torch.empty(shape, dtype=self.dtype, device="cpu"), False
        for e in range(shape[0]):
            if isinstance(self.codec, Mxfp4):  # (out, in) -> gpt-oss's stored (in, out)
                W = self.codec.dequantize(read(e), shape[2], shape[1], torch.float32).transpose(0, 1)
            else:
                W = self.codec.dequantize(read(e), shape[1], shape[2], torch.float32)
            delta = merger.expert_delta(name, e)
            out[e] = W if delta is None else W.double() + delta
            changed |= delta is not None
        return out, changed

    def note(self) -> str | None:
        if self.codec is None:
            return None
        block = f" {list(self.codec.block)}" if isinstance(self.codec, Fp8Block) else ""
        return (f"the {self.codec.name}{block} base was dequantized: {self.tensors} quantized tensors written as "
                f"{str(self.dtype).removeprefix('torch.')}, {self.dropped} scale tensors dropped, quantization_config "
                "removed from config.json (a plain checkpoint; not re-quantized)")


def _config_dtype(config) -> torch.dtype:
    """The base config's floating dtype (transformers 5 `dtype`, older `torch_dtype`), else bf16."""
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else name
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def export_merged(ckpt: TrainedCheckpoint, base: BaseModel, out: Path, dtype: torch.dtype | None = None) -> dict:
    """Write the merged checkpoint into `out` (an empty staging dir). Returns counts (and, for
    a quantized base, a note saying it was dequantized)."""
    merger = _Merger(ckpt, base)
    weight_map, files = base.weight_files()
    deq = _Dequantizer(base, weight_map, dtype)
    out_map: dict[str, str] = {}
    total, changed = 0, 0
    for src in files:
        specs, meta = tensor_specs(src)
        layout = deq.shard(src, specs)
        if dtype is not None:
            layout = {k: ((DTYPE_NAMES[dtype] if d in FLOATS else d), s, p) for k, (d, s, p) in layout.items()}
        if not layout:  # a shard of scales only: nothing of it is left
            continue
        meta = meta or {"format": "pt"}
        if deq.codec is not None:
            meta = {**meta, "moe_dist_dequantized_from": deq.codec.name}
        writer = ShardWriter(out / src.name, {k: (d, s) for k, (d, s, _) in layout.items()}, meta)
        for name, (_d, shape, parts) in layout.items():
            if parts is not None:
                W, was_merged = deq.dense(name, shape, parts, merger)
            else:
                W = read_tensor(src, name)
                merged = merger.transform(name, W)
                was_merged, W = merged is not None, W if merged is None else merged
                if dtype is not None and W.is_floating_point():
                    W = W.to(dtype)
            changed += was_merged
            writer.write(name, W)
            out_map[name] = src.name
            total += W.numel() * W.element_size()
            del W
        writer.close()
    merger.check_all_applied()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(out_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in sorted(base.dir.iterdir()):
        if f.is_file() and not SKIP_FILES.search(f.name):
            shutil.copy2(f, out / f.name)
    if dtype is not None or deq.codec is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("quantization_config", None)
        name = str(dtype or deq.dtype).removeprefix("torch.")
        cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    result = {"tensors_merged": changed, "bytes": total, "shards": len(set(out_map.values()))}
    note = deq.note()
    if note:
        log.warning("merged export: %s", note)
        result.update(note=note, dequantized=deq.tensors)
    return result
