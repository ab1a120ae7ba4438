"""What moe_dist needs to know about an architecture, derived from the model itself.

transformers 5 gives most MoE models one experts contract (`@use_experts_implementation`:
`gate_up_proj` E x 2F x D with gate rows first, `down_proj` E x D x F, SwiGLU-style `act_fn`,
`forward(hidden, top_k_index, top_k_weights)`, router and shared experts outside the module).
A model type is supported when its experts modules follow that contract: the description is
read off a meta-device instance of the model (no memory) — where the MoE blocks are, the
sizes, which decoder layers are MoE, the attention projections of every layer — and the
per-expert names of hub checkpoints come from transformers' own conversion mapping
(`transformers.conversion_mapping`). What cannot be derived lives in two small tables:
`QUIRK_LAYOUTS` (gpt-oss stores its experts transposed, interleaved, with biases) and
`QUIRKS` (refusals), and every model type that is refused says why (`UnsupportedModelError`).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_dist.models.layout import COMMON, GPT_OSS, ExpertsLayout

# Attention projections LoRA targets by default, when a layer's attention module has them
# (q,k,v,o; DeepSeek's MLA; fused qkv). A module with none of these takes all its linears.
DEFAULT_ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                           "kv_b_proj", "qkv_proj", "query_key_value", "dense", "out_proj")
# Where decoder layers keep their softmax attention; linear-attention / SSM mixers (Qwen3-Next's
# `linear_attn`, Mamba `mixer`) are not under these names and get no attention LoRA.
ATTENTION_ATTRS = ("self_attn", "attention", "self_attention", "attn")
NUM_EXPERTS_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
INTERMEDIATE_FIELDS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_k", "num_experts_per_token", "top_k", "moe_topk")

# Model types the contract check cannot judge alone: the reason they are refused. Types on the
# contract whose tiny config could not be built are refused too: supported means parity-tested.
_UNTESTED = "on the experts contract, but no tiny config of it could be built here, so it is not parity-tested: "
QUIRKS: dict[str, str] = {
    "axk1": _UNTESTED + "its attention sizes did not fit together in a tiny config",
    "dots3_note": _UNTESTED + "building it allocates real memory (16 GB) even on the meta device",
    "qwen4_exp": _UNTESTED + "its config leaves head sizes unset (None // None)",
    "zaya": _UNTESTED + "its config accepts top-1 routing only, which the parity plan does not exercise",
}


# Model types whose experts are on the interface with another storage layout (moe_dist/models/layout.py).
QUIRK_LAYOUTS: dict[str, ExpertsLayout] = {"gpt_oss": GPT_OSS}


def interface_model_types() -> list[str]:
    """Model types whose transformers modeling file uses the experts interface."""
    import transformers
    from pathlib import Path

    root = Path(transformers.__file__).parent / "models"
    return sorted({f.parent.name for f in root.glob("*/modeling_*.py")
                   if "@use_experts_implementation" in f.read_text(encoding="utf-8", errors="ignore")})


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class HubNames:
    """How checkpoints name expert weights, from transformers' conversion mapping.

    `expert_names`: per-expert (gate, up, down) names (`model.layers.{l}.{block}.experts.{e}.{name}.weight`);
    `renames`: (checkpoint fragment, model fragment) pairs, e.g. Mixtral's ('.block_sparse_moe.', '.mlp.')."""

    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    renames: tuple[tuple[str, str], ...] = ()
    per_expert: bool = False  # the mapping says hub checkpoints store experts one by one
    # dense tensors the checkpoint stores in parts: (model fragment, checkpoint fragments, cat dim)
    concatenated: tuple[tuple[str, tuple[str, ...], int], ...] = ()

    def checkpoint_parts(self, model_key: str) -> tuple[list[list[str]], int] | None:
        """For a tensor stored in parts (Kimi-Linear's q/k/v conv1d -> conv1d): the candidate
        names of each part and the dim they concatenate along, or None."""
        for model_part, ckpt_parts, dim in self.concatenated:
            if model_key.endswith(model_part):
                stem = model_key[: -len(model_part)]
                return [self.checkpoint_candidates(stem + part) for part in ckpt_parts], dim
        return None

    def checkpoint_candidates(self, model_key: str) -> list[str]:
        """The names a model tensor may have in a checkpoint: its own, then with the renames
        undone one at a time, then all of them, last first (PhiMoE renames both the block and its router).
        A rename anchored at the start (`^model.word_embeddings.`) applies there only."""
        def undo(key: str, rename: tuple[str, str]) -> str:
            ckpt_part, model_part = rename
            if ckpt_part.startswith("^"):
                return ckpt_part[1:] + key[len(model_part):] if key.startswith(model_part) else key
            return key.replace(model_part, ckpt_part)

        out = [model_key] + [undo(model_key, rename) for rename in self.renames]
        all_undone = model_key
        for rename in reversed(self.renames):  # transformers applies them in order: undo backwards
            all_undone = undo(all_undone, rename)
        out.append(all_undone)
        return list(dict.fromkeys(out))


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    experts_class: str  # transformers class of block.experts that we replace
    block_name: str  # attribute of a decoder layer holding the MoE block (mlp, block_sparse_moe, feed_forward)
    num_experts: int
    hidden: int
    intermediate: int
    top_k: int
    moe_layers: tuple[int, ...]
    # layer -> (attention module attr, default LoRA targets, all its linears); "" / () without attention
    attention: dict[int, tuple[str, tuple[str, ...], tuple[str, ...]]] = field(hash=False)
    hub: HubNames = HubNames()
    layout: ExpertsLayout = COMMON  # how transformers stores the expert weights
    num_experts_attr: str = "num_experts"  # config field names, for messages and checks
    intermediate_attr: str = "intermediate_size"
    top_k_attr: str = "num_experts_per_tok"

    @property
    def attention_projections(self) -> tuple[str, ...]:
        """Every attention linear of any layer (validation of plans)."""
        return tuple(dict.fromkeys(p for _attr, _default, projs in self.attention.values() for p in projs))

    @property
    def hub_block(self) -> str:
        """The MoE block's name in per-expert hub checkpoints (Mixtral: block_sparse_moe)."""
        key = self.hub.checkpoint_candidates(f".{self.block_name}.experts")[-1]
        return key.strip(".").rsplit(".experts", 1)[0]

    @property
    def hub_expert_names(self) -> tuple[str, str, str]:
        return self.hub.expert_names

    def experts_path(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block_name}.experts"

    def attention_targets(self, layer: int) -> tuple[str, ...]:
        return self.attention.get(layer, ("", (), ()))[1]

    def attention_module(self, layer: int) -> str:
        return self.attention.get(layer, ("", (), ()))[0]


