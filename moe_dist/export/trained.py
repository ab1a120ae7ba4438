"""What a moe_dist checkpoint holds, read in one process, as the factors every export needs.

A checkpoint (moe_dist/train/checkpoint.py) keeps each adapter once under its logical key,
spread over `adapters-rank*.safetensors` by whichever rank wrote it, so any world or EP size
reads the same way: an index of key -> file, tensors read on demand (the adapters are never
all in memory). Everything an export writes is expressed through one function,
`expert_factors`, which folds each adapter's own scale (alpha/r of *its* rank) and its LoRI
mask into B, so that delta = B @ A exactly, whatever format carries it on.

Shape legend: D hidden, F expert intermediate, R adapter rank, O/I out/in features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moe_dist.adapters.lora import LoRAConfig
from moe_dist.config import RunConfig, config_from_dict
from moe_dist.plan import AdapterPlan, attention_param_key, expert_param_key, expert_proj_layout

STATE_FILE = "trainer_state.json"
NATIVE_FILE = "moe_dist_adapter.json"  # what `--format moe_dist` writes instead of the trainer state


class ExportError(RuntimeError):
    """A checkpoint, base model or output that cannot be exported; the message names it."""


@dataclass(frozen=True)
class Factors:
    """delta (O x I) = B_OR @ A_RI, scale and mask already in B."""

    B_OR: torch.Tensor
    A_RI: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A_RI.shape[0]

    def delta(self) -> torch.Tensor:
        """In float64: W + delta is then rounded once, to the weight's dtype."""
        return self.B_OR.double() @ self.A_RI.double()


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None


def newest_checkpoint_under(path: Path) -> Path:
    """A checkpoint dir as is; a run's output_dir or its checkpoints/ dir -> its newest complete
    checkpoint (what `checkpoint.resume=auto` would take)."""
    from moe_dist.train.checkpoint import complete_checkpoints

    if not path.is_dir() or any((path / f).is_file() for f in (STATE_FILE, NATIVE_FILE)):
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    return path


