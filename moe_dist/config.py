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

from moe_dist.methods import METHODS as _METHODS
from moe_dist.methods import method_class, method_sections
from moe_dist.parallel.elastic import check_global_batch, resolve_ep_size
from moe_dist.plan import EXPERT_PROJECTIONS
from moe_dist.validation import (ConfigError, check_ds_config, check_writable, fraction, non_negative, one_of,
                                 positive)

__all__ = ["ConfigError", "RunConfig", "config_from_dict", "load_config"]


EXPORT_FORMATS = ("merged", "peft", "vllm", "moe_dist")
EVAL_METRICS = ("loss", "exact_match")
EXPORT_DTYPES = ("", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


@dataclass
class LoRASection:
    # Any rank >= 1, here and wherever ranks come from (HELLoRA, EPnG's rank_unit / max_rank):
    # on GPU the grouped kernel zero-pads each rank to grouped_mm's 16-byte stride (multiple of 8
    # in bf16, 4 in fp32), so ranks that are multiples of 8 waste nothing (tests/test_precision.py)
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    attention: bool = True  # LoRA on the attention projections too
    # Which attention projections: [] = the architecture's default (q,k,v,o; DeepSeek's MLA
    # q_a/q_b/kv_a/kv_b/o; ...), or names, taken in every layer that has them.
    attention_targets: list[str] = field(default_factory=list)
    # Expert projections that get adapters: [gate_proj, up_proj, down_proj] (one adapter each) or
    # [gate_up_proj, down_proj] (one adapter on the fused gate|up weight, as PEFT's target_parameters).
    expert_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])

    def expert_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.expert_targets if t.strip())

    def attention_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.attention_targets if t.strip())

    def validate(self, path: str) -> None:
        positive(self, path, "rank", "alpha")
        targets = self.expert_target_list()
        unknown = [t for t in targets if t not in EXPERT_PROJECTIONS]
        if unknown or not targets or ("gate_up_proj" in targets and {"gate_proj", "up_proj"} & set(targets)):
            raise ConfigError(f"{path}.expert_targets: {self.expert_targets!r} must be names from "
                              f"{EXPERT_PROJECTIONS}, with gate_up_proj or gate_proj/up_proj, not both")


@dataclass
class DataSection:
    # hub name, local json/jsonl/parquet file or dir, or embedded:arithmetic (-hard: 3-5 steps + a distractor)
    train: str = "embedded:arithmetic"
    eval: str = "embedded:arithmetic"  # where the held-out split comes from ("" = no evaluation)
    subset: str = ""  # a hub dataset's configuration name (load_dataset's second argument)
    train_split: str = "train"
    eval_split: str = "test"
    # > 0: hold this fraction of data.train's rows out for evaluation (seeded, by datasets'
    # train_test_split) and train on the rest: for a dataset without a test split
    eval_fraction: float = 0.0
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"  # chat rows, used when the prompt column is absent
    seq_len: int = 128
    packing: bool = True  # pack documents to seq_len; no attention across documents

    def validate(self, path: str) -> None:
        positive(self, path, "seq_len")
        fraction(self, path, "eval_fraction")
        if self.eval_fraction and self.eval and self.eval != self.train:
            raise ConfigError(f"{path}.eval_fraction holds rows of {path}.train out for evaluation; {path}.eval "
                              f"({self.eval!r}) names another dataset: set one of them")
        for name in ("train", "eval"):  # an empty local file: said now, not after the model is built
            source = Path(getattr(self, name))
            if getattr(self, name) and source.is_file() and source.stat().st_size == 0:
                raise ConfigError(f"{path}.{name}: data file {source} is empty")


@dataclass
class TrainSection:
    steps: int = 150  # optimizer steps
    micro_batch: int = 8  # sequences per rank per micro-step (with global_batch: the largest allowed)
    grad_accum: int = 1
    # sequences per optimizer step, the same at every world (elastic runs): micro_batch and
    # grad_accum are chosen per world so that micro_batch x grad_accum x world = global_batch.
    # 0: micro_batch x grad_accum x the world of the first start, kept by every resume.
    global_batch: int = 0
    lr: float = 3e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    log_every: int = 5
    # routing figures (TensorBoard images) every this many steps and after the last (0: only
    # after the last): each takes ~0.2 s of rank 0, which every other rank waits for
    figures_every: int = 100
    # recompute decoder layers in backward (keeps only each layer's input): activations of
    # long sequences fit; costs about one more forward per step (moe_dist/recompute.py)
    activation_checkpointing: bool = False
    # auto: bf16 (frozen base in bf16, fp32 masters in DeepSpeed's bf16 engine) on a GPU that has
    # it, fp32 on CPU; bf16 / fp32 force it (bf16 on CPU runs the GPU's code path, e.g. for tests)
    precision: str = "auto"

    def validate(self, path: str) -> None:
        positive(self, path, "steps", "micro_batch", "grad_accum", "log_every")
        non_negative(self, path, "lr", "warmup_steps", "weight_decay", "grad_clip", "figures_every", "global_batch")
        if self.global_batch and self.grad_accum != 1:
            raise ConfigError(f"{path}.grad_accum ({self.grad_accum}) is chosen per world from {path}.global_batch "
                              f"({self.global_batch}); set one of them")
        one_of(self, path, "precision", ("auto", "bf16", "fp32"))
        fraction(self, path, "min_lr_ratio", closed=True)
        if self.warmup_steps > self.steps:
            raise ConfigError(f"{path}.warmup_steps ({self.warmup_steps}) exceeds {path}.steps ({self.steps})")


