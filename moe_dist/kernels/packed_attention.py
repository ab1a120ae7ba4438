"""Causal attention over packed documents on CPU, as a transformers attention implementation.

Packed rows hold several documents back to back, with position ids restarting at each
(moe_dist/data/packing.py). transformers' sdpa path turns that into a dense B x 1 x S x S
block-causal mask, and torch's CPU flash kernel then computes every one of the S x S scores
and masks most away (~85% of them with ~50-token documents in 128-token rows). This
implementation takes the documents from the position ids instead, as transformers' own
flash-attention path does on GPU, and runs each document as its own causal attention in
compiled code (csrc/packed_attention.cpp): no mask is built, and the work is sum(n^2 / 2) per
row instead of S^2.

It is registered with transformers' AttentionInterface and AttentionMaskInterface under
`moe_dist_packed`, so the HF model is unchanged apart from `config._attn_implementation`:

- the mask function returns no mask exactly when there is no cache and no padding mask (the
  training forward), and transformers' sdpa mask otherwise;
- the attention function runs the kernel when it got no mask and as many queries as keys,
  and transformers' sdpa attention otherwise (generation, padded batches).

Where documents are told apart by position ids alone, the semantics are those of
transformers' packed-sequence mask (`find_packed_sequence_indices`): a document starts where a
position id is not the previous one plus one. `attention_unsupported` names what the kernel
does not cover (sliding windows, sinks, dropout, non-CPU or non-fp32); `use_attention_kernel`
applies the run's `kernels.attention` choice.
"""

from __future__ import annotations

import torch

from moe_dist.kernels.expert_loop import native_loop

IGNORE_INDEX = -100  # transformers' loss ignore index (moe_dist.data.dataset's, without importing datasets)

NAME = "moe_dist_packed"
KERNELS = ("auto", "packed", "hf")


class PackedCausalAttention(torch.autograd.Function):
    """q [B, H, S, Dq], k [B, KV, S, Dq], v [B, KV, S, Dv] -> o [B, S, H, Dv] (transformers'
    attention-function output layout); documents from position ids [B or 1, S]."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
                scale: float) -> torch.Tensor:
        o, lse = native_loop().packed_attention_forward(q, k, v, position_ids, scale)
        ctx.save_for_backward(q, k, v, o, lse, position_ids)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, g_o: torch.Tensor):
        q, k, v, o, lse, position_ids = ctx.saved_tensors
        dq, dk, dv = native_loop().packed_attention_backward(g_o.contiguous(), q, k, v, o, lse, position_ids,
                                                             ctx.scale)
        return dq, dk, dv, None, None


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """The kernel on transformers' head-major q/k/v; position ids None: one document per row."""
    B, H, S, _ = q.shape
    if H % k.shape[1]:
        raise ValueError(f"packed attention: {H} query heads are not a multiple of {k.shape[1]} key/value heads")
    if position_ids is None:
        position_ids = torch.arange(S, device=q.device)[None]
    position_ids = position_ids.to(torch.int64).contiguous()
    if position_ids.shape[-1] != S or position_ids.shape[0] not in (1, B):
        raise ValueError(f"packed attention: position ids of shape {tuple(position_ids.shape)} for {B} rows of {S}")
    return PackedCausalAttention.apply(_unit_stride(q), _unit_stride(k), _unit_stride(v), position_ids, float(scale))


