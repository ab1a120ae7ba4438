"""bench/gpu_check.sh --dry: the GPU check's three steps end to end on CPU (gloo, small), so the
script is known to run before a GPU is lent: parity passes in fp32 and bf16 with both expert
kernels, the bf16 run with activation checkpointing lowers the loss, the bf16 layer benchmark
reports both systems, and nothing is written to bench/results/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_RESULTS = [ROOT / "bench" / "results" / f"gpu_{n}.json" for n in ("parity", "train", "moe_layer")]


def test_dry_mode_runs_the_three_steps_on_cpu(tmp_path, cache_dir):
    before = {p: p.stat().st_mtime_ns for p in GPU_RESULTS if p.exists()}
    # GPU_CHECK_CACHE: the session's 20-step embedded base, not a second build
    env = dict(os.environ, GPU_CHECK_DIR=str(tmp_path), PYTHON=sys.executable, GPU_CHECK_CACHE=str(cache_dir))
    env.pop("DRY", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "gpu_check: all passed" in proc.stdout
    results = tmp_path / "results"

    parity = json.loads((results / "gpu_parity.json").read_text())
    assert parity["passed"] and parity["failed"] == [], parity["failed"]
    assert (parity["device"], parity["backend"], parity["ep_size"]) == ("cpu", "gloo", 1)
    assert parity["archs"] == ["olmoe", "gpt_oss"]
    for arch, by_dtype in parity["results"].items():
        assert set(by_dtype) == {"fp32", "bf16"}, arch
        for dtype, by_kernel in by_dtype.items():
            assert set(by_kernel) == {"grouped", "loop"}, (arch, dtype)
            for row in by_kernel.values():
                assert row["passed"] and row["model"]["logits_max_rel"] >= 0, (arch, dtype, row)
        for row in by_dtype["bf16"].values():
            assert row["layers"], arch  # every expert layer was checked against its fp32 twin
        for row in by_dtype["fp32"].values():
            assert row["model"]["logits_max_rel"] < 1e-5, (arch, row)

    train = json.loads((results / "gpu_train.json").read_text())
    assert train["final_loss"] < train["first_loss"], train
    assert train["activation_checkpointing"] is True and train["steps"] == 5 and train["skipped_steps"] == 0

    layer = json.loads((results / "gpu_moe_layer.json").read_text())
    assert (layer["dtype"], layer["device"]) == ("bf16", "cpu")
    assert set(layer["tokens_per_sec"]) == {"baseline_peft_grouped_mm", "moe_dist_all_experts"}
    assert all(v > 0 for v in layer["tokens_per_sec"].values()) and layer["speedup_all_experts"] > 0

    assert {p: p.stat().st_mtime_ns for p in GPU_RESULTS if p.exists()} == before  # CPU figures stay out
