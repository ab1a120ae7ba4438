"""Export round trips: real training checkpoints of every method (and one written at EP 2 with a
non-contiguous placement) leave moe_dist as a merged HF checkpoint, a PEFT adapter, vLLM's
per-expert layout and moe_dist's own format, and each gives the fine-tuned model's logits
through the ecosystem's own loaders (plain transformers, plain PEFT, a reader written from
vLLM's `PackedLoRALayerWeights.pack_moe`). Every architecture's tiny config round-trips with
mixed per-expert ranks, cold experts and both checkpoint layouts; a base in 8 shards exports
at a fraction of its size in memory; bad inputs fail naming the file or field, writing nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import PRETRAIN_STEPS
from reference import build_hf, set_b_values
from moe_dist.adapters.lora import LoRAConfig
from moe_dist.config import RunConfig
from moe_dist.export import ExportError, export, load_for_inference
from moe_dist.models.arch import shape_summary
from moe_dist.models.arch import arch_spec, decoder_layers, expert_sizes, moe_layer_indices
from moe_dist.models.convert import adapter_params
from moe_dist.models.loading import load_model
from moe_dist.models.tiny import TINY_CONFIGS
from moe_dist.plan import AdapterPlan

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("merged", "peft", "vllm", "moe_dist")


# ---- helpers ----------------------------------------------------------------------------
def _run(args: list[str], launcher: bool = False, port: int = 29561) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if launcher:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               str(ROOT / "launch" / "train.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _train(out: Path, cache: Path, *extra: str, launcher: bool = False) -> Path:
    _run(["--recipe", str(ROOT / "launch/recipes/tiny_lora.yaml"), f"output_dir={out}", f"cache_dir={cache}",
          f"embedded_pretrain_steps={PRETRAIN_STEPS}", "train.steps=4", "train.warmup_steps=1", "train.log_every=1",
          "train.lr=0.02", "checkpoint.every=0", "eval.before=false", "eval.samples=8", "eval.max_new_tokens=4",
          "export.formats=[]", *extra], launcher=launcher)
    return json.loads((out / "summary.json").read_text())["checkpoint"]


RUNS = {  # name -> (overrides, launched on 2 ranks)
    "lora": ((), False),
    "hellora": (("method=hellora", "hellora.profile_steps=2"), False),
    "hellori": (("method=hellori", "hellora.profile_steps=2", "train.steps=6", "hellori.stage1_steps=3"), False),
    "epng": (("method=epng", "epng.warmup_steps=2", "epng.interval=100"), False),
    "lora_ep2": (("lora.expert_targets=gate_up_proj,down_proj", "repartition.force_step=2"), True),
    "dmep": (("method=dmep", "dmep.prune_start=2", "dmep.prune_interval=1", "dmep.prune_times=1"), False),
}


@pytest.fixture(scope="module")
def checkpoints(cache_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {name: Path(_train(root / name, cache_dir, *extra, launcher=launched))
            for name, (extra, launched) in RUNS.items()}


def trained_model(ckpt: Path):
    """The fine-tuned moe_dist model of a checkpoint, in one process (EP 1), as eval.py builds it."""
    from moe_dist.export.trained import TrainedCheckpoint
    from moe_dist.models.convert import adapter_params
    from moe_dist.routing import experts_modules
    from moe_dist.train.checkpoint import load_adapter_values, load_masks
    from moe_dist.train.setup import build_model

    t = TrainedCheckpoint(ckpt)
    model = build_model(t.config, t.base_model_dir(), t.plan, 1, torch.device("cpu"), bf16=False)
    load_adapter_values(ckpt, adapter_params(model))
    masks = {k: m for mod in experts_modules(model).values() for k, m in mod.adapters.lori_masks().items()}
    load_masks(ckpt, masks)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_same_logits(got: torch.Tensor, want: torch.Tensor, what) -> None:
    """fp32 through a 4-layer MoE: relative 1e-5 over the logits, and no position off by more
    than 1e-4 of the largest logit (a routing near-tie amplifies rounding order, not more)."""
    rel, worst = _rel(got, want), ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5 and worst < 1e-4, (what, rel, worst)


def vllm_reconstruct(adapter_dir: Path, base_dir: Path):
    """vLLM's reading of the per-expert layout (vllm/lora: parse `base_model.model.` names into
    modules, `PackedLoRALayerWeights.pack_moe` stacks per expert (w1=gate, w2=down, w3=up), all
    three required for every expert; scaling = lora_alpha / r, one r per file), applied to a
    plain HF model in memory."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, scaling = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loras: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        assert name.startswith("base_model.model.") and name.endswith((".lora_A.weight", ".lora_B.weight")), name
        module, part = name[len("base_model.model."):].rsplit(".", 2)[:2]
        loras.setdefault(module, {})[part] = t
    from transformers import AutoConfig

    num_experts = expert_sizes(AutoConfig.from_pretrained(base_dir))[0]
    for module, ab in loras.items():
        k = num_experts if module.endswith((".experts", ".experts.base_layer")) else 1  # 3-D: E x r rows
        assert ab["lora_A"].shape[0] == k * r and ab["lora_B"].shape[1] == k * r, (module, "one rank per adapter file")
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    spec = arch_spec(model.config)
    E, _D, F, _K = expert_sizes(model.config)
    gate, up, down = spec.hub_expert_names
    layers = decoder_layers(model)
    used = set()
    with torch.no_grad():
        if any(m.endswith(".experts.base_layer") for m in loras):
            # the 3-D layout (vllm/lora/model_manager.py `_stack_moe_lora_weights`, is_3d_moe_weight):
            # experts.base_layer = gate_up_proj, experts = down_proj; A -> (E, r, in), B -> (out, r, E) -> (E, out, r)
            for layer in moe_layer_indices(model.config):
                prefix = f"model.layers.{layer}.{spec.block_name}.experts"
                experts = getattr(layers[layer], spec.block_name).experts
                for module, param in ((prefix + ".base_layer", "gate_up_proj"), (prefix, "down_proj")):
                    ab = loras[module]
                    A_ERI = ab["lora_A"].reshape(E, -1, ab["lora_A"].shape[-1])
                    B_EOR = ab["lora_B"].reshape(ab["lora_B"].shape[0], -1, E).permute(2, 0, 1)
                    delta = scaling * torch.bmm(B_EOR, A_ERI)  # (E, out, in) in the stored output order
                    W = getattr(experts, param)
                    W += delta.transpose(1, 2) if spec.layout.transposed else delta
                    used.add(module)
        elif any(".experts." in m for m in loras):
            for layer in moe_layer_indices(model.config):
                prefix = f"model.layers.{layer}.{spec.hub_block}.experts"
                per_expert = [loras[f"{prefix}.{e}.{n}"] for e in range(E) for n in (gate, down, up)]  # KeyError = missing
                used.update(f"{prefix}.{e}.{n}" for e in range(E) for n in (gate, down, up))
                w1_a = torch.stack([per_expert[3 * e]["lora_A"] for e in range(E)])
                w2_a = torch.stack([per_expert[3 * e + 1]["lora_A"] for e in range(E)])
                w3_a = torch.stack([per_expert[3 * e + 2]["lora_A"] for e in range(E)])
                w1_b = torch.stack([per_expert[3 * e]["lora_B"] for e in range(E)])
                w2_b = torch.stack([per_expert[3 * e + 1]["lora_B"] for e in range(E)])
                w3_b = torch.stack([per_expert[3 * e + 2]["lora_B"] for e in range(E)])
                experts = getattr(layers[layer], spec.block_name).experts
                experts.gate_up_proj[:, :F] += scaling * torch.bmm(w1_b, w1_a)
                experts.gate_up_proj[:, F:] += scaling * torch.bmm(w3_b, w3_a)
                experts.down_proj += scaling * torch.bmm(w2_b, w2_a)
        for module, ab in loras.items():
            if ".self_attn." in module:
                layer, proj = int(module.split(".")[2]), module.rsplit(".", 1)[1]
                getattr(layers[layer].self_attn, proj).weight += scaling * ab["lora_B"] @ ab["lora_A"]
                used.add(module)
    assert used == set(loras), sorted(set(loras) - used)[:3]
    return model


