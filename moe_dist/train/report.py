"""The run's closing summary as the console shows it (summary.json holds the same numbers)."""

from __future__ import annotations


def format_summary(s: dict) -> str:
    acc = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    return "\n".join(line for line in [
        "=" * 60,
        f"moe_dist {s['method']} on {s['model']}: world {s['world_size']}, EP {s['ep_size']}, {s['steps']} steps",
        f"  loss            {s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s["final_loss"] is not None else "",
        f"  skipped steps   {s['skipped_steps']} (non-finite loss or gradient)" if s.get("skipped_steps") else "",
        f"  exact match     {acc(s['accuracy_before'])} before -> {acc(s['accuracy_after'])} after",
        f"  trainable       {s['trainable_params']:,} params, "
        f"{(s['adapter_flops_per_token'] or 0) / 1e6:.3f} MFLOP/token in adapters",
        f"  throughput      {s['tokens_per_sec'] or 0:.0f} tokens/s",
        f"  step memory     {s['step_peak_memory_gib']:.2f} GiB peak over what step 1 left (max over ranks; activation "
        f"checkpointing {'on' if s.get('activation_checkpointing') else 'off'})"
        if s.get("step_peak_memory_gib") is not None else "",
        f"  frozen base     {s['frozen_bytes_per_rank']['expert'] / 2**20:,.1f} MiB experts + "
        f"{s['frozen_bytes_per_rank']['non_expert'] / 2**20:,.1f} MiB rest, as stored (max over ranks)"
        if s.get("frozen_bytes_per_rank") else "",
        f"  expert balance  max/mean per-rank cost {s['expert_imbalance']:.3f} over EP {s['ep_size']}"
        if s.get("expert_imbalance") is not None else "",
        f"  logs            {s['output_dir']} (summary.json, metrics.jsonl, tensorboard/)",
        f"  checkpoint      {s['checkpoint']}",
        "=" * 60] if line)
