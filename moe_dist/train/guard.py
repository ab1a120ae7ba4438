"""Per-step health, decided by every rank at once: a non-finite step is skipped and counted,
a run that keeps producing them stops, a run that stalls is reported, a stop request ends the
run after this step.

One all-reduce (MAX over the world) of a few flags per optimizer step carries this rank's
view: a non-finite loss, a step DeepSpeed skipped (non-finite gradients anywhere: ZeRO's
overflow check, all-reduced over the data-parallel world, which `arm_overflow_check` turns on
for fp32 too), and a pending stop request. Every rank reads the same result, so every rank
skips, stops or saves at the same step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_dist.parallel.reduce import all_reduce


class DivergenceError(RuntimeError):
    pass


def arm_overflow_check(engine) -> None:
    """Make ZeRO skip the update of a step with a non-finite gradient, in fp32 as in bf16:
    gradients zeroed, no optimizer or LR step, `engine.skipped_steps` counted, every rank alike.

    ZeRO-1/2 (DeepSpeed 0.19.8) finds a non-finite gradient two ways: a serial pass over every
    gradient tensor (`check_overflow`: one isfinite kernel and reduction per tensor, ~1/8 of a
    tiny-model step with 300 adapter tensors) and the global gradient norm it computes anyway for
    clipping (all-reduced; inf/NaN masked to -1 and flagged when `check_grad_overflow` is on or
    the dtype is not bf16). With the norm computed the serial pass finds nothing the norm does
    not, so it is turned off and the norm decides; without it (`compute_grad_norm: false`) the
    serial pass stays."""
    zero = getattr(engine, "optimizer", None)
    if zero is None or not hasattr(zero, "check_grad_overflow"):
        return
    zero.check_grad_overflow = True
    if getattr(zero, "compute_grad_norm", False) and hasattr(zero, "check_overflow"):
        zero.check_overflow = lambda partition_gradients=True: None


@dataclass
class StepHealth:
    nonfinite: bool  # on some rank: a non-finite loss or a skipped (non-finite gradient) step
    stop: bool  # some rank has a stop request


class Guard:
    def __init__(self, max_nonfinite_steps: int, stall_steps: int, device: torch.device):
        self.max_nonfinite, self.stall_steps, self.device = max_nonfinite_steps, stall_steps, device
        self.nonfinite_run = 0  # consecutive non-finite steps
        self.nonfinite_total = 0
        self.stalled_run = 0
        self.last_loss: float | None = None

    def check(self, loss: float, step_applied: bool, stop_requested: bool) -> StepHealth:
        """Collective: this rank's view of the step in, the job's out."""
        local = torch.tensor([float(not math.isfinite(loss) or not step_applied), float(stop_requested)],
                             device=self.device)
        all_reduce(local, op=dist.ReduceOp.MAX)
        health = StepHealth(nonfinite=bool(local[0].item()), stop=bool(local[1].item()))
        if health.nonfinite:
            self.nonfinite_run += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_run = 0
        return health

    def report(self, step: int, health: StepHealth, loss: float, grad_norm: float, logger, cfg) -> None:
        """Log a skipped step, stop a diverged run (naming the checkpoint to resume from), warn
        about a stalled one. Every rank holds the same verdict, so every rank raises alike."""
        if health.nonfinite:
            logger.record(step, "skipped_step", {"nonfinite_in_a_row": self.nonfinite_run})
            logger.print(f"step {step}: non-finite loss or gradient on some rank; the update was skipped on every "
                         f"rank ({self.nonfinite_run} in a row)")
            if self.diverged():
                from moe_dist.train.checkpoint import checkpoint_root, complete_checkpoints

                good = complete_checkpoints(checkpoint_root(cfg.output_dir))
                where = (f"{good[-1][1]} (checkpoint.resume=auto) with a lower train.lr (now {cfg.train.lr:g})" if good
                         else "scratch with a lower train.lr (no checkpoint yet)")
                raise DivergenceError(
                    f"training diverged: steps {step - self.nonfinite_run + 1}..{step} had a non-finite loss or "
                    f"gradient ({self.nonfinite_run} in a row, faults.max_nonfinite_steps={self.max_nonfinite}); no "
                    f"checkpoint was written from that state. Resume from {where}")
        if self.stalled(loss, grad_norm):
            logger.record(step, "stalled", {"steps": self.stall_steps})
            logger.print(f"WARNING step {step}: the loss has not moved and the gradient norm was 0 for "
                         f"{self.stall_steps} steps: the run is not training (train.lr {cfg.train.lr:g} too high or "
                         "too low?)")

    def diverged(self) -> bool:
        return self.max_nonfinite > 0 and self.nonfinite_run >= self.max_nonfinite

    def stalled(self, loss: float, grad_norm: float) -> bool:
        """True once, when the loss has not moved and the gradient norm was zero for
        `stall_steps` logged steps in a row (a collapsed run: it trains nothing)."""
        flat = self.last_loss is not None and math.isfinite(loss) and abs(loss - self.last_loss) <= 1e-7 * max(
            1.0, abs(loss))
        self.last_loss = loss
        self.stalled_run = self.stalled_run + 1 if (flat and grad_norm == 0.0) else 0
        return self.stall_steps > 0 and self.stalled_run == self.stall_steps


def inject_nan(loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """Test hook MOE_DIST_NAN_AT="rank:step[:count]": a NaN loss on that rank from that step
    on (for `count` steps, default all): what a diverging run looks like to the guard."""
    spec = os.environ.get("MOE_DIST_NAN_AT")
    if spec:
        at_rank, start, *count = (int(x) for x in spec.split(":"))
        if at_rank == rank and start <= step < start + (count[0] if count else 10**9):
            return loss * float("nan")
    return loss