def exported_logits(fmt: str, out: Path, base_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        if fmt == "merged":
            return AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        if fmt == "peft":
            base = AutoModelForCausalLM.from_pretrained(base_dir)
            return PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
        if fmt == "vllm":
            return vllm_reconstruct(out, base_dir)(ids).logits
        return load_for_inference(None, out)(ids).logits


# ---- round trips of real training checkpoints ---------------------------------------------
@pytest.mark.parametrize("name", [n for n in RUNS if n != "dmep"])
def test_trained_checkpoint_round_trips_every_format(name, checkpoints, tmp_path):
    ckpt = checkpoints[name]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    plan = AdapterPlan.from_json((ckpt / "plan.json").read_text())
    base_dir = Path(state["model_dir"])
    if name == "lora_ep2":  # written by 2 ranks, experts spread non-contiguously
        assert state["ep_size"] == 2 and len(list(ckpt.glob("adapters-rank*.safetensors"))) == 2
        assert any(owner != sorted(owner) for owner in state["placements"].values()), state["placements"]
        assert {p for (_l, _e, p) in plan.expert_ranks} == {"gate_up_proj", "down_proj"}
    if name == "epng":  # after a prune/grow: fewer adapted experts, some with a grown rank
        assert len({(l, e) for (l, e, _p) in plan.expert_ranks}) < 4 * 16
        assert len(set(plan.expert_ranks.values())) > 1
    if name == "hellori":
        with safe_open(str(next(ckpt.glob("adapters-rank*.safetensors"))), "pt") as fh:
            masks = [fh.get_tensor(k) for k in fh.keys() if k.endswith(".mask")]
        assert masks and sum(float(m.mean()) for m in masks) / len(masks) < 0.5  # B is mostly masked
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained_model(ckpt)(ids).logits
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
    assert _rel(base_logits, want) > 1e-3  # the adapters matter: dropping one would show
    for fmt in FORMATS:
        out = tmp_path / fmt
        export(ckpt, fmt, out)
        info = json.loads((out / "moe_dist_export.json").read_text())
        assert info["format"] == fmt and info["step"] == state["step"] and info["plan_hash"] == plan.hash()
        assert_same_logits(exported_logits(fmt, out, base_dir, ids), want, fmt)


def test_merged_checkpoint_is_complete_and_keeps_the_base_layout(checkpoints, tmp_path):
    ckpt = checkpoints["lora"]
    base_dir = Path(json.loads((ckpt / "trainer_state.json").read_text())["model_dir"])
    export(ckpt, "merged", tmp_path / "m")
    out = tmp_path / "m"
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors.index.json"):
        assert (out / f).is_file(), f
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_names = set()
    for f in base_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            base_names |= set(fh.keys())
    assert set(index["weight_map"]) == base_names  # same tensors, same names: the base's own layout
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind
    # bf16 on request: tensors and config say so, and it still loads
    export(ckpt, "merged", tmp_path / "bf16", dtype="bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(next((tmp_path / "bf16").glob("*.safetensors"))), "pt") as fh:
        assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in fh.keys())


def test_peft_config_is_plain_peft(checkpoints, tmp_path):
    """Per-expert ranks become padded per-parameter ranks with alpha = r (scaling 1)."""
    from peft import PeftConfig

    export(checkpoints["epng"], "peft", tmp_path / "p")
    cfg = PeftConfig.from_pretrained(str(tmp_path / "p"))
    assert cfg.lora_alpha == cfg.r and cfg.alpha_pattern == cfg.rank_pattern
    assert all(t.endswith((".gate_up_proj", ".down_proj")) for t in cfg.target_parameters)
    assert all(".self_attn." in t for t in cfg.target_modules)
    assert cfg.lora_dropout == 0.0


def test_dmep_refuses_lora_formats_and_loads_for_inference(checkpoints, tmp_path):
    ckpt = checkpoints["dmep"]
    for fmt in ("merged", "peft", "vllm"):
        with pytest.raises(ExportError, match="LoRA-MoE.*moe_dist"):
            export(ckpt, fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()
    export(ckpt, "moe_dist", tmp_path / "native")
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained_model(ckpt)(ids).logits
        model = load_for_inference(None, tmp_path / "native")
        got = model(ids).logits
    from moe_dist.adapters.lora_moe import LoRAMoELinear

    assert any(isinstance(m, LoRAMoELinear) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Module) and type(m).__name__ == "ExpertParallelExperts"
                   for m in model.modules())  # a plain HF model, no DeepSpeed layer
    assert_same_logits(got, want, "dmep")


def test_greedy_generation_of_exports_matches_the_checkpoint(checkpoints, tmp_path):
    """Plain transformers `generate` on the merged model (and PEFT on the base) produces the
    same tokens as moe_dist's own evaluation of the checkpoint; launch/eval.py agrees."""
    from launch.eval import eval_export
    from moe_dist.export.use import load_exported
    from moe_dist.export.trained import TrainedCheckpoint
    from moe_dist.train.evaluate import generate_exact_match, greedy_generate
    from moe_dist.train.setup import load_eval_set

    ckpt = checkpoints["lora"]
    export(ckpt, "merged", tmp_path / "merged")
    export(ckpt, "peft", tmp_path / "peft")
    t = TrainedCheckpoint(ckpt)
    t.config.eval.samples = 24
    model = trained_model(ckpt)
    tokenizer = load_exported(str(tmp_path / "merged"))[1]
    held = load_eval_set(t.config, tokenizer, t.base_model_dir())
    prompts, refs = held.prompts, held.references
    want = [row for i in range(0, len(prompts), 8)  # the same batches as below: same padding
            for row in greedy_generate(model, prompts[i:i + 8], tokenizer.pad_token_id, tokenizer.eos_token_id, 12,
                                       torch.device("cpu"))]
    want_text = [tokenizer.decode(w, skip_special_tokens=True).strip() for w in want]
    assert len(set(want_text)) > 1 or any(want_text)  # something was generated
    for model_dir, adapter in ((str(tmp_path / "merged"), None), (None, str(tmp_path / "peft"))):
        hf, tok = load_exported(model_dir, adapter)
        result = generate_exact_match(hf, tok, prompts, refs, 12, 8)
        got = [s["generated"] for s in result["samples"]]
        assert got == want_text[:len(got)]
        # all prompts, token for token
        for i in range(0, len(prompts), 8):
            batch = prompts[i:i + 8]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=tok.eos_token_id)
            for j, row in enumerate(out[:, width:].tolist()):
                row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                assert row == want[i + j], (i + j, row, want[i + j])
    # the CLI: eval.py on the checkpoint and on the merged export give the same exact match
    res_export = eval_export(str(tmp_path / "merged"), None, ["eval.samples=24", "eval.max_new_tokens=12"])
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), "--checkpoint", str(ckpt),
                           f"output_dir={tmp_path / 'ev'}", "eval.samples=24", "eval.max_new_tokens=12"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res_ckpt = json.loads(next((tmp_path / "ev").glob("eval-step-*.json")).read_text())
    assert (res_export["correct"], res_export["total"]) == (res_ckpt["correct"], res_ckpt["total"])
    assert [s["generated"] for s in res_export["samples"]] == [s["generated"] for s in res_ckpt["samples"]]


