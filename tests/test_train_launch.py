"""The training system end to end, through the real launchers: the deepspeed launcher with 2
CPU ranks (gloo), resume after a crash (same curve), resume on another EP size and ZeRO
stage, crash reporting, and the clear errors of bad config / data / model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_dist.train.checkpoint import complete_checkpoints

ROOT = Path(__file__).resolve().parent.parent
from conftest import PRETRAIN_STEPS


def _args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--recipe", str(ROOT / "launch/recipes/tiny_lora.yaml"), f"output_dir={out}", f"cache_dir={cache}",
            f"embedded_pretrain_steps={PRETRAIN_STEPS}", "train.steps=8", "train.warmup_steps=1", "train.log_every=1",
            "checkpoint.every=2", "checkpoint.keep=3", "eval.samples=16", "eval.max_new_tokens=4", "train.lr=0.01",
            *extra]


def _launch(args: list[str], nprocs: int = 2, env: dict | None = None, port: int = 29533):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port", str(port),
           str(ROOT / "launch" / "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _python(args: list[str], script: str = "train.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _tensorboard_images(logdir: Path) -> dict[str, list[tuple[int, int, int]]]:
    """{tag: [(step, width, height)]} of the images in a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [(e.step, e.width, e.height) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_train_crash_resume_and_resume_on_other_ep_size(tmp_path, cache_dir):
    # A: uninterrupted, world 2, EP 2, ZeRO-2.
    a = tmp_path / "a"
    _ok(_launch(_args(a, cache_dir)))
    summary = json.loads((a / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ep_size"] == 2 and summary["steps"] == 8
    assert summary["trainable_params"] > 0 and summary["adapter_flops_per_token"] > 0
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05, summary  # the held-out loss falls
    losses_a = _losses(a)
    assert sorted(losses_a) == list(range(1, 9))
    assert losses_a[8] < losses_a[1] - 0.05, losses_a  # it trains
    metrics = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_sec", "trainable_params", "grad_norm"} <= set(metrics[1])
    assert any((a / "tensorboard").iterdir())
    assert [s for s, _ in complete_checkpoints(a / "checkpoints")] == [4, 6, 8]  # keep=3

    # launch/eval.py on the final checkpoint (world 1, EP 1) agrees with the run's own evaluation.
    proc = _python(["--checkpoint", str(a / "checkpoints" / "step-8"), f"output_dir={tmp_path / 'eval'}"], "eval.py")
    _ok(proc)
    result = json.loads((tmp_path / "eval" / "eval-step-8.json").read_text())
    assert result["total"] == 16 and abs(result["accuracy"] - summary["accuracy_after"]) <= 1 / 16
    # the held-out loss at EP 1 (one process) equals the run's own at EP 2 on the same weights
    assert result["loss"] == pytest.approx(summary["eval_loss_after"], rel=1e-5), (result, summary)
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 8]  # before and after, with exact match
    assert all("eval_exact_match" in r and r["eval_perplexity"] > 1 for r in rows if "eval_loss" in r)

    # B: rank 1 dies during step 5; the job ends non-zero naming the rank and the cause, fast.
    b = tmp_path / "b"
    t0 = time.time()
    crashed = _launch(_args(b, cache_dir), env={"MOE_DIST_FAIL_AT": "1:5"}, port=29534)
    assert crashed.returncode != 0
    assert "[rank 1] FAILED: RuntimeError: injected failure" in crashed.stderr + crashed.stdout
    assert time.time() - t0 < 300
    assert [s for s, _ in complete_checkpoints(b / "checkpoints")] == [2, 4]
    # ... and resume=auto continues the same loss curve.
    _ok(_launch(_args(b, cache_dir, "checkpoint.resume=auto"), port=29535))
    losses_b = _losses(b)
    for step in range(5, 9):
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-5, abs=1e-6), (step, losses_a, losses_b)

    # C: A's step-4 checkpoint resumed on EP 1 with ZeRO-1: same weights and optimizer state,
    # so the curve matches up to reduction order.
    c = tmp_path / "c"
    _ok(_launch(_args(c, cache_dir, f"checkpoint.resume={a / 'checkpoints' / 'step-4'}", "ep_size=1",
                      "ds_config=ds_configs/zero1.json", "eval.before=false"), port=29536))
    losses_c = _losses(c)
    assert sorted(losses_c) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert losses_c[step] == pytest.approx(losses_a[step], rel=1e-3), (step, losses_a, losses_c)
    assert json.loads((c / "summary.json").read_text())["ep_size"] == 1


def _chat_rows(n: int) -> list[dict]:
    """Conversations with free-form answers (exact match says ~0 before and after), in words
    the embedded tokenizer knows."""
    names = ["Ann", "Bo", "Cy", "Di"]
    return [{"messages": [
        {"role": "user", "content": f"Tell me about {names[i % 4]} and the apples."},
        {"role": "assistant", "content": f"{names[i % 4]} has {i % 9 + 2} apples. {names[(i + 1) % 4]} gives "
                                         f"{i % 5 + 1} more, so {names[i % 4]} has {i % 9 + i % 5 + 3} apples now."}]}
        for i in range(n)]


def test_plain_python_world_of_one_with_offload_on_chat_data(tmp_path, cache_dir):
    """One process, optimizer offload, a chat dataset in `messages` form without a test split:
    data.eval_fraction holds rows out; the run reports held-out loss (the default metric for
    user data), no exact match."""
    out, chat = tmp_path / "one", tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(200)))
    proc = _python(_args(out, cache_dir, "train.steps=3", "checkpoint.every=0", f"data.train={chat}", "data.eval=",
                         "data.eval_fraction=0.1", "ds_config=ds_configs/zero2_offload.json"))
    _ok(proc)
    assert "20 of 200 rows of" in proc.stdout and "held out for evaluation" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["ep_size"] == 1 and summary["steps"] == 3
    assert summary["accuracy_after"] is None and summary["eval_loss_after"] < summary["eval_loss_before"], summary
    ends = summary["step_ends_s"]  # what bench/e2e.py times the run by: one increasing stamp per step
    assert len(ends) == 3 and all(b > a > 0 for a, b in zip(ends, ends[1:]))