def contract_problem(experts: nn.Module, layout: ExpertsLayout = COMMON) -> str | None:
    """Why an experts module is not on transformers' experts contract in `layout` (the common
    one unless the model type declares another), or None."""
    name = type(experts).__name__
    if isinstance(experts, nn.ModuleList):
        return f"{name}: experts are a per-expert ModuleList (remote code or an older layout), not 3-D expert weights"
    if not hasattr(experts, "is_concatenated"):
        return f"{name} is not on transformers' experts interface (@use_experts_implementation)"
    for flag, want, what in (("has_gate", True, "no gate projection (up -> act -> down)"),
                             ("has_bias", layout.biases, "biases on the expert projections" if not layout.biases
                              else "no expert biases"),
                             ("is_transposed", layout.transposed, "transposed (E, D, 2F) expert weights"),
                             ("is_concatenated", not layout.interleaved, "gate/up rows interleaved, not [gate | up]"),
                             ("has_post_expert_norm", False, "a norm after each expert")):
        if bool(getattr(experts, flag, want)) != want:
            return f"{name}: {what}"
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 and
            down.dim() == 3):
        return f"{name}: no 3-D gate_up_proj / down_proj parameters"
    E, F2, D = (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1]) if layout.transposed else gate_up.shape
    want_down = (E, F2 // 2, D) if layout.transposed else (E, D, F2 // 2)
    if F2 % 2 or tuple(down.shape) != want_down:
        return f"{name}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not fit E={E}, 2F={F2}, D={D}"
    if layout.gate == "act":
        if not callable(getattr(experts, "act_fn", None)):
            return f"{name}: no act_fn"
        from transformers.integrations import moe as hf_moe

        if getattr(type(experts), "_apply_gate", None) is not getattr(hf_moe, "_default_apply_gate", None):
            return f"{name}: its own gate activation (_apply_gate), not act_fn(gate) * up"
    forward = inspect.unwrap(type(experts).forward)
    params = [p for p in inspect.signature(forward).parameters.values() if p.name != "self"]
    if len(params) < 3:
        return f"{name}.forward takes {[p.name for p in params]}, not (hidden_states, top_k_index, top_k_weights)"
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a *ForCausalLM (or base) model."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layer list at .model.layers")
    return layers


