"""Token dispatch and combine for expert parallelism.

Shape legend: T tokens on this rank, D hidden, K top-k, N = T*K routed slots sent from this
rank, M rows received by this rank (sum over sources), E experts in the layer, e experts owned
by this rank, P expert-parallel world size.

Phases (Megatron's split): `dispatch` = permute (no communication) -> exchange (counts, then
rows, all-to-all over the EP group) -> local sort by owned expert (no communication).
`combine` = local unsort -> exchange back -> unpermute and gate-weighted sum (no comm).
Dispatchers keep no per-call state: `dispatch` returns a frozen `DispatchMeta` that `combine`
takes back, so two layers, activation recompute or re-entrant calls cannot clash.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.ep_count import count_tokens_per_expert



@dataclass(frozen=True)
class DispatchMeta:
    """Everything `combine` needs to route expert outputs back, returned by `dispatch`."""

    unsort_N: torch.Tensor  # position of each routed slot (token-major) in the sent order
    sort_N: torch.Tensor  # its inverse: sent order -> token-major slot
    token_N: torch.Tensor  # token of each slot in sent order (sort_N // top_k)
    input_splits: list[int]  # rows this rank sent to each EP rank
    output_splits: list[int]  # rows this rank received from each EP rank
    local_sort_M: torch.Tensor | None  # received rows -> local-expert-major order (None: identity)
    local_unsort_M: torch.Tensor | None  # its inverse
    tokens_per_expert: list[int]  # rows per owned expert, in local slot order (host ints)
    num_tokens: int
    top_k: int


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward is the mirror exchange.
    (torch.distributed.nn.functional.all_to_all_single does this too but is deprecated.)"""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(input_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(input_splits[:r]) : ...] go to rank r; returns the rows received (autograd-aware)."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class _Permute(torch.autograd.Function):
    """rows[perm] whose backward is a gather by the inverse permutation: no zero-filled
    buffer and no scatter-add, unlike index_select's backward."""

    @staticmethod
    def forward(ctx, rows, perm, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        return grad_out.index_select(0, inverse), None, None


def permute(rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """rows[perm] for a permutation `perm` with `inverse` = its inverse (pure, no communication)."""
    return _Permute.apply(rows, perm, inverse)


class _GatherTokens(torch.autograd.Function):
    """The token row of every routed slot, in sent order: x[sort // K]. One gather from the T
    token rows instead of copying each token K times and then permuting; backward adds each
    slot's gradient into its token row."""

    @staticmethod
    def forward(ctx, x_TD, token_N, unsort_N, K):
        ctx.save_for_backward(unsort_N, token_N)
        ctx.K = K
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, g_ND):
        unsort_N, token_N = ctx.saved_tensors
        N, D = g_ND.shape
        if g_ND.device.type == "cpu" and g_ND.dtype in (torch.float32, torch.float64):
            # CPU index_add_ is sequential (deterministic) and one pass; elsewhere it is atomic
            # (GPU) or would round every add (bf16), so those gather and sum in fp32.
            return g_ND.new_zeros(N // ctx.K, D).index_add_(0, token_N, g_ND), None, None, None
        return g_ND.index_select(0, unsort_N).view(N // ctx.K, ctx.K, D).sum(1), None, None, None


def gather_tokens(x_TD: torch.Tensor, token_N: torch.Tensor, unsort_N: torch.Tensor, K: int) -> torch.Tensor:
    """Rows for the N = T*K routed slots in sent order (`token_N` = sort // K); `unsort_N`
    maps token-major slots to their position in sent order."""
    return _GatherTokens.apply(x_TD, token_N, unsort_N, K)


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * y[unsort[t*K + k]]: unpermute and gate-weighted sum as one
    gather and one batched matmul, accumulated in the promoted dtype (fp32 gates) like
    transformers' grouped path. Backward builds the rows' gradient straight in sent order
    (g[sort // K] * w[sort]) instead of materialising it token-major and permuting it."""

    @staticmethod
    def forward(ctx, y_ND, w_TK, unsort_N, sort_N, token_N):
        T, K = w_TK.shape
        dt = torch.promote_types(y_ND.dtype, w_TK.dtype)
        y_TKD = y_ND.index_select(0, unsort_N).view(T, K, -1)
        out_TD = torch.bmm(w_TK.to(dt).unsqueeze(1), y_TKD.to(dt)).squeeze(1)
        ctx.save_for_backward(y_TKD, w_TK, sort_N, token_N)
        return out_TD.to(y_ND.dtype)

    @staticmethod
    def backward(ctx, g_TD):
        y_TKD, w_TK, sort_N, token_N = ctx.saved_tensors
        dt = torch.promote_types(y_TKD.dtype, w_TK.dtype)
        g_TD = g_TD.to(dt)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            w_N1 = w_TK.to(dt).reshape(-1).index_select(0, sort_N).unsqueeze(1)
            grad_y = g_TD.index_select(0, token_N).mul_(w_N1).to(y_TKD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(y_TKD.to(dt), g_TD.unsqueeze(1)).to(w_TK.dtype)
        return grad_y, grad_w, None, None, None


def weighted_combine(y_ND: torch.Tensor, top_k_weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """Expert outputs in sent order -> gate-weighted sum per token, in the rows' dtype."""
    return _WeightedCombine.apply(y_ND, top_k_weights_TK, meta.unsort_N, meta.sort_N, meta.token_N)


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


class LocalDispatcher:
    """EP size 1: every expert is local. Same interface as `AllToAllDispatcher`; the test
    reference for the exchange and the fast path when there is nothing to exchange."""

    def __init__(self, local_experts: list[int], num_experts: int, device: torch.device | None = None):
        if sorted(local_experts) != list(range(num_experts)):
            raise ValueError("LocalDispatcher needs every expert local")
        slot = torch.empty(num_experts, dtype=torch.long)
        slot[torch.tensor(local_experts, dtype=torch.long)] = torch.arange(num_experts)
        self.slot_of_expert_E = slot.to(device) if device is not None else slot
        self.num_experts = num_experts

    def to(self, device: torch.device) -> "LocalDispatcher":
        self.slot_of_expert_E = self.slot_of_expert_E.to(device)
        return self

    def dispatch(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor) -> tuple[torch.Tensor, DispatchMeta]:
        T, K = top_k_index_TK.shape
        slot_N = self.slot_of_expert_E[top_k_index_TK.reshape(-1)]
        sort_N = torch.argsort(slot_N, stable=True)
        tokens_per_expert = count_tokens_per_expert(slot_N, self.num_experts).tolist()  # the one host sync
        unsort_N = _inverse_permutation(sort_N)
        token_N = torch.div(sort_N, K, rounding_mode="floor")
        x_ND = gather_tokens(x_TD, token_N, unsort_N, K)
        meta = DispatchMeta(
            unsort_N=unsort_N,
            sort_N=sort_N,
            token_N=token_N,
            input_splits=[T * K],
            output_splits=[T * K],
            local_sort_M=None,
            local_unsort_M=None,
            tokens_per_expert=tokens_per_expert,
            num_tokens=T,
            top_k=K,
        )
        return x_ND, meta

    def combine(self, y_MD: torch.Tensor, top_k_weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return weighted_combine(y_MD, top_k_weights_TK, meta)


class AllToAllDispatcher:
    """Sends each routed slot to the rank that owns its expert, with `all_to_all_single`
    (uneven splits; the per-expert counts are exchanged first). Autograd flows through the
    exchange, so the backward pass runs
    the mirror collectives on every rank in the same order, even for ranks with no rows."""

    def __init__(self, experts_by_rank: list[list[int]], ep_rank: int, group: dist.ProcessGroup, device=None):
        """`experts_by_rank[r]` lists rank r's experts in r's local slot order (every rank
        must pass the same lists: they define the global send order)."""
        self.ep_size = len(experts_by_rank)
        self.ep_rank = ep_rank
        self.group = group
        self.num_experts = sum(len(x) for x in experts_by_rank)
        # Global send order: ranks in order, each rank's experts in its local slot order.
        self.num_local_of_rank = [len(x) for x in experts_by_rank]
        self.local_experts = experts_by_rank[ep_rank]
        order = torch.tensor([e for xs in experts_by_rank for e in xs], dtype=torch.long)
        self.key_of_expert_E = _inverse_permutation(order)
        self.rank_of_key_E = torch.tensor([r for r, xs in enumerate(experts_by_rank) for _ in xs], dtype=torch.long)
        if device is not None:
            self.to(device)

    def to(self, device: torch.device) -> "AllToAllDispatcher":
        self.key_of_expert_E = self.key_of_expert_E.to(device)
        self.rank_of_key_E = self.rank_of_key_E.to(device)
        return self

    def dispatch(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor) -> tuple[torch.Tensor, DispatchMeta]:
        T, K = top_k_index_TK.shape
        P, e = self.ep_size, len(self.local_experts)
        # permute (no communication)
        key_N = self.key_of_expert_E[top_k_index_TK.reshape(-1)]
        sort_N = torch.argsort(key_N, stable=True)
        counts_E = count_tokens_per_expert(key_N, self.num_experts).long()
        send_P = torch.zeros(P, dtype=torch.long, device=counts_E.device).scatter_add_(0, self.rank_of_key_E, counts_E)
        # exchange counts: rank r receives, from every source, the counts of r's own experts
        recv_counts_Pe = torch.empty(P * e, dtype=torch.long, device=counts_E.device)
        dist.all_to_all_single(
            recv_counts_Pe, counts_E, output_split_sizes=[e] * P, input_split_sizes=self.num_local_of_rank, group=self.group
        )
        recv_counts_Pe = recv_counts_Pe.view(P, e)
        # The one host sync of the layer: split lists and local counts in a single copy.
        host = torch.cat((send_P, recv_counts_Pe.sum(1), recv_counts_Pe.sum(0))).tolist()
        input_splits, output_splits, tokens_per_expert = host[:P], host[P : 2 * P], host[2 * P :]
        # exchange rows
        unsort_N = _inverse_permutation(sort_N)
        token_N = torch.div(sort_N, K, rounding_mode="floor")
        x_ND = gather_tokens(x_TD, token_N, unsort_N, K)
        M = sum(output_splits)
        x_MD = exchange(x_ND, output_splits, input_splits, self.group)
        # local sort (no communication): rows arrive source-major, experts want expert-major
        local_id_M = torch.arange(e, device=x_MD.device).repeat(P).repeat_interleave(recv_counts_Pe.reshape(-1), output_size=M)
        local_sort_M = torch.argsort(local_id_M, stable=True)
        local_unsort_M = _inverse_permutation(local_sort_M)
        meta = DispatchMeta(
            unsort_N=unsort_N,
            sort_N=sort_N,
            token_N=token_N,
            input_splits=input_splits,
            output_splits=output_splits,
            local_sort_M=local_sort_M,
            local_unsort_M=local_unsort_M,
            tokens_per_expert=tokens_per_expert,
            num_tokens=T,
            top_k=K,
        )
        return permute(x_MD, local_sort_M, local_unsort_M), meta

    def combine(self, y_MD: torch.Tensor, top_k_weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        y_source_major = permute(y_MD, meta.local_unsort_M, meta.local_sort_M)
        y_ND = exchange(y_source_major, meta.input_splits, meta.output_splits, self.group)
        return weighted_combine(y_ND, top_k_weights_TK, meta)