def test_bad_override_names_the_key():
    proc = _python(["lora.rnak=4"])
    assert proc.returncode != 0 and "lora.rnak" in proc.stderr


def test_ep_size_must_divide_world():
    proc = _python(["ep_size=2"])
    assert proc.returncode != 0 and "ep_size (2) must divide the world size (1)" in proc.stderr


def test_bad_dataset_names_the_file(tmp_path, cache_dir):
    proc = _python(_args(tmp_path / "o", cache_dir, f"data.train={tmp_path / 'missing.jsonl'}"))
    assert proc.returncode != 0 and "missing.jsonl" in proc.stderr and "[rank 0] FAILED" in proc.stderr


def test_dense_model_under_a_moe_method_says_why(tmp_path, cache_dir):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    proc = _python(_args(tmp_path / "o", cache_dir, f"model={model}"))
    assert proc.returncode != 0 and "llama" in proc.stderr and "no MoE block" in proc.stderr and "dmep" in proc.stderr


def test_hellori_keeps_A_frozen_and_B_inside_its_mask(tmp_path, cache_dir):
    """HELLoRA profiling + placement, then LoRI: A never moves from its seeded init; after
    stage 2, B is non-zero only inside a ~10% mask; masks survive in the checkpoint."""
    from safetensors.torch import load_file

    from moe_dist.adapters.lora import init_lora_A

    out = tmp_path / "hellori"
    _ok(_launch(_args(out, cache_dir, "--recipe", str(ROOT / "launch/recipes/tiny_hellori.yaml"), "train.steps=6",
                      "hellori.stage1_steps=3", "eval.before=false", "hellora.profile_steps=4"), port=29537))
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert any(e.startswith("hellora plan") for e in events) and any(e.startswith("hellori step 3") for e in events)
    final = out / "checkpoints" / "step-6"
    tensors = {}
    for f in final.glob("adapters-rank*.safetensors"):
        tensors.update(load_file(str(f)))
    expert_B = [k for k in tensors if ".experts." in k and k.endswith("lora_B")]
    experts_per_layer = {k.split(".")[1] for k in expert_B}
    assert expert_B and len({k.split(".")[3] for k in expert_B}) <= 2 * len(experts_per_layer)  # 2 hot per layer
    kept = total = 0
    for k in expert_B:
        mask = tensors[f"{k}.mask"]
        assert torch.all(tensors[k][mask == 0] == 0), f"{k}: B moved outside its mask"
        assert tensors[k].abs().sum() > 0, f"{k}: B did not train inside its mask"
        kept, total = kept + int(mask.sum()), total + mask.numel()
        a_key = k.replace("lora_B", "lora_A")
        torch.testing.assert_close(tensors[a_key], init_lora_A(*tensors[a_key].shape, a_key, 0), rtol=0, atol=0)
    assert 0.05 < kept / total < 0.15