def block_causal_mask(position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The same documents as a dense boolean B x 1 x S x S mask (transformers' packed mask)."""
    pos = position_ids.expand(batch, length)
    doc = torch.cat([torch.zeros_like(pos[:, :1]), (pos[:, 1:] != pos[:, :-1] + 1).long()], dim=1).cumsum(1)
    idx = torch.arange(length, device=pos.device)
    return ((doc[:, :, None] == doc[:, None, :]) & (idx[:, None] >= idx[None, :]))[:, None]


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (AttentionInterface)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[2] != key.shape[2]:  # padded batch, or decoding with a cache
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None or kwargs.get("softcap"):
        raise ValueError(f"{NAME} attention got a sliding window, sinks or a softcap: kernels.attention=hf runs it")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    position_ids = kwargs.get("position_ids")
    if query.device.type != "cpu" or query.dtype != torch.float32 or native_loop() is None or dropout:
        # what the kernel does not run (e.g. a model moved to GPU after the choice): the same
        # documents through sdpa
        mask = None if position_ids is None else block_causal_mask(position_ids, query.shape[0], query.shape[2])
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scale,
                                      is_causal=mask is None, **{k: v for k, v in kwargs.items() if k != "is_causal"})
    return packed_causal_attention(query, key, value, position_ids, scale), None


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """transformers' mask-function signature (AttentionMaskInterface): none where the attention
    function takes the documents from the position ids, sdpa's mask elsewhere."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and int(q_offset) == 0 and int(kv_offset) == 0 and q_length == kv_length:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)


def attention_unsupported(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the packed kernel cannot run this model here, or None."""
    cfg = model.config
    if device.type != "cpu":
        return f"it is a CPU kernel and the model is on {device.type} (transformers' flash attention packs on GPU)"
    if dtype != torch.float32:
        return f"it is fp32 only and the model is {dtype}"
    if native_loop() is None:
        return "the compiled CPU kernels are unavailable"
    if cfg._attn_implementation not in ("sdpa", "eager", NAME):
        return f"the model asks for attention {cfg._attn_implementation!r}"
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return f"{cfg.model_type} uses sliding-window attention"
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"{cfg.model_type} has {sorted(layer_types - {'full_attention'})} layers"
    if getattr(cfg, "attention_dropout", 0.0):
        return f"attention_dropout is {cfg.attention_dropout}"
    for name, mod in model.named_modules():
        if getattr(mod, "sinks", None) is not None:
            return f"{name} has attention sinks"
        if getattr(mod, "is_causal", True) is False:
            return f"{name} is not causal"
    return None


def installed_flash_attention() -> str | None:
    """transformers' flash-attention implementation installed here, newest first (None: none).
    Only the installed packages count (`flash-attn-3`, `flash-attn`): the hub-kernel fallback
    would download at the first forward, which a cluster node may not be allowed to do."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if is_flash_attn_3_available():
        return "flash_attention_3"
    if is_flash_attn_2_available():
        return "flash_attention_2"
    return None


def _use_flash_attention(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """On a CUDA device in bf16/fp16, switch the model to installed flash attention (its varlen
    path takes the documents from the restarting position ids of one flattened row:
    `flatten_packed_rows`); None where it is not installed or the model class refuses it."""
    name = installed_flash_attention() if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None
    if name is None:
        return None
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError):  # the model class does not support it: sdpa stays
        return None
    return name


def flatten_packed_rows(batch: dict[str, torch.Tensor], attn_implementation: str) -> dict[str, torch.Tensor]:
    """A packed micro-batch (B rows, position ids restarting per document, no mask) as one row
    of B x S tokens when the model runs flash attention: transformers' flash path finds the
    documents from the position ids only in a batch of one (`_is_packed_sequence`), as its
    DataCollatorWithFlattening lays batches out. Each row's first label becomes ignored, so
    no token learns to predict the next row's first one: the loss is the unflattened one
    (the causal-LM shift never scores a row's first label)."""
    if not attn_implementation.startswith("flash") or "attention_mask" in batch or "position_ids" not in batch:
        return batch
    out = {k: v.reshape(1, -1) for k, v in batch.items() if k != "labels"}
    if "labels" in batch:
        labels = batch["labels"].clone()
        labels[:, 0] = IGNORE_INDEX
        out["labels"] = labels.reshape(1, -1)
    return out


def use_attention_kernel(model: torch.nn.Module, kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """Apply `kernels.attention` (auto: packed where supported, installed flash attention on a
    GPU, else transformers' own; packed: raise naming why it cannot run; hf: transformers' own).
    Returns the implementation used."""
    if kernel not in KERNELS:
        raise ValueError(f"kernels.attention must be one of {KERNELS}, got {kernel!r}")
    if kernel == "hf":
        return model.config._attn_implementation
    if kernel == "auto":
        flash = _use_flash_attention(model, device, dtype)
        if flash is not None:
            return flash
    reason = attention_unsupported(model, device, dtype)
    if reason is not None:
        if kernel == "packed":
            raise ValueError(f"kernels.attention=packed cannot run here: {reason}")
        return model.config._attn_implementation
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError) as exc:  # a model class that takes no custom attention function
        if kernel == "packed":
            raise ValueError(f"kernels.attention=packed cannot run here: {exc}") from exc
        return model.config._attn_implementation
    return NAME
