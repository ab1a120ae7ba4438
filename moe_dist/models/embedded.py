"""The embedded default base model: a tiny OLMoE-shaped MoE with its own tokenizer, pre-trained
briefly on synthetic text, built once and cached as a real HF checkpoint directory.

Why: the default run must fine-tune something that has actually learned, with no downloads.
A random-init model makes every fine-tuning figure meaningless; a pre-trained one that knows
the words and the arithmetic facts (`moe_dist.data.arithmetic.pretraining_corpus`) but not the
task's question/answer form starts near zero exact-match on the arithmetic task, and LoRA
visibly raises it.

The directory is an ordinary checkpoint (config.json, model.safetensors, generation_config.json,
tokenizer files with a chat template) plus `task/{train,test}.jsonl` and `build.json`, so it is
loaded by the same code as a hub model and by `AutoModelForCausalLM`/`AutoTokenizer`. It is
built atomically (a temp dir beside the target, then a rename): concurrent builders race
harmlessly and a reader never sees half a checkpoint. Deterministic in (seed, pretrain_steps)
on a given machine (same core count).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_dist.data import arithmetic

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

EMBEDDED_NAME = "embedded:tiny-olmoe"
DEFAULT_PRETRAIN_STEPS = 600

VOCAB_SIZE = 512
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 0, 1, 2 in this order
TINY_OLMOE = dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, max_position_embeddings=512,
                  tie_word_embeddings=False)

PRETRAIN_SEQ_LEN = 128
PRETRAIN_BATCH = 16
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 0.05  # fraction of steps
TASK_SIZES = {"train": 4000, "test": 500}

# Renders a conversation as the plain prompt/response text the task uses: BOS, each user turn
# ending in a newline, each assistant turn ending in EOS. The prompt of a conversation is thus
# a prefix of the whole, and a task row gives the same tokens as text or as chat messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] }}{% if not message['content'].endswith('\\n') %}{{ '\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
)


def _log(msg: str) -> None:
    print(f"[embedded model] {msg}", flush=True)


def model_dir_name(seed: int, pretrain_steps: int) -> str:
    """Cache directory name: different seeds or step counts never share a checkpoint."""
    return f"tiny-olmoe-s{seed}-p{pretrain_steps}"


def is_complete(directory: Path) -> bool:
    """build.json is written last into the temp dir, so its presence means a whole build."""
    return (directory / "config.json").is_file() and (directory / "build.json").is_file()


def embedded_task_files(model_dir: str | os.PathLike, variant: str = "base") -> dict[str, Path]:
    """{"train": ..., "test": ...}: the arithmetic task files shipped with the checkpoint
    (`task/`); another variant (`task/<variant>/`) is written beside them on first use, same
    sizes, from the build's seed (deterministic: every rank writes the same bytes)."""
    task = Path(model_dir) / "task"
    base = {split: task / f"{split}.jsonl" for split in arithmetic.SPLITS}
    missing = [str(p) for p in base.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: no embedded task files {missing}; is it an embedded model directory?")
    if variant == "base":
        return base
    files = {split: task / variant / f"{split}.jsonl" for split in arithmetic.SPLITS}
    if not all(p.is_file() for p in files.values()):
        build = Path(model_dir) / "build.json"
        seed = json.loads(build.read_text()).get("seed", 0) if build.is_file() else 0
        arithmetic.write_task(task / variant, TASK_SIZES["train"], TASK_SIZES["test"], seed, variant)
    return files


# ---- tokenizer ---------------------------------------------------------------------------

def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, as a PreTrainedTokenizerFast.

    Byte-level so any text round-trips exactly (exact-match compares decoded text); no prefix
    space, so a prompt and its response tokenize the same separately as joined at a newline.
    Digits are single tokens whatever precedes them (a space is a token of its own before a
    number): the "3" that starts a response is then the same token as the " 3" in its prompt,
    so the model can copy numbers, and numbers are spelt digit by digit as in LLaMA."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, core.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=TINY_OLMOE["max_position_embeddings"],
                                  clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ---- model and pre-training --------------------------------------------------------------

def build_config(tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The tiny OLMoE config, its vocabulary and special ids taken from `tokenizer`."""
    from moe_dist.models.tiny import tiny_config

    return tiny_config("olmoe", **TINY_OLMOE, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _token_stream(tokenizer: PreTrainedTokenizerFast, seed: int, n_tokens: int) -> torch.Tensor:
    """At least `n_tokens` of corpus text as one id stream, each document between BOS and EOS,
    so the model learns where texts start and stop."""
    docs_per_round = max(256, n_tokens // 30)
    ids: list[int] = []
    round_ = 0
    while len(ids) < n_tokens:
        docs = arithmetic.pretraining_corpus(docs_per_round, seed=seed * 1000 + round_)
        for doc_ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids += [tokenizer.bos_token_id, *doc_ids, tokenizer.eos_token_id]
        round_ += 1
    return torch.tensor(ids[:n_tokens], dtype=torch.long, device="cpu")


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine down to a tenth of the peak."""
    warm = max(1, int(steps * PRETRAIN_WARMUP))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(model: torch.nn.Module, stream: torch.Tensor, steps: int, seed: int) -> float:
    """Causal-LM training on shuffled fixed-length windows of the packed `stream`, with the
    router's load-balancing loss so that every expert is used (as in a real MoE, and so that
    expert placement has real load to balance). Returns the mean LM loss of the last tenth."""
    gen = torch.Generator().manual_seed(seed)
    n_windows = (len(stream) - 1) // PRETRAIN_SEQ_LEN
    windows = stream[: n_windows * PRETRAIN_SEQ_LEN].view(n_windows, PRETRAIN_SEQ_LEN)
    order = torch.randperm(n_windows, generator=gen, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    recent: list[float] = []
    tail = max(1, steps // 10)
    for step in range(steps):
        idx = order[(torch.arange(PRETRAIN_BATCH, device="cpu") + step * PRETRAIN_BATCH) % n_windows]
        batch = windows[idx]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, PRETRAIN_LR)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_loss = out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item()
        recent = (recent + [lm_loss])[-tail:]
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            _log(f"pretrain step {step + 1}/{steps}: loss {lm_loss:.3f}")
    model.eval()
    return sum(recent) / max(1, len(recent))


@contextlib.contextmanager
def _build_settings() -> Iterator[None]:
    """While building: every core this process may use (other ranks wait at a barrier
    meanwhile), and deterministic kernels (the experts' scatter-adds are not bitwise
    reproducible across threads otherwise), so a seed gives the same bytes on a given machine.
    The caller's settings are restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(cores, 8)))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def build_embedded_model(directory: Path, seed: int, pretrain_steps: int) -> dict:
    """Build everything into `directory` (which must exist): tokenizer, pre-trained model,
    task files, build.json last. Returns the build record."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.perf_counter()
    _log(f"building seed={seed} pretrain_steps={pretrain_steps} into {directory}")
    tokenizer = build_tokenizer(arithmetic.pretraining_corpus(20_000, seed=seed) + arithmetic.task_vocabulary())
    n_tokens = max(1, pretrain_steps) * PRETRAIN_BATCH * PRETRAIN_SEQ_LEN + 1
    stream = _token_stream(tokenizer, seed, n_tokens)
    _log(f"tokenizer: {len(tokenizer)} tokens; corpus: {len(stream)} tokens")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(tokenizer))
    loss = pretrain(model, stream, pretrain_steps, seed) if pretrain_steps > 0 else None
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    arithmetic.write_task(directory / "task", TASK_SIZES["train"], TASK_SIZES["test"], seed)
    record = {"name": EMBEDDED_NAME, "seed": seed, "pretrain_steps": pretrain_steps, "final_pretrain_loss": loss,
              "build_seconds": round(time.perf_counter() - t0, 2), "threads": torch.get_num_threads(),
              "vocab_size": len(tokenizer), "pretrain_tokens": pretrain_steps * PRETRAIN_BATCH * PRETRAIN_SEQ_LEN,
              "task_sizes": TASK_SIZES}
    (directory / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"built in {record['build_seconds']}s, final pretraining loss {loss if loss is None else round(loss, 3)}")
    return record


def ensure_embedded_model(cache_dir: str | os.PathLike, seed: int = 0,
                          pretrain_steps: int = DEFAULT_PRETRAIN_STEPS) -> Path:
    """Path of the cached checkpoint for (seed, pretrain_steps), building it if absent.

    Built in a temp dir beside the target and renamed into place; if another process renamed
    first, its (identical) build is kept and ours dropped."""
    target = Path(cache_dir) / model_dir_name(seed, pretrain_steps)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        with _build_settings():
            build_embedded_model(tmp, seed, pretrain_steps)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):
            raise
        _log(f"another process built {target} first; using it")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
