"""Every MoE model type the installed transformers ships on its experts interface is either
supported, and then parity-tested (logits and every adapter gradient against the plain HF
model + LoRA reference at EP 1 and at EP 2 with a non-contiguous placement; hub per-expert
and transformers-5 fused checkpoints load to from_pretrained's logits), or refused with a
stated reason. A transformers upgrade that adds a type cannot slip in untested: the set is
read from transformers' own source files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dist_utils import run_distributed
from reference import build_hf
from moe_dist.models.arch import QUIRKS, UnsupportedModelError, arch_spec, interface_model_types, moe_blocks
from moe_dist.models.convert import convert_model
from moe_dist.models.loading import load_model
from moe_dist.models.tiny import TINY_CONFIGS, tiny_config
from moe_dist.plan import AdapterPlan

# Types people fine-tune today: these must stay supported.
MUST_SUPPORT = {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "deepseek_v2", "deepseek_v3",
                "glm4_moe", "glm4_moe_lite", "minimax", "phimoe", "granitemoe", "ernie4_5_moe", "dots1",
                "hunyuan_v1_moe", "flex_olmo", "jamba", "gpt_oss"}


def classify(model_type: str) -> tuple[str, str]:
    """("supported", "") or ("refused", why)."""
    from transformers import CONFIG_MAPPING

    if model_type in QUIRKS:
        return "refused", QUIRKS[model_type]
    if model_type not in CONFIG_MAPPING:
        return "refused", f"no config class for {model_type!r} in this transformers"
    try:
        arch_spec(tiny_config(model_type))
    except UnsupportedModelError as exc:
        return "refused", str(exc)
    return "supported", ""


VERDICTS = {mt: classify(mt) for mt in interface_model_types()}
SUPPORTED = sorted(mt for mt, (v, _) in VERDICTS.items() if v == "supported")
NEW = [mt for mt in SUPPORTED if mt not in TINY_CONFIGS]  # the original five have their own parity test


def test_every_interface_type_is_supported_or_refused_with_a_reason():
    refused = {mt: why for mt, (v, why) in VERDICTS.items() if v == "refused"}
    print(f"{len(SUPPORTED)} supported: {SUPPORTED}")
    for mt, why in sorted(refused.items()):
        print(f"refused {mt}: {why}")
        assert len(why) > 20, (mt, why)
    assert MUST_SUPPORT <= set(SUPPORTED), sorted(MUST_SUPPORT - set(SUPPORTED))
    assert "no gate projection" in refused["nemotron_h"]
    for mt in SUPPORTED:
        spec = arch_spec(tiny_config(mt))
        assert spec.num_experts == 8 and spec.moe_layers, (mt, spec)
        assert any(spec.attention_targets(l) for l in spec.attention), mt  # attention LoRA has targets


def test_per_expert_module_lists_do_not_convert_silently():
    hf = build_hf("olmoe")
    block = hf.model.layers[0].mlp
    block.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(8)])
    with pytest.raises(UnsupportedModelError, match="ModuleList"):
        convert_model(hf, AdapterPlan())


def _check_new_types(rank: int, world: int) -> None:
    from test_parity_distributed import _check_rank

    _check_rank(rank, world, archs=NEW, setups=(("ep1", 1, None), ("ep2-scattered", 2, [[0, 3, 5, 6], [1, 2, 4, 7]])))


def test_parity_of_every_newly_supported_type_ep1_and_ep2_scattered():
    run_distributed(_check_new_types, 2)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_hub_and_fused_checkpoints_load_like_from_pretrained(model_type, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    hf = build_hf(model_type)
    spec = arch_spec(hf.config)
    plan = AdapterPlan.uniform(spec.moe_layers, 8, 4)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    for layout in ("hub_per_expert", "fused_v5"):
        d = tmp_path / layout
        hf.save_pretrained(d, save_original_format=layout == "hub_per_expert", max_shard_size="200KB")
        names = set()
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                names |= set(fh.keys())
        if layout == "hub_per_expert":
            assert len(list(d.glob("*.safetensors"))) > 1 and (d / "model.safetensors.index.json").is_file()
            if spec.hub.per_expert:
                assert any(f".experts.0.{spec.hub_expert_names[0]}.weight" in n for n in names), sorted(names)[:8]
        with torch.no_grad():
            want = AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits
            got = load_model(d, plan).eval()(ids).logits
            ref = convert_model(copy.deepcopy(hf), plan).eval()(ids).logits
        torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
        assert not any(t.is_meta for t in moe_blocks(load_model(d, plan), spec)[spec.moe_layers[0]].experts.parameters())


FAMILIES = ["mixtral", "deepseek_v3", "qwen3_next", "glm4_moe_lite", "qwen3_moe", "gpt_oss"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_recipe_defaults_train_each_family_on_two_ranks(model_type, cache_dir, tmp_path):
    """`deepspeed --num_gpus 2 launch/train.py` with the lora recipe's defaults (EP 2, ZeRO-2,
    experts + the architecture's attention targets) on a tiny checkpoint: the loss falls."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from conftest import PRETRAIN_STEPS
    from moe_dist.models.embedded import embedded_task_files, ensure_embedded_model

    root = Path(__file__).resolve().parent.parent
    embedded = ensure_embedded_model(cache_dir, 0, PRETRAIN_STEPS)
    model_dir = tmp_path / model_type
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=512)).save_pretrained(model_dir)
    for f in embedded.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, model_dir / f.name)
    task = embedded_task_files(embedded)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(29580 + FAMILIES.index(model_type)), str(root / "launch" / "train.py"),
           "--recipe", str(root / "launch/recipes/tiny_lora.yaml"), f"model={model_dir}", f"output_dir={out}",
           f"data.train={task['train']}", f"data.eval={task['test']}", "train.steps=8", "train.warmup_steps=1",
           "train.log_every=1", "train.lr=0.02", "eval.before=false", "eval.samples=4", "eval.max_new_tokens=2",
           "checkpoint.every=0", "export.formats=[]"]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert losses[8] < losses[1] - 0.1, losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ep_size"] == 2 and summary["trainable_params"] > 0


