"""Entry point: `deepspeed [--num_gpus N | --hostfile H] launch/train.py --recipe R.yaml [key=value ...]`.

Also runs as `python launch/train.py` (a world of one), under `torchrun` and under `mpirun`
(DeepSpeed's MPI discovery through mpi4py). The config is checked before any process-group
work; an exception on any rank prints the rank and the cause and ends that process non-zero,
and the launcher then stops the other ranks (a rank blocked in a collective would otherwise
wait for dist_timeout_s).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def share_cores_between_local_ranks() -> None:
    """OMP_NUM_THREADS = this process's cores / ranks on this host, unless the user set it.

    Must run before torch loads: thread pools read it once at start. The deepspeed launcher
    sets nothing (torchrun sets 1), so 2 ranks on 2 cores ran 2 threads each. Setting
    torch.set_num_threads after start was not enough: measured at the bench shape, EP 1 x DP 2
    on 2 cores, the gradient reductions still waited 258 ms a step, 58 ms with this variable
    set (pools that torch.set_num_threads does not reach keep spinning against the peer rank)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = next((int(os.environ[k]) for k in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                                 "MPI_LOCALNRANKS") if k in os.environ), 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // local))


def prefer_this_environments_tools() -> None:
    """This Python's bin directory first on PATH, before torch loads: torch.utils.cpp_extension
    runs `ninja` from PATH to build the compiled kernels (moe_dist's, DeepSpeed's shm op), and a
    launcher that starts ranks through a login shell (pdsh over ssh) gives them the system PATH.
    A system ninja of another version (1.11 beside the venv's 1.13 here) hashes the build
    commands differently, so every switch between the two rebuilt both extensions from scratch:
    ~70 s of a 2-core box, in 3 of the launch tests."""
    bindir = str(Path(sys.executable).parent)
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bindir]
    os.environ["PATH"] = os.pathsep.join([bindir, *parts])


share_cores_between_local_ranks()
prefer_this_environments_tools()

from moe_dist.config import ConfigError, RunConfig, load_config  # noqa: E402

LAUNCHED_BY = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def single_process_env_if_unlaunched() -> None:
    """`python launch/train.py` with no launcher: a world of one on localhost. Under
    deepspeed/torchrun (WORLD_SIZE) or mpirun (OMPI_/PMI_ variables) nothing is set, and
    DeepSpeed's MPI discovery (mpi4py) handles mpirun."""
    if not any(k in os.environ for k in LAUNCHED_BY):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def mpi_port() -> int:
    """The rendezvous port under mpirun: MASTER_PORT if set (`mpirun -x MASTER_PORT=...`,
    a `.deepspeed_env` line under `deepspeed --launcher openmpi`), else DeepSpeed's 29500.

    Under mpirun no RANK is set, so deepspeed.init_distributed runs its MPI discovery
    (mpi4py: rank, world, local rank, MASTER_ADDR = rank 0's first `hostname -I` address), which
    overwrites MASTER_PORT with its `distributed_port` argument: without passing it through,
    every mpirun job on a host would meet on 29500 and two at once would collide. Under the
    deepspeed launcher and torchrun the environment is complete and the argument is unused."""
    return int(os.environ.get("MASTER_PORT", "29500"))


def rank_from_env() -> str:
    """This process's rank for its failure lines, before the process group exists: under
    mpirun RANK appears only after DeepSpeed's MPI discovery, so read the MPI's own variable."""
    return next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if k in os.environ), "?")


def world_size_from_env() -> int:
    for key in LAUNCHED_BY:
        if key in os.environ:
            return int(os.environ[key])
    return 1


def peek_num_experts(cfg: RunConfig) -> int | None:
    """The model's expert count from its config alone (no weights), for validation."""
    from moe_dist.models import embedded

    if cfg.model == embedded.EMBEDDED_NAME:
        return embedded.TINY_OLMOE["num_experts"]
    from moe_dist.models.arch import UnsupportedModelError, expert_sizes
    from moe_dist.models.loading import load_hf_config

    try:
        hf_config = load_hf_config(cfg.model)
    except Exception:  # unreachable hub, missing dir: reported with context when loading
        return None
    from moe_dist.quant.checkpoint import QuantizationConfigError, load_codec

    try:  # a quantization this loader does not read is refused before any work
        stored, kept = load_codec(hf_config, cfg.base.quantize, where=f"{cfg.model}: config.json")
    except QuantizationConfigError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return expert_sizes(hf_config)[0]
    except UnsupportedModelError:
        if cfg.method == "dmep":  # DMEP also runs on dense models
            if stored is not None or kept is not None:
                raise ConfigError(f"{cfg.model} is a dense model, loaded by transformers as is: a quantized base "
                                  f"({(stored or kept).name}) is supported for MoE models only; use its bf16 "
                                  "checkpoint and base.quantize=none") from None
            return None
        raise  # an unsupported model type fails here, listing the supported


def parse(argv: list[str] | None) -> RunConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="YAML recipe (launch/recipes/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.recipe, overrides)
    num_experts = peek_num_experts(cfg)
    cfg.validate(world_size_from_env(), num_experts)
    elastic_defaults(cfg, num_experts)
    from moe_dist.models import embedded
    from moe_dist.train.setup import missing_tokenizer

    if cfg.model != embedded.EMBEDDED_NAME and Path(cfg.model).is_dir():
        problem = missing_tokenizer(Path(cfg.model))
        if problem:
            raise ConfigError(problem)
    return cfg