def test_export_at_the_end_of_training_and_generate(cache_dir, tmp_path):
    """`export.formats=[merged,peft]` in a recipe: the run ends with both, loadable as is."""
    out = tmp_path / "run"
    ckpt = _train(out, cache_dir, "export.formats=[merged,peft]", "train.steps=2")
    assert json.loads((out / "export" / "merged" / "moe_dist_export.json").read_text())["checkpoint"] == \
        str(Path(ckpt).resolve())
    assert (out / "export" / "peft" / "adapter_model.safetensors").is_file()
    from launch.generate import main as generate

    texts = generate(["--model", str(out / "export" / "merged"), "--prompt", "Sam has 2 cards.", "--max-new-tokens",
                      "5"])
    assert len(texts) == 1 and isinstance(texts[0], str)


# ---- every architecture, both checkpoint layouts -------------------------------------------
def _mixed_plan(hf) -> AdapterPlan:
    """Per-expert variety: separate gate/up/down rank 4, a fused gate_up + down at rank 8, and
    cold experts; two attention projections at different ranks."""
    E = expert_sizes(hf.config)[0]
    ranks = {}
    for layer in moe_layer_indices(hf.config):
        for e in range(E):
            if e % 3 == 0:
                ranks.update({(layer, e, p): 4 for p in ("gate_proj", "up_proj", "down_proj")})
            elif e % 3 == 1:
                ranks.update({(layer, e, "gate_up_proj"): 8, (layer, e, "down_proj"): 8})
    spec = arch_spec(hf.config)
    att = {}
    for layer in spec.attention:
        targets = spec.attention_targets(layer)
        if targets:  # (linear-attention layers have none)
            att.update({(layer, targets[0]): 4, (layer, targets[-1]): 8})
    return AdapterPlan(expert_ranks=ranks, attention_ranks=att)


