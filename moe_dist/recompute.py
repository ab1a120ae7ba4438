"""Activation checkpointing: decoder layers keep only their inputs and run again in backward.

What a long sequence costs is activations, not weights: the Mixtral-8x7B recipe (4k tokens,
EP 8) keeps ~40 GiB per rank without recompute and ~2 GiB with it, by launch/plan.py's estimate. transformers' own mechanism does the wrapping
(`activation_checkpointing_enable`: every `GradientCheckpointingLayer` runs under
`torch.utils.checkpoint`, non-reentrant), so what moe_dist adds is only what expert
parallelism and the routing-aware methods need from a recompute:

- the recompute repeats each MoE layer's dispatch/combine all-to-alls. Backward visits layers
  in the same (reverse) order on every rank, and the dispatcher keeps no state between
  forward and backward (it returns its metadata), so the repeated exchanges pair up the same
  way the first ones did;
- routing counters (which experts were picked, how much gate mass) and DMEP's balancing loss
  belong to the forward only: `recomputing()` is true while a layer runs again, and those
  counters skip it, so decisions see each token once.

Non-reentrant checkpointing needs no input that requires grad, so transformers' input-grad
hook on the embeddings (there for the reentrant variant) is removed again: with frozen
embeddings it would only add an unused gradient.
"""

from __future__ import annotations

import contextlib
import threading

from torch import nn

_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed layer's forward runs again inside backward."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recompute_scope():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _contexts():
    """torch.utils.checkpoint's `context_fn`: (the first forward's context, the recompute's)."""
    return contextlib.nullcontext(), _recompute_scope()


def enable_activation_checkpointing(model: nn.Module, every_n_layers: int = 1) -> int:
    """Recompute every `every_n_layers`-th decoder layer in backward; returns how many layers
    are checkpointed. Eval and generation (`model.eval()`) are unaffected."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support activation "
                         "checkpointing in transformers")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
                                                                           "context_fn": _contexts},
                                          every_n_layers=every_n_layers)
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    return checkpointed_layers(model)


def _is_layer(module: nn.Module) -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


def checkpointed_layers(model: nn.Module) -> int:
    """How many decoder layers recompute in backward (0: activation checkpointing off)."""
    return sum(1 for m in model.modules() if _is_layer(m) and m.gradient_checkpointing)