class TrainedCheckpoint:
    """One `step-N` directory (or a `--format moe_dist` export of one): plan, run config,
    adapter tensors by logical key."""

    def __init__(self, path: str | Path):
        self.path = newest_checkpoint_under(Path(path))
        if not self.path.is_dir():
            raise ExportError(f"checkpoint {self.path}: no such directory")
        state_file = next((self.path / f for f in (STATE_FILE, NATIVE_FILE) if (self.path / f).is_file()), None)
        if state_file is None:
            raise ExportError(f"{self.path}: no {STATE_FILE}, so not a complete moe_dist checkpoint (a step-N "
                              "directory under output_dir/checkpoints)")
        self.state = _json(state_file)
        for field in ("config", "step"):
            if field not in self.state:
                raise ExportError(f"{self.path / STATE_FILE}: no {field!r} field")
        try:
            self.config: RunConfig = config_from_dict(self.state["config"])
            self.plan = AdapterPlan.from_dict(_json(self.path / "plan.json"))
        except ValueError as exc:
            raise ExportError(f"{self.path}: {exc}") from None
        self.lora = LoRAConfig(alpha=self.config.lora.alpha, rslora=self.config.lora.rslora, seed=self.config.seed)
        self.method = self.state.get("method", self.config.method)
        self.step = int(self.state["step"])
        self._file_of: dict[str, Path] = {}
        files = sorted(self.path.glob("adapters*.safetensors"))
        if not files and (self.plan.expert_ranks or self.plan.attention_ranks or self.plan.lora_moe):
            raise ExportError(f"{self.path}: no adapters-rank*.safetensors, but plan.json lists adapters")
        for f in files:
            try:
                with safe_open(str(f), "pt") as fh:
                    self._file_of.update({k: f for k in fh.keys()})
            except Exception as exc:  # truncated or foreign file
                raise ExportError(f"{f}: unreadable safetensors file ({exc})") from None
        missing = [k for k in self.plan_keys() if k not in self._file_of]
        if missing:
            raise ExportError(f"{self.path}: plan.json lists {len(missing)} adapter tensors that no adapters-rank*"
                              f".safetensors holds, e.g. {missing[:3]}")

    # ---- the base model ----------------------------------------------------------------
    def base_model_dir(self, override: str | None = None) -> Path:
        """`override`, else the directory training read (recorded at save), else the run's
        `model` resolved as training does (hub name, local dir, or the embedded default)."""
        from moe_dist.models.loading import CheckpointError, resolve_checkpoint

        if override:
            path = Path(override)
            if path.is_dir():
                return path
            try:
                return resolve_checkpoint(override)
            except CheckpointError as exc:
                raise ExportError(f"--base: {exc}") from None
        recorded = self.state.get("model_dir")
        if recorded and (Path(recorded) / "config.json").is_file():
            return Path(recorded)
        from moe_dist.train.setup import resolve_model_path

        try:
            return resolve_model_path(self.config)
        except Exception as exc:  # noqa: BLE001 - say which model could not be found
            raise ExportError(f"{self.path}: base model {self.config.model!r} (the run's `model`) not found: {exc}; "
                              "pass --base DIR") from None

    # ---- tensors ------------------------------------------------------------------------
    def plan_keys(self) -> list[str]:
        from moe_dist.adapters.lora_moe import lora_moe_key

        keys = []
        for (l, e, p) in self.plan.expert_ranks:
            keys += [expert_param_key(l, e, p, "lora_A"), expert_param_key(l, e, p, "lora_B")]
        for (l, p) in self.plan.attention_ranks:
            keys += [attention_param_key(l, p, "lora_A"), attention_param_key(l, p, "lora_B")]
        for (l, path), experts in self.plan.lora_moe.items():
            keys += [lora_moe_key(l, path, e, part) for e in experts for part in ("lora_A", "lora_B", "router")]
        return keys

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise ExportError(f"{self.path}: no tensor {key!r} in adapters-rank*.safetensors")
        with safe_open(str(self._file_of[key]), "pt") as fh:
            return fh.get_tensor(key).float()

    def has(self, key: str) -> bool:
        return key in self._file_of

    def _factors(self, prefix: str, rank: int) -> Factors:
        A, B = self.tensor(f"{prefix}.lora_A"), self.tensor(f"{prefix}.lora_B")
        if A.shape[0] != rank or B.shape[1] != rank:
            raise ExportError(f"{self.path}: {prefix} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, plan.json "
                              f"says rank {rank}")
        if self.has(f"{prefix}.lora_B.mask"):  # LoRI: B trained under a fixed sparse mask
            B = B * self.tensor(f"{prefix}.lora_B.mask")
        return Factors(B * self.lora.scale(rank), A)

    def attention_factors(self, layer: int, proj: str) -> Factors | None:
        rank = self.plan.attention_rank(layer, proj)
        return self._factors(f"layers.{layer}.self_attn.{proj}", rank) if rank else None

    def projection_factors(self, layer: int, expert: int, proj: str) -> Factors | None:
        """The plan's own adapter on (layer, expert, proj), or None."""
        rank = self.plan.rank(layer, expert, proj)
        return self._factors(expert_param_key(layer, expert, proj, "")[:-1], rank) if rank else None

    def target_rank(self, layer: int, expert: int, target: str) -> int:
        """The rank `expert_factors(layer, expert, target)` has, from the plan alone (no tensor read):
        separate gate and up adapters on the fused gate_up weight stack their ranks."""
        plan = self.plan
        if target == "down_proj":
            return plan.rank(layer, expert, "down_proj")
        halves = ("gate_proj", "up_proj") if target == "gate_up_proj" else (target,)
        return sum(plan.rank(layer, expert, h) for h in halves) + plan.rank(layer, expert, "gate_up_proj")

    def expert_factors(self, layer: int, expert: int, target: str, hidden: int, intermediate: int) -> Factors | None:
        """Factors of the delta on one output block of an expert, whatever adapters the plan put
        there. `target`: an HF fused parameter (gate_up_proj: 2F x D, down_proj: D x F) or one
        half of the gate|up rows (gate_proj / up_proj: F x D). Separate gate and up adapters on
        the fused weight stack along the rank with B block-diagonal (exact); a fused gate_up
        adapter seen through one half keeps its A and the half of B's rows."""
        t_in, t_out, t_lo, t_hi = expert_proj_layout(target, hidden, intermediate)
        pieces = []
        sources = ("down_proj",) if target == "down_proj" else ("gate_proj", "up_proj", "gate_up_proj")
        for proj in sources:
            f = self.projection_factors(layer, expert, proj)
            if f is None:
                continue
            p_in, p_out, p_lo, p_hi = expert_proj_layout(proj, hidden, intermediate)
            if f.A_RI.shape[1] != p_in or f.B_OR.shape[0] != p_out:
                raise ExportError(
                    f"{self.path}: layer {layer} expert {expert} {proj} adapter is {tuple(f.B_OR.shape)} @ "
                    f"{tuple(f.A_RI.shape)}; the base model's experts (hidden_size {hidden}, expert intermediate size "
                    f"{intermediate}) need in-features {p_in} and out-features {p_out} (wrong --base?)")
            lo, hi = max(p_lo, t_lo), min(p_hi, t_hi)
            if lo >= hi:
                continue
            B_rows = torch.zeros(t_out, f.rank, device="cpu")
            B_rows[lo - t_lo:hi - t_lo] = f.B_OR[lo - p_lo:hi - p_lo]
            pieces.append(Factors(B_rows, f.A_RI))
        if not pieces:
            return None
        if len(pieces) == 1:
            return pieces[0]
        return Factors(torch.cat([p.B_OR for p in pieces], dim=1), torch.cat([p.A_RI for p in pieces], dim=0))

    def expert_layers(self) -> list[int]:
        return sorted({l for (l, _e, _p) in self.plan.expert_ranks})

    def metadata(self, fmt: str, base: Path) -> dict:
        """What an export records about where it came from (moe_dist_export.json)."""
        return {"format": fmt, "checkpoint": str(self.path.resolve()), "step": self.step, "method": self.method,
                "plan_hash": self.plan.hash(), "base_model": self.config.model, "base_model_dir": str(base.resolve()),
                "config": self.state["config"]}
