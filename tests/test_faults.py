"""Faults a cluster produces, injected with the real launcher and real processes (the spirit of
tests/test_train_launch.py): a stopped rank, SIGTERM to the runner or to one rank, a NaN, a
truncated checkpoint, resume overrides, and bad inputs. Each asserts what a user relies on:
the job ends in bounded time naming the cause, nothing is left running, no good checkpoint
is lost, and the resumed run continues the uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PRETRAIN_STEPS
from test_train_launch import _losses, _ok
from moe_dist.train.checkpoint import complete_checkpoints

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


def _args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--recipe", str(ROOT / "launch/recipes/tiny_lora.yaml"), f"output_dir={out}", f"cache_dir={cache}",
            f"embedded_pretrain_steps={PRETRAIN_STEPS}", f"train.steps={STEPS}", "train.warmup_steps=1",
            "train.log_every=1", "checkpoint.every=2", "checkpoint.keep=3", "eval.before=false", "data.eval=",
            "train.lr=0.01", "export.formats=[]", *extra]


def _cmd(args: list[str], port: int, nprocs: int = 2) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port", str(port),
            str(ROOT / "launch" / "train.py"), *args]


def _env(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def _launch(args: list[str], port: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(args, port), cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=600)


def _python(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the job ended before the fault was injected"
        if (out / "metrics.jsonl").is_file() and max(_losses(out), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _rank_pids(out: Path) -> dict[int, int]:
    return {int(f.name.split("-")[1]): json.loads(f.read_text())["pid"] for f in (out / ".heartbeat").glob("rank-*")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _same_curve(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(b) == sorted(a), (sorted(a), sorted(b))
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5), (step, a[step], b[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted run: the curve every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _ok(_launch(_args(out, cache_dir), port=29640))
    return out


def test_a_stopped_rank_ends_the_job_naming_it(tmp_path, cache_dir):
    """SIGSTOP (a stuck device, a dead NIC) on rank 1: the other rank's collective times out
    after dist_timeout_s on whichever group it waits in, the job ends non-zero in < 2x that,
    the line names rank 1, and no process is left."""
    out, timeout = tmp_path / "stop", 20
    proc = subprocess.Popen(_cmd(_args(out, cache_dir, f"dist_timeout_s={timeout}", "train.steps=400"), 29641),
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(out, 2, proc)
    pids = _rank_pids(out)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.time()
    try:
        text, _ = proc.communicate(timeout=4 * timeout)
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert elapsed < 2 * timeout, (elapsed, text[-3000:])
    assert "unresponsive: rank 1" in text, text[-3000:]
    assert not any(_alive(p) for p in pids.values())


@pytest.mark.parametrize("target", ["runner", "rank"])
def test_sigterm_checkpoints_exits_and_resumes_on_the_same_curve(tmp_path, cache_dir, reference, target):
    """SIGTERM to the deepspeed runner (it has no handler on one node: our ranks notice it is
    gone) or to one rank: every rank finishes the step, a fresh complete checkpoint is written,
    the job exits non-zero saying so, no process remains, and resume=auto continues the
    uninterrupted run's curve."""
    out = tmp_path / target
    args = _args(out, cache_dir, "checkpoint.every=0")  # only the stop writes one
    proc = subprocess.Popen(_cmd(args, 29642 + (target == "rank")), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_step(out, 2, proc)  # steps take ~0.1 s here: leave the stop time to land before STEPS
    everyone = _descendants(proc.pid)
    os.kill(proc.pid if target == "runner" else _rank_pids(out)[1], signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    deadline = time.time() + 30  # the runner may exit first; its launcher and ranks follow
    while any(_alive(p) for p in everyone) and time.time() < deadline:
        time.sleep(0.5)
    assert not [p for p in everyone if _alive(p)], "processes left behind"
    if target == "rank":
        assert proc.returncode != 0
    saved = complete_checkpoints(out / "checkpoints")
    assert saved and 2 <= saved[-1][0] < STEPS, (saved, text[-3000:])
    log = text + "".join(f.read_text() for f in out.glob("*.log"))
    assert "SIGTERM" in log and "checkpoint.resume=auto" in log, log[-3000:]
    _ok(_launch([*args, "checkpoint.resume=auto"], port=29644 + (target == "rank")))
    _same_curve(_losses(reference), _losses(out))


def test_nan_stops_the_run_and_keeps_the_good_checkpoints(tmp_path, cache_dir):
    """A NaN loss on one rank from step 5 on: every rank skips those updates (one all-reduced
    flag), the run stops non-zero after train.max_nonfinite_steps of them naming the step and
    the checkpoint to resume from, and no checkpoint is written from the diverged state."""
    out = tmp_path / "nan"
    proc = _launch(_args(out, cache_dir, "faults.max_nonfinite_steps=2"), port=29646, MOE_DIST_NAN_AT="1:5")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite" in text and "steps 5..6" in text and "step-4" in text, text[-3000:]
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [2, 4]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "skipped_step"] == [5, 6]


def test_a_transient_nan_is_skipped_and_counted(tmp_path, cache_dir, reference):
    out = tmp_path / "blip"
    _ok(_launch(_args(out, cache_dir), port=29647, MOE_DIST_NAN_AT="0:3:1"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == STEPS
    losses, ref = _losses(out), _losses(reference)
    assert math.isclose(losses[2], ref[2], rel_tol=1e-5) and not math.isfinite(losses[3])
    assert all(math.isfinite(v) for s, v in losses.items() if s != 3)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, cache_dir, reference):
    out = tmp_path / "trunc"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / f"step-{STEPS}"
    f = newest / "adapters-rank00000.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    proc = _launch(_args(out, cache_dir, f"train.steps={STEPS + 2}", "checkpoint.resume=auto"), port=29648)
    _ok(proc)
    text = proc.stdout + proc.stderr
    assert f"skipping {newest}" in text and "adapters-rank00000.safetensors" in text, text[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step-{STEPS - 2}'}" in text
    assert (out / "checkpoints" / f".bad-step-{STEPS}").is_dir()  # set aside for a look, not deleted
    _same_curve({s: v for s, v in _losses(reference).items()}, {s: v for s, v in _losses(out).items() if s <= STEPS})
    from moe_dist.train.checkpoint import resolve_resume

    (out / "checkpoints" / f"step-{STEPS + 2}" / "trainer_state.json").write_text("{not json")  # invalid state
    assert resolve_resume("auto", out, log=lambda _: None).name == f"step-{STEPS}"


def test_resume_applies_a_new_lr_and_refuses_fixed_keys(tmp_path, cache_dir, reference):
    out = tmp_path / "lr"
    shutil.copytree(reference, out)
    for step, d in complete_checkpoints(out / "checkpoints")[:-1]:
        shutil.rmtree(d)
    refused = _python(_args(out, cache_dir, "checkpoint.resume=auto", "lora.rank=16"))
    assert refused.returncode != 0 and "lora.rank" in refused.stderr and "fixed by the checkpoint" in refused.stderr
    _ok(_launch(_args(out, cache_dir, f"train.steps={STEPS + 2}", "train.lr=0.02", "checkpoint.resume=auto"),
                port=29649))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert math.isclose(lr[STEPS + 1], 2 * lr[STEPS], rel_tol=1e-6), lr  # constant schedule: the new peak


# ---- bad inputs: a message naming the culprit, non-zero, before a model is loaded ------------
def test_bad_inputs_are_named_before_any_work(tmp_path, cache_dir):
    from moe_dist.models.embedded import ensure_embedded_model

    model = ensure_embedded_model(cache_dir, 0, PRETRAIN_STEPS)
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(model, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "vocab*",
                                                                  "merges*", "chat_template*"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: embedded:tiny-olmoe\ntrain:\n  steps: [1, 2\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"zero_optimization": {"stage": 2},}')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "tokenizer": ([f"model={no_tok}"], ["tokenizer", str(no_tok)]),
        "yaml": (["--recipe", str(bad_yaml)], [str(bad_yaml), "line 3"]),
        "ds_config": ([f"ds_config={bad_json}"], [str(bad_json), "JSON", "line 1"]),
        "output_dir": ([f"output_dir={a_file}/run"], ["output_dir", "not writable"]),
        "empty": ([f"data.train={empty}"], [str(empty), "empty"]),
    }
    for name, (extra, expected) in cases.items():
        base = _args(tmp_path / name, cache_dir)
        args = extra + base[2:] if extra[0] == "--recipe" else base + extra
        t0 = time.time()
        proc = _python(args)
        assert proc.returncode != 0, name
        assert all(e in proc.stderr for e in expected), (name, proc.stderr[-2000:])
        assert "trainable params" not in proc.stdout, name  # refused before the model was built
        assert time.time() - t0 < 120, name


def test_malformed_jsonl_lines_are_counted_not_fatal(tmp_path, cache_dir):
    from moe_dist.models.embedded import embedded_task_files, ensure_embedded_model

    good = embedded_task_files(ensure_embedded_model(cache_dir, 0, PRETRAIN_STEPS))["train"].read_text().splitlines()
    lines = good[:200]
    for i in (1, 4, 9):
        lines[i] = lines[i][: len(lines[i]) // 2]  # cut mid-object
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    proc = _python(_args(tmp_path / "o", cache_dir, f"data.train={data}", "train.steps=1", "checkpoint.every=0"))
    _ok(proc)
    assert "3 malformed JSON lines (lines 2, 5, 10)" in proc.stdout + proc.stderr


def _groups_get_the_bound(rank: int, world: int) -> None:
    from moe_dist.parallel.groups import expert_groups
    from moe_dist.parallel.liveness import bound_collective_waits, group_timeouts

    bound_collective_waits(17)
    groups = expert_groups(2)  # DeepSpeed's EP and EDP groups, created after the bound
    timeouts = group_timeouts()
    assert len(timeouts) >= 3 and set(timeouts.values()) == {17.0}, timeouts  # world + EP + EDP
    assert groups.ep_group is not None


def test_every_process_group_gets_dist_timeout_s():
    """torch gives groups created without a timeout 30 minutes, not the world's: the expert
    groups DeepSpeed creates would wait that long on a stopped rank."""
    from dist_utils import run_distributed

    run_distributed(_groups_get_the_bound, 2)


def test_a_collapsed_run_is_reported(tmp_path, cache_dir):
    """train.lr=1e6 collapses the model to a constant loss with a zero gradient norm: still
    exit 0 (it is not an error of the job), but a warning and a `stalled` metrics record."""
    out = tmp_path / "flat"
    proc = _python(_args(out, cache_dir, "train.lr=1e6", "train.steps=30", "faults.stall_steps=5",
                         "checkpoint.every=0"))
    _ok(proc)
    assert "WARNING" in proc.stdout + proc.stderr and "gradient norm was 0" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "stalled" for r in rows)


def test_a_killed_rank_is_named_by_its_peer(tmp_path, cache_dir):
    """SIGKILL (the OOM killer) leaves no line from the rank itself, and the launcher names
    the last spawned rank: the peer's own FAILED line says whose process is gone."""
    out = tmp_path / "kill"
    proc = subprocess.Popen(_cmd(_args(out, cache_dir, "train.steps=400"), 29650), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(out, 2, proc)
    pids = _rank_pids(out)
    os.kill(pids[1], signal.SIGKILL)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"rank 1 (pid {pids[1]}) is gone" in text, text[-3000:]