def write_checkpoint(directory: Path, model, plan: AdapterPlan, base_dir: Path, hf_config, alpha: float = 16.0) -> Path:
    """A checkpoint in the trainer's on-disk format (plan, adapters by logical key, state)."""
    directory.mkdir(parents=True)
    save_file({k: p.detach().contiguous() for k, p in adapter_params(model).items()},
              str(directory / "adapters-rank00000.safetensors"))
    (directory / "plan.json").write_text(plan.to_json())
    cfg = RunConfig(model=str(base_dir))
    cfg.lora.alpha = alpha
    state = {"step": 1, "method": "lora", "config": asdict(cfg), "model_dir": str(base_dir),
             "base_shape": shape_summary(hf_config)}
    (directory / "trainer_state.json").write_text(json.dumps(state))
    return directory


def synthetic_checkpoint(tmp: Path, arch: str, per_expert_layout: bool):
    hf = build_hf(arch)
    base_dir = tmp / "base"
    hf.save_pretrained(base_dir, save_original_format=per_expert_layout)
    plan = _mixed_plan(hf)
    model = load_model(base_dir, plan, lora=LoRAConfig(alpha=16.0)).eval()
    set_b_values(adapter_params(model))
    return model, write_checkpoint(tmp / "ckpt", model, plan, base_dir, hf.config), base_dir


