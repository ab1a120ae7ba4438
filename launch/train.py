"""Entry point: `deepspeed [--num_gpus N] launch/train.py [--recipe R.yaml] [key=value ...]`.

Also runs as `python launch/train.py` (one process). parse -> build -> train -> close.
This first version trains LoRA on every expert and attention projection on a synthetic
counting task; datasets, evaluation, checkpoints and the routing-aware methods build
on it (issues 3 and 4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from moe_dist.config import load_config  # noqa: E402


def counting_batch(batch: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences that count up from a random start (mod the vocab, skipping special ids 0-2):
    a task a random base model cannot do and LoRA learns within a few dozen steps."""
    start = torch.randint(0, vocab - 3, (batch, 1), generator=generator)
    return (start + torch.arange(seq_len)) % (vocab - 3) + 3


def _single_process_env_if_unlaunched() -> None:
    """`python launch/train.py` with no launcher: a world of one on localhost. Under
    deepspeed/torchrun (WORLD_SIZE) or mpirun (OMPI_/PMI_ variables) nothing is set, and
    DeepSpeed's MPI discovery (mpi4py) handles mpirun."""
    launched = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if not any(k in os.environ for k in launched):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    _single_process_env_if_unlaunched()
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    cfg = load_config(args.recipe, overrides)
    cfg.validate(world)  # before any process-group work

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from moe_dist.adapters.lora import LoRAConfig
    from moe_dist.models.arch import expert_sizes, moe_layer_indices
    from moe_dist.models.convert import trainable_params
    from moe_dist.models.embedded import EMBEDDED_NAME, ensure_embedded_model
    from moe_dist.models.loading import load_model
    from moe_dist.optim import adamw
    from moe_dist.plan import AdapterPlan
    from transformers import AutoConfig

    on_gpu = get_accelerator().device_name() == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    rank = torch.distributed.get_rank()
    device = torch.device(get_accelerator().device_name(), get_accelerator().current_device()) if on_gpu else torch.device("cpu")

    path = cfg.model
    if path == EMBEDDED_NAME:
        if rank == 0:
            ensure_embedded_model(cfg.cache_dir, cfg.seed)
        torch.distributed.barrier()
        path = str(ensure_embedded_model(cfg.cache_dir, cfg.seed))
    hf_config = AutoConfig.from_pretrained(path)
    num_experts, *_ = expert_sizes(hf_config)
    layers = moe_layer_indices(hf_config)
    plan = AdapterPlan.uniform(layers, num_experts, cfg.lora.rank,
                               attention_layers=range(hf_config.num_hidden_layers) if cfg.lora.attention else ())
    ep = cfg.ep_size or world
    model = load_model(path, plan, ep_size=ep, lora=LoRAConfig(alpha=cfg.lora.alpha, rslora=cfg.lora.rslora, seed=cfg.seed),
                       device=device)
    ds_config = json.loads(Path(cfg.ds_config).read_text())
    ds_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch
    ds_config["bf16"] = {"enabled": on_gpu}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model, cfg.lr), config=ds_config)

    n_trainable = sum(p.numel() for p in trainable_params(model).values())
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        ids = counting_batch(cfg.micro_batch, cfg.seq_len, hf_config.vocab_size, gen).to(device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if rank == 0 and (step % 10 == 0 or step == cfg.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    elapsed = time.perf_counter() - t0
    summary = {
        "world": world, "ep_size": ep, "trainable_params": n_trainable,
        "first_loss": sum(losses[:5]) / min(5, len(losses)), "final_loss": sum(losses[-5:]) / min(5, len(losses)),
        "tokens_per_sec": cfg.steps * cfg.micro_batch * cfg.seq_len * world / elapsed,
    }
    if rank == 0:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        print("summary: " + json.dumps(summary))
    engine.destroy()
    return summary


if __name__ == "__main__":
    main()
