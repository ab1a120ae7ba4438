"""Run configuration: a dataclass loaded from a YAML recipe plus `key=value` overrides.

Errors name the offending key (`unknown key 'lora.rnak'`, `ep_size (3) must divide ...`)
and are raised before any process group is created.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class LoRASection:
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    attention: bool = True  # LoRA on q,k,v,o too


@dataclass
class RunConfig:
    model: str = "embedded:tiny-olmoe"  # a local HF dir, a hub name, or the embedded default
    ep_size: int = 0  # 0 = the whole world
    steps: int = 60
    lr: float = 1e-2
    seq_len: int = 64
    micro_batch: int = 8
    seed: int = 0
    ds_config: str = "ds_configs/zero2.json"
    output_dir: str = "outputs/run"
    cache_dir: str = ".cache/moe_dist"
    lora: LoRASection = field(default_factory=LoRASection)

    def validate(self, world_size: int) -> None:
        ep = self.ep_size or world_size
        if world_size % ep:
            raise ConfigError(f"ep_size ({ep}) must divide the world size ({world_size})")
        for name in ("steps", "seq_len", "micro_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lora.rank <= 0:
            raise ConfigError(f"lora.rank must be > 0, got {self.lora.rank}")


def _coerce(value: Any, typ: type, key: str) -> Any:
    if typ is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    try:
        return typ(yaml.safe_load(value)) if isinstance(value, str) and typ is not str else typ(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from exc


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in hints:
            raise ConfigError(f"unknown key {key!r}; known: {sorted(hints)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def load_config(recipe: str | None, overrides: list[str]) -> RunConfig:
    cfg = RunConfig()
    if recipe:
        data = yaml.safe_load(Path(recipe).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{recipe}: a recipe must be a mapping")
        _apply(cfg, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        nested: dict = {}
        cur = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        _apply(cfg, nested)
    return cfg