def _supported() -> list[str]:
    from test_architectures import SUPPORTED

    return SUPPORTED


@pytest.mark.parametrize("arch,layout", [(a, lay) for a in _supported() for lay in ("hub_per_expert", "fused_v5")
                                         if lay == "hub_per_expert" or a in TINY_CONFIGS])  # (both loaded for all)
def test_every_architecture_round_trips(arch, layout, tmp_path):
    model, ckpt, base_dir = synthetic_checkpoint(tmp_path, arch, layout == "hub_per_expert")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    spec = arch_spec(model.config)
    from moe_dist.export.vllm_adapter import VLLM_3D_TYPES

    vllm_ok = spec.hub.per_expert or arch in VLLM_3D_TYPES
    if not vllm_ok:  # fused hub checkpoints vLLM does not read in its 3-D layout: refused, clearly
        with pytest.raises(ExportError, match="3-D MoE LoRA layout"):
            export(ckpt, "vllm", tmp_path / "vllm")
    for fmt in ("merged", "peft", "vllm") if vllm_ok else ("merged", "peft"):
        export(ckpt, fmt, tmp_path / fmt)
        assert_same_logits(exported_logits(fmt, tmp_path / fmt, base_dir, ids), want, (arch, layout, fmt))
    # the merged checkpoint keeps the base's layout (Mixtral: block_sparse_moe.experts.{e}.w1)
    with open(tmp_path / "merged" / "model.safetensors.index.json") as fh:
        names = json.load(fh)["weight_map"]
    if layout == "hub_per_expert" and spec.hub.per_expert:
        assert any(f".{spec.hub_block}.experts.0.{spec.hub_expert_names[0]}.weight" in n for n in names)
        # vLLM names follow the per-expert hub names of the architecture
        with safe_open(str(tmp_path / "vllm" / "adapter_model.safetensors"), "pt") as fh:
            assert any(f".{spec.hub_block}.experts.2.{spec.hub_expert_names[2]}.lora_B" in k for k in fh.keys())
    elif layout == "fused_v5":
        assert any(n.endswith(".experts.gate_up_proj") for n in names)


# ---- memory ---------------------------------------------------------------------------------
def _export_and_measure(ckpt: str, out: str, result: str) -> None:
    import gc
    import threading

    import psutil

    from moe_dist.export import export as run_export

    run_export(ckpt, "merged", out + "-warmup", log=lambda _: None)  # imports and lazy init
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_export(ckpt, "merged", out, log=lambda _: None)
    done.set()
    sampler.join()
    Path(result).write_text(str(max(peak[0], proc.memory_info().rss) - before))


