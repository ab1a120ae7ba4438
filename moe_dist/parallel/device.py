"""The one place a process picks its accelerator: once, from its local rank, before any process
group or model exists.

Why here and not later: torch's `init_process_group` does not set the current CUDA device, and
DeepSpeed sets it only inside `deepspeed.initialize`, after the model is built. An entry point
that reads `current_device()` before that gets device 0 on every rank: 8 ranks would load
their shards onto one GPU, and NCCL's communicators (bound to the current device at their
first collective) would all sit there too. So every entry point calls `init_distributed`
below, which sets the device first, then starts the process group.
"""

from __future__ import annotations

import datetime
import os
from typing import Mapping

import torch

# Launchers and the variable each sets for the rank on this host: deepspeed/torchrun, Open MPI,
# MPICH / Intel MPI, Slurm's srun.
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def local_rank_from_env(env: Mapping[str, str] | None = None) -> int:
    """This process's rank on its host, from whichever launcher started it (0 when none did)."""
    env = os.environ if env is None else env
    for key in LOCAL_RANK_VARS:
        if env.get(key, "") != "":
            return int(env[key])
    return 0


def select_device(accel=None, env: Mapping[str, str] | None = None) -> torch.device:
    """The device of this rank: `cpu` on a CPU accelerator, else accelerator `LOCAL_RANK`, made
    current here (so the model, the batches, every collective's tensors and NCCL's
    communicator land on it). `accel`: DeepSpeed's accelerator object (the default one)."""
    if accel is None:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
    name = accel.device_name()
    if name == "cpu":
        return torch.device("cpu")
    local = local_rank_from_env(env)
    count = accel.device_count()
    if not 0 <= local < count:
        visible = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(f"local rank {local} has no {name} device: {count} visible"
                           f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; "
                           "start at most one process per device on each host")
    accel.set_device(local)
    return torch.device(name, local)


def init_distributed(timeout_s: float, distributed_port: int = 29500, accel=None) -> torch.device:
    """Select this rank's device, then start the process group on the accelerator's backend
    (NCCL on CUDA, gloo on CPU). Returns the device. Every entry point starts this way."""
    import deepspeed

    if accel is None:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
    device = select_device(accel)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s), distributed_port=distributed_port)
    return device


def collective_device_error(t: torch.Tensor, group=None) -> str | None:
    """Why `t` cannot enter a collective on `group` (None: it can). NCCL takes only tensors on
    the rank's current CUDA device; gloo reads host memory. Checked at every collective
    moe_dist issues, so a tensor built without its device fails with its name on the first
    GPU run, not inside NCCL."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    backend = str(dist.get_backend(group)).lower()  # "cpu:gloo,cuda:nccl" (both) picks by device
    if backend == "nccl":
        if t.device.type != "cuda":
            return f"a {t.device.type} tensor {tuple(t.shape)} sent to an NCCL collective (NCCL takes CUDA tensors)"
        if t.device.index != torch.cuda.current_device():
            return (f"a tensor on {t.device} sent to an NCCL collective of a rank on cuda:"
                    f"{torch.cuda.current_device()}")
    elif backend == "gloo" and t.device.type not in ("cpu", "cuda"):
        return f"a {t.device.type} tensor sent to a gloo collective"
    return None


def check_collective_device(t: torch.Tensor, group=None, what: str = "collective") -> None:
    problem = collective_device_error(t, group)
    if problem:
        raise RuntimeError(f"{what}: {problem}")