def test_dmep_on_a_dense_checkpoint(tmp_path, cache_dir):
    """DMEP end to end on a dense (Qwen3-shaped) checkpoint with the embedded tokenizer: LoRA
    experts get pruned at the prune points, trainable params fall, load balancing goes off."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from moe_dist.models.embedded import embedded_task_files, ensure_embedded_model

    embedded = ensure_embedded_model(cache_dir, 0, PRETRAIN_STEPS)
    tok = AutoTokenizer.from_pretrained(embedded)
    cfg = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dense)
    tok.save_pretrained(dense)
    task = embedded_task_files(embedded)
    out = tmp_path / "o"
    _ok(_python(["--recipe", str(ROOT / "launch/recipes/tiny_dmep.yaml"), f"model={dense}", f"output_dir={out}",
                 f"data.train={task['train']}", f"data.eval={task['test']}", "train.steps=6", "train.warmup_steps=1",
                 "train.log_every=1", "eval.samples=8", "eval.max_new_tokens=4", "dmep.prune_start=2",
                 "dmep.prune_interval=2", "dmep.util_threshold=0.9", "train.lr=0.01"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in rows if "event" in r]
    assert len(events) == 2 and "load balancing off" in events[-1], events
    trainable = [r["trainable_params"] for r in rows if "trainable_params" in r]
    assert trainable[-1] < trainable[0], trainable


def test_epng_with_repartition_resumes_on_same_and_other_ep_size(tmp_path, cache_dir):
    """A checkpoint taken after prune/grow + moves resumes exactly on the same EP size (with
    the saved placement) and on EP 1 (contiguous, up to reduction order)."""
    epng = ("method=epng", "epng.warmup_steps=3", "epng.interval=100", "repartition.force_step=4",
            "eval.before=false")
    a = tmp_path / "a"
    _ok(_launch(_args(a, cache_dir, *epng), port=29537))
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    moves = [r for r in rows if r.get("event") == "repartition"]
    assert [m["step"] for m in moves] == [3, 4] and moves[0]["reason"].startswith("epng")
    assert sum(m["experts_moved"] for m in moves) > 0 and all(m["bytes_moved"] >= 0 for m in moves)
    assert all(m["imbalance_after"] <= m["imbalance_before"] + 1e-9 for m in moves)
    saved = json.loads((a / "checkpoints" / "step-6" / "trainer_state.json").read_text())["placements"]
    assert saved == moves[-1]["placements"]
    assert any(owner != sorted(owner) for owner in saved.values())  # not the contiguous map
    losses_a = _losses(a)
    images = _tensorboard_images(a / "tensorboard")
    # labelled figures (axes, colour bar: hundreds of pixels, not a 16 x 4 raw heatmap)
    assert set(images) >= {"routing/expert_load", "routing/router_mass", "plan/adapter_rank"}, sorted(images)
    assert all(w >= 300 and h >= 200 for _, w, h in images["routing/expert_load"])
    assert [s for s, _, _ in images["plan/adapter_rank"]] == [0, 3]  # the start, then EPnG's prune/grow

    b = tmp_path / "b"
    _ok(_launch(_args(b, cache_dir, *epng, f"checkpoint.resume={a / 'checkpoints' / 'step-6'}"), port=29538))
    losses_b = _losses(b)
    for step in (7, 8):
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-5, abs=1e-6), (step, losses_a, losses_b)
    assert json.loads((b / "checkpoints" / "step-8" / "trainer_state.json").read_text())["placements"] == saved

    c = tmp_path / "c"
    _ok(_launch(_args(c, cache_dir, *epng, f"checkpoint.resume={a / 'checkpoints' / 'step-6'}", "ep_size=1"),
                port=29539))
    losses_c = _losses(c)
    for step in (7, 8):
        assert losses_c[step] == pytest.approx(losses_a[step], rel=1e-3), (step, losses_a, losses_c)


def test_fp8_base_trains_resumes_on_other_ep_size_and_stays_out_of_checkpoints(tmp_path, cache_dir):
    """An FP8 copy of the embedded base (hub layout, 64 x 64 blocks: its dims are 128 / 64)
    through the real launcher: EP 2, then step 2's checkpoint resumed on EP 1 follows the same
    curve; checkpoints hold adapters only, never the frozen base or its scales."""
    from safetensors import safe_open

    from moe_dist.models.embedded import model_dir_name
    from moe_dist.quant.write import main as write_quantized

    fp8 = tmp_path / "fp8"
    write_quantized([str(cache_dir / model_dir_name(0, PRETRAIN_STEPS)), str(fp8), "--fmt", "fp8_block",
                     "--block", "64", "64"])
    common = [f"model={fp8}", "train.steps=4", "data.eval=", "export.formats=[]"]
    a = tmp_path / "a"
    _ok(_launch(_args(a, cache_dir, *common), port=29541))
    losses_a = _losses(a)
    assert losses_a[4] < losses_a[1], losses_a
    names = [k for f in (a / "checkpoints").rglob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert names and not [k for k in names if "scale_inv" in k or ".weight" in k and "lora" not in k], names[:8]
    c = tmp_path / "c"
    _ok(_launch(_args(c, cache_dir, *common, f"checkpoint.resume={a / 'checkpoints' / 'step-2'}", "ep_size=1"),
                port=29542))
    losses_c = _losses(c)
    for step in (3, 4):
        assert losses_c[step] == pytest.approx(losses_a[step], rel=1e-3), (step, losses_a, losses_c)
