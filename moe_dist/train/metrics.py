"""What a run reports: TensorBoard, metrics.jsonl, a progress bar, structure-change events.

Only rank 0 writes; other ranks get a logger whose methods do nothing, so call sites need
no rank checks. metrics.jsonl is appended and flushed per line, so a killed run keeps every
logged step, and a resumed run continues the same file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.previous = last_step_row(out / "metrics.jsonl")  # what a run before this process logged last
        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.jsonl = open(out / "metrics.jsonl", "a")
        # The bar appears with the first step (setup, which logs through `print`, comes first).
        self._new_bar = lambda: tqdm(total=total_steps, initial=start_step, desc="train", unit="step",  # noqa: E731
                                     dynamic_ncols=True)
        self.bar = None
        self.t0 = time.time()

    def step(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"train/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n")
        self.jsonl.flush()
        self._bar().set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        self.print(f"step {step}: {shown}")

    def _bar(self):
        if self.bar is None:
            self.bar = self._new_bar()
        return self.bar

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self._bar().update(n)

    def eval(self, step: int, result: dict) -> None:
        """Held-out loss / perplexity and exact match, whichever `result` has (evaluate.py)."""
        if not self.enabled:
            return
        row, shown = {"step": step}, []
        if "loss" in result:
            row.update(eval_loss=result["loss"], eval_perplexity=result["perplexity"], eval_tokens=result["tokens"])
            shown.append(f"eval loss {result['loss']:.4f} (perplexity {result['perplexity']:.3g}, "
                         f"{result['tokens']} tokens)")
        if "accuracy" in result:
            row["eval_exact_match"] = result["accuracy"]
            shown.append(f"exact match {result['accuracy']:.3f} ({result['correct']}/{result['total']})")
        for key in ("eval_loss", "eval_perplexity", "eval_exact_match"):
            if key in row:
                self.writer.add_scalar(key.replace("eval_", "eval/"), row[key], step)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self.print(f"step {step}: {'; '.join(shown)}")

    def figure(self, tag: str, step: int, draw) -> None:
        """A matplotlib figure from `draw()` (called only on the writing rank) as a TensorBoard image."""
        if self.enabled:
            self.writer.add_figure(tag, draw(), step, close=True)

    def routing(self, step: int, stats) -> None:
        """Per layer x expert: the share of routed tokens and of router mass (RoutingStats)."""
        if self.enabled and stats.layers:
            from moe_dist.train.figures import routing_figure

            self.figure("routing/expert_load", step, lambda: routing_figure(stats.load_share_LE(), stats.layers))
            self.figure("routing/router_mass", step,
                        lambda: routing_figure(stats.mass_share_LE(), stats.layers, "router mass"))

    def plan(self, step: int, plan, layers: list[int], num_experts: int) -> None:
        """The plan's adapter rank per (layer, expert) and the surviving LoRA-MoE experts, as they change."""
        if not self.enabled:
            return
        from moe_dist.train.figures import lora_moe_figure, plan_figure

        if plan.expert_ranks and layers:
            self.figure("plan/adapter_rank", step, lambda: plan_figure(plan, layers, num_experts, step))
        if plan.lora_moe:
            self.figure("plan/lora_moe_experts", step, lambda: lora_moe_figure(plan, step))

    def event(self, step: int, text: str) -> None:
        """A structure change (adapters pruned, grown, moved): TensorBoard text + a jsonl line."""
        if self.enabled:
            self.writer.add_text("events", text, step)
            self.jsonl.write(json.dumps({"step": step, "event": text}) + "\n")
            self.jsonl.flush()

    def record(self, step: int, kind: str, scalars: dict, extra: dict | None = None) -> None:
        """A structured event (e.g. a repartition): scalars to TensorBoard under `kind/`, the
        whole record (with `extra`, e.g. the new expert map) as one jsonl line and TB text."""
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)
        record = {"step": step, "event": kind, **scalars, **(extra or {})}
        self.writer.add_text(kind, json.dumps(record), step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def resumed(self, step: int, from_step: int, scalars: dict) -> None:
        """The first logged step of a resumed run: a `resume` record with what the restart cost,
        against the last step a run before this process logged (a checkpoint is at most
        `checkpoint.every` steps old): `steps_redone` (trained, lost, trained again) and
        `recovery_s` (from that step's log line to this one: the fault, the restart, setup and
        the redone steps)."""
        if not self.enabled:
            return
        before = self.previous or {}
        scalars = dict(scalars, from_step=from_step, steps_redone=max(0, before.get("step", from_step) - from_step))
        if "time" in before:
            scalars["recovery_s"] = round(time.time() - before["time"], 3)
        self.record(step, "resume", scalars)
        since = (f", {scalars['recovery_s']:.1f} s after step {before['step']} was logged" if "recovery_s" in scalars
                 else "")
        self.print(f"resumed from step {from_step} at world {scalars.get('world')}: {scalars['steps_redone']} steps "
                   f"redone{since}")

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
            self.jsonl.close()


def last_step_row(path: Path) -> dict | None:
    """The last training-step row of a metrics.jsonl (None: no file or no step yet)."""
    if not path.is_file():
        return None
    last = None
    with open(path) as f:
        for line in f:
            if '"loss"' in line:
                try:
                    last = json.loads(line)
                except ValueError:  # a line cut by a kill
                    continue
    return last
