"""Preemption: a stop request ends the run at a step boundary with a checkpoint, in bounded time.

A request comes from SIGTERM or SIGINT (how SLURM, Kubernetes and Ctrl-C stop a job) or from
the launcher going away:
- the per-node launcher (deepspeed.launcher.launch, torchrun) dying: PR_SET_PDEATHSIG makes
  the kernel send this rank SIGTERM;
- the `deepspeed` runner dying on a single node (it installs no handler and leaves its
  launcher behind): a watcher thread sees the launcher re-parented and raises SIGTERM here.

The first request only sets a flag (repeats within REPEAT_WINDOW_S are the same request). The trainer all-reduces it with the step's other flags
(moe_dist/train/guard.py), so every rank stops after the same step, writes the checkpoint
and exits non-zero (EXIT_CODE). If that takes longer than the grace period, or a second
signal arrives, the process exits at once (the previous checkpoint is whole: saves are
atomic).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

from moe_dist.procfs import cmdline, parent_of

EXIT_CODE = 143  # 128 + SIGTERM: what schedulers expect of a preempted job
REPEAT_WINDOW_S = 3.0  # Ctrl-C reaches every process, then the launcher forwards SIGTERM: one stop, not two
LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torchrun")
RUNNER_POLL_S = 0.25  # how often a rank checks that the deepspeed runner is alive (a read of /proc)


class Preempted(SystemExit):
    """Raised after the checkpoint of a requested stop is written."""

    def __init__(self, message: str):
        super().__init__(EXIT_CODE)
        self.message = message


def _say(text: str) -> None:
    """From a signal handler: os.write, not print (a handler interrupting a print to the same
    stream would raise 'reentrant call' into the training loop)."""
    try:
        os.write(2, (text + "\n").encode(errors="replace"))
    except OSError:
        pass


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the runner watch and the launcher's own SIGTERM still apply
        pass


class StopRequests:
    def __init__(self, rank: int, grace_s: float, log=print):
        self.rank, self.grace_s, self.log = rank, grace_s, log
        self.reason: str | None = None
        self.since: float | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def install(self) -> "StopRequests":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        launcher = os.getppid()
        launcher_cmd = " ".join(cmdline(launcher))
        if any(name in launcher_cmd for name in LAUNCHERS):  # not a shell: `nohup python ...` survives logout
            _die_with_parent()
        if "deepspeed.launcher.launch" in launcher_cmd:
            threading.Thread(target=self._watch_runner, args=(launcher, parent_of(launcher)),
                             name="moe_dist-runner-watch", daemon=True).start()
        return self

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            if time.monotonic() - self.since < REPEAT_WINDOW_S:  # the same stop, fanned out by a launcher
                return
            _say(f"[rank {self.rank}] {name} again during the stop ({self.reason}): exiting now")
            os._exit(EXIT_CODE)
        self.reason, self.since = name, time.monotonic()
        _say(f"[rank {self.rank}] {name}: stopping after this step with a checkpoint "
             f"(within {self.grace_s:.0f} s; another signal after {REPEAT_WINDOW_S:.0f} s exits at once)")
        threading.Thread(target=self._grace_timer, name="moe_dist-grace", daemon=True).start()

    def _grace_timer(self) -> None:
        time.sleep(self.grace_s)
        _say(f"[rank {self.rank}] the stop ({self.reason}) did not finish within {self.grace_s:.0f} s: exiting without "
             "a new checkpoint (the previous one is whole)")
        os._exit(EXIT_CODE)

    def _watch_runner(self, launcher: int, runner: int | None) -> None:
        while True:
            time.sleep(RUNNER_POLL_S)
            parent = parent_of(launcher)
            if parent is None:  # the launcher itself is gone: PDEATHSIG has fired or will
                return
            if parent != runner:
                _say(f"[rank {self.rank}] the deepspeed runner (pid {runner}) is gone")
                os.kill(os.getpid(), signal.SIGTERM)
                return
