"""What a run is built from: the base model's directory, the data, the converted model.

Every function is rank-aware only where it must be (the embedded default is built once per
node; everything else is the same call on every rank).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.adapters.lora import LoRAConfig
from moe_dist.config import RunConfig
from moe_dist.data.dataset import DataError, RowEncoder, encode_dataset, load_rows
from moe_dist.data.packing import ShardedBatches, pack_examples, pad_examples
from moe_dist.kernels.packed_attention import flatten_packed_rows, use_attention_kernel
from moe_dist.kernels.rms_norm import use_norm_kernel
from moe_dist.models.arch import is_moe
from moe_dist.models.convert import convert_dense_model
from moe_dist.models.loading import load_model, resolve_checkpoint
from moe_dist.recompute import enable_activation_checkpointing
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan
from moe_dist.routing import RoutingStats, collect_routing_stats, experts_modules

EMBEDDED_TASKS = {"embedded:arithmetic": "base", "embedded:arithmetic-hard": "hard"}  # -> arithmetic variant


def resolve_model_path(cfg: RunConfig) -> Path:
    """The checkpoint directory; the embedded default is built once (local rank 0) and cached."""
    from moe_dist.models.embedded import DEFAULT_PRETRAIN_STEPS, EMBEDDED_NAME, ensure_embedded_model

    if cfg.model != EMBEDDED_NAME:
        return resolve_checkpoint(cfg.model)
    steps = DEFAULT_PRETRAIN_STEPS if cfg.embedded_pretrain_steps < 0 else cfg.embedded_pretrain_steps
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        ensure_embedded_model(cfg.cache_dir, cfg.seed, steps)
    if dist.is_initialized():
        dist.barrier()
    return ensure_embedded_model(cfg.cache_dir, cfg.seed, steps)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")
SAMPLE = "What is 12 plus 30? The answer is 42."


def check_tokenizer(tokenizer, model_dir: Path) -> None:
    """A directory without tokenizer files makes transformers fall back to a tokenizer that
    encodes every row to nothing (the run then trains on nothing and exits 0): refuse it."""
    ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        present = [f for f in TOKENIZER_FILES if (Path(model_dir) / f).is_file()] or ["none"]
        raise DataError(f"model {model_dir}: its tokenizer encodes a sample sentence to {len(ids)} tokens "
                        f"(tokenizer files present: {', '.join(present)}); copy the base model's tokenizer files in")


def missing_tokenizer(model_dir: Path) -> str | None:
    """Before any work: a local model directory with no tokenizer file at all."""
    if not (Path(model_dir) / "config.json").is_file() or any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return (f"model {model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); transformers would fall "
            "back to a tokenizer that encodes every row to nothing. Copy the base model's tokenizer files in")


def resolve_data_source(source: str, model_dir: Path, cfg: RunConfig, role: str) -> str:
    if source not in EMBEDDED_TASKS:
        return source
    from moe_dist.models.embedded import embedded_task_files

    return str(embedded_task_files(model_dir, EMBEDDED_TASKS[source])[role])


@dataclass
class EvalSet:
    """The held-out split as each metric needs it."""

    source: str
    metrics: tuple[str, ...]
    loss_rows: list[dict] | None  # packed (or padded) exactly as training packs its rows
    prompts: list[list[int]] | None  # exact match: prompt token ids and reference answers
    references: list[str] | None


def load_data(cfg: RunConfig, tokenizer, model_dir: Path, rank: int, world: int, log=print
              ) -> tuple[ShardedBatches, EvalSet | None]:
    """The training rows as this rank's micro-batches, and the held-out split."""
    d = cfg.data
    encoder = RowEncoder(tokenizer, d.prompt_column, d.response_column, d.messages_column)
    rows, eval_rows = load_rows(resolve_data_source(d.train, model_dir, cfg, "train"), d.train_split, d.subset, log), None
    if d.eval_fraction:  # a dataset without a test split: rows held out, never trained on
        rows, eval_rows = held_out(rows, d.eval_fraction, cfg.seed)
        log(f"data.eval_fraction={d.eval_fraction:g}: {len(eval_rows)} of {len(rows) + len(eval_rows)} rows of "
            f"{d.train} held out for evaluation")
    train, report = encode_dataset(rows, encoder, d.seq_len, d.train)
    log(report.line())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = ShardedBatches(list(zip(train["input_ids"], train["labels"])), d.seq_len, cfg.train.micro_batch, rank,
                             world, cfg.seed, d.packing, pad_id)
    return batches, load_eval_set(cfg, tokenizer, model_dir, log, eval_rows)


def held_out(rows, fraction: float, seed: int):
    """(train rows, eval rows): `fraction` of a split held out, seeded, the same on every rank
    (datasets' own train_test_split, in memory: no cache file for ranks to race on)."""
    if len(rows) < 2:
        raise DataError(f"data.eval_fraction={fraction}: {len(rows)} row cannot be split into train and eval")
    parts = rows.train_test_split(test_size=fraction, seed=seed, keep_in_memory=True)
    return parts["train"], parts["test"]


