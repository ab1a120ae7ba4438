"""DMEP's LoRA-MoE adapter: N LoRA experts and a top-k router on one frozen linear.

    y = W x + scale * sum_{i in top-k(router(x))} g_i(x) B_i A_i x,  g = softmax over the top-k

Every LoRA expert's A, B and router row is its own Parameter under a logical key
(`layers.{l}.{path}.lora_moe.{i}.lora_A|lora_B|router`), so pruning an expert removes exactly
its tensors (and, through the restructure path, their optimizer state) and the survivors
keep theirs. The experts are computed densely (one matmul for all A, one batched for all B)
and weighted by the gates, zero outside the top-k: with a handful of experts this beats
gathering tokens, and pruning an expert removes its FLOPs.

Counters live in the module (selections and gate mass per expert, no host sync); the
load-balancing loss of the last forward is kept in `aux_loss` while `lb_enabled`.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.adapters.lora import LoRAConfig, init_lora_A
from moe_dist.recompute import recomputing


def lora_moe_key(layer: int, path: str, expert: int, part: str) -> str:
    return f"layers.{layer}.{path}.lora_moe.{expert}.{part}"


class LoRAMoELinear(nn.Module):
    def __init__(self, base: nn.Linear, layer: int, path: str, experts: tuple[int, ...], rank: int, top_k: int,
                 config: LoRAConfig, device=None):
        super().__init__()
        self.base, self.layer, self.path, self.rank, self.top_k = base, layer, path, rank, top_k
        self.scaling = config.scale(rank)
        dev = device if device is not None else base.weight.device
        if dev is not None and torch.device(dev).type == "meta":
            dev = None
        self.lora_A, self.lora_B, self.router = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for e in experts:
            self.lora_A[str(e)] = nn.Parameter(init_lora_A(rank, base.in_features, self.key(e, "lora_A"),
                                                           config.seed).to(dev))
            self.lora_B[str(e)] = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
            # Router rows seeded like A (small): a zero router would tie every expert at start.
            self.router[str(e)] = nn.Parameter(init_lora_A(1, base.in_features, self.key(e, "router"),
                                                           config.seed)[0].to(dev))
        self.lb_enabled = True
        self.aux_loss: torch.Tensor | None = None
        self.register_buffer("selected_N", torch.zeros(len(experts), dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("gate_mass_N", torch.zeros(len(experts), dtype=torch.float64, device=dev),
                             persistent=False)

    @property
    def experts(self) -> list[int]:
        return [int(e) for e in self.lora_A]

    def key(self, expert: int, part: str) -> str:
        return lora_moe_key(self.layer, self.path, expert, part)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        out = {}
        for e in self.lora_A:
            for part, table in (("lora_A", self.lora_A), ("lora_B", self.lora_B), ("router", self.router)):
                out[self.key(int(e), part)] = table[e]
        return out

    def keep_experts(self, experts: tuple[int, ...]) -> None:
        """Prune: drop every other LoRA expert's tensors (physically) and its counters."""
        keep = [i for i, e in enumerate(self.experts) if e in experts]
        for e in [e for e in self.experts if e not in experts]:
            for table in (self.lora_A, self.lora_B, self.router):
                del table[str(e)]
        self.selected_N = self.selected_N[keep].clone()
        self.gate_mass_N = self.gate_mass_N[keep].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        names = list(self.lora_A)
        N, R = len(names), self.rank
        x_TI = x.reshape(-1, x.shape[-1])
        router_NI = torch.stack([self.router[n] for n in names]).to(x.dtype)
        probs_TN = torch.softmax((x_TI @ router_NI.T).float(), dim=-1)
        top_p_TK, top_i_TK = probs_TN.topk(min(self.top_k, N), dim=-1)
        gates_TN = torch.zeros_like(probs_TN).scatter(1, top_i_TK, top_p_TK / top_p_TK.sum(-1, keepdim=True))
        A_NRI = torch.stack([self.lora_A[n] for n in names]).to(x.dtype)
        B_NOR = torch.stack([self.lora_B[n] for n in names]).to(x.dtype)
        h_TNR = (x_TI @ A_NRI.reshape(N * R, -1).T).view(-1, N, R) * gates_TN.to(x.dtype).unsqueeze(-1)
        delta_TO = torch.einsum("tnr,nor->to", h_TNR, B_NOR) * self.scaling
        if self.training:
            selected_TN = torch.zeros_like(probs_TN).scatter(1, top_i_TK, 1.0)
            # the balancing loss is computed again when activation checkpointing recomputes the
            # layer (its backward reads the recomputed tensors); the counters and the loss the
            # trainer adds belong to the first forward only: each token counted once
            aux = None
            if self.lb_enabled:  # Switch-style: N * sum_i f_i P_i (1 when perfectly balanced)
                f_N = selected_TN.mean(0) / top_i_TK.shape[1]  # share of routed slots
                aux = N * (f_N * probs_TN.mean(0)).sum()
            if not recomputing():
                self.selected_N += selected_TN.sum(0).long()
                self.gate_mass_N += gates_TN.detach().sum(0).double()
                self.aux_loss = aux
        return y + delta_TO.view(*y.shape[:-1], -1).to(y.dtype)


def lora_moe_modules(model: nn.Module) -> list[LoRAMoELinear]:
    """In a fixed order (layer, path): every rank has every module, so it is the same order."""
    return sorted((m for m in model.modules() if isinstance(m, LoRAMoELinear)), key=lambda m: (m.layer, m.path))