def _experts_in_layer(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """(block attribute, experts module) of a decoder layer's MoE block, or None (a dense layer)."""
    for attr, child in layer.named_children():
        experts = getattr(child, "experts", None)
        if isinstance(experts, nn.Module):
            return attr, experts
    return None


def _attention_of(layer: nn.Module) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    for attr in ATTENTION_ATTRS:
        module = getattr(layer, attr, None)
        if isinstance(module, nn.Module):
            linears = tuple(n for n, c in module.named_children() if isinstance(c, nn.Linear))
            default = tuple(n for n in linears if n in DEFAULT_ATTENTION_NAMES)
            return attr, default or linears, linears
    return "", (), ()


def _hub_names(model_type: str) -> HubNames:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return HubNames()
    names = {}
    renames, concatenated = [], []
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        src = list(getattr(conv, "source_patterns", []) or [])
        tgt = list(getattr(conv, "target_patterns", []) or [])
        ops = list(getattr(conv, "operations", []) or [])
        if len(tgt) != 1:
            continue
        per_expert = [re.search(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$", s) for s in src]
        if tgt[0].endswith("experts.gate_up_proj") and len(src) == 2 and all(per_expert):
            names["gate"], names["up"] = per_expert[0].group(1), per_expert[1].group(1)
        elif tgt[0].endswith("experts.down_proj") and len(src) == 1 and per_expert[0]:
            names["down"] = per_expert[0].group(1)
        elif (len(ops) == 1 and type(ops[0]).__name__ == "Concatenate" and len(src) > 1
              and not any(re.search(r"[*\\\[\]()|+?^$]", x) for x in src + tgt)):
            concatenated.append((tgt[0], tuple(src), int(getattr(ops[0], "dim", 0))))
        elif not ops and len(src) == 1 and "*" not in src[0]:
            plain = src[0].replace("\\.", ".")
            if not re.search(r"[\\\[\]()|+?$]", plain[1:] if plain.startswith("^") else plain):
                renames.append((plain, tgt[0]))  # a literal rename we can undo
    if len(names) == 3:
        return HubNames((names["gate"], names["up"], names["down"]), tuple(renames), True, tuple(concatenated))
    return HubNames(renames=tuple(renames), concatenated=tuple(concatenated))


def _field(config, candidates: tuple[str, ...], value: int | None = None) -> str | None:
    """The config field (as config.json names it, aliases last) that holds `value`."""
    stored = config.to_dict()
    for name in sorted(candidates, key=lambda n: n not in stored):
        v = getattr(config, name, None)
        if isinstance(v, int) and (value is None or v == value):
            return name
    return None


_SPECS: dict[str, ArchSpec | UnsupportedModelError] = {}


def _describe(config) -> ArchSpec:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.model_type
    if model_type in QUIRKS:
        raise UnsupportedModelError(QUIRKS[model_type])
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"model_type {model_type!r} has no AutoModelForCausalLM class in transformers "
                                    "(a vision-language / encoder model): not supported")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        layers = decoder_layers(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"model_type {model_type!r}: {exc}") from None
    moe_layers, block_names, attention, first = [], set(), {}, None
    for i, layer in enumerate(layers):
        attention[i] = _attention_of(layer)
        found = _experts_in_layer(layer)
        if found is None:
            continue
        attr, experts = found
        problem = contract_problem(experts, QUIRK_LAYOUTS.get(model_type, COMMON))
        if problem:
            raise UnsupportedModelError(f"model_type {model_type!r}: {problem}")
        moe_layers.append(i)
        block_names.add(attr)
        first = first or experts
    if first is None:
        raise UnsupportedModelError(f"model_type {model_type!r}: no MoE block with an experts module in any decoder "
                                    "layer (a dense model: only method dmep applies)")
    if len(block_names) != 1:
        raise UnsupportedModelError(f"model_type {model_type!r}: MoE blocks under several names {sorted(block_names)}")
    layout = QUIRK_LAYOUTS.get(model_type, COMMON)
    E, F2, D = first.gate_up_proj.shape
    if layout.transposed:
        F2, D = D, F2
    top_k_attr = _field(config, TOP_K_FIELDS)
    return ArchSpec(
        model_type=model_type, experts_class=type(first).__name__, block_name=block_names.pop(), num_experts=E,
        hidden=D, intermediate=F2 // 2, top_k=getattr(config, top_k_attr) if top_k_attr else 1,
        moe_layers=tuple(moe_layers), attention=attention, hub=_hub_names(model_type), layout=layout,
        num_experts_attr=_field(config, NUM_EXPERTS_FIELDS, E) or "num_experts",
        intermediate_attr=_field(config, INTERMEDIATE_FIELDS, F2 // 2) or "intermediate_size",
        top_k_attr=top_k_attr or "num_experts_per_tok")


def arch_spec(config) -> ArchSpec:
    """The architecture description of a config (cached: one meta-device build per config)."""
    if not getattr(config, "model_type", None):
        raise UnsupportedModelError("config has no model_type")
    key = config.to_json_string(use_diff=False)
    if key not in _SPECS:
        if len(_SPECS) > 32:
            _SPECS.clear()
        try:
            _SPECS[key] = _describe(config)
        except UnsupportedModelError as exc:  # a refusal is an answer too (dense models ask often)
            _SPECS[key] = exc
    found = _SPECS[key]
    if isinstance(found, UnsupportedModelError):
        raise UnsupportedModelError(str(found))
    return found


def moe_blocks(model: nn.Module, spec: ArchSpec) -> dict[int, nn.Module]:
    """Layer index -> MoE block (the module whose `.experts` we replace). Dense layers
    (DeepSeek's first_k_dense_replace, Qwen2-MoE's mlp_only_layers) are not in it."""
    layers = decoder_layers(model)
    out = {i: getattr(layers[i], spec.block_name) for i in spec.moe_layers}
    kinds = {type(b.experts).__name__ for b in out.values()} - {spec.experts_class, "ExpertParallelExperts"}
    if kinds:
        raise UnsupportedModelError(f"{spec.model_type}: MoE blocks hold {sorted(kinds)}, expected {spec.experts_class}")
    return out


def is_moe(config) -> bool:
    """Whether moe_dist can swap this model's experts (False: dense, DMEP's plain data parallel)."""
    try:
        arch_spec(config)
        return True
    except UnsupportedModelError:
        return False


def shape_summary(config) -> dict:
    """What a checkpoint records of its base model, to check an export's base against."""
    out = {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
           "hidden_size": config.hidden_size}
    if not is_moe(config):
        return out
    spec = arch_spec(config)
    return dict(out, **{spec.num_experts_attr: spec.num_experts, spec.intermediate_attr: spec.intermediate})


def moe_layer_indices(config) -> list[int]:
    """MoE layer indices from the config alone (planning, meta builds)."""
    return list(arch_spec(config).moe_layers)


def expert_sizes(config) -> tuple[int, int, int, int]:
    """(num_experts, hidden, expert intermediate, top_k)."""
    s = arch_spec(config)
    return s.num_experts, s.hidden, s.intermediate, s.top_k


def attention_targets(config, names: tuple[str, ...] = ()) -> dict[int, tuple[str, ...]]:
    """Layer -> attention projections that get LoRA: the architecture's default set, or
    `names` where a layer has them. Layers without softmax attention (linear attention, SSM
    mixers) get none. A name no layer has is an error."""
    spec = arch_spec(config)
    if not names:
        return {l: spec.attention_targets(l) for l in sorted(spec.attention) if spec.attention_targets(l)}
    out = {}
    for layer, (_attr, _default, linears) in sorted(spec.attention.items()):
        chosen = tuple(n for n in names if n in linears)
        if chosen:
            out[layer] = chosen
    missing = [n for n in names if not any(n in t for t in out.values())]
    if missing:
        raise UnsupportedModelError(f"lora.attention_targets: {missing} is in no attention layer of {spec.model_type} "
                                    f"(its attention linears: {list(spec.attention_projections)})")
    return out