@pytest.mark.parametrize("model_type", ["llama4_text", "jetmoe", "longcat_flash"])
def test_moe_types_off_the_interface_are_refused_naming_why(model_type):
    with pytest.raises(UnsupportedModelError, match=f"{model_type}.*not on transformers' experts interface"):
        arch_spec(tiny_config(model_type))


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_packed_attention_equals_sdpa_wherever_auto_picks_it(model_type):
    """kernels.attention=auto on CPU fp32 swaps transformers' sdpa attention for the packed-document
    kernel wherever it judges the architecture covered. There, rows of packed documents give the
    logits and every parameter's gradient (q/k/v's through the kernel's backward) of running
    each document through the plain HF model on its own; padded batches (a 2-d mask) and
    decoding with a cache match HF too. Elsewhere it says why and leaves transformers' own."""
    from moe_dist.kernels import packed_attention as pa

    hf = build_hf(model_type)  # eval mode: PhiMoE's router jitter is random in train mode (gradients still flow)
    packed = copy.deepcopy(hf)
    reason = pa.attention_unsupported(packed, torch.device("cpu"), torch.float32)
    chosen = pa.use_attention_kernel(packed, "auto", torch.device("cpu"), torch.float32)
    if reason is not None:
        assert chosen == hf.config._attn_implementation != pa.NAME and len(reason) > 10
        with pytest.raises(ValueError, match="kernels.attention=packed cannot run here"):
            pa.use_attention_kernel(packed, "packed", torch.device("cpu"), torch.float32)
        return
    assert chosen == pa.NAME
    S = 24
    ids = torch.randint(3, 100, (2, S), generator=torch.Generator().manual_seed(0))
    docs = [[(0, 7), (7, 16), (16, S)], [(0, 11), (11, S)]]  # per row; positions restart at each document
    pos = torch.stack([torch.cat([torch.arange(e - s) for s, e in row]) for row in docs])
    hf.zero_grad(set_to_none=True)
    want = torch.zeros(2, S, hf.config.get_text_config().vocab_size)
    for b, row in enumerate(docs):  # the oracle: each document alone through the plain HF model
        for s, e in row:
            logits = hf(input_ids=ids[b:b + 1, s:e], use_cache=False).logits[0]
            (logits.float() ** 2).sum().div(want.numel()).backward()
            want[b, s:e] = logits.detach()
    logits = packed(input_ids=ids, position_ids=pos, use_cache=False).logits
    (logits.float() ** 2).mean().backward()
    tol = dict(atol=1e-5 * want.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(logits.detach(), want, **tol)
    grads = {n: p.grad for n, p in packed.named_parameters() if p.grad is not None}
    ref = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys() and any("q_proj" in n or "qkv" in n or "q_a_proj" in n for n in grads)
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, atol=1e-5 * g.abs().max().item() + 1e-8, rtol=1e-4, msg=n)
    with torch.no_grad():  # a padded batch (2-d mask) and cached decoding take transformers' sdpa path
        mask = torch.ones_like(ids)
        mask[1, 18:] = 0
        try:
            padded = hf(input_ids=ids, attention_mask=mask).logits
        except RuntimeError:  # transformers' own sdpa path fails on this tiny config (deepseek_v2)
            padded = None
        if padded is not None:
            torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits, padded, **tol)
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(packed.generate(ids[:1, :8], **gen), hf.generate(ids[:1, :8], **gen))


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_fused_rms_norm_equals_transformers_wherever_auto_swaps_it(model_type):
    """kernels.rms_norm=auto swaps the forward of every RMSNorm module whose formula the
    compiled kernel computes (checked per module): the model's logits and every parameter's
    gradient (the norms' weights included, through the kernel's backward) stay transformers'."""
    from moe_dist.kernels.rms_norm import use_norm_kernel

    hf = build_hf(model_type)
    fused = copy.deepcopy(hf)
    swapped = use_norm_kernel(fused, "auto", torch.device("cpu"), torch.float32)
    norms = [m for m in hf.modules() if type(m).__name__.endswith("RMSNorm")]
    if model_type in ("olmoe", "mixtral", "qwen3_moe", "deepseek_v3"):
        assert swapped == len(norms) > 0, (swapped, len(norms))
    assert swapped <= len(norms)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for model in (hf, fused):
        logits = model(input_ids=ids, use_cache=False).logits
        (logits.float() ** 2).mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5 * outs[0][0].abs().max().item(), rtol=1e-4)
    assert outs[1][1].keys() == outs[0][1].keys() and any("norm" in n for n in outs[0][1])
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, atol=1e-5 * g.abs().max().item() + 1e-8, rtol=1e-4, msg=n)
