"""bench/gpu_check.sh --dry: the GPU check's steps end to end on CPU (gloo, small), so the
script is known to run before a GPU is lent: parity passes in fp32 and bf16 with both expert
kernels, the bf16 ZeRO-2 engine trains with the ZeRO anchor on the adapter-less layers,
HELLoRI reaches LoRI's stage 2 with B zero outside its masks, the bf16 run with activation
checkpointing lowers the loss, the bf16 layer benchmark reports both systems, and nothing is
written to bench/results/. And bench/gpu_kit.py's check of a kit folder (no downloads: a fake
kit) passes a complete one and fails one over the size limit or with a second version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("parity", "quant_parity", "engine", "hellori", "train", "moe_layer")
GPU_RESULTS = [ROOT / "bench" / "results" / f"gpu_{n}.json" for n in STEPS]


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

    quant = json.loads((results / "gpu_quant_parity.json").read_text())
    assert quant["failures"] == [] and [r["arch"] for r in quant["results"]] == ["deepseek_v3"], quant["failures"]
    assert set(quant["results"][0]["cases"]) == {"fp32/grouped", "fp32/loop", "bf16/grouped", "bf16/loop"}
    assert all(row["logits_max_rel"] < 1e-5 for k, row in quant["results"][0]["cases"].items() if k.startswith("fp32"))

    engine = json.loads((results / "gpu_engine.json").read_text())
    assert engine["passed"] and engine["problems"] == [], engine["problems"]
    setup = (engine["backend"], engine["precision"], engine["zero_stage"], engine["kernel"])
    assert setup == ("gloo", "bf16", 2, "grouped"), setup
    assert engine["anchored_layers"] == [0, 2] and engine["adapted_layers"] == [1, 3] and len(engine["losses"]) == 3

    hellori = json.loads((results / "gpu_hellori.json").read_text())
    assert hellori["passed"] and hellori["stage2_event"]["step"] == 3, hellori["problems"]
    assert hellori["nonzero_outside_mask"] == 0 and hellori["nonzero_inside_mask"] > 0
    assert hellori["summary"]["method"] == "hellori" and hellori["summary"]["steps"] == 5

    train = json.loads((results / "gpu_train.json").read_text())
    assert train["final_loss"] < train["first_loss"], train
    assert train["activation_checkpointing"] is True and train["steps"] == 5 and train["skipped_steps"] == 0

    layer = json.loads((results / "gpu_moe_layer.json").read_text())
    assert (layer["dtype"], layer["device"]) == ("bf16", "cpu")
    assert set(layer["tokens_per_sec"]) == {"baseline_peft_grouped_mm", "moe_dist_all_experts"}
    assert all(v > 0 for v in layer["tokens_per_sec"].values()) and layer["speedup_all_experts"] > 0

    assert {p: p.stat().st_mtime_ns for p in GPU_RESULTS if p.exists()} == before  # CPU figures stay out


def _gpu_kit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_kit.py"), *args], capture_output=True, text=True,
                          timeout=60)


def test_gpu_kit_list_checks_a_kit_folder_without_downloading(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_kit

    kit = tmp_path / "kit"
    plan = _gpu_kit("--list", "--kit", str(kit))
    assert plan.returncode == 0 and "no kit at" in plan.stdout and "deepspeed==0.19.8" in plan.stdout, plan.stdout

    (kit / "wheels").mkdir(parents=True)
    for name, version, _ in gpu_kit.WHEELS:  # stand-ins: the check reads names, sizes and the manifest
        (kit / "wheels" / f"{name}-{version}-py3-none-any.whl").write_bytes(b"x" * 1000)
    model = kit / "cache" / gpu_kit.MODEL_DIR
    model.mkdir(parents=True)
    (model / "build.json").write_text("{}")
    manifest = gpu_kit.write_manifest(kit)
    assert manifest["total_bytes"] == 1000 * len(gpu_kit.WHEELS) + 2
    assert {w["name"] for w in manifest["wheels"]} == {n for n, _, _ in gpu_kit.WHEELS}
    ok = _gpu_kit("--list", "--kit", str(kit))
    assert ok.returncode == 0 and "gpu_kit: ok" in ok.stdout, ok.stdout + ok.stderr
    assert "wheels/deepspeed-0.19.8-py3-none-any.whl" in ok.stdout and "total" in ok.stdout

    with open(model / "model.safetensors", "wb") as f:  # sparse: 61 MiB on paper, nothing on disk
        f.truncate(61 << 20)
    (kit / "wheels" / "peft-0.20.0-py3-none-any.whl").write_bytes(b"x")
    bad = _gpu_kit("--list", "--kit", str(kit))
    assert bad.returncode == 1 and "gpu_kit: FAILED" in bad.stdout
    assert "over the 60 MiB limit" in bad.stdout and "peft: 2 wheels" in bad.stdout
    assert "model.safetensors: not in the manifest" in bad.stdout


def test_gpu_kit_check_env_runs_here():
    """The target-side check (standard library + packaging) runs on this Python: it lists what
    the carried wheels rely on; versions here may differ from the kit's (CI resolves freely)."""
    proc = _gpu_kit("--check-env")
    assert proc.returncode in (0, 1) and "carried packages" in proc.stdout, proc.stdout + proc.stderr
