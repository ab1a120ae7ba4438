"""Elastic runs: what a run's parallel layout is at whatever world the launcher gives it.

torchrun's elastic agent (`--nnodes MIN:MAX --max-restarts K`) restarts every worker on each
membership change: a node lost, a node joined, a worker failed. Each restart is a fresh
process at a new world size, so the decisions that depend on the world are pure functions of
it, taken identically on every rank:

- the expert-parallel size (`ep_size`): a fixed N, or `auto` / `auto:N`, which keep N (or the
  whole world) where it divides the world and the expert count, else the largest size that
  does (gcd(world, experts));
- the split of the global batch (`train.global_batch` sequences per optimizer step, the same
  at every world): micro_batch x grad_accum x data-parallel size = global batch, with the
  micro-batch the largest divisor of global / world that is <= `train.micro_batch`.

The worlds an elastic job may see are read from the agent's own command line with torchrun's
own parser (`--nnodes MIN:MAX` x `--nproc-per-node`), so a global batch or a fixed EP size
that some of them cannot hold is refused when the job starts, not at the first restart.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from moe_dist.procfs import cmdline
from moe_dist.validation import ConfigError

AGENT_SCRIPTS = ("torchrun", "torch.distributed.run")


@dataclass(frozen=True)
class ElasticLaunch:
    """What torchrun's agent tells its workers (TORCHELASTIC_* and the agent's arguments)."""

    restart: int  # TORCHELASTIC_RESTART_COUNT: 0 at a node's first start
    max_restarts: int
    min_nodes: int | None  # None: the agent's command line could not be read
    max_nodes: int | None
    procs_per_node: int

    @property
    def elastic(self) -> bool:
        """A run that may restart its workers at another world: restarts allowed or a node range."""
        return self.max_restarts > 0 or (self.min_nodes is not None and self.min_nodes != self.max_nodes)

    @property
    def may_grow(self) -> bool:
        """A node may join after the first rendezvous (a range of nodes; a lost node may come back)."""
        return self.min_nodes is not None and self.max_nodes is not None and self.max_nodes > self.min_nodes

    def worlds(self) -> list[int]:
        """Every world size the job may run at (homogeneous nodes), [] when unknown."""
        if self.min_nodes is None or self.max_nodes is None:
            return []
        return [n * self.procs_per_node for n in range(self.min_nodes, self.max_nodes + 1)]

    def nodes_text(self) -> str:
        return f"--nnodes {self.min_nodes}:{self.max_nodes} x {self.procs_per_node} per node"


def agent_nnodes(argv: list[str]) -> tuple[int, int] | None:
    """(min, max) nodes from a torchrun command line, read by torchrun's own parser."""
    at = next((i for i, a in enumerate(argv) if a.endswith(AGENT_SCRIPTS)), None)
    if at is None:
        return None
    from torch.distributed.run import get_args_parser, parse_min_max_nnodes

    try:
        args, _ = get_args_parser().parse_known_args(argv[at + 1:])
        return parse_min_max_nnodes(args.nnodes)
    except (SystemExit, ValueError, RuntimeError):
        return None


def elastic_launch(environ: dict | None = None, agent_argv: list[str] | None = None) -> ElasticLaunch | None:
    """This worker's elastic launch, or None when torchrun's agent did not start it."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    nodes = agent_nnodes(cmdline(os.getppid()) if agent_argv is None else agent_argv)
    return ElasticLaunch(restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
                         max_restarts=int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")),
                         min_nodes=nodes[0] if nodes else None, max_nodes=nodes[1] if nodes else None,
                         procs_per_node=int(env.get("LOCAL_WORLD_SIZE", "1")))


# ---- expert-parallel size -------------------------------------------------------------------
def parse_ep_size(spec: str) -> tuple[bool, int]:
    """(auto, preferred size); preferred 0 = the whole world. Raises naming `ep_size`."""
    text = str(spec).strip().lower()
    auto = text == "auto" or text.startswith("auto:")
    number = text[5:] if text.startswith("auto:") else ("0" if text == "auto" else text)
    try:
        size = int(number)
    except ValueError:
        size = -1
    if size < 0 or (auto and text != "auto" and size == 0):
        raise ConfigError(f"ep_size: {spec!r} must be auto, auto:N or N (N >= 1; 0 = the whole world)")
    return auto, size


def fitting_ep_sizes(world: int, num_experts: int | None) -> list[int]:
    """EP sizes that divide the world (and the expert count, when known)."""
    return [d for d in range(1, world + 1) if world % d == 0 and (num_experts is None or num_experts % d == 0)]


def resolve_ep_size(spec: str, world: int, num_experts: int | None) -> tuple[int, str]:
    """(EP size, why) for this world. A fixed size that does not fit is an error naming the
    world and the sizes that would."""
    auto, preferred = parse_ep_size(spec)
    want = preferred or world
    fits = fitting_ep_sizes(world, num_experts)
    experts = f" and the model's {num_experts} experts" if num_experts is not None else ""
    if want in fits:
        return want, f"ep_size {spec}: {want} divides the world ({world}){experts}"
    if not auto:
        what = f"world size ({world})" if world % want else f"model's expert count ({num_experts})"
        raise ConfigError(f"ep_size ({want}) must divide the {what}; sizes that fit world {world}: {fits}; or "
                          f"ep_size=auto:{want} (keeps {want} where it fits, else the largest that does)")
    chosen = max(fits)
    return chosen, f"ep_size {spec}: {want} does not divide the world ({world}){experts}; the largest that does: {chosen}"


# ---- the global batch -----------------------------------------------------------------------
def split_global_batch(global_batch: int, world: int, micro_cap: int) -> tuple[int, int] | None:
    """(micro_batch, grad_accum) with micro x accum x world == global_batch and the largest
    micro-batch <= micro_cap; None when the world does not divide the global batch."""
    if global_batch % world:
        return None
    per_rank = global_batch // world
    micro = max(d for d in range(1, min(micro_cap, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def check_global_batch(global_batch: int, worlds: list[int], where: str) -> None:
    """Every world in `worlds` splits the global batch exactly, else an error naming the
    worlds that work and the smallest global batch that every one of them splits."""
    bad = [w for w in worlds if global_batch % w]
    if bad:
        ok = [w for w in worlds if not global_batch % w]
        every = math.lcm(*worlds)
        fix = every * max(1, round(global_batch / every))
        raise ConfigError(f"train.global_batch ({global_batch} sequences per step) has no exact split "
                          f"(micro_batch x grad_accum x world) at world {', '.join(map(str, bad))} of {where}; "
                          f"worlds that work: {ok or 'none'}; a global batch every one of them splits: "
                          f"train.global_batch={fix} (a multiple of {every})")


def check_ep_size(spec: str, worlds: list[int], num_experts: int | None, where: str) -> None:
    """A fixed EP size fits every world the job may see (auto always does)."""
    auto, preferred = parse_ep_size(spec)
    if auto or not preferred:
        return
    bad = [w for w in worlds if preferred not in fitting_ep_sizes(w, num_experts)]
    if bad:
        raise ConfigError(f"ep_size ({preferred}) does not fit world {', '.join(map(str, bad))} of {where}; "
                          f"use ep_size=auto:{preferred} (keeps {preferred} where it fits, else the largest that does)")
