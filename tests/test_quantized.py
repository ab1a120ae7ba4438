"""Quantized bases as shipped (FP8 block, MXFP4) and quantized at load (NF4, int8).

The oracle for a shipped quantized checkpoint is transformers' own model on the weights
*transformers* dequantizes (`FineGrainedFP8Config(dequantize=True)`, `Mxfp4Config(dequantize=
True)`), with the test's reference adapters on top; moe_dist keeps the weights quantized and
must give the same logits and adapter gradients at EP 1 and EP 2, before and after experts
move between ranks. For NF4 / int8 the oracle is the HF model with each expert weight
round-tripped through bitsandbytes' 4-bit functions / a per-row int8 rounding written here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_utils import run_distributed
from reference import build_hf, build_reference, set_b_values
from test_parity_distributed import _tokens, mixed_plan, reference_runs
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.models.arch import arch_spec, moe_blocks, moe_layer_indices
from moe_dist.models.convert import adapter_grads, adapter_params
from moe_dist.models.loading import CheckpointError, load_model
from moe_dist.parallel.move import move_experts
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan
from moe_dist.quant.codecs import FP8
from moe_dist.quant.frozen import QuantizedLinear, QuantizedWeight
from moe_dist.quant.write import write_quantized_checkpoint
from moe_dist.routing import experts_modules

# (arch, format, FP8 block): blocks that divide every tiny dim, so transformers' dequantize
# (which needs whole blocks) is the oracle; the ragged-edge case has its own test below
SHIPPED = [("deepseek_v3", "fp8_block", (8, 8)), ("qwen3_moe", "fp8_block", (16, 16)), ("gpt_oss", "mxfp4", None)]


@pytest.fixture(scope="module")
def shipped_dirs(tmp_path_factory) -> dict[str, str]:
    out = {}
    for arch, fmt, block in SHIPPED:
        d = tmp_path_factory.mktemp(f"{arch}_{fmt}")
        write_quantized_checkpoint(build_hf(arch), d, fmt, block or (128, 128))
        out[arch] = str(d)
    return out


def transformers_dequantized(directory: str, arch: str):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    qc = Mxfp4Config(dequantize=True) if arch == "gpt_oss" else FineGrainedFP8Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=qc, dtype=torch.float32).eval()


def _dense_stack_shapes(model) -> set[tuple[int, ...]]:
    """Shapes of each layer's dequantized local expert stacks (either orientation): what must never be saved."""
    shapes = set()
    for m in experts_modules(model).values():
        for w in (m.gate_up_proj, m.down_proj):
            e, O, I = w.shape  # noqa: E741
            shapes |= {(e, O, I), (e, I, O)}
    return shapes


