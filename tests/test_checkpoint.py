"""Checkpoint files: a save that dies mid-write leaves the previous checkpoint whole and
the partial one invisible to resume; values round-trip by logical key; a plan mismatch is a
clear error. (Resume through ZeRO on other world/EP sizes: tests/test_train_launch.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_dist.train import checkpoint as ckpt
from moe_dist.train.zero_state import EngineSnapshot


def _params(value: float) -> dict[str, nn.Parameter]:
    return {"layers.0.experts.1.up_proj.lora_A": nn.Parameter(torch.full((4, 8), value)),
            "layers.0.self_attn.q_proj.lora_B": nn.Parameter(torch.full((8, 4), -value))}


def _save(out, step, params):
    snap = EngineSnapshot({k: p.detach().clone() for k, p in params.items()}, {}, optimizer_step=step)
    return ckpt.save_checkpoint(out, step, snap, set(params), '{"plan": 1}', {}, {}, keep=5)


@pytest.mark.parametrize("crash_in", ["save_file", "rename"])
def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    _save(tmp_path, 2, _params(1.0))

    def boom(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(ckpt, crash_in, boom) if crash_in == "save_file" else monkeypatch.setattr(ckpt.os, "rename", boom)
    with pytest.raises(OSError, match="disk gone"):
        _save(tmp_path, 4, _params(2.0))
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / ".tmp-step-4").exists()  # the partial write is there...
    latest = ckpt.resolve_resume("auto", tmp_path)  # ...and ignored
    assert latest == tmp_path / "checkpoints" / "step-2"
    fresh = _params(0.0)
    assert ckpt.load_adapter_values(latest, fresh) == 2
    assert all(torch.equal(fresh[k], p) for k, p in _params(1.0).items())
    # The next save of that step succeeds over the leftovers.
    _save(tmp_path, 4, _params(2.0))
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == [2, 4]


def test_plan_mismatch_and_bad_path_are_named(tmp_path):
    path = _save(tmp_path, 1, _params(1.0))
    other = {"layers.3.experts.0.gate_proj.lora_A": nn.Parameter(torch.zeros(2, 2))}
    with pytest.raises(ckpt.ResumeError, match="layers.3.experts.0.gate_proj.lora_A"):
        ckpt.load_adapter_values(path, other)
    wrong_shape = {"layers.0.experts.1.up_proj.lora_A": nn.Parameter(torch.zeros(2, 8))}
    with pytest.raises(ckpt.ResumeError, match="shape"):
        ckpt.load_adapter_values(path, wrong_shape)
    with pytest.raises(ckpt.ResumeError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path / "fresh") is None


def test_rng_state_round_trips_without_pickle(tmp_path):
    """RNG states are safetensors + JSON metadata: nothing in a checkpoint is a pickle, and a
    resume draws the same numbers (python, numpy, torch) as the run that saved."""
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(3)  # numpy's cached gaussian is state too
    path = _save(tmp_path, 1, _params(1.0))
    expected = (random.random(), np.random.normal(), torch.rand(3))
    assert not [f for f in path.iterdir() if f.suffix in (".pt", ".pkl", ".bin")]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert ckpt.load_rng_state(path)
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_rotation_keeps_the_newest_finite_and_the_one_just_written(tmp_path):
    import json

    root = tmp_path / "checkpoints"
    for step, loss in ((2, 1.0), (4, float("nan")), (6, float("nan")), (9, 0.5)):
        d = root / f"step-{step}"
        d.mkdir(parents=True)
        (d / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "loss": loss}))
    ckpt.rotate(root, keep=1, written=root / "step-4")  # a run resumed at step 2 wrote step 4 below step 9
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [4, 9]
    (root / "step-9").rename(root / ".bad-step-9")  # what resume=auto does with an unreadable one
    (root / "step-8").mkdir()
    (root / "step-8" / ckpt.STATE_FILE).write_text(json.dumps({"step": 8, "loss": float("nan")}))
    (root / "step-3").mkdir()
    (root / "step-3" / ckpt.STATE_FILE).write_text(json.dumps({"step": 3, "loss": 2.0}))
    ckpt.rotate(root, keep=1, written=root / "step-8")
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [3, 8]  # the newest finite one is never rotated away
    assert (root / ".bad-step-9").is_dir()  # set-aside ones are not checkpoints to rotate


def test_checkpoints_of_the_previous_layout_still_read(tmp_path):
    """trainer_state.json before each owner had its entry: read as today's layout."""
    import json

    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps({
        "step": 4, "optimizer_step": 4, "scheduler": {"base_lrs": [0.1]}, "data_position": {"epoch": 0},
        "importance_LE": [[0.5]], "world_size": 2}))
    state = ckpt.read_trainer_state(tmp_path)
    assert state["engine"] == {"optimizer_step": 4, "scheduler": {"base_lrs": [0.1]}, "counters": {}}
    assert state["data"] == {"epoch": 0} and state["method_state"] == {"importance_LE": [[0.5]]}
