"""bench/methods.py's bookkeeping, without training: how per-seed summaries become the README's
rows (means, spreads, ratios paired by seed, DMEP against its own baseline), and that --reuse
reads back only a run made with the same command."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def methods():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "bench" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(acc, params, flops, tps, loss=0.1, wall=100.0):
    return {"accuracy_after": acc, "trainable_params": params, "adapter_flops_per_token": flops,
            "tokens_per_sec": tps, "tokens_per_sec_final": tps * 1.1, "final_loss": loss, "wall_s": wall}


def test_rows_pair_seeds_and_compare_dmep_with_lora_moe(methods, tmp_path):
    runs = {
        "lora": [_summary(0.6, 1000, 100, 10.0), _summary(0.8, 1000, 100, 20.0), _summary(0.4, 1000, 100, 10.0)],
        "hellora": [_summary(0.9, 200, 50, 15.0), _summary(0.1, 200, 50, 60.0), _summary(0.5, 200, 50, 20.0)],
        "lora_moe": [_summary(0.7, 800, 300, 8.0)] * 3,
        "dmep": [_summary(0.7, 400, 150, 10.0)] * 3,
    }
    rows = {r["method"]: r for r in methods.aggregate(runs, None)}
    h = rows["hellora"]
    assert h["exact_match_mean"] == pytest.approx(0.5) and h["exact_match_std"] == pytest.approx(0.4)
    assert h["params_pct_of_lora"] == pytest.approx(20.0) and h["flops_pct_of_lora"] == pytest.approx(50.0)
    # same-seed ratios 1.5, 3.0, 2.0 -> the median, not the mean (2.17) an outlier seed would pull
    assert h["throughput_vs_lora_per_seed"] == pytest.approx([1.5, 3.0, 2.0])
    assert h["throughput_vs_lora"] == pytest.approx(2.0)
    assert rows["lora"]["throughput_vs_lora"] == pytest.approx(1.0)
    d = rows["dmep"]  # against uniform LoRA-MoE, not LoRA
    assert d["params_vs_own_baseline_pct"] == pytest.approx(50.0)
    assert d["final_throughput_vs_own_baseline"] == pytest.approx(10.0 / 8.0)
    text = methods.table(list(rows.values()))
    assert "50.0 ± 40.0% (3 seeds)" in text and "50.0% fewer trainable params" in text
    methods.plot(list(rows.values()), tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert statistics.fmean(r["wall_s_mean"] for r in rows.values()) == pytest.approx(100.0)


def test_reuse_reads_back_only_the_same_command(methods, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = Path(next(a for a in cmd if a.startswith("output_dir=")).split("=", 1)[1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(_summary(0.5, 1, 1, 1.0)))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(methods.subprocess, "run", fake_run)
    out = tmp_path / "hard" / "seed0" / "lora"
    first = methods.run("lora", 2, out, ["seed=0"], 29999, reuse=True)
    assert len(calls) == 1 and first["bench_cmd"][-1] == "seed=0"
    again = methods.run("lora", 2, out, ["seed=0"], 29998, reuse=True)  # another port: same run
    assert len(calls) == 1 and again["accuracy_after"] == 0.5
    methods.run("lora", 2, out, ["seed=1"], 29997, reuse=True)  # another command: runs again
    assert len(calls) == 2
    methods.run("lora", 2, out, ["seed=1"], 29996, reuse=False)  # without --reuse: always runs
    assert len(calls) == 3
