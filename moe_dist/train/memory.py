"""Peak memory of the training steps, above what the process held when they started.

What activation checkpointing (and micro batch, sequence length) changes is the memory that
exists only inside a step: activations, gradients in flight, the optimizer's temporaries.
So the figure is the step peak minus the resident memory after the first step (weights,
adapters, optimizer state, which the first step creates, data): on CUDA from the caching allocator's counters
(`max_memory_allocated`), on CPU from Linux's resident-set high-water mark (`VmHWM`, reset
through /proc/self/clear_refs). None where neither exists.
"""

from __future__ import annotations

import re

import torch

GiB = 1024**3


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class StepMemory:
    """`start()` after the first step, `peak_gib()` after the last: the later steps' peak
    above the start, in GiB (and the process's whole peak in `total_gib`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base: int | None = None
        self.total_gib: float | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        rss = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            rss = None
        self.base = rss * 1024 if rss is not None else None

    def peak_gib(self) -> float | None:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kib("VmHWM")
            if hwm is None:
                return None
            peak = hwm * 1024
        self.total_gib = peak / GiB
        return max(0, peak - self.base) / GiB
