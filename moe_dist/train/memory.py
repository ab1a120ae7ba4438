"""Peak memory of the training steps, above what the process held when they started.

What activation checkpointing (and micro batch, sequence length) changes is the memory that
exists only inside a step: activations, gradients in flight, the optimizer's temporaries.
So the figure is the step peak minus the resident memory after the first step (weights,
adapters, optimizer state, which the first step creates, data): on CUDA from the caching allocator's counters
(`max_memory_allocated`), on CPU from Linux's resident-set high-water mark (`VmHWM`, reset
through /proc/self/clear_refs). None where neither exists.

`frozen_bytes` is the other half of a rank's resident memory that the run decides: the frozen
base as stored (quantized or not), experts apart from the rest.
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


def frozen_bytes(model: torch.nn.Module) -> dict[str, int]:
    """This rank's resident bytes of the frozen base, as stored: `expert` (the routed experts'
    base weights and biases, in `ExpertParallelExperts`) and `non_expert` (everything else:
    embeddings, attention, routers, norms, shared experts, LM head). Counts each parameter that
    does not require grad once (tied ones once) and each `QuantizedWeight`'s parts (FP8 +
    scales, NF4 packed + absmax, ...); adapters are left out, LoRI's frozen A included."""
    from moe_dist.models.convert import adapter_params
    from moe_dist.moe.experts import ExpertParallelExperts
    from moe_dist.quant.frozen import QuantizedWeight

    # an expert adapter is a view of its bucket's Parameter: leave out the view and the bucket
    skip = {id(x) for t in adapter_params(model).values() for x in (t, t._base) if x is not None}
    expert_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts))
    tensors = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    tensors += [(f"{name}.{part}", t) for name, m in model.named_modules() if isinstance(m, QuantizedWeight)
                for part, t in m.parts().items()]
    out, seen = {"expert": 0, "non_expert": 0}, set(skip)
    for name, t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out["expert" if name.startswith(expert_prefixes) else "non_expert"] += t.numel() * t.element_size()
    return out
