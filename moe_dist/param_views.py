"""Adapters handed out as views of the Parameter that stores them (moe_dist/adapters/expert_bank.py:
one Parameter per rank bucket): which Parameter that is, where in it a view lies, and its gradient.

Parameter-level machinery (DeepSpeed's ZeRO state, attributes such as `allreduce`, `.grad`)
lives on the storing Parameter; code that works by logical key resolves through here. A plain
Parameter (an attention adapter) is its own storage at offset 0.
"""

from __future__ import annotations

import torch


def storage_param(t: torch.Tensor) -> torch.Tensor:
    """The Parameter `t` is a view of, or `t` itself."""
    return t if t._base is None else t._base


def view_offset(t: torch.Tensor, key: str = "") -> int:
    """Elements from the start of `storage_param(t)` to `t` (a contiguous view of it).

    Raises when the view no longer shares its Parameter's storage: DeepSpeed moves each
    Parameter's data into its flat buffer when an engine is built, so views taken before
    that are stale (take `adapter_params` anew)."""
    base = storage_param(t)
    if base is t:
        return 0
    offset = t.storage_offset() - base.storage_offset()
    same = t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    if not (same and t.is_contiguous() and 0 <= offset <= base.numel() - t.numel()):
        raise RuntimeError(f"adapter view {key or tuple(t.shape)} is stale: its Parameter's storage moved since "
                           "it was taken (take adapter_params(model) again after building an engine)")
    return offset


def slice_of(flat_like: torch.Tensor, t: torch.Tensor, key: str = "") -> torch.Tensor:
    """The part of `flat_like` (a tensor shaped like `storage_param(t)`) where `t` lies, shaped like `t`."""
    offset = view_offset(t, key)
    return flat_like.reshape(-1)[offset:offset + t.numel()].view(t.shape)


def grad_of(t: torch.Tensor) -> torch.Tensor | None:
    """The gradient of an adapter by its view: that slice of its Parameter's `.grad`."""
    base = storage_param(t)
    return None if base.grad is None else slice_of(base.grad, t)
