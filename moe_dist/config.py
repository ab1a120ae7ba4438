"""Run configuration: a dataclass loaded from a YAML recipe plus `key=value` overrides.

Errors name the offending key (`unknown key 'lora.rnak'`, `ep_size (3) must divide ...`)
and are raised before any process group is created.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from moe_dist.plan import EXPERT_PROJECTIONS


class ConfigError(ValueError):
    pass


@dataclass
class LoRASection:
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    attention: bool = True  # LoRA on the attention projections too
    # Which attention projections: "" = the architecture's default (q,k,v,o; DeepSeek's MLA
    # q_a/q_b/kv_a/kv_b/o; ...), or comma-separated names, taken in every layer that has them.
    attention_targets: str = ""
    # Expert projections that get adapters: gate_proj,up_proj,down_proj (one adapter each) or
    # gate_up_proj,down_proj (one adapter on the fused gate|up weight, as PEFT's target_parameters).
    expert_targets: str = "gate_proj,up_proj,down_proj"

    def expert_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.expert_targets.split(",") if t.strip())

    def attention_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.attention_targets.split(",") if t.strip())


@dataclass
class DataSection:
    train: str = "embedded:arithmetic"  # hub name, local json/jsonl/parquet file or dir, or embedded:arithmetic
    eval: str = "embedded:arithmetic"  # where the held-out split comes from ("" = no evaluation)
    subset: str = ""  # a hub dataset's configuration name (load_dataset's second argument)
    train_split: str = "train"
    eval_split: str = "test"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"  # chat rows, used when the prompt column is absent
    seq_len: int = 128
    packing: bool = True  # pack documents to seq_len; no attention across documents


@dataclass
class TrainSection:
    steps: int = 150  # optimizer steps
    micro_batch: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    log_every: int = 5


@dataclass
class EvalSection:
    every: int = 0  # evaluate every N steps (0 = before and after training only)
    samples: int = 200  # held-out prompts (0 = the whole split)
    max_new_tokens: int = 40
    batch_size: int = 32
    before: bool = True  # also measure the base model


@dataclass
class CheckpointSection:
    every: int = 0  # save every N steps (0 = only the final one)
    keep: int = 2  # newest complete checkpoints kept
    resume: str = ""  # "" (fresh), "auto" (newest complete under output_dir), or a step-N directory


@dataclass
class HelloraSection:
    """method: hellora. Profile routing for `profile_steps` micro-batches of training data
    (forward only, not trained on), then LoRA on each layer's hot experts only."""

    profile_steps: int = 20
    selection: str = "top_k"  # top_k | coverage
    top_k: int = 2  # hot experts per layer (selection: top_k)
    coverage: float = 0.2  # share of routed slots the hot set must cover (selection: coverage)


@dataclass
class HelloriSection:
    """method: hellori = hellora placement (the hellora section) + LoRI adapters."""

    stage1_steps: int = 50  # dense-B steps before the mask is taken
    sparsity: float = 0.9  # share of B entries masked out
    stage2_lr_scale: float = 10.0


@dataclass
class DmepSection:
    """method: dmep (see moe_dist/methods/dmep.py for the choices and their reasons)."""

    num_experts: int = 8  # LoRA experts per target module (rank: lora.rank)
    top_k: int = 2
    targets: str = "auto"  # auto, or comma-separated paths in a layer: "self_attn.q_proj,mlp.up_proj"
    lb_coef: float = 0.01  # load-balancing loss weight until the last prune point
    prune_start: int = 40  # first prune point (step)
    prune_interval: int = 20
    prune_times: int = 2  # prune points: prune_start + i * prune_interval, i < prune_times
    util_threshold: float = 0.8  # prune below util_threshold / N of the module's selections


@dataclass
class EpngSection:
    """method: epng (see moe_dist/methods/epng.py for the choices and their reasons)."""

    warmup_steps: int = 20  # first prune/grow after this many steps
    interval: int = 20  # then every `interval` steps
    stop_step: int = 0  # no updates from this step on (0 = until the end)
    prune_ratio: float = 0.25  # of the adapted experts, per update
    grow_ratio: float = 0.25  # of the adapted experts receive the freed rank
    decay: float = 0.9  # importance EMA
    rank_unit: int = 4  # rank granularity of growth
    max_rank: int = 64


