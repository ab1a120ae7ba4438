"""The plain single-process reference: the HF model with the same LoRA applied the obvious
way (a loop over experts, W x + s B A x), against which the expert-parallel model is checked."""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moe_dist.adapters.lora import LoRAConfig, init_lora_A
from moe_dist.models.arch import arch_spec, decoder_layers, moe_blocks
from moe_dist.models.tiny import tiny_config
from moe_dist.plan import AdapterPlan, attention_param_key, expert_param_key


def build_hf(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny HF model with every routing feature switched on (random router, random bias)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    with torch.no_grad():
        for block in moe_blocks(model, arch_spec(model.config)).values():
            router = next(getattr(block, n) for n in ("gate", "router") if isinstance(getattr(block, n, None), nn.Module))
            next(p for p in router.parameters() if p.dim() == 2).normal_(0, 0.5)  # its weight, however nested
            for name, buf in list(router.named_parameters()) + list(router.named_buffers()):
                if name.endswith("e_score_correction_bias") or name == "bias":  # (gpt-oss: router bias)
                    buf.normal_(0, 0.1)
            for name, b in block.experts.named_parameters():
                if name.endswith("_bias"):  # expert biases (gpt-oss) start at zeros: make them matter
                    b.normal_(0, 0.1)
    return model


def b_value(key: str, out_f: int, rank: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return torch.randn(out_f, rank, generator=torch.Generator().manual_seed(seed)) * 0.2


class RefLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.A, self.B, self.scale = base, A, B, scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.t()) @ self.B.t()


class RefLoRAExperts(nn.Module):
    """HF's eager expert loop plus a LoRA term on each adapted (expert, projection), on the
    HF module's own weights (read through their storage layout) and its own gate function."""

    def __init__(self, hf_experts: nn.Module, adapters: dict, scales: dict, layer: int, spec):
        super().__init__()
        self.hf, self.adapters, self.scales, self.layer, self.spec = hf_experts, adapters, scales, layer, spec

    def _proj(self, x, W, e, proj):
        out = x @ W.t() if W is not None else 0.0
        k = expert_param_key(self.layer, e, proj, "lora_A")
        if k in self.adapters:
            A, B = self.adapters[k], self.adapters[k[: -len("lora_A")] + "lora_B"]
            out = out + self.scales[k] * (x @ A.t()) @ B.t()
        return out

    def forward(self, hidden, top_k_index, top_k_weights):
        from moe_dist.models.layout import down_to_canonical, gate_up_bias_to_canonical, gate_up_to_canonical

        F, layout = self.spec.intermediate, self.spec.layout
        out = torch.zeros_like(hidden)
        for e in range(self.spec.num_experts):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            x = hidden[tok]
            W_gu = gate_up_to_canonical(self.hf.gate_up_proj[e], layout)
            gate_up = self._proj(x, W_gu, e, "gate_up_proj")  # a fused adapter, if any
            if layout.biases:
                gate_up = gate_up + gate_up_bias_to_canonical(self.hf.gate_up_proj_bias[e], layout)
            g = gate_up[:, :F] + self._proj(x, None, e, "gate_proj")
            u = gate_up[:, F:] + self._proj(x, None, e, "up_proj")
            if layout.gate == "act":
                h = self.hf.act_fn(g) * u
            else:  # the module's own gate code, on its own interleaved layout
                h = self.hf._apply_gate(torch.stack([g, u], dim=-1).flatten(-2))
            y = self._proj(h, down_to_canonical(self.hf.down_proj[e], layout), e, "down_proj")
            if layout.biases:
                y = y + self.hf.down_proj_bias[e]
            out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
        return out


def build_reference(hf: nn.Module, plan: AdapterPlan, lora: LoRAConfig) -> tuple[nn.Module, dict]:
    """Returns (reference model, {logical key: leaf tensor}) with A seeded as moe_dist seeds it
    and B set to `b_value` (non-zero, so adapters change the output)."""
    import copy

    ref = copy.deepcopy(hf)
    for p in ref.parameters():
        p.requires_grad_(False)
    tensors, scales = {}, {}
    spec = arch_spec(ref.config)
    for layer, block in moe_blocks(ref, spec).items():
        F, D = spec.intermediate, spec.hidden
        dims = {"gate_proj": (D, F), "up_proj": (D, F), "gate_up_proj": (D, 2 * F), "down_proj": (F, D)}
        for (e, proj), r in plan.expert_ranks_of_layer(layer).items():
            ka, kb = expert_param_key(layer, e, proj, "lora_A"), expert_param_key(layer, e, proj, "lora_B")
            tensors[ka] = init_lora_A(r, dims[proj][0], ka, lora.seed).requires_grad_(not plan.lori)
            tensors[kb] = b_value(kb, dims[proj][1], r).requires_grad_()
            scales[ka] = lora.scale(r)
        block.experts = RefLoRAExperts(block.experts, tensors, scales, layer, spec)
    layers = decoder_layers(ref)
    for (layer, proj), r in plan.attention_ranks.items():
        attn = getattr(layers[layer], spec.attention_module(layer))
        base = getattr(attn, proj)
        ka, kb = attention_param_key(layer, proj, "lora_A"), attention_param_key(layer, proj, "lora_B")
        tensors[ka] = init_lora_A(r, base.in_features, ka, lora.seed).requires_grad_()
        tensors[kb] = b_value(kb, base.out_features, r).requires_grad_()
        setattr(attn, proj, RefLoRALinear(base, tensors[ka], tensors[kb], lora.scale(r)))
    return ref, tensors


def set_b_values(params: dict) -> None:
    """Give the converted model's B tensors the reference's values (A is seeded identically)."""
    with torch.no_grad():
        for k, p in params.items():
            if k.endswith("lora_B"):
                p.copy_(b_value(k, *p.shape))
