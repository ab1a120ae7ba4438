"""The base model an export applies to: its config, architecture and checkpoint files, and
the check that a checkpoint's plan fits it (so a wrong `--base` fails naming the field, before
anything is written)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moe_dist.export.trained import ExportError, TrainedCheckpoint
from moe_dist.models.arch import ArchSpec, UnsupportedModelError, arch_spec


@dataclass(frozen=True)
class BaseModel:
    dir: Path
    config: object  # transformers PretrainedConfig
    spec: ArchSpec | None  # None: a dense model (DMEP's LoRA-MoE only)
    num_experts: int
    hidden: int
    intermediate: int
    moe_layers: tuple[int, ...]

    def weight_files(self) -> tuple[dict[str, str], list[Path]]:
        """(tensor name -> file name, the files in order) of the base's safetensors checkpoint."""
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            return weight_map, [self.dir / f for f in files]
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{self.dir}: no *.safetensors files (only safetensors base checkpoints are exported)")
        from moe_dist.export.safetensors_stream import tensor_specs

        weight_map = {k: f.name for f in files for k in tensor_specs(f)[0]}
        return weight_map, files


def describe_base(directory: Path) -> BaseModel:
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise ExportError(f"base model {directory}: no config.json")
    config = AutoConfig.from_pretrained(directory)
    try:
        spec = arch_spec(config)
    except UnsupportedModelError:
        return BaseModel(directory, config, None, 0, config.hidden_size, 0, ())
    return BaseModel(directory, config, spec, spec.num_experts, spec.hidden, spec.intermediate, spec.moe_layers)


def check_plan_fits(ckpt: TrainedCheckpoint, base: BaseModel) -> None:
    """Every adapter of the plan has a place of the right size in the base model."""
    cfg_file = base.dir / "config.json"
    recorded = ckpt.state.get("base_shape") or {}
    for field, value in recorded.items():
        have = getattr(base.config, field, None)
        if have != value:
            raise ExportError(f"base model {cfg_file}: {field} is {have!r}, the checkpoint {ckpt.path} was trained on "
                              f"{value!r} (wrong --base?)")
    plan = ckpt.plan
    if plan.expert_ranks and base.spec is None:
        raise ExportError(f"base model {cfg_file}: model_type {base.config.model_type!r} is not a supported MoE, but "
                          f"{ckpt.path}/plan.json has expert adapters")
    for (layer, expert, proj) in plan.expert_ranks:
        if layer not in base.moe_layers:
            raise ExportError(f"{ckpt.path}/plan.json: expert adapter on layer {layer}, which is not a MoE layer of "
                              f"{cfg_file} (MoE layers {list(base.moe_layers)})")
        if expert >= base.num_experts:
            raise ExportError(f"{ckpt.path}/plan.json: layer {layer} expert {expert}, but {cfg_file} has "
                              f"{base.spec.num_experts_attr}={base.num_experts}")
    for (layer, proj) in plan.attention_ranks:
        if layer >= base.config.num_hidden_layers:
            raise ExportError(f"{ckpt.path}/plan.json: attention adapter on layer {layer}, {cfg_file} has "
                              f"num_hidden_layers={base.config.num_hidden_layers}")
    for (layer, _path) in plan.lora_moe:
        if layer >= base.config.num_hidden_layers:
            raise ExportError(f"{ckpt.path}/plan.json: LoRA-MoE on layer {layer}, {cfg_file} has "
                              f"num_hidden_layers={base.config.num_hidden_layers}")
    # Sizes: the first adapter of each projection against the base's dimensions.
    seen = set()
    for (layer, expert, proj) in plan.expert_ranks:
        if proj not in seen:
            seen.add(proj)
            target = "down_proj" if proj == "down_proj" else "gate_up_proj"
            ckpt.expert_factors(layer, expert, target, base.hidden, base.intermediate)
