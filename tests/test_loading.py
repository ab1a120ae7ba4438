"""Sharded loading from safetensors: both naming families, every architecture, and memory."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed
from reference import build_hf
from moe_dist.models.arch import moe_layer_indices
from moe_dist.models.convert import convert_model
from moe_dist.models.loading import CheckpointError, load_model
from moe_dist.models.tiny import TINY_CONFIGS
from moe_dist.plan import AdapterPlan


def _plan(config) -> AdapterPlan:
    return AdapterPlan.uniform(moe_layer_indices(config), 8, 4, attention_layers=[0], attention_projections=("o_proj",))


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("fmt", ["hub_per_expert", "fused_v5"])
def test_load_matches_hf_model(arch, fmt, tmp_path):
    hf = build_hf(arch)
    hf.save_pretrained(tmp_path, save_original_format=(fmt == "hub_per_expert"))
    from safetensors import safe_open

    with safe_open(next(tmp_path.glob("*.safetensors")), "pt") as fh:
        names = list(fh.keys())
    assert any(".experts.gate_up_proj" in n for n in names) == (fmt == "fused_v5")
    model = load_model(tmp_path, _plan(hf.config))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
        ref = convert_model(copy.deepcopy(hf), _plan(hf.config))
        for (n1, p1), (n2, p2) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
            assert n1 == n2 and torch.equal(p1, p2), n1


def test_load_errors_name_the_problem(tmp_path):
    hf = build_hf("olmoe")
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="experts.*not found|not found"):
        # a Mixtral config over OLMoE tensors: the expert names do not exist
        cfg = tmp_path / "config.json"
        import json

        data = json.loads(cfg.read_text())
        data.update(model_type="mixtral", num_local_experts=8, architectures=["MixtralForCausalLM"])
        cfg.write_text(json.dumps(data))
        load_model(tmp_path, AdapterPlan())
    with pytest.raises(CheckpointError, match="no-such-dir"):
        load_model(tmp_path / "no-such-dir", AdapterPlan())


def _big_expert_checkpoint(path) -> int:
    """OLMoE-shaped, 64 experts x 2 layers of 256x512: experts are ~98% of the bytes."""
    from transformers import AutoModelForCausalLM

    from moe_dist.models.tiny import tiny_config

    cfg = tiny_config("olmoe", hidden_size=256, intermediate_size=512, num_experts=64, num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, save_original_format=False)
    return sum(p.numel() * 4 for p in model.parameters())


def _measure_rank(rank: int, world: int, path: str, result_dir: str) -> None:
    plan = AdapterPlan()
    # warm up imports and lazy init so the measurement sees the weights only
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    import gc
    import threading

    import psutil

    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak_rss = [before]
    done = threading.Event()

    def sample() -> None:  # ru_maxrss is useless here: imports already peaked higher
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
            done.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    model = load_model(path, plan, ep_size=world)
    done.set()
    sampler.join()
    peak = max(peak_rss[0], proc.memory_info().rss) - before
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    with open(f"{result_dir}/rank{rank}.txt", "w") as fh:
        fh.write(f"{peak} {held}")


def test_rank_reads_only_its_experts(tmp_path):
    ckpt = tmp_path / "ckpt"
    full = _big_expert_checkpoint(ckpt)
    run_distributed(_measure_rank, 4, str(ckpt), str(tmp_path))
    for rank in range(4):
        peak, held = map(int, (tmp_path / f"rank{rank}.txt").read_text().split())
        print(f"rank {rank}: peak +{peak / 2**20:.1f} MiB, holds {held / 2**20:.1f} MiB, model {full / 2**20:.1f} MiB")
        # a quarter of the experts + the small dense part; peak close to what is held
        assert held < 0.30 * full, (rank, held, full)
        assert peak < held + 0.10 * full, f"rank {rank}: peak +{peak / 2**20:.0f} MiB, holds {held / 2**20:.0f} MiB, model {full / 2**20:.0f} MiB"
