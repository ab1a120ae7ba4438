"""Held-out loss and exact match of a checkpoint: `python launch/eval.py --checkpoint DIR [key=value ...]`
(or under `deepspeed --num_gpus N`, any world size: the checkpoint's logical keys load on any
EP size). The run's own config is read from the checkpoint; overrides change it (e.g.
`data.eval=my_test.jsonl eval.samples=0`). Prints the result and writes it to
output_dir/eval-step-N.json.

Also evaluates what an export wrote, in one process through plain transformers `generate`:
`--model MERGED_DIR`, `--adapter PEFT_DIR` (on the base it names, or on `--model`), or
`--adapter MOE_DIST_DIR` (launch/export.py --format moe_dist: load_for_inference). The eval
data comes from the export's record of the run (moe_dist_export.json) unless overridden.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.train import mpi_port, single_process_env_if_unlaunched, world_size_from_env  # noqa: E402
from moe_dist.config import ConfigError, config_from_dict  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a step-N directory under output_dir/checkpoints")
    parser.add_argument("--model", default=None, help="an exported merged dir (or the base of --adapter)")
    parser.add_argument("--adapter", default=None, help="an exported PEFT or moe_dist adapter dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.checkpoint is None:
        if args.model is None and args.adapter is None:
            parser.error("give --checkpoint, or --model and/or --adapter")
        return eval_export(args.model, args.adapter, overrides)
    single_process_env_if_unlaunched()
    from moe_dist.train.checkpoint import ResumeError, read_trainer_state, resolve_resume

    try:
        path = resolve_resume(args.checkpoint, ".")
        state = read_trainer_state(path)
        cfg = config_from_dict(state["config"], ["ep_size=0", "checkpoint.resume=", *overrides])
        cfg.validate(world_size_from_env())
    except (ConfigError, ResumeError) as exc:
        sys.exit(f"eval error: {exc}")

    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoTokenizer

    from moe_dist.models.convert import adapter_params
    from moe_dist.parallel.device import init_distributed
    from moe_dist.plan import AdapterPlan
    from moe_dist.train.checkpoint import load_adapter_values
    from moe_dist.train.engine import use_bf16
    from moe_dist.train.setup import build_model, resolve_model_path

    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    device = init_distributed(cfg.dist_timeout_s, mpi_port(), accel)  # this rank's device first
    world = torch.distributed.get_world_size()
    model_dir = resolve_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plan = AdapterPlan.from_json((path / "plan.json").read_text())
    model = build_model(cfg, model_dir, plan, world, device,  # the run's precision, as it trained
                        bf16=use_bf16(cfg.train.precision, on_gpu, accel.is_bf16_supported()))
    load_adapter_values(path, adapter_params(model))
    rank0 = torch.distributed.get_rank() == 0
    eval_set = held_out_split(cfg, tokenizer, model_dir, print if rank0 else (lambda _: None))
    result = score(model, tokenizer, eval_set, cfg, device, through_generate=False)
    result.update(checkpoint=str(path), step=state["step"], world_size=world)
    if rank0:
        out = Path(cfg.output_dir) / f"eval-step-{state['step']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"{describe(result)} on {eval_set.source}; written to {out}")
    return result


def held_out_split(cfg, tokenizer, data_dir: Path, log=print):
    """The run's held-out split: data.eval's split, or the rows data.eval_fraction held out of
    data.train (the same rows the run held out: seeded)."""
    from moe_dist.data.dataset import load_rows
    from moe_dist.train.setup import held_out, load_eval_set, resolve_data_source

    d, rows = cfg.data, None
    if d.eval_fraction:
        train = load_rows(resolve_data_source(d.train, data_dir, cfg, "train"), d.train_split, d.subset, log)
        rows = held_out(train, d.eval_fraction, cfg.seed)[1]
    eval_set = load_eval_set(cfg, tokenizer, data_dir, log, rows)
    if eval_set is None:
        sys.exit("eval error: data.eval is empty and data.eval_fraction is 0; name a held-out dataset")
    return eval_set


def score(model, tokenizer, eval_set, cfg, device, through_generate: bool) -> dict:
    """eval.metrics of the held-out split: the token loss, exact match (through moe_dist's
    collective decoding, or plain transformers `generate` for an exported model)."""
    from moe_dist.train.evaluate import exact_match, generate_exact_match, token_loss

    result = {}
    if eval_set.loss_rows is not None:
        result.update(token_loss(model, eval_set.loss_rows, cfg.train.micro_batch, device))
    if eval_set.prompts is not None:
        args = (model, tokenizer, eval_set.prompts, eval_set.references, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        result.update(generate_exact_match(*args) if through_generate else exact_match(*args, device))
    return result


def describe(result: dict) -> str:
    parts = [f"eval loss {result['loss']:.4f} (perplexity {result['perplexity']:.3g})"] if "loss" in result else []
    if "accuracy" in result:
        parts.append(f"exact match {result['accuracy']:.3f} ({result['correct']}/{result['total']})")
    return "; ".join(parts)


def eval_export(model: str | None, adapter: str | None, overrides: list[str]) -> dict:
    """Held-out loss and exact match of an exported model, one process, plain transformers
    (+ PEFT): its forward and `generate`."""
    from moe_dist.export import ExportError
    from moe_dist.export.use import export_info, load_exported

    info = export_info(adapter, model)
    try:
        cfg = config_from_dict(info["config"], overrides) if info else config_from_dict({}, overrides)
    except ConfigError as exc:
        sys.exit(f"eval error: {exc}")
    try:
        hf, tokenizer = load_exported(model, adapter)
    except (ExportError, OSError) as exc:
        sys.exit(f"eval error: {exc}")
    data_dir = Path(info.get("base_model_dir") or model or ".")  # the embedded task lives beside its base
    eval_set = held_out_split(cfg, tokenizer, data_dir)
    result = score(hf, tokenizer, eval_set, cfg, next(hf.parameters()).device, through_generate=True)
    result.update(model=model, adapter=adapter, step=info.get("step"))
    print(f"{describe(result)} on {eval_set.source} ({model or ''} {adapter or ''})")
    return result


if __name__ == "__main__":
    main()