def elastic_defaults(cfg: RunConfig, num_experts: int | None) -> None:
    """Under torchrun's elastic agent (docs/elastic.md): every worker start resumes from the
    newest complete checkpoint (checkpoint.resume=auto unless set), and a fixed ep_size or
    global batch that some world of `--nnodes MIN:MAX` cannot hold is refused now, not at the
    restart that reaches that world."""
    from moe_dist.parallel.elastic import check_ep_size, check_global_batch, elastic_launch

    launch = elastic_launch()
    if launch is None or not launch.elastic:
        return
    if not cfg.checkpoint.resume:
        cfg.checkpoint.resume = "auto"
    if launch.may_grow and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError(
            f"an elastic launch that may grow ({launch.nodes_text()}) needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
            "every agent's environment: with the shared store torch's rendezvous keeps rank 0's address from the "
            "round it started in, so a node that joins later waits for an address that is never written "
            "(torch.distributed.elastic.rendezvous.dynamic_rendezvous, next_rendezvous); docs/elastic.md")
    if launch.worlds():
        check_ep_size(cfg.ep_size, launch.worlds(), num_experts, launch.nodes_text())
        if cfg.train.global_batch:
            check_global_batch(cfg.train.global_batch, launch.worlds(), launch.nodes_text())
    if not cfg.checkpoint.every and rank_from_env() == "0" and launch.restart == 0:
        print("warning: an elastic run without checkpoint.every: a lost node restarts it from step 0", flush=True)


def heartbeat_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / ".heartbeat"


def failure_context(cfg: RunConfig, exc: BaseException) -> str:
    """Which peer is behind a failed collective: a rank whose process is gone (on this host),
    or after a timeout, the ranks that stopped responding (fenced on this host)."""
    from moe_dist.parallel.liveness import describe_unresponsive

    from moe_dist.parallel.liveness import exited_ranks

    text = f"{type(exc).__name__}: {exc}".lower()
    timed_out = any(k in text for k in ("timed out", "timeout", "deadline"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ""
    gone = exited_ranks(heartbeat_dir(cfg), world)  # a peer killed outright (SIGKILL, OOM) leaves no line
    if gone:
        return "; the process of " + ", ".join(f"rank {r} (pid {w['pid']})" for r, w in gone) + " is gone"
    if timed_out:
        return "; " + describe_unresponsive(heartbeat_dir(cfg), world, stale_after=5 * cfg.faults.heartbeat_s)
    return ""


def run(cfg: RunConfig) -> dict:
    import torch
    from deepspeed.accelerator import get_accelerator

    from moe_dist.parallel.device import init_distributed
    from moe_dist.parallel.elastic import resolve_ep_size
    from moe_dist.parallel.liveness import Heartbeat, bound_collective_waits
    from moe_dist.train.stop import StopRequests
    from moe_dist.train.engine import use_bf16
    from moe_dist.train.trainer import Trainer

    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    device = init_distributed(cfg.dist_timeout_s, mpi_port(), accel)  # this rank's device first
    bound_collective_waits(cfg.dist_timeout_s)  # the expert groups too, created later
    rank = torch.distributed.get_rank()
    Heartbeat(heartbeat_dir(cfg), rank, cfg.faults.heartbeat_s)
    stop = StopRequests(rank, cfg.faults.preempt_grace_s).install()
    torch.manual_seed(cfg.seed)
    ep_size, why = resolve_ep_size(cfg.ep_size, torch.distributed.get_world_size(), peek_num_experts(cfg))
    if rank == 0:
        print(why, flush=True)
    trainer = Trainer(cfg, device, bf16=use_bf16(cfg.train.precision, on_gpu, accel.is_bf16_supported()), stop=stop,
                      ep_size=ep_size)
    trainer.setup()
    summary = trainer.run()
    trainer.ds.engine.destroy()
    if cfg.export.formats and summary["checkpoint"] and torch.distributed.get_rank() == 0:  # from the final checkpoint
        from moe_dist.export import export

        root = Path(cfg.export.dir or Path(cfg.output_dir) / "export")
        summary["exports"] = [export(summary["checkpoint"], fmt, root / fmt, dtype=cfg.export.dtype,
                                     replace_previous=True) for fmt in cfg.export.formats]
    return summary


def main(argv: list[str] | None = None) -> dict:
    single_process_env_if_unlaunched()
    from moe_dist.models.arch import UnsupportedModelError

    try:
        cfg = parse(argv)
    except (ConfigError, UnsupportedModelError) as exc:
        sys.exit(f"config error: {exc}")
    from moe_dist.data.dataset import DataError
    from moe_dist.train.checkpoint import ResumeError
    from moe_dist.train.guard import DivergenceError
    from moe_dist.train.stop import Preempted

    rank = rank_from_env()
    try:
        return run(cfg)
    except Preempted as exc:
        _end(f"[rank {rank}] preempted: {exc.message}\n", exc.code)
    except (ConfigError, DataError, ResumeError, DivergenceError) as exc:  # known causes: the line says it all
        _end(f"[rank {rank}] FAILED: {type(exc).__name__}: {exc}\n", 1)
    except BaseException as exc:  # noqa: BLE001 - report, then end this rank without waiting on peers
        _end(f"[rank {rank}] FAILED: {type(exc).__name__}: {exc}{failure_context(cfg, exc)}\n"
             f"{traceback.format_exc()}", 1)


def _end(text: str, code: int) -> None:
    """Report and end this rank now (no waiting on peers in atexit handlers)."""
    sys.stderr.write(text)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
