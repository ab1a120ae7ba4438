"""Run a function on N CPU processes with the gloo backend, the way the deepspeed launcher
would (env:// rendezvous, deepspeed.init_distributed). A failure on any rank fails the test
with that rank's traceback."""

from __future__ import annotations

import os
import socket
from typing import Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
    )
    import torch

    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    import torch.distributed as dist

    fn(rank, world, *args)  # a rank that raises exits here; the spawner then stops the others
    # Every rank's last sends are delivered before any rank tears its gloo pairs down: a rank
    # that left its final all-to-all early (nothing to receive) and destroyed the group while
    # a send was in flight aborted ("terminate called without an active exception", SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args) -> None:
    """`fn(rank, world, *args)` on `world` processes; fn must be importable (module level)."""
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True, start_method="spawn")
