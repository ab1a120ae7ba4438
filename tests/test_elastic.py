"""Elastic expert parallelism: the layout decisions at any world (pure), and a run through
torch's elastic agent that loses a node, gains it back and loses it by a planned leave.

The run: two `torchrun --nnodes 1:2 --max-restarts 3` agents on one c10d rendezvous on
localhost, each a "node" of one CPU rank. Node B's agent and worker are SIGKILLed mid-run
(node A continues at world 1, EP 1 from the last checkpoint), B is started again (world 2,
EP 2, experts placed from the checkpoint's routing), then B's agent gets SIGTERM (a scheduler
draining it: every rank checkpoints first, A continues). After each event the losses equal
those of a run resumed by hand from the same checkpoint at that world, the global batch and
the LR schedule are the ones the run started with.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PRETRAIN_STEPS
from moe_dist.config import ConfigError
from moe_dist.parallel.elastic import (ElasticLaunch, agent_nnodes, check_ep_size, check_global_batch,
                                       elastic_launch, resolve_ep_size, split_global_batch)
from moe_dist.train.engine import warmup_cosine

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STEPS, LR, WARMUP, MIN_LR = 24, 3e-3, 1, 0.1


# ---- the decisions ------------------------------------------------------------------------
def test_ep_size_auto_fixed_and_the_sizes_that_fit():
    assert resolve_ep_size("auto", 2, 16)[0] == 2
    assert resolve_ep_size("auto", 6, 16)[0] == 2  # the largest dividing the world and the experts
    assert resolve_ep_size("auto:8", 16, 64)[0] == 8  # the configured size where it fits
    size, why = resolve_ep_size("auto:8", 12, 64)
    assert size == 4 and "8 does not divide the world (12)" in why
    assert resolve_ep_size("0", 4, 16)[0] == 4 and resolve_ep_size("2", 4, 16)[0] == 2
    with pytest.raises(ConfigError) as err:
        resolve_ep_size("8", 12, 64)
    assert "ep_size (8) must divide the world size (12)" in str(err.value) and "[1, 2, 4]" in str(err.value)
    with pytest.raises(ConfigError, match="expert count"):
        resolve_ep_size("4", 4, 6)
    for bad in ("auto:0", "eight", "-1"):
        with pytest.raises(ConfigError, match="ep_size"):
            resolve_ep_size(bad, 4, 16)
    with pytest.raises(ConfigError) as err:  # a fixed size some world of the range cannot hold
        check_ep_size("8", [4, 8, 12, 16], 64, "--nnodes 1:4 x 4 per node")
    assert "world 4, 12" in str(err.value) and "auto:8" in str(err.value)
    check_ep_size("auto:8", [4, 12], 64, "")


def test_global_batch_split_per_world():
    assert split_global_batch(16, 2, 8) == (8, 1)
    assert split_global_batch(16, 1, 8) == (8, 2)
    assert split_global_batch(48, 4, 8) == (6, 2)  # the largest micro-batch <= the cap that divides 12
    assert split_global_batch(16, 3, 8) is None
    with pytest.raises(ConfigError) as err:
        check_global_batch(16, [2, 3, 4], "--nnodes 2:4 x 1 per node")
    text = str(err.value)
    assert "world 3" in text and "worlds that work: [2, 4]" in text and "train.global_batch=12" in text


def test_the_elastic_launch_is_read_from_the_agent():
    argv = ["/venv/bin/python", "/venv/bin/torchrun", "--nnodes", "1:3", "--nproc-per-node", "2", "--max-restarts",
            "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h:29400", "launch/train.py", "--recipe", "r.yaml"]
    assert agent_nnodes(argv) == (1, 3)
    assert agent_nnodes(["python", "-m", "torch.distributed.run", "--nnodes", "2", "x.py"]) == (2, 2)
    assert agent_nnodes(["python", "launch/train.py"]) is None
    env = {"TORCHELASTIC_RUN_ID": "j", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_MAX_RESTARTS": "3",
           "LOCAL_WORLD_SIZE": "2"}
    launch = elastic_launch(env, argv)
    assert launch == ElasticLaunch(2, 3, 1, 3, 2) and launch.elastic and launch.may_grow
    assert launch.worlds() == [2, 4, 6]
    assert elastic_launch({}, argv) is None  # not under torchrun's agent
    fixed = elastic_launch(dict(env, TORCHELASTIC_MAX_RESTARTS="0"), argv[:2] + ["--nnodes", "2", "t.py"])
    assert not fixed.elastic and not fixed.may_grow


# ---- the run ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return [str(ROOT / "launch/train.py"), "--recipe", str(ROOT / "launch/recipes/tiny_lora.yaml"),
            f"output_dir={out}", f"cache_dir={cache}", f"embedded_pretrain_steps={PRETRAIN_STEPS}",
            f"train.steps={STEPS}", f"train.lr={LR}", f"train.warmup_steps={WARMUP}", f"train.min_lr_ratio={MIN_LR}",
            "train.global_batch=16", "train.log_every=1", "data.eval=", "export.formats=[]", "checkpoint.every=2",
            "checkpoint.keep=100", *extra]


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return rows


def _children(pid: int) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(d))
        except (OSError, IndexError):
            pass
    return found


class Job:
    """Agents of one elastic job, started and stopped as a cluster would."""

    def __init__(self, out: Path, cache: Path, logs: Path):
        self.out, self.logs, self.port = out, logs, _free_port()
        self.cmd = [str(BIN / "torchrun"), "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "3",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", "elastic-test",
                    # a dead node leaves the rendezvous after 5 s, a round closes 2 s after its last join
                    "--rdzv-conf", "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=5",
                    "--monitor-interval", "0.5", *_train_args(out, cache)]
        self.t0 = time.time()

    def start(self, name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        return subprocess.Popen(self.cmd, cwd=ROOT, env=_env(MOE_DIST_STEP_PAUSE_S="0.4"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, step: int, world: int, timeout: float = 240) -> dict:
        """The first logged step >= `step` run at `world`."""
        end = time.time() + timeout
        while time.time() < end:
            rows = [r for r in _rows(self.out) if "loss" in r and r["step"] >= step and r["world"] == world]
            if rows:
                return rows[0]
            time.sleep(0.1)
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(self.logs.glob("*.log")))
        pytest.fail(f"no step >= {step} at world {world} within {timeout} s; rows {_rows(self.out)[-3:]}\n{logs}")


def _by_hand(checkpoint: Path, world: int, out: Path, cache: Path) -> dict[int, float]:
    """The same run resumed by hand from `checkpoint` at `world` (no elastic agent)."""
    launcher = ([sys.executable] if world == 1 else
                [str(BIN / "torchrun"), "--nproc-per-node", str(world), "--master-port", str(_free_port())])
    proc = subprocess.run([*launcher, *_train_args(out, cache, f"checkpoint.resume={checkpoint}")], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}


def test_node_lost_regained_and_drained(tmp_path, cache_dir):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    job = Job(out, cache_dir, logs)
    a = job.start("A")
    time.sleep(1)  # A hosts the rendezvous store
    b = job.start("B")
    faults = {}
    try:
        # (a) unplanned: node B's agent and worker killed outright
        at = job.wait_for(5, 2)
        faults["lost"] = time.time()
        for pid in _children(b.pid):
            os.kill(pid, signal.SIGKILL)
        os.kill(b.pid, signal.SIGKILL)
        b.wait()
        at = job.wait_for(at["step"], 1)
        # (b) growth: node B comes back
        at = job.wait_for(at["step"] + 3, 1)
        faults["joined"] = time.time()
        b = job.start("B")
        at = job.wait_for(at["step"], 2)
        # (c) planned leave: a scheduler drains node B (SIGTERM to its agent)
        at = job.wait_for(at["step"] + 3, 2)
        faults["drained"] = time.time()
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=120) != 0
        assert a.wait(timeout=300) == 0, (logs / "A.log").read_text()[-4000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    rows = _rows(out)
    resumes = [r for r in rows if r.get("event") == "resume"]
    assert [(r["world"], r["ep_size"], r["saved_world"]) for r in resumes] == [(1, 1, 2), (2, 2, 1), (1, 1, 2)], resumes
    lost, joined, drained = resumes
    assert joined["steps_redone"] == 0 and drained["steps_redone"] == 0  # checkpoint first: nothing lost
    assert "preempted: stopped by SIGTERM" in (logs / "B.log").read_text()

    # Generations: the rows after each resume record, up to the next; the last row of a step wins.
    generations = [[]]
    for r in rows:
        if r.get("event") == "resume":
            generations.append([])
        elif "loss" in r:
            generations[-1].append(r)
    final = {r["step"]: r for gen in generations for r in gen}
    assert sorted(final) == list(range(1, STEPS + 1))  # the run completes all its steps
    assert {r["sequences"] for gen in generations for r in gen} == {16}  # the global batch never moved
    for step, r in final.items():  # the LR follows the one schedule across every restart
        assert r["lr"] == pytest.approx(LR * warmup_cosine(step, WARMUP, STEPS, MIN_LR), rel=1e-6), (step, r)

    # After each event: the losses of a run resumed by hand from the same checkpoint at that world.
    for i, (resume, gen) in enumerate(zip(resumes, generations[1:])):
        checkpoint = out / "checkpoints" / f"step-{resume['from_step']}"
        ref = _by_hand(checkpoint, resume["world"], tmp_path / f"by-hand-{i}", cache_dir)
        assert gen and gen[0]["step"] == resume["from_step"] + 1
        for r in gen:
            assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5), (i, r["step"], r["loss"], ref)

    # Growth: experts placed from the checkpoint's routing, balanced (not contiguous).
    placed = [r for r in rows if r.get("event") == "repartition" and r["reason"].startswith("resume at EP 2")]
    assert len(placed) == 1 and placed[0]["imbalance_after"] <= 1.10 < placed[0]["imbalance_before"], placed
    assert joined["expert_imbalance"] < joined["expert_imbalance_contiguous"], joined

    report = {name: {"steps_redone": r["steps_redone"], "seconds_to_first_resumed_step":
                     round(gen[0]["time"] - faults[name], 1), "recovery_s_logged": r["recovery_s"]}
              for name, r, gen in zip(("lost", "joined", "drained"), resumes, generations[1:])}
    report["joined"].update(imbalance_expected=placed[0]["imbalance_after"],
                            imbalance_contiguous=placed[0]["imbalance_before"],
                            imbalance_first_step=joined["expert_imbalance"],
                            imbalance_first_step_contiguous=joined["expert_imbalance_contiguous"])
    print(json.dumps(report, indent=1))