def test_merged_export_memory_is_a_fraction_of_the_model(tmp_path):
    import multiprocessing

    from transformers import AutoModelForCausalLM

    from moe_dist.models.tiny import tiny_config

    cfg = tiny_config("olmoe", hidden_size=256, intermediate_size=256, num_experts=32, num_hidden_layers=8,
                      vocab_size=256)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg)
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    base_dir = tmp_path / "base"
    hf.save_pretrained(base_dir, save_original_format=False, max_shard_size=size // 8 + 2**20)
    shards = list(base_dir.glob("*.safetensors"))
    assert len(shards) == 8, len(shards)
    plan = AdapterPlan.uniform(range(8), 32, 8, attention_layers=range(8))
    model = load_model(base_dir, plan)
    set_b_values(adapter_params(model))
    ckpt = write_checkpoint(tmp_path / "ckpt", model, plan, base_dir, cfg)
    del model, hf
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_export_and_measure, args=(str(ckpt), str(tmp_path / "out"), str(tmp_path / "peak")))
    p.start()
    p.join(600)
    assert p.exitcode == 0
    peak = int((tmp_path / "peak").read_text())
    biggest = max(f.stat().st_size for f in shards)
    print(f"merged export: peak +{peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB model in 8 shards "
          f"(largest shard {biggest / 2**20:.1f} MiB)")
    assert peak < 0.25 * size, (peak, size)
    assert peak < 1.5 * biggest, (peak, biggest)


# ---- bad inputs -----------------------------------------------------------------------------
def test_bad_inputs_are_named_and_nothing_is_written(tmp_path):
    model, ckpt, base_dir = synthetic_checkpoint(tmp_path, "olmoe", True)
    # not a checkpoint
    with pytest.raises(ExportError, match="trainer_state.json"):
        export(tmp_path / "base", "merged", tmp_path / "o1")
    with pytest.raises(ExportError, match="no such directory"):
        export(tmp_path / "nope", "merged", tmp_path / "o1")
    # output exists and is not empty: untouched
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export(ckpt, "merged", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    # a base with another expert count / hidden size
    for field, value in (("num_experts", 16), ("hidden_size", 96)):
        other = tmp_path / f"other-{field}"
        hf = AutoModel_from(build_hf("olmoe"), **{field: value})
        hf.save_pretrained(other)
        with pytest.raises(ExportError, match=field):
            export(ckpt, "merged", tmp_path / f"o-{field}", base=str(other))
        assert not (tmp_path / f"o-{field}").exists()
    # a truncated adapter file names the file
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "adapters-rank00000.safetensors").read_bytes()
    (broken / "adapters-rank00000.safetensors").write_bytes(data[:100])
    with pytest.raises(ExportError, match="adapters-rank00000.safetensors"):
        export(broken, "peft", tmp_path / "o2")
    # a failure mid-write leaves no output and no temp dir
    import moe_dist.export.merged as merged

    real = merged.ShardWriter.close
    calls = []

    def failing_close(self):
        calls.append(self.path)
        real(self)
        raise OSError("disk full (injected)")

    merged.ShardWriter.close = failing_close
    try:
        with pytest.raises(OSError, match="injected"):
            export(ckpt, "merged", tmp_path / "o3")
    finally:
        merged.ShardWriter.close = real
    assert calls and not (tmp_path / "o3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o3")]


def AutoModel_from(hf, **overrides):
    from transformers import AutoModelForCausalLM

    from moe_dist.models.tiny import tiny_config

    return AutoModelForCausalLM.from_config(tiny_config(hf.config.model_type, **overrides))


def test_export_config_section_is_checked():
    from moe_dist.config import ConfigError, load_config

    cfg = load_config(str(ROOT / "launch/recipes/tiny_lora.yaml"), ["export.formats=[merged,peft]"])
    assert cfg.export.formats == ["merged", "peft"]
    cfg.validate(2, 16)
    with pytest.raises(ConfigError, match="export.formats.*'gguf'"):
        load_config(None, ["export.formats=gguf"]).validate(1)
    with pytest.raises(ConfigError, match="export.formats.*LoRA-MoE"):
        load_config(str(ROOT / "launch/recipes/tiny_dmep.yaml"), ["export.formats=[merged]"]).validate(2, 16)
    load_config(str(ROOT / "launch/recipes/tiny_dmep.yaml"), ["export.formats=[moe_dist]"]).validate(2, 16)
