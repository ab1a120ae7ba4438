"""Exports of a run on a quantized base (FP8 block, gpt-oss MXFP4), train-free.

A converted model of a tiny quantized checkpoint (moe_dist/quant/write.py) gets nonzero adapters
on experts (per projection, fused gate_up, cold experts) and attention; its adapters are written
in the trainer's checkpoint format and exported:

- `merged` is a plain HF checkpoint: plain `AutoModelForCausalLM.from_pretrained` (no
  quantization config) gives our model's logits (fp32 export of an fp32 base: fp32 tolerance),
  no `*_scale_inv` / `*_blocks` / `*_scales` tensor and no `quantization_config` is left, and
  every weight without an adapter equals transformers' own dequantization of the base exactly;
- `peft` / `vllm` are unchanged: they apply on top of the quantized base as transformers loads
  it (on CPU it dequantizes, as a server without FP8 / MXFP4 kernels does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reference import build_hf, set_b_values
from test_export import _mixed_plan, _rel, assert_same_logits, exported_logits, write_checkpoint
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.export import ExportError, export
from moe_dist.models.arch import arch_spec, moe_layer_indices
from moe_dist.models.convert import adapter_params
from moe_dist.models.loading import load_model
from moe_dist.quant.write import write_quantized_checkpoint

# (arch, format, FP8 block dividing every tiny dim, so transformers' dequantize is the oracle)
# (qwen3_moe's FP8 layout is deepseek_v3's per-expert one: tests/test_quantized.py loads both)
CASES = {"deepseek_v3": ("fp8_block", (8, 8)), "gpt_oss": ("mxfp4", None)}
QUANT_SUFFIXES = ("_scale_inv", "_blocks", "_scales")


def _reshard(base: Path) -> None:
    """The checkpoint in three shards: FP8 weights, their scales alone (a shard the merged
    export drops entirely), everything else; so every scale is read from another file."""
    (src,) = base.glob("*.safetensors")
    tensors = load_file(str(src))
    src.unlink()
    groups = {"model-00001-of-00003.safetensors": {k: t for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn},
              "model-00002-of-00003.safetensors": {k: t for k, t in tensors.items() if k.endswith("_scale_inv")}}
    groups["model-00003-of-00003.safetensors"] = {k: t for k, t in tensors.items()
                                                  if not any(k in g for g in groups.values())}
    for name, group in groups.items():
        save_file(group, str(base / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, g in groups.items() for k in g}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory):
    """(arch, our model's logits, checkpoint dir, quantized base dir, plan, ids) of one case."""
    arch = request.param
    fmt, block = CASES[arch]
    tmp = tmp_path_factory.mktemp(arch)
    hf = build_hf(arch)
    base = write_quantized_checkpoint(hf, tmp / "base", fmt, block or (128, 128))
    if arch == "deepseek_v3":
        _reshard(base)
    plan = _mixed_plan(hf)
    model = load_model(base, plan, lora=LoRAConfig(alpha=16.0)).eval()
    set_b_values(adapter_params(model))
    ckpt = write_checkpoint(tmp / "ckpt", model, plan, base, hf.config)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    return arch, want, ckpt, base, plan, ids


def _tensor_names(directory: Path) -> dict[str, torch.dtype]:
    out = {}
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    return out


def _transformers_dequantized(base: Path, arch: str):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    qc = Mxfp4Config(dequantize=True) if arch == "gpt_oss" else FineGrainedFP8Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, dtype=torch.float32).eval()


