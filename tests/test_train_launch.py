"""README command 1 in small: the deepspeed launcher runs 2 CPU ranks with ZeRO-2, EP 2,
and the counting-task loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_deepspeed_launch_two_ranks_trains(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29533",
           str(ROOT / "launch" / "train.py"), "--recipe", str(ROOT / "launch/recipes/tiny_lora.yaml"),
           "steps=40", "lr=0.01", f"output_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world"] == 2 and summary["ep_size"] == 2
    assert summary["final_loss"] < summary["first_loss"] - 0.05, summary


def test_bad_override_names_the_key(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "lora.rnak=4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "lora.rnak" in proc.stderr


def test_plain_python_runs_as_a_world_of_one(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "steps=3", f"output_dir={tmp_path}",
           f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world"] == 1 and summary["ep_size"] == 1