@dataclass
class EvalSection:
    # loss: mean token loss and perplexity on the held-out split (any data); exact_match: greedy
    # generation compared with the reference answer (short single answers, e.g. arithmetic).
    # [] = [loss] for user data, [loss, exact_match] for the embedded tasks
    metrics: list[str] = field(default_factory=list)
    every: int = 0  # evaluate every N steps (0 = before and after training only)
    samples: int = 200  # held-out prompts (0 = the whole split)
    max_new_tokens: int = 40
    batch_size: int = 32
    before: bool = True  # also measure the base model

    def validate(self, path: str) -> None:
        positive(self, path, "max_new_tokens", "batch_size")
        non_negative(self, path, "every", "samples")
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        if unknown:
            raise ConfigError(f"{path}.metrics: {unknown} not in {list(EVAL_METRICS)}")

    def metric_list(self, eval_source: str) -> tuple[str, ...]:
        if self.metrics:
            return tuple(self.metrics)
        return EVAL_METRICS if eval_source.startswith("embedded:") else ("loss",)


@dataclass
class CheckpointSection:
    every: int = 0  # save every N steps (0 = only the final one)
    keep: int = 2  # newest complete checkpoints kept
    resume: str = ""  # "" (fresh), "auto" (newest complete under output_dir), or a step-N directory

    def validate(self, path: str) -> None:
        positive(self, path, "keep")
        non_negative(self, path, "every")


@dataclass
class ExportSection:
    """Export the final checkpoint when training ends (launch/export.py does it for any checkpoint)."""

    formats: list[str] = field(default_factory=list)  # any of merged, peft, vllm, moe_dist
    dir: str = ""  # default: output_dir/export; each format goes to dir/<format>
    dtype: str = ""  # merged weights' dtype: "" (the base's), bf16, fp16, fp32

    def validate(self, path: str, exports_as_lora: bool = True) -> None:
        for fmt in self.formats:
            if fmt not in EXPORT_FORMATS:
                raise ConfigError(f"{path}.formats: {fmt!r} is not one of {EXPORT_FORMATS}")
            if not exports_as_lora and fmt != "moe_dist":
                raise ConfigError(f"{path}.formats: {fmt!r} cannot carry LoRA-MoE adapters (a router in every "
                                  "module picks its LoRA experts per token: no fixed W + s*B*A); use moe_dist")
        if self.dtype not in EXPORT_DTYPES:
            raise ConfigError(f"{path}.dtype: {self.dtype!r} is not one of {[d for d in EXPORT_DTYPES if d]}")


@dataclass
class RepartitionSection:
    """Where experts live across expert-parallel ranks (moe_dist/parallel/balance.py and
    moe_dist/parallel/move.py). Nothing to do at ep_size 1."""

    enabled: bool = True  # HELLoRA: build with hot experts spread; EPnG: rebalance with every prune/grow
    every: int = 0  # also measure the imbalance every N steps ... (0 = off)
    threshold: float = 1.10  # ... and move when max/mean per-rank expected cost exceeds this
    force_step: int = 0  # move to the balanced placement at this step whatever the imbalance (0 = never)

    def validate(self, path: str) -> None:
        non_negative(self, path, "every", "force_step")
        if self.threshold < 1:
            raise ConfigError(f"{path}.threshold is a max/mean ratio, >= 1; got {self.threshold}")


@dataclass
class BaseSection:
    """The frozen base model's storage."""

    # none: as the checkpoint ships it (FP8 / MXFP4 checkpoints stay quantized, others in the run's
    # precision); nf4 / int8: an unquantized checkpoint's experts quantized as they are read
    # (QLoRA for MoE; moe_dist/quant). Dequantized only inside the expert kernels.
    quantize: str = "none"

    def validate(self, path: str) -> None:
        from moe_dist.quant.checkpoint import QUANTIZE_CHOICES

        one_of(self, path, "quantize", QUANTIZE_CHOICES)