def test_merged_export_of_a_quantized_base_is_a_plain_checkpoint(run, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, want, ckpt, base, plan, ids = run
    result = export(ckpt, "merged", tmp_path / "m", log=lambda _: None)  # dtype: the base's (float32 here)
    out = tmp_path / "m"
    assert "dequantized" in result["note"] and "quantization_config removed" in result["note"], result
    assert json.loads((out / "moe_dist_export.json").read_text())["note"] == result["note"]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    names = _tensor_names(out)
    assert not [n for n in names if n.endswith(QUANT_SUFFIXES)], "scales / packed blocks left in the export"
    assert set(names.values()) == {"F32"}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(names) and all((out / f).is_file() for f in index.values())
    # every base tensor is there, quantized ones under their dense names
    base_names = set(_tensor_names(base))
    dense_names = {n.removesuffix("_blocks") for n in base_names if not n.endswith(("_scale_inv", "_scales"))}
    assert set(names) == dense_names
    with safe_open(str(out / index[next(iter(index))]), "pt") as fh:
        assert fh.metadata()["moe_dist_dequantized_from"] == CASES[arch][0]

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain: no quantization config
    assert getattr(merged, "hf_quantizer", None) is None
    with torch.no_grad():
        got = merged(ids).logits
    assert_same_logits(got, want, (arch, "merged"))

    # un-adapted weights are transformers' own dequantization, bit for bit; adapted ones moved
    oracle = _transformers_dequantized(base, arch)
    with torch.no_grad():
        assert _rel(oracle(ids).logits, want) > 1e-2  # the adapters matter
    spec = arch_spec(merged.config)
    adapted_attention = {f"model.layers.{l}.{spec.attention_module(l)}.{p}.weight" for (l, p) in plan.attention_ranks}
    ours, theirs = dict(merged.named_parameters()), dict(oracle.named_parameters())
    assert set(ours) == set(theirs)
    checked_experts = 0
    for name, w in ours.items():
        if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
            layer = int(name.split(".")[2])
            assert layer in moe_layer_indices(merged.config)
            for e in range(w.shape[0]):
                has = plan.rank(layer, e, "down_proj") if name.endswith("down_proj") else \
                    sum(plan.rank(layer, e, p) for p in ("gate_proj", "up_proj", "gate_up_proj"))
                assert torch.equal(w[e], theirs[name][e]) == (not has), (name, e, has)
                checked_experts += not has
        else:
            assert torch.equal(w, theirs[name]) == (name not in adapted_attention), name
    assert checked_experts > 0


def test_merged_export_of_a_quantized_base_in_bf16(run, tmp_path):
    """--dtype bf16: every tensor bf16 (the hub's FP8 / MXFP4 configs say bf16 anyway)."""
    from transformers import AutoModelForCausalLM

    arch, want, ckpt, _base, _plan, ids = run
    export(ckpt, "merged", tmp_path / "bf16", dtype="bf16", log=lambda _: None)
    assert set(_tensor_names(tmp_path / "bf16").values()) == {"BF16"}
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()(ids).logits
    assert _rel(got, want) < 2e-2, (arch, _rel(got, want))  # bf16 weights (8 mantissa bits) through 4 layers


def test_adapter_exports_apply_on_the_quantized_base(run, tmp_path):
    """PEFT and vLLM adapters need nothing from the export for a quantized base: on the base as
    transformers loads it (dequantized on CPU) they give our model's logits."""
    from transformers import AutoConfig

    from moe_dist.export.vllm_adapter import VLLM_3D_TYPES

    arch, want, ckpt, base, _plan, ids = run
    spec = arch_spec(AutoConfig.from_pretrained(base))
    formats = ("peft", "vllm") if spec.hub.per_expert or arch in VLLM_3D_TYPES else ("peft",)
    for fmt in formats:
        export(ckpt, fmt, tmp_path / fmt, log=lambda _: None)
        assert_same_logits(exported_logits(fmt, tmp_path / fmt, base, ids), want, (arch, fmt))


def test_load_for_inference_dequantizes_the_base_through_transformers(run):
    """moe_dist.load_for_inference on a run over a quantized base: transformers' dequantized
    model with the adapters folded in gives our model's logits."""
    from moe_dist.export.inference import load_for_inference

    arch, want, ckpt, base, _plan, ids = run
    with torch.no_grad():
        got = load_for_inference(base, ckpt)(ids).logits
    assert_same_logits(got, want, (arch, "load_for_inference"))


@pytest.mark.parametrize("run", ["deepseek_v3"], indirect=True)
def test_fp8_weight_without_its_scale_is_named_and_nothing_written(run, tmp_path):
    _arch, _want, ckpt, base, _plan, _ids = run
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    index_file = broken / "model.safetensors.index.json"  # (resharded: the scales have a file of their own)
    index = json.loads(index_file.read_text())
    victim = next(k for k in sorted(index["weight_map"]) if k.endswith(".self_attn.o_proj.weight_scale_inv"))
    shard = broken / index["weight_map"].pop(victim)
    index_file.write_text(json.dumps(index))
    tensors = load_file(str(shard))
    del tensors[victim]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    weight = victim.removesuffix("_scale_inv")
    with pytest.raises(ExportError, match=f"{weight}.*without a '{victim}'"):
        export(ckpt, "merged", tmp_path / "out", base=str(broken), log=lambda _: None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("run", ["deepseek_v3"], indirect=True)
def test_unread_quantization_method_is_refused_naming_the_field(run, tmp_path):
    _arch, _want, ckpt, base, _plan, _ids = run
    other = tmp_path / "gptq"
    shutil.copytree(base, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"quantization_config\.quant_method='gptq'"):
        export(ckpt, "merged", tmp_path / "out", base=str(other), log=lambda _: None)
    assert not (tmp_path / "out").exists()
