"""Labelled pictures of what the routing-aware methods look at and decide, for TensorBoard.

Pure functions from numbers to matplotlib figures (no trainer state), so a notebook or a
bench can draw the same ones from a checkpoint's routing counters or plan.json:
- `routing_figure`: per layer (rows, real layer indices) and expert (columns) the share of
  routed tokens (or router mass), with a colour bar: hot experts are the bright cells;
- `plan_figure`: the plan's adapter rank per (layer, expert) (summed over the expert's
  projections, 0 = no adapter: pruned or never chosen), so a hot set, pruning and growth and
  their change over steps are visible;
- `lora_moe_figure`: per module, which LoRA-MoE experts survive pruning.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures are rendered to PNG for TensorBoard
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moe_dist.plan import AdapterPlan  # noqa: E402


def _grid(values: np.ndarray, rows: Sequence[str], title: str, xlabel: str, ylabel: str, bar_label: str,
          cmap: str = "viridis"):
    h, w = values.shape
    fig, ax = plt.subplots(figsize=(min(14.0, 2.5 + 0.22 * w), min(10.0, 1.6 + 0.35 * h)), dpi=100)
    im = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yticks(range(h), list(rows))
    step = max(1, w // 16)
    ax.set_xticks(range(0, w, step), [str(i) for i in range(0, w, step)])
    fig.colorbar(im, ax=ax, label=bar_label)
    fig.tight_layout()
    return fig


def routing_figure(share_LE, layers: Sequence[int], what: str = "routed tokens"):
    """share_LE: [layers, experts] shares (rows sum to 1)."""
    values = np.asarray(share_LE, dtype=np.float64)
    E = values.shape[1]
    return _grid(values, [f"layer {l}" for l in layers], f"share of {what} per expert (uniform = {1 / max(E, 1):.3f})",
                 "expert", "layer", f"share of the layer's {what}")


def plan_figure(plan: AdapterPlan, layers: Sequence[int], num_experts: int, step: int):
    """The adapter rank of each (layer, expert), summed over its projections."""
    row = {l: i for i, l in enumerate(layers)}
    ranks = np.zeros((len(layers), num_experts))
    for (l, e, _proj), r in plan.expert_ranks.items():
        if l in row and 0 <= e < num_experts:
            ranks[row[l], e] += r
    adapted = int((ranks > 0).sum())
    return _grid(ranks, [f"layer {l}" for l in layers],
                 f"adapter rank per expert at step {step} ({adapted} of {ranks.size} experts adapted)", "expert",
                 "layer", "rank (sum over projections)", cmap="magma")


def lora_moe_figure(plan: AdapterPlan, step: int):
    """Rows: modules with LoRA-MoE; columns: LoRA expert ids; 1 = alive."""
    modules = sorted(plan.lora_moe)
    n = 1 + max((e for es in plan.lora_moe.values() for e in es), default=0)
    alive = np.zeros((len(modules), n))
    for i, key in enumerate(modules):
        alive[i, list(plan.lora_moe[key])] = 1
    return _grid(alive, [f"{l}.{p}" for l, p in modules], f"LoRA experts alive at step {step} "
                 f"({int(alive.sum())} of {len(modules) * n})", "LoRA expert", "module", "alive", cmap="Greens")