@dataclass
class MoESection:
    """The expert layer's compute."""

    # auto: on CPU the fused expert MLP (fp32 SiLU-gated experts) or else the per-expert loop (LoRA
    # added in place), grouped matmuls on GPU; or fused / loop / grouped
    kernel: str = "auto"

    def validate(self, path: str) -> None:
        one_of(self, path, "kernel", ("auto", "fused", "loop", "grouped"))


@dataclass
class KernelsSection:
    """The compute of the model's dense parts (the modules themselves stay transformers')."""

    # auto: on CPU in fp32, causal attention over the packed documents in compiled code
    # (moe_dist/kernels/packed_attention.py) where the architecture allows (no sliding window,
    # sinks or attention dropout), transformers' own elsewhere; or packed / hf
    attention: str = "auto"
    # auto: on CPU in fp32, each RMSNorm that computes w * x / rms(x) in one compiled pass
    # forward and backward (moe_dist/kernels/rms_norm.py); or fused / hf
    rms_norm: str = "auto"

    def validate(self, path: str) -> None:
        one_of(self, path, "attention", ("auto", "packed", "hf"))
        one_of(self, path, "rms_norm", ("auto", "fused", "hf"))


@dataclass
class FaultsSection:
    """What a run does when something goes wrong (docs/faults.md)."""

    # consecutive steps with a non-finite loss or gradient (each skipped) before the run stops (0: never)
    max_nonfinite_steps: int = 3
    stall_steps: int = 20  # warn when the loss is flat and the gradient norm 0 this many steps in a row (0: off)
    # SIGTERM/SIGINT: finish the step and write a checkpoint within this, else exit without one
    # (DeepSpeed's launcher escalates to SIGKILL 30 s after its SIGTERM)
    preempt_grace_s: float = 25.0
    heartbeat_s: float = 2.0  # each rank's liveness file is touched this often (names a stopped rank)

    def validate(self, path: str) -> None:
        non_negative(self, path, "max_nonfinite_steps", "stall_steps")
        positive(self, path, "preempt_grace_s", "heartbeat_s")


@dataclass
class CoreConfig:
    """The sections every run has; each method's own section is added from moe_dist.methods
    (RunConfig below), so a new method is one file there."""

    model: str = "embedded:tiny-olmoe"  # a local HF dir, a hub name, or the embedded default
    method: str = "lora"  # lora: adapters on every expert (+ attention); see moe_dist/methods/
    # auto: the whole world where it divides the expert count, else the largest size that does;
    # auto:N: N where it divides the world and the expert count, else the same; N: exactly N (0 =
    # the whole world), an error where it does not fit (moe_dist/parallel/elastic.py)
    ep_size: str = "auto"
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
    repartition: RepartitionSection = field(default_factory=RepartitionSection)
    export: ExportSection = field(default_factory=ExportSection)
    base: BaseSection = field(default_factory=BaseSection)
    moe: MoESection = field(default_factory=MoESection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    faults: FaultsSection = field(default_factory=FaultsSection)

    def validate(self, world_size: int, num_experts: int | None = None) -> None:
        """Impossible combinations, named by key, before any process-group work: the run's
        own fields, each section, then the method's checks."""
        resolve_ep_size(self.ep_size, world_size, num_experts)  # a fixed size that does not fit: named here
        if self.train.global_batch:
            check_global_batch(self.train.global_batch, [world_size], "this launch")
        method = method_class(self.method)
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        for name in ("lora", "data", "train", "eval", "checkpoint", "repartition", "base", "moe", "kernels", "faults"):
            getattr(self, name).validate(name)
        self.export.validate("export", method.exports_as_lora)
        method.validate(self, num_experts)
        check_ds_config(self.ds_config)
        check_writable(self.output_dir)


RunConfig = dataclasses.make_dataclass(
    "RunConfig", [(name, section, field(default_factory=section)) for name, section in method_sections().items()],
    bases=(CoreConfig,))
RunConfig.__module__ = __name__
RunConfig.__doc__ = """A run: CoreConfig's sections plus one per method (hellora, hellori, epng, dmep, ...)."""
METHODS = tuple(_METHODS)


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
        try:
            data = yaml.safe_load(Path(recipe).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"recipe {recipe}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            if context is not None and getattr(exc, "context", None):
                where += f" ({exc.context} at line {context.line + 1} column {context.column + 1})"
            raise ConfigError(f"recipe {recipe}: YAML error{where}: {getattr(exc, 'problem', None) or exc}") from exc
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