def _check_shipped_rank(rank: int, world: int, dirs: dict[str, str]) -> None:
    lora = LoRAConfig(alpha=8.0)
    for arch, fmt, _ in SHIPPED:
        hf = transformers_dequantized(dirs[arch], arch)
        plan = mixed_plan(hf.config)
        ref, ref_tensors = build_reference(hf, plan, lora)
        ref_logits, ref_grads = reference_runs(ref, ref_tensors, [_tokens(src) for src in range(world)])
        for ep in (1, 2):
            for kernel in ("auto", "grouped"):
                where = f"{arch}/ep{ep}/{kernel}/rank{rank}"
                model = load_model(dirs[arch], plan, ep_size=ep, lora=lora)
                mods = experts_modules(model)
                for m in mods.values():
                    m.set_kernel(kernel)
                    assert isinstance(m.gate_up_proj, QuantizedWeight), where
                    stored = m.gate_up_proj.parts()
                    assert (stored["weight"].dtype == FP8) if fmt == "fp8_block" else (stored["blocks"].dtype == torch.uint8)
                if fmt == "fp8_block":  # attention (LoRA-wrapped) and the dense layer's MLP stay FP8 too
                    assert isinstance(model.model.layers[0].self_attn.o_proj.base, QuantizedLinear), where
                    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear), where
                params = adapter_params(model)
                set_b_values(params)
                dense = _dense_stack_shapes(model)
                saved = []
                with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
                    out = model(_tokens(rank), labels=_tokens(rank))
                assert not dense & set(saved), f"{where}: a dequantized expert stack was kept for backward"
                out.loss.backward()
                scale = ref_logits[rank].abs().max().item()
                torch.testing.assert_close(out.logits, ref_logits[rank], atol=1e-5 * scale, rtol=0,
                                           msg=lambda m: f"{where}: logits {m}")
                grads = adapter_grads(model)
                group = range(rank // ep * ep, rank // ep * ep + ep)
                for k in params:
                    zero = torch.zeros_like(ref_tensors[k])
                    expected = (sum(ref_grads[s].get(k, zero) for s in group) if ".experts." in k
                                else ref_grads[rank].get(k, zero))
                    g_scale = max(expected.abs().max().item(), 1e-6)
                    torch.testing.assert_close(grads.get(k), expected, atol=2e-5 * g_scale, rtol=1e-4,
                                               msg=lambda m: f"{where}: grad {k}: {m}")
        # the repartitioner's move carries the quantized parts: after a reshuffle, same logits
        mods = experts_modules(model)
        new = ExpertPlacement.from_lists([[0, 3, 5, 6], [1, 2, 4, 7]])
        move_experts(mods, plan, {layer: new for layer in mods}, {}, {}, with_moments=False)
        assert all(set(m.local_experts) == set(new.experts_of(rank)) for m in mods.values())
        set_b_values(adapter_params(model))  # adapters are rebuilt by the move; B by key, as before
        with torch.no_grad():
            torch.testing.assert_close(model(_tokens(rank)).logits, ref_logits[rank], atol=2e-5 * scale, rtol=0,
                                       msg=lambda m: f"{arch}: after the move, rank {rank}: {m}")


def test_shipped_quantized_checkpoints_match_transformers_dequantized_ep1_ep2(shipped_dirs):
    run_distributed(_check_shipped_rank, 2, shipped_dirs)


def _roundtrip(w: torch.Tensor, how: str) -> torch.Tensor:
    """The oracle's own round trip of one (O, I) weight (not moe_dist's codec)."""
    if how == "nf4":
        import bitsandbytes.functional as bnb

        packed, state = bnb.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
        return bnb.dequantize_4bit(packed, state)
    scale = w.abs().amax(-1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


@pytest.mark.parametrize("how", ["nf4", "int8"])
def test_quantized_at_load_equals_round_tripped_model(how, tmp_path):
    hf = build_hf("qwen3_moe")
    hf.save_pretrained(tmp_path)
    spec, lora = arch_spec(hf.config), LoRAConfig(alpha=8.0)
    plan = mixed_plan(hf.config)
    oracle = copy.deepcopy(hf)
    errors = []
    with torch.no_grad():
        for block in moe_blocks(oracle, spec).values():
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(block.experts, name)
                rt = torch.stack([_roundtrip(w[e], how) for e in range(w.shape[0])])
                errors.append(((rt - w).norm() / w.norm()).item())
                w.copy_(rt)
    print(f"{how}: relative weight error per expert stack {[round(e, 4) for e in errors]}")
    assert all(0 < e < (0.12 if how == "nf4" else 0.01) for e in errors), errors  # it quantized, and sanely
    ref, ref_tensors = build_reference(oracle, plan, lora)
    out_ref = ref(_tokens(0), labels=_tokens(0))
    out_ref.loss.backward()
    model = load_model(tmp_path, plan, lora=lora, quantize=how)
    for m in experts_modules(model).values():
        assert isinstance(m.gate_up_proj, QuantizedWeight) and m.gate_up_proj.codec.name == how
    params = adapter_params(model)
    set_b_values(params)
    out = model(_tokens(0), labels=_tokens(0))
    out.loss.backward()
    scale = out_ref.logits.abs().max().item()
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5 * scale, rtol=0)
    grads = adapter_grads(model)
    for k, t in ref_tensors.items():
        if t.grad is not None and k in grads:
            torch.testing.assert_close(grads[k], t.grad, atol=2e-5 * max(t.grad.abs().max().item(), 1e-6), rtol=1e-4,
                                       msg=lambda m: f"{how}: grad {k}: {m}")


def test_fp8_dequantize_ragged_blocks_matches_transformers():
    """DeepSeek-V3's kv_a_proj_with_mqa has 576 rows: blocks of 128 end in a partial one."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from moe_dist.quant.codecs import Fp8Block
    from moe_dist.quant.write import fp8_quantize_padded

    w = torch.randn(72, 40)
    parts = fp8_quantize_padded(w, (16, 16))
    assert parts["weight_scale_inv"].shape == (5, 3)
    ours = Fp8Block((16, 16)).dequantize(parts, 72, 40, torch.float32)
    theirs = _dequantize_fp8_weight(parts["weight"], parts["weight_scale_inv"], [16, 16], torch.float32)
    assert torch.equal(ours, theirs)
    assert (ours - w).norm() / w.norm() < 0.05


def _edit_checkpoint(directory, fn) -> None:
    f = next(iter(sorted(directory.glob("*.safetensors"))))
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_fp8_checkpoint_errors_name_tensor_and_file(tmp_path):
    hf = build_hf("qwen3_moe")
    plan = AdapterPlan.uniform(moe_layer_indices(hf.config), 8, 4)
    expert = "model.layers.1.mlp.experts.3.up_proj.weight"
    for case in ("no_scale", "bad_scale", "no_config"):
        d = tmp_path / case
        write_quantized_checkpoint(hf, d, "fp8_block", (16, 16))
        if case == "no_scale":
            _edit_checkpoint(d, lambda t: t.pop(expert[: -len("weight")] + "weight_scale_inv"))
            match = rf"{expert}.*model.safetensors.*no .*weight_scale_inv"
        elif case == "bad_scale":
            _edit_checkpoint(d, lambda t: t.update({expert[: -len("weight")] + "weight_scale_inv": torch.ones(3, 3)}))
            match = r"up_proj.weight_scale_inv.*shape \(3, 3\).*needs \(2, 4\)"
        else:
            cfg = json.loads((d / "config.json").read_text())
            del cfg["quantization_config"]
            (d / "config.json").write_text(json.dumps(cfg))
            match = r"model.safetensors is torch.float8_e4m3fn.*without its scales"
        with pytest.raises(CheckpointError, match=match):
            load_model(d, plan)


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "bitsandbytes"])
def test_unsupported_quant_method_refused_before_any_work(method, tmp_path):
    import launch.train as train
    from moe_dist.config import ConfigError

    hf = build_hf("qwen3_moe")
    hf.save_pretrained(tmp_path)
    for f in ("tokenizer.json",):  # parse() checks the tokenizer first: give it one
        (tmp_path / f).write_text("{}")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"quantization_config.quant_method='{method}'.*supported: fp8"):
        train.parse([f"model={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(CheckpointError, match="quantization_config.quant_method"):
        load_model(tmp_path, AdapterPlan())


def test_quantized_weight_keeps_storage_through_casts():
    """`.to(bf16)` / `.double()` change what the weight dequantizes to, never its stored bytes."""
    from moe_dist.quant.codecs import Nf4

    w = QuantizedWeight(Nf4(), (2, 64, 32), torch.float32)
    for name, t in Nf4().quantize(torch.randn(2, 64, 32)).items():
        w.parts()[name].copy_(t)
    before = {k: v.clone() for k, v in w.parts().items()}
    dense = w.dense()
    w.to(torch.bfloat16)
    assert w.dtype == torch.bfloat16 and w.dense().dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in w.parts().items())
    torch.testing.assert_close(w.dense().float(), dense, atol=2e-2, rtol=1e-2)


def test_fp8_bf16_dequantize_in_chunks_rounds_once(monkeypatch):
    """bf16 from fp32 math (as transformers' Fp8Dequantize does), a few experts at a time."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    import moe_dist.quant.codecs as codecs

    codec = codecs.Fp8Block((16, 16))
    parts = codec.quantize(torch.randn(5, 64, 48))
    monkeypatch.setattr(codecs, "FP32_CHUNK_BYTES", 2 * 64 * 48 * 4)  # two experts a chunk: 3 chunks
    want = _dequantize_fp8_weight(parts["weight"], parts["weight_scale_inv"], [16, 16], torch.float32).bfloat16()
    assert torch.equal(codec.dequantize(parts, 64, 48, torch.bfloat16), want)


def test_quantized_dense_base_refused_before_any_work(tmp_path):
    """DMEP's dense models load through transformers as they are: no quantized base there."""
    import launch.train as train
    from transformers import AutoModelForCausalLM

    from moe_dist.config import ConfigError
    from moe_dist.models.tiny import tiny_config

    AutoModelForCausalLM.from_config(tiny_config("qwen3")).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="dense model.*quantized base \\(nf4\\)"):
        train.parse([f"model={tmp_path}", "method=dmep", "base.quantize=nf4", f"output_dir={tmp_path / 'out'}"])