@dataclass
class ExportSection:
    """Export the final checkpoint when training ends (launch/export.py does it for any checkpoint)."""

    formats: list[str] = field(default_factory=list)  # any of merged, peft, vllm, moe_dist
    dir: str = ""  # default: output_dir/export; each format goes to dir/<format>
    dtype: str = ""  # merged weights' dtype: "" (the base's), bf16, fp16, fp32


@dataclass
class RepartitionSection:
    """Where experts live across expert-parallel ranks (moe_dist/parallel/balance.py and
    moe_dist/train/repartition.py). Nothing to do at ep_size 1."""

    enabled: bool = True  # HELLoRA: build with hot experts spread; EPnG: rebalance with every prune/grow
    every: int = 0  # also measure the imbalance every N steps ... (0 = off)
    threshold: float = 1.10  # ... and move when max/mean per-rank expected cost exceeds this
    force_step: int = 0  # move to the balanced placement at this step whatever the imbalance (0 = never)


@dataclass
class RunConfig:
    model: str = "embedded:tiny-olmoe"  # a local HF dir, a hub name, or the embedded default
    method: str = "lora"  # lora: adapters on every expert (+ attention)
    ep_size: int = 0  # 0 = the whole world
    seed: int = 0
    ds_config: str = "ds_configs/zero2.json"
    output_dir: str = "outputs/run"
    cache_dir: str = ".cache/moe_dist"
    embedded_pretrain_steps: int = -1  # -1 = the embedded model's default
    dist_timeout_s: int = 900  # a collective that waits longer than this ends the job
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    hellora: HelloraSection = field(default_factory=HelloraSection)
    epng: EpngSection = field(default_factory=EpngSection)
    hellori: HelloriSection = field(default_factory=HelloriSection)
    dmep: DmepSection = field(default_factory=DmepSection)
    repartition: RepartitionSection = field(default_factory=RepartitionSection)
    export: ExportSection = field(default_factory=ExportSection)

    def validate(self, world_size: int, num_experts: int | None = None) -> None:
        """Impossible combinations, named by key, before any process-group work."""
        ep = self.ep_size or world_size
        if self.ep_size < 0:
            raise ConfigError(f"ep_size must be >= 0, got {self.ep_size}")
        if world_size % ep:
            raise ConfigError(f"ep_size ({ep}) must divide the world size ({world_size})")
        if num_experts is not None and num_experts % ep:
            raise ConfigError(f"ep_size ({ep}) must divide the model's expert count ({num_experts})")
        for key in ("train.steps", "train.micro_batch", "train.grad_accum", "train.log_every", "data.seq_len",
                    "lora.rank", "eval.max_new_tokens", "eval.batch_size", "checkpoint.keep"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(getattr(self, section), name)}")
        for key in ("train.lr", "train.warmup_steps", "train.weight_decay", "train.grad_clip", "eval.every",
                    "eval.samples", "checkpoint.every"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(getattr(self, section), name)}")
        if not 0 <= self.train.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.train.min_lr_ratio}")
        if self.train.warmup_steps > self.train.steps:
            raise ConfigError(f"train.warmup_steps ({self.train.warmup_steps}) exceeds train.steps ({self.train.steps})")
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {sorted(METHODS)}")
        if self.method == "dmep":
            d = self.dmep
            if not 0 < d.top_k <= d.num_experts:
                raise ConfigError(f"dmep.top_k ({d.top_k}) must be in 1..dmep.num_experts ({d.num_experts})")
            if d.prune_times < 0 or d.prune_interval <= 0 or d.prune_start <= 0:
                raise ConfigError("dmep.prune_start and dmep.prune_interval must be > 0, dmep.prune_times >= 0")
            if d.util_threshold < 0 or d.lb_coef < 0:
                raise ConfigError("dmep.util_threshold and dmep.lb_coef must be >= 0")
        if self.method == "hellori":
            if not 0 < self.hellori.stage1_steps < self.train.steps:
                raise ConfigError(f"hellori.stage1_steps ({self.hellori.stage1_steps}) must be in 1..train.steps-1")
            if not 0 <= self.hellori.sparsity < 1:
                raise ConfigError(f"hellori.sparsity must be in [0, 1), got {self.hellori.sparsity}")
        if self.method in ("hellora", "hellori"):
            h = self.hellora
            if h.selection not in ("top_k", "coverage"):
                raise ConfigError(f"hellora.selection must be 'top_k' or 'coverage', got {h.selection!r}")
            if h.profile_steps <= 0:
                raise ConfigError(f"hellora.profile_steps must be > 0, got {h.profile_steps}")
            if h.selection == "top_k" and not 0 < h.top_k <= (num_experts or h.top_k):
                raise ConfigError(f"hellora.top_k must be in 1..{num_experts} (the expert count), got {h.top_k}")
            if h.selection == "coverage" and not 0 < h.coverage <= 1:
                raise ConfigError(f"hellora.coverage must be in (0, 1], got {h.coverage}")
        if self.method == "epng":
            g = self.epng
            for name in ("prune_ratio", "grow_ratio"):
                if not 0 <= getattr(g, name) < 1:
                    raise ConfigError(f"epng.{name} must be in [0, 1), got {getattr(g, name)}")
            if not 0 <= g.decay < 1:
                raise ConfigError(f"epng.decay must be in [0, 1), got {g.decay}")
            if g.interval <= 0 or g.rank_unit <= 0:
                raise ConfigError("epng.interval and epng.rank_unit must be > 0")
            if self.lora.rank % g.rank_unit:
                raise ConfigError(f"lora.rank ({self.lora.rank}) must be a multiple of epng.rank_unit ({g.rank_unit})")
            if g.max_rank < self.lora.rank:
                raise ConfigError(f"epng.max_rank ({g.max_rank}) is below lora.rank ({self.lora.rank})")
        targets = self.lora.expert_target_list()
        unknown = [t for t in targets if t not in EXPERT_PROJECTIONS]
        if unknown or not targets or ("gate_up_proj" in targets and {"gate_proj", "up_proj"} & set(targets)):
            raise ConfigError(f"lora.expert_targets: {self.lora.expert_targets!r} must be comma-separated names from "
                              f"{EXPERT_PROJECTIONS}, with gate_up_proj or gate_proj/up_proj, not both")
        r = self.repartition
        if r.every < 0 or r.force_step < 0:
            raise ConfigError("repartition.every and repartition.force_step must be >= 0")
        if r.threshold < 1:
            raise ConfigError(f"repartition.threshold is a max/mean ratio, >= 1; got {r.threshold}")
        from moe_dist.export import DTYPES, FORMATS, refusal

        for fmt in self.export.formats:
            if fmt not in FORMATS:
                raise ConfigError(f"export.formats: {fmt!r} is not one of {FORMATS}")
            why = refusal(fmt, self.method == "dmep")
            if why:
                raise ConfigError(f"export.formats: {why}")
        if self.export.dtype not in DTYPES:
            raise ConfigError(f"export.dtype: {self.export.dtype!r} is not one of {sorted(k for k in DTYPES if k)}")
        if not Path(self.ds_config).is_file():
            raise ConfigError(f"ds_config: no such file {self.ds_config!r}")


METHODS = ("lora", "hellora", "hellori", "epng", "dmep")


def _coerce(value: Any, typ: type, key: str) -> Any:
    if typing.get_origin(typ) is list:  # a YAML list, or on the command line `[a,b]` / `a,b`
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            value = parsed or []
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, key) for v in value]
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


def config_from_dict(data: dict, overrides: list[str] = ()) -> RunConfig:
    """A config saved with `dataclasses.asdict` (e.g. in a checkpoint), then overrides."""
    cfg = RunConfig()
    _apply(cfg, data)
    _apply_overrides(cfg, overrides)
    return cfg


def load_config(recipe: str | None, overrides: list[str]) -> RunConfig:
    cfg = RunConfig()
    if recipe:
        data = yaml.safe_load(Path(recipe).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{recipe}: a recipe must be a mapping")
        _apply(cfg, data)
    _apply_overrides(cfg, overrides)
    return cfg


def _apply_overrides(cfg: RunConfig, overrides: list[str]) -> None:
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
