"""Load what an export wrote, the way a user without moe_dist would (plain transformers, plain
PEFT), for launch/eval.py and launch/generate.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_dist.export.output import EXPORT_INFO
from moe_dist.export.trained import NATIVE_FILE, STATE_FILE, ExportError


def export_info(*dirs: str | Path | None) -> dict:
    """The first moe_dist_export.json among `dirs` (the run's config, base dir), or {}."""
    for d in dirs:
        if d is not None and (Path(d) / EXPORT_INFO).is_file():
            return json.loads((Path(d) / EXPORT_INFO).read_text())
    return {}


def load_exported(model: str | None, adapter: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): `model` a merged export or any HF model dir / hub name; `adapter` a
    PEFT adapter dir (loaded with PeftModel on `model`, or on the base it names) or a moe_dist
    export / checkpoint (load_for_inference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter is None:
        if model is None:
            raise ExportError("name a model (--model DIR) or an adapter (--adapter DIR)")
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval(), AutoTokenizer.from_pretrained(model)
    adapter_dir = Path(adapter)
    if (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base = model or json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        hf = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        return PeftModel.from_pretrained(hf, str(adapter_dir)).eval(), AutoTokenizer.from_pretrained(base)
    if (adapter_dir / NATIVE_FILE).is_file() or (adapter_dir / STATE_FILE).is_file():
        from moe_dist.export.inference import load_for_inference
        from moe_dist.export.trained import TrainedCheckpoint

        base = Path(model) if model else TrainedCheckpoint(adapter_dir).base_model_dir()
        return load_for_inference(base, adapter_dir, dtype=dtype), AutoTokenizer.from_pretrained(base)
    raise ExportError(f"--adapter {adapter_dir}: neither a PEFT adapter (adapter_config.json) nor a moe_dist export "
                      f"({NATIVE_FILE}) or checkpoint ({STATE_FILE})")