def load_eval_set(cfg: RunConfig, tokenizer, model_dir: Path, log=print, rows=None) -> EvalSet | None:
    """The held-out split (`rows` when held out of the training data, else `data.eval`'s
    `data.eval_split`), encoded for each of `eval.metrics`; None without one."""
    d = cfg.data
    source = d.eval or (d.train if rows is not None else "")
    if not source:
        return None
    metrics = cfg.eval.metric_list(source)
    encoder = RowEncoder(tokenizer, d.prompt_column, d.response_column, d.messages_column)
    if rows is None:
        rows = load_rows(resolve_data_source(d.eval, model_dir, cfg, "test"), d.eval_split, d.subset, log)
    if cfg.eval.samples:
        rows = rows.select(range(min(cfg.eval.samples, len(rows))))
    loss_rows = prompts = references = None
    if "loss" in metrics:
        scored, report = encode_dataset(rows, encoder, d.seq_len, f"{source} (eval loss)")
        log(report.line())
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        build = pack_examples if d.packing else pad_examples
        loss_rows = build(list(zip(scored["input_ids"], scored["labels"])), d.seq_len, pad_id)
    if "exact_match" in metrics:
        evals, report = encode_dataset(rows, encoder, d.seq_len, source, for_generation=True)
        log(report.line())
        cut, longest = references_longer_than(tokenizer, evals["reference"], cfg.eval.max_new_tokens)
        if cut:
            log(f"WARNING: eval.max_new_tokens={cfg.eval.max_new_tokens} is shorter than {cut} of "
                f"{len(evals['reference'])} references in {source} (longest {longest} tokens): those can never "
                f"match exactly; set eval.max_new_tokens={longest} or more")
        prompts, references = evals["prompt_ids"], evals["reference"]
    return EvalSet(source, metrics, loss_rows, prompts, references)


def references_longer_than(tokenizer, references: list[str], max_new_tokens: int) -> tuple[int, int]:
    """(how many references need more than `max_new_tokens` tokens, the longest's length):
    generation stops there, so they score 0 whatever the model learnt (the hard arithmetic
    task's 5-step chains need ~60 tokens, the recipes' default is 40)."""
    lengths = [len(ids) for ids in tokenizer(list(references), add_special_tokens=False)["input_ids"]] or [0]
    return sum(n > max_new_tokens for n in lengths), max(lengths)


def build_model(cfg: RunConfig, model_dir: Path, plan: AdapterPlan, ep_size: int, device: torch.device,
                bf16: bool, placements: dict[int, ExpertPlacement] | None = None) -> torch.nn.Module:
    """The converted model: frozen base (bf16 on GPU, fp32 on CPU) + fp32 adapters from `plan`,
    its expert kernel chosen from `moe.kernel`, its attention's and norms' from `kernels`."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    lora = LoRAConfig(alpha=cfg.lora.alpha, rslora=cfg.lora.rslora, seed=cfg.seed)
    from transformers import AutoConfig, AutoModelForCausalLM

    if not is_moe(AutoConfig.from_pretrained(model_dir)):  # a dense model: LoRA-MoE only, plain data parallel
        if ep_size != 1:
            raise ValueError(f"{model_dir} is a dense model: expert parallelism needs ep_size=1, got {ep_size}")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        model = convert_dense_model(model, plan, lora, device)
    else:
        model = load_model(str(model_dir), plan, ep_size=ep_size, placements=placements, dtype=dtype, device=device,
                           lora=lora, quantize=cfg.base.quantize)
    for experts in experts_modules(model).values():
        experts.set_kernel(cfg.moe.kernel)
    use_attention_kernel(model, cfg.kernels.attention, device, dtype)
    use_norm_kernel(model, cfg.kernels.rms_norm, device, dtype)
    model.config.use_cache = False
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def profile_routing(cfg: RunConfig, model_dir: Path, plan: AdapterPlan, ep_size: int, device: torch.device,
                    bf16: bool, batches, micro_batches: int) -> RoutingStats:
    """Collective: routing counts of `micro_batches` training micro-batches per rank through a
    model built on `plan` (train mode, no gradients: nothing is trained). The data position
    goes back to the start, so training sees those batches as if never drawn."""
    model = build_model(cfg, model_dir, plan, ep_size, device, bf16)
    model.train()
    with torch.no_grad():
        for _ in range(micro_batches):
            batch = flatten_packed_rows({k: v.to(device) for k, v in batches.next_batch().items()},
                                        model.config._attn_implementation)
            model(**batch, use_cache=False)
    stats = collect_routing_stats(model)
    del model
    gc.collect()  # q, k, v's SharedInputProjections form a cycle: free the profiling model now
    batches.load_state_dict({"epoch": 0, "rows_consumed": 0})
    return stats
