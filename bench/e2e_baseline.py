"""The alternative a user would pick, as one training script: HF model (grouped_mm experts) +
PEFT LoRA + a DeepSpeed ZeRO engine, plain data parallel. What LLaMA-Factory-style tools run.

    deepspeed --num_gpus 2 bench/e2e_baseline.py --model DIR --out times.json [--seq-len 128 ...]

Built only from the public APIs of transformers, peft and deepspeed. LoRA: r, alpha on the
attention projections (modules) and the fused expert weights `mlp.experts.gate_up_proj` /
`mlp.experts.down_proj` (PEFT `target_parameters`). Its batches are the same packed rows
moe_dist trains on (moe_dist.data: same tokenizer, same packing, same order), so the two runs
differ in the training system only. Writes the wall time at the end of every step (rank 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ATTN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def packed_batches(model_dir: str, seq_len: int, micro_batch: int, rank: int, world: int, seed: int):
    """The rows moe_dist's trainer would train on, for this rank (the embedded task's train split)."""
    from transformers import AutoTokenizer

    from moe_dist.data.dataset import RowEncoder, encode_dataset, load_rows
    from moe_dist.data.packing import ShardedBatches
    from moe_dist.models.embedded import embedded_task_files

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = load_rows(str(embedded_task_files(model_dir)["train"]), "train", log=lambda *_: None)
    train, _ = encode_dataset(rows, RowEncoder(tok, "prompt", "response", "messages"), seq_len, "train")
    examples = list(zip(train["input_ids"], train["labels"]))
    return ShardedBatches(examples, seq_len, micro_batch, rank, world, seed, True, tok.pad_token_id or 0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ds-config", default="ds_configs/zero2.json")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts-implementation", default="grouped_mm")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moe_dist.parallel.device import select_device

    device = select_device()  # this rank's accelerator before the process group, as launch/train.py
    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 experts_implementation=args.experts_implementation)
    model.config.use_cache = False
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=ATTN_TARGETS,
                      target_parameters=EXPERT_TARGETS)
    model = get_peft_model(model, lora).to(device)
    model.train()
    ds = json.loads(Path(args.ds_config).read_text())
    ds.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps=1, gradient_clipping=1.0,
              zero_allow_untested_optimizer=True, steps_per_print=10**9)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    batches = packed_batches(args.model, args.seq_len, args.micro_batch, rank, world, args.seed)

    ends, losses = [], []
    t_start = time.perf_counter()
    for _ in range(args.steps):
        batch = {k: v.to(device) for k, v in batches.next_batch().items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        ends.append(time.perf_counter() - t_start)
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "step_ends_s": ends, "losses": losses, "world_size": world, "threads": torch.get_num_threads(),
            "trainable_params": sum(p.numel() for p in params),
            "tokens_per_step": args.micro_batch * args.seq_len * world}))


if __name__ == "__main__":
    main()
