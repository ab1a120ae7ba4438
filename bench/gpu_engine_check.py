"""The ZeRO anchor under DeepSpeed's bf16 ZeRO-2 engine, on one device (issue 28 item 5).

Why a script and not a recipe: the anchor (moe_dist/parallel/groups.py `zero_anchor`, a
one-element trainable expert parameter) exists only where a rank's experts in some MoE layer
carry no adapter. At world 1 / EP 1 no recipe's method plans that (LoRA adapts every expert,
HELLoRA/HELLoRI every layer's hot ones), so this builds the trainer's own model
(moe_dist.train.setup.build_model: the embedded base through the sharded loader, bf16 frozen
base, `moe.kernel=grouped`) on an explicit plan: MoE layers 0 and 2 with NO expert adapter,
layers 1 and 3 with ranks 8/6/4 on every other expert (6 and 4 are zero-padded to grouped_mm's
stride), LoRA on attention everywhere. Then the trainer's engine (moe_dist.train.engine:
AdamW in MoE parameter groups, DeepSpeed bf16 + ZeRO-2 from ds_configs/zero2.json) takes
`--steps` optimizer steps on one fixed batch of the embedded task and asserts:

  - anchors on exactly the layers without expert adapters, and in ZeRO's parameter groups
  - every loss finite and the last below the first (one batch, repeated)
  - adapters changed in every adapted layer and on attention; every anchor still 0 and finite

Prints one line per step and a verdict; writes a JSON report with `--out`; exits 1 on failure.

    python bench/gpu_engine_check.py [--device cuda] [--steps 10] [--cache-dir DIR]
                                     [--pretrain-steps 600] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from gpu_parity import init_world_of_one  # noqa: E402

from moe_dist.config import load_config  # noqa: E402
from moe_dist.models.arch import arch_spec, moe_layer_indices  # noqa: E402
from moe_dist.models.convert import adapter_params  # noqa: E402
from moe_dist.plan import AdapterPlan  # noqa: E402
from moe_dist.routing import experts_modules  # noqa: E402
from moe_dist.train.engine import build_engine  # noqa: E402
from moe_dist.train.setup import build_model, resolve_model_path  # noqa: E402


def anchor_plan(config) -> tuple[AdapterPlan, list[int]]:
    """(plan, the MoE layers left without expert adapters: every other one, from the first)."""
    spec = arch_spec(config)
    layers = sorted(moe_layer_indices(config))
    bare, adapted = layers[::2], layers[1::2]
    if not adapted:
        raise SystemExit(f"gpu_engine_check: {len(layers)} MoE layer(s); need two or more")
    ranks = {(l, e, p): (8, 6, 4)[(e // 2) % 3]
             for l in adapted for e in range(0, spec.num_experts, 2) for p in ("gate_proj", "up_proj", "down_proj")}
    attention = {(l, p): 8 for l in spec.attention for p in spec.attention_targets(l)}
    return AdapterPlan(expert_ranks=ranks, attention_ranks=attention), bare


def fixed_batch(model_dir: Path, batch: int, seq: int, device) -> dict[str, torch.Tensor]:
    """`batch` x `seq` tokens of the embedded task's training rows, concatenated and cut."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    with open(model_dir / "task" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids += tok(row["prompt"] + row["response"])["input_ids"] + [tok.eos_token_id]
            if len(ids) >= batch * seq:
                break
    x = torch.tensor(ids[:batch * seq]).view(batch, seq).to(device)
    return {"input_ids": x, "labels": x.clone()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "moe_dist"))
    ap.add_argument("--pretrain-steps", type=int, default=-1, help="the embedded base's (-1: its default)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    backend = init_world_of_one(device)
    cfg = load_config(str(ROOT / "launch" / "recipes" / "tiny_lora.yaml"), [
        f"cache_dir={args.cache_dir}", f"embedded_pretrain_steps={args.pretrain_steps}", "train.precision=bf16",
        "moe.kernel=grouped", f"train.steps={args.steps}", "train.warmup_steps=1", "train.lr=0.003",
        f"train.micro_batch={args.micro_batch}", f"data.seq_len={args.seq}",
        f"ds_config={ROOT / 'ds_configs' / 'zero2.json'}"])
    model_dir = resolve_model_path(cfg)
    from transformers import AutoConfig

    plan, bare = anchor_plan(AutoConfig.from_pretrained(model_dir))
    model = build_model(cfg, model_dir, plan, 1, device, bf16=True)
    problems = []
    experts = experts_modules(model)
    anchored = sorted(l for l, m in experts.items() if m.anchor is not None)
    if anchored != bare:
        problems.append(f"anchors on layers {anchored}, want {bare} (the layers without expert adapters)")
    engine, _ = build_engine(model, cfg, bf16=True)
    in_zero = {id(p) for g in getattr(engine.optimizer, "bit16_groups", []) for p in g}
    anchors = {l: experts[l].anchor for l in anchored}
    missing = [l for l, a in anchors.items() if id(a) not in in_zero]
    if missing:
        problems.append(f"anchors of layers {missing} are not in ZeRO's parameter groups")
    before = {k: p.detach().float().clone() for k, p in adapter_params(model).items()}
    batch = fixed_batch(model_dir, args.micro_batch, args.seq, device)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss = engine(**batch, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        print(f"step {step + 1}: loss {losses[-1]:.4f} at {time.perf_counter() - t0:.1f}s", flush=True)
    seconds = time.perf_counter() - t0
    after = {k: p.detach().float() for k, p in adapter_params(model).items()}  # anew: the engine moved them
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    adapted_layers = sorted({l for (l, _e, _p) in plan.expert_ranks})
    for l in adapted_layers:
        if not any(k.startswith(f"layers.{l}.experts.") for k in changed):
            problems.append(f"no expert adapter of layer {l} changed")
    if not any("self_attn" in k for k in changed):
        problems.append("no attention adapter changed")
    if not all(math.isfinite(x) for x in losses):
        problems.append(f"non-finite loss: {losses}")
    elif len(losses) > 1 and not losses[-1] < losses[0]:
        problems.append(f"the loss did not fall on a repeated batch: {losses[0]:.4f} -> {losses[-1]:.4f}")
    for l in anchored:
        a = experts[l].anchor.detach().float()
        if not (torch.isfinite(a).all() and a.abs().max().item() == 0.0):
            problems.append(f"layer {l}'s anchor is {a.tolist()}, want [0.0]")
    if not all(torch.isfinite(t).all() for t in after.values()):
        problems.append("non-finite adapter values")
    report = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
                  "cpu", backend=backend, torch=torch.__version__, precision="bf16", zero_stage=2, kernel="grouped",
                  anchored_layers=anchored, adapted_layers=adapted_layers, losses=losses,
                  adapters_changed=len(changed), adapters=len(before), seconds=round(seconds, 2),
                  problems=problems, passed=not problems)
    print(f"gpu_engine_check: anchors on layers {anchored}, expert adapters on {adapted_layers}; {args.steps} bf16 "
          f"ZeRO-2 steps in {seconds:.1f}s, loss {losses[0]:.4f} -> {losses[-1]:.4f}; {len(changed)}/{len(before)} "
          f"adapter tensors changed: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    engine.destroy()
    import torch.distributed as dist

    dist.destroy_process_group()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
