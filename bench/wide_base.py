"""The methods bench's second base: OLMoE's expert proportions (the bench shape: hidden 256, 64
experts top-8, 4 layers), pre-trained like the embedded default on its corpus and tokenizer,
so routing is a trained router's (with pre-training's load balancing) and not a random projection's.

Why a second base: on the embedded model (16 small experts) attention and the LM head take
most of the step, so the methods' throughput and FLOP ratios (which act on the experts) are
diluted; here experts are most of the step, as in real MoE models. Why pre-trained: HELLoRA's
hot set, EPnG's importance and the tokens per expert all follow the router, and an untrained
router is not what a real model has: at this shape it piles tokens onto a few experts (on 64
hard-task rows the busiest expert per layer got 4.1-7.2x the mean, the 8 busiest of 64 took 62%
of the last layer's selections), the pre-trained one 3.3-5.2x and 43%.

Built once under .cache/moe_dist/ (a real HF checkpoint with the embedded tokenizer and task
files), in about the embedded model's build budget. Throughput only: fine-tuning it to an
accuracy would take ~5x the embedded model's time per step.

    python bench/wide_base.py [--pretrain-steps 120]     # prints the directory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from baseline_peft import BENCH_SHAPE, olmoe_config  # noqa: E402

CACHE = ROOT / ".cache" / "moe_dist"
PRETRAIN_STEPS = 120  # x 16 x 128 tokens: ~2 min on 2 cores, the embedded model's build is ~2 min


def wide_base_dir(pretrain_steps: int = PRETRAIN_STEPS, seed: int = 0) -> Path:
    """The pre-trained wide base's checkpoint directory, built on first use (atomically)."""
    from moe_dist.models import embedded

    s = BENCH_SHAPE
    target = CACHE / f"wide-olmoe-h{s['hidden']}-e{s['experts']}-top{s['top_k']}-s{seed}-p{pretrain_steps}"
    if embedded.is_complete(target):
        return target
    from transformers import AutoTokenizer, OlmoeForCausalLM

    src = embedded.ensure_embedded_model(CACHE, seed)
    tok = AutoTokenizer.from_pretrained(src)
    config = olmoe_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, use_cache=True)
    t0 = time.perf_counter()
    stream = embedded._token_stream(tok, seed, pretrain_steps * embedded.PRETRAIN_BATCH * embedded.PRETRAIN_SEQ_LEN + 1)
    with embedded._build_settings():
        torch.manual_seed(seed)
        model = OlmoeForCausalLM(config)
        loss = embedded.pretrain(model, stream, pretrain_steps, seed)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copytree(src / "task", tmp / "task")
    (tmp / "build.json").write_text(json.dumps({
        "name": "wide OLMoE (bench shape), pre-trained", "shape": s, "seed": seed, "pretrain_steps": pretrain_steps,
        "final_pretrain_loss": loss, "build_seconds": round(time.perf_counter() - t0, 1),
        "embedded_build_seconds": json.loads((src / "build.json").read_text()).get("build_seconds")}, indent=2) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another builder won the race: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    print(wide_base_dir(parser.parse_args().pretrain_steps))
