"""`merged`: a complete HF checkpoint with every adapter folded in (W + s B A), written shard by
shard from the base checkpoint's own shards, in the base's own layout and tensor names.

Each base shard is streamed tensor by tensor into a shard of the same name (ShardWriter), so
peak memory is about the largest single tensor plus one expert's delta, not a shard and never
the model. Expert weights are recognised in both layouts transformers reads: the fused 3-D
`...experts.gate_up_proj` / `down_proj` (E x 2F x D gate rows first, E x D x F) and the
per-expert hub names (`model.layers.{l}.{block}.experts.{e}.{w1|gate_proj}.weight`, block
`block_sparse_moe` for Mixtral), as transformers' conversion mapping names them. Every adapter of the plan must land on a tensor: one that finds
none stops the export (the silent drop users meet elsewhere is an error here).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from moe_dist.export.base import BaseModel
from moe_dist.export.safetensors_stream import DTYPE_NAMES, ShardWriter, read_tensor, tensor_specs
from moe_dist.export.trained import ExportError, TrainedCheckpoint
from moe_dist.models.layout import down_delta_to_storage, gate_up_delta_to_storage

SKIP_FILES = re.compile(r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack)$")
HALVES = {"gate_proj": ("gate_proj",), "up_proj": ("up_proj",), "gate_up_proj": ("gate_proj", "up_proj"),
          "down_proj": ("down_proj",)}


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

    def transform(self, name: str, W: torch.Tensor) -> torch.Tensor | None:
        """W with its adapters merged (in fp64, rounded once to W's dtype), or None if `name`
        carries none."""
        target = self.targets.get(name)
        if target is None:
            return None
        D, F = self.base.hidden, self.base.intermediate
        kind, layer = target[0], target[1]
        if kind == "fused":
            param = target[2]
            todo = [(e, f) for e in range(self.base.num_experts)
                    if (f := self.ckpt.expert_factors(layer, e, param, D, F)) is not None]
            layout = self.base.spec.layout
            to_storage = down_delta_to_storage if param == "down_proj" else gate_up_delta_to_storage
            for e, f in todo:  # one expert at a time: the fp64 copy is one expert's weight
                W[e] = (W[e].double() + to_storage(f.delta(), layout)).to(W.dtype)
                self.applied.update((layer, e, h) for h in (("down_proj",) if param == "down_proj" else
                                                            ("gate_proj", "up_proj")))
            return W if todo else None
        if kind == "expert":
            f = self.ckpt.expert_factors(layer, target[2], target[3], D, F)
            if f is None:
                return None
            self.applied.add((layer, target[2], target[3]))
            return (W.double() + f.delta()).to(W.dtype)
        f = self.ckpt.attention_factors(layer, target[2])
        if tuple(W.shape) != (f.B_OR.shape[0], f.A_RI.shape[1]):
            raise ExportError(f"{name}: base weight {tuple(W.shape)}, adapter delta "
                              f"{(f.B_OR.shape[0], f.A_RI.shape[1])} ({self.ckpt.path})")
        self.applied.add((layer, target[2]))
        return (W.double() + f.delta()).to(W.dtype)

    def check_all_applied(self) -> None:
        plan = self.ckpt.plan
        want = {(l, e, h) for (l, e, p) in plan.expert_ranks for h in HALVES[p]} | set(plan.attention_ranks)
        missing = sorted(want - self.applied, key=str)
        if missing:
            raise ExportError(f"{self.base.dir}: {len(missing)} adapters found no weight to merge into, e.g. "
                              f"{missing[:3]} (a checkpoint layout this exporter does not know); nothing was written")


def export_merged(ckpt: TrainedCheckpoint, base: BaseModel, out: Path, dtype: torch.dtype | None = None) -> dict:
    """Write the merged checkpoint into `out` (an empty staging dir). Returns counts."""
    if getattr(base.config, "quantization_config", None):
        raise ExportError(f"{base.dir}: a quantized base ({base.config.quantization_config.get('quant_method', '?')}) "
                          "cannot be merged into; export --format peft instead")
    merger = _Merger(ckpt, base)
    weight_map, files = base.weight_files()
    out_dtype = DTYPE_NAMES[dtype] if dtype is not None else None
    total, changed = 0, 0
    for src in files:
        specs, meta = tensor_specs(src)
        if out_dtype:
            specs = {k: ((out_dtype if d in ("F32", "F16", "BF16", "F64") else d), s) for k, (d, s) in specs.items()}
        writer = ShardWriter(out / src.name, specs, meta or {"format": "pt"})
        for name in specs:
            W = read_tensor(src, name)
            merged = merger.transform(name, W)
            if merged is not None:
                changed += 1
                W = merged
            if dtype is not None and W.is_floating_point():
                W = W.to(dtype)
            writer.write(name, W)
            total += W.numel() * W.element_size()
            del W, merged
        writer.close()
    merger.check_all_applied()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in sorted(base.dir.iterdir()):
        if f.is_file() and not SKIP_FILES.search(f.name):
            shutil.copy2(f, out / f.name)
    if dtype is not None:
        cfg = json.loads((out / "config.json").read_text())
        name = str(dtype).removeprefix("torch.")
        cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"tensors_merged": changed, "bytes": total, "shards": len(files)}
