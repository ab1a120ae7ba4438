"""Token dispatch and combine for expert parallelism.

Shape legend: T tokens on this rank, D hidden, K top-k, N = T*K routed slots of this rank,
P expert-parallel world size, S (token, destination rank) pairs this rank sends, R rows it
receives (sum over sources), Q routed slots it computes (rows expanded to its experts),
J = min(P, K) the most ranks one token can reach, E experts in the layer, e owned here.

Each token is sent once to each rank that owns at least one of its top-k experts, not once
per (token, expert) (the token-deduplicating dispatch of DeepEP and Megatron's flex
dispatcher): with its row go, per slot on that rank, the local expert and the gate weight.
The owning rank expands the row to its experts, computes them, sums their gate-weighted
outputs, and sends one row back per pair; the source adds up one row per rank. With top-4 of
16 experts on 2 ranks a token reaches ~1.9 ranks, not 4 experts: about half the rows.

Phases: `dispatch` = pairs and counts (one count all-to-all, the layer's one host sync) ->
exchange rows with their slot metadata -> expand to local-expert-major order (no comm).
`combine` = weighted sum per received row (no comm) -> exchange back -> sum per token.
A fused expert kernel that gathers and weight-sums by itself (moe_dist/kernels/expert_mlp.py)
takes `route` (dispatch without the expansion: rows, and each slot's row and gate weight) and
`finish` (combine without the weighted sum).
Dispatchers keep no per-call state: `dispatch` returns a frozen meta that `combine` takes
back, so two layers, activation recompute or re-entrant calls cannot clash. Every reduction
has a fixed order (no atomics), so results do not depend on the device's scheduling.
Exchanges: moe_dist/parallel/host_exchange.py (shared memory for CPU ranks of one host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.ep_count import count_tokens_per_expert

from moe_dist.moe.row_sums import sum_rows_into
from moe_dist.parallel.host_exchange import all_to_all_single


@dataclass(frozen=True)
class LocalMeta:
    """What `LocalDispatcher.combine` needs: the slot permutation and the gate weights."""

    unsort_N: torch.Tensor  # position of each routed slot (token-major) in expert-major order
    sort_N: torch.Tensor  # its inverse: expert-major order -> token-major slot
    token_N: torch.Tensor  # token of each slot in expert-major order (sort_N // top_k)
    weights_TK: torch.Tensor
    tokens_per_expert: list[int]  # rows per owned expert, in local slot order (host ints)
    counts_e: torch.Tensor  # the same on the device (the grouped kernel's offsets: no host copy)


@dataclass(frozen=True)
class AllToAllMeta:
    """What `AllToAllDispatcher.combine` needs to send outputs back and add them up."""

    weights_RK: torch.Tensor  # gate weight of each received row's slots here (0: not here)
    order_Q: torch.Tensor  # computed slot q is flat position row * K + k of the received rows
    pair_token_S: torch.Tensor  # token of each sent pair
    pair_pos_S: torch.Tensor  # token * J + (how many ranks before this one the token reaches)
    input_splits: list[int]  # pairs this rank sent to each EP rank
    output_splits: list[int]  # rows this rank received from each EP rank
    tokens_per_expert: list[int]  # computed rows per owned expert, local slot order (host ints)
    counts_e: torch.Tensor  # the same on the device
    num_tokens: int


@dataclass(frozen=True)
class Routes:
    """What a fused expert kernel needs from a dispatcher (`route`), and what `finish` takes back:
    the source rows' index and gate weight of every computed slot, local-expert-major."""

    row_Q: torch.Tensor  # source row of each computed slot
    weight_Q: torch.Tensor  # its gate weight (autograd: the router's gradient flows through it)
    tokens_per_expert: list[int]  # computed slots per owned expert, local slot order (host ints)
    back: AllToAllMeta | None = None  # how the rows' outputs return (None: they are the tokens')


def _all_to_all_rows(xs: tuple[torch.Tensor, ...], output_splits: list[int], input_splits: list[int],
                     group) -> list[torch.Tensor]:
    """all_to_all_single of 2-D row tensors that share splits; rows of one dtype travel as
    one message (columns side by side), so rows and their slot metadata cost one collective."""
    if len({x.dtype for x in xs}) == 1 and all(x.dim() == 2 for x in xs):
        widths = [x.shape[1] for x in xs]
        packed = torch.cat(xs, 1) if len(xs) > 1 else xs[0].contiguous()
        out = packed.new_empty(sum(output_splits), sum(widths))
        all_to_all_single(out, packed, output_splits, input_splits, group)
        return list(out.split(widths, 1))
    outs = []
    for x in xs:
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        all_to_all_single(out, x.contiguous(), output_splits, input_splits, group)
        outs.append(out)
    return outs


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of one or more row tensors with the same uneven splits; backward is
    the mirror exchange of their gradients, in the same order on every rank (one node, so
    the autograd engine cannot reorder the collectives between ranks)."""

    @staticmethod
    def forward(ctx, output_splits, input_splits, group, *xs):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return tuple(_all_to_all_rows(xs, output_splits, input_splits, group))

    @staticmethod
    def backward(ctx, *grads):
        output_splits, input_splits = ctx.splits
        return (None, None, None, *_all_to_all_rows(grads, input_splits, output_splits, ctx.group))


def exchange(output_splits: list[int], input_splits: list[int], group, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows x[sum(input_splits[:r]) : ...] of each x go to rank r; returns the rows received
    (autograd-aware)."""
    return _AllToAll.apply(output_splits, input_splits, group, *xs)


class _GatherRows(torch.autograd.Function):
    """x[index] where several gathered rows may read one source row; `pos` orders the
    gathered rows of each source row, so backward sums a row's gradients in a fixed order."""

    @staticmethod
    def forward(ctx, x_TD, index_N, pos_N):
        ctx.save_for_backward(index_N, pos_N)
        ctx.T = x_TD.shape[0]
        return x_TD.index_select(0, index_N)

    @staticmethod
    def backward(ctx, g_ND):
        index_N, pos_N = ctx.saved_tensors
        return sum_rows_into(g_ND, index_N, pos_N, ctx.T), None, None


def gather_rows(x_TD: torch.Tensor, index_N: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
    """Rows x[index] (autograd-aware); pos_N: distinct keys, the order of a row's gradients."""
    return _GatherRows.apply(x_TD, index_N, pos_N)


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * y[unsort[t*K + k]]: unpermute and gate-weighted sum as one
    gather and one batched matmul, accumulated in the promoted dtype (fp32 gates) like
    transformers' grouped path. Backward builds the rows' gradient straight in sent order
    (g[sort // K] * w[sort]) instead of materialising it token-major and permuting it."""

    @staticmethod
    def forward(ctx, y_ND, w_TK, unsort_N, sort_N, token_N):
        T, K = w_TK.shape
        dt = torch.promote_types(y_ND.dtype, w_TK.dtype)
        y_TKD = y_ND.index_select(0, unsort_N).view(T, K, y_ND.shape[1])
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


class _ScatterWeightedSum(torch.autograd.Function):
    """out[r] = sum_k w[r, k] * y[q] over the computed slots q at flat position r*K + k: each
    received row's outputs from this rank's experts, gate-weighted, in the promoted dtype,
    summed in k order (`sum_rows_into`: no R*K grid). Saves only the compact rows (Q x D)."""

    @staticmethod
    def forward(ctx, y_QD, w_RK, order_Q):
        R, K = w_RK.shape
        dt = torch.promote_types(y_QD.dtype, w_RK.dtype)
        w_Q1 = w_RK.to(dt).reshape(-1).index_select(0, order_Q).unsqueeze(1)
        wy_QD = y_QD.to(dt) * w_Q1
        out_RD = sum_rows_into(wy_QD, torch.div(order_Q, K, rounding_mode="floor"), order_Q, R)
        ctx.save_for_backward(y_QD, w_RK, order_Q)
        return out_RD

    @staticmethod
    def backward(ctx, g_RD):
        y_QD, w_RK, order_Q = ctx.saved_tensors
        K = w_RK.shape[1]
        dt = torch.promote_types(y_QD.dtype, w_RK.dtype)
        g_QD = g_RD.to(dt).index_select(0, torch.div(order_Q, K, rounding_mode="floor"))
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            w_Q1 = w_RK.to(dt).reshape(-1).index_select(0, order_Q).unsqueeze(1)
            grad_y = (g_QD * w_Q1).to(y_QD.dtype)
        if ctx.needs_input_grad[1]:
            dots_Q = torch.linalg.vecdot(y_QD.to(dt), g_QD)
            grad_w = dots_Q.new_zeros(w_RK.numel()).index_copy_(0, order_Q, dots_Q).view_as(w_RK).to(w_RK.dtype)
        return grad_y, grad_w, None


class _SumPairs(torch.autograd.Function):
    """out[t] = sum of the rows sent back for token t (one per rank it reached), in rank order."""

    @staticmethod
    def forward(ctx, y_SD, token_S, pos_S, T):
        ctx.save_for_backward(token_S)
        return sum_rows_into(y_SD, token_S, pos_S, T)

    @staticmethod
    def backward(ctx, g_TD):
        (token_S,) = ctx.saved_tensors
        return g_TD.index_select(0, token_S), None, None, None


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
        slot = torch.empty(num_experts, dtype=torch.long, device="cpu")
        slot[torch.tensor(local_experts, dtype=torch.long, device="cpu")] = torch.arange(num_experts, device="cpu")
        self.slot_of_expert_E = slot.to(device) if device is not None else slot
        self.num_experts = num_experts

    def to(self, device: torch.device) -> "LocalDispatcher":
        self.slot_of_expert_E = self.slot_of_expert_E.to(device)
        return self

    def _sort_slots(self, top_k_index_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
        """(slots in expert-major order as flat t*K + k, their tokens, slots per expert on the
        host and on the device); the layer's one host sync."""
        K = top_k_index_TK.shape[1]
        slot_N = self.slot_of_expert_E[top_k_index_TK.reshape(-1)]
        sort_N = torch.argsort(slot_N, stable=True)
        counts_e = count_tokens_per_expert(slot_N, self.num_experts).long()
        return sort_N, torch.div(sort_N, K, rounding_mode="floor"), counts_e.tolist(), counts_e

    def dispatch(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor,
                 top_k_weights_TK: torch.Tensor) -> tuple[torch.Tensor, LocalMeta]:
        sort_N, token_N, tokens_per_expert, counts_e = self._sort_slots(top_k_index_TK)
        unsort_N = _inverse_permutation(sort_N)
        x_ND = gather_rows(x_TD, token_N, sort_N)  # sort_N = t*K + k: k order within a token
        return x_ND, LocalMeta(unsort_N, sort_N, token_N, top_k_weights_TK, tokens_per_expert, counts_e)

    def combine(self, y_MD: torch.Tensor, meta: LocalMeta) -> torch.Tensor:
        """Expert outputs in expert-major order -> gate-weighted sum per token, in the rows' dtype."""
        return _WeightedCombine.apply(y_MD, meta.weights_TK, meta.unsort_N, meta.sort_N, meta.token_N)

    def route(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor,
              top_k_weights_TK: torch.Tensor) -> tuple[torch.Tensor, Routes]:
        """For a fused kernel that gathers and combines itself: the tokens as they are, and each
        slot's token and gate weight in expert-major order (no communication)."""
        sort_N, token_N, tokens_per_expert, _ = self._sort_slots(top_k_index_TK)
        return x_TD, Routes(token_N, top_k_weights_TK.reshape(-1).index_select(0, sort_N), tokens_per_expert)

    def finish(self, y_TD: torch.Tensor, routes: Routes) -> torch.Tensor:
        """The fused kernel's per-row sums are already per token."""
        return y_TD


class AllToAllDispatcher:
    """Sends each token once to every rank that owns one of its experts, with
    `all_to_all_single` (uneven splits; the counts are exchanged first). Autograd flows
    through the exchanges, so the backward pass runs the mirror collectives on every rank in
    the same order, even for ranks with no rows."""

    def __init__(self, experts_by_rank: list[list[int]], ep_rank: int, group: dist.ProcessGroup, device=None):
        """`experts_by_rank[r]` lists rank r's experts in r's local slot order (every rank
        must pass the same lists: they define the global order)."""
        self.ep_size = len(experts_by_rank)
        self.ep_rank = ep_rank
        self.group = group
        self.num_experts = sum(len(x) for x in experts_by_rank)
        self.num_local_of_rank = [len(x) for x in experts_by_rank]
        self.local_experts = experts_by_rank[ep_rank]
        # Keys: ranks in order, each rank's experts in its local slot order.
        order = torch.tensor([e for xs in experts_by_rank for e in xs], dtype=torch.long, device="cpu")
        self.key_of_expert_E = _inverse_permutation(order)
        self.rank_of_key_E = torch.tensor([r for r, xs in enumerate(experts_by_rank) for _ in xs], dtype=torch.long, device="cpu")
        self.local_of_key_E = torch.tensor([i for xs in experts_by_rank for i in range(len(xs))], dtype=torch.long, device="cpu")
        # The count message to rank r: [pairs, slots, slots per expert of r (local order)].
        self.count_splits = [2 + n for n in self.num_local_of_rank]
        starts = [sum(self.count_splits[:r]) for r in range(self.ep_size)]
        self.pos_pairs_P = torch.tensor(starts, dtype=torch.long, device="cpu")
        self.pos_keys_E = torch.tensor([starts[r] + 2 + i for r, xs in enumerate(experts_by_rank)
                                        for i in range(len(xs))], dtype=torch.long, device="cpu")
        self.rows_sent = {"pairs": 0, "slots": 0}  # to other ranks, per forward (host ints: free)
        if device is not None:
            self.to(device)

    def to(self, device: torch.device) -> "AllToAllDispatcher":
        for name in ("key_of_expert_E", "rank_of_key_E", "local_of_key_E", "pos_pairs_P", "pos_keys_E"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _exchange_counts(self, hit_TP: torch.Tensor, rank_TK: torch.Tensor, key_TK: torch.Tensor
                         ) -> tuple[list[int], torch.Tensor]:
        """Host ints [pairs to each rank | slots to each rank | rows from each rank | slots per
        owned expert], and the slots per owned expert on the device: one all-to-all and the
        layer's one host sync (counts by scatter-add: bincount would sync to size its output)."""
        P, e = self.ep_size, len(self.local_experts)
        dev = hit_TP.device
        pairs_P = hit_TP.sum(0)
        slots_P = count_tokens_per_expert(rank_TK, P).long()
        send = torch.empty(sum(self.count_splits), dtype=torch.long, device=dev)
        send[self.pos_pairs_P] = pairs_P
        send[self.pos_pairs_P + 1] = slots_P
        send[self.pos_keys_E] = count_tokens_per_expert(key_TK.reshape(-1), self.num_experts).long()
        recv_P2e = torch.empty(P * (2 + e), dtype=torch.long, device=dev)
        all_to_all_single(recv_P2e, send, [2 + e] * P, self.count_splits, self.group)
        recv_P2e = recv_P2e.view(P, 2 + e)
        counts_e = recv_P2e[:, 2:].sum(0)
        return torch.cat((pairs_P, slots_P, recv_P2e[:, 0], counts_e)).tolist(), counts_e

    def dispatch(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor,
                 top_k_weights_TK: torch.Tensor) -> tuple[torch.Tensor, AllToAllMeta]:
        K = top_k_index_TK.shape[1]
        x_RD, meta = self._send_rows(x_TD, top_k_index_TK, top_k_weights_TK)
        x_QD = gather_rows(x_RD, torch.div(meta.order_Q, K, rounding_mode="floor"), meta.order_Q)
        return x_QD, meta

    def route(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor,
              top_k_weights_TK: torch.Tensor) -> tuple[torch.Tensor, Routes]:
        """For a fused kernel that gathers and combines itself: the rows received (each token
        once per rank), and each computed slot's row and gate weight, local-expert-major."""
        K = top_k_index_TK.shape[1]
        x_RD, meta = self._send_rows(x_TD, top_k_index_TK, top_k_weights_TK)
        row_Q = torch.div(meta.order_Q, K, rounding_mode="floor")
        return x_RD, Routes(row_Q, meta.weights_RK.reshape(-1).index_select(0, meta.order_Q), meta.tokens_per_expert,
                            meta)

    def finish(self, y_RD: torch.Tensor, routes: Routes) -> torch.Tensor:
        """Per received row, the sum of its slots' weighted outputs -> back to the source ->
        summed per token."""
        return self._return_rows(y_RD, routes.back)

    def _send_rows(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor,
                   top_k_weights_TK: torch.Tensor) -> tuple[torch.Tensor, AllToAllMeta]:
        """Pairs and counts (one count all-to-all, the layer's one host sync) -> each token's
        row and slot metadata to every rank it reaches (one all-to-all)."""
        T, K = top_k_index_TK.shape
        P, e = self.ep_size, len(self.local_experts)
        J = min(P, K)
        key_TK = self.key_of_expert_E[top_k_index_TK]
        rank_TK = self.rank_of_key_E[key_TK]
        hit_TP = torch.zeros(T, P, dtype=torch.bool, device=x_TD.device).scatter_(1, rank_TK, True)
        host, counts_e = self._exchange_counts(hit_TP, rank_TK, key_TK)
        input_splits, slots_sent = host[:P], host[P:2 * P]
        output_splits, tokens_per_expert = host[2 * P:3 * P], host[3 * P:]
        self.rows_sent["pairs"] += sum(input_splits) - input_splits[self.ep_rank]
        self.rows_sent["slots"] += sum(slots_sent) - slots_sent[self.ep_rank]
        # pairs, rank-major and token-ascending within a rank (a stable sort: no host sync)
        pair_PT = torch.argsort((~hit_TP.t().reshape(-1)).to(torch.uint8), stable=True)[: sum(input_splits)]
        pair_rank_S = torch.div(pair_PT, T, rounding_mode="floor")
        pair_token_S = pair_PT - pair_rank_S * T
        nth_rank_TP = hit_TP.long().cumsum(1) - 1
        pair_pos_S = pair_token_S * J + nth_rank_TP[pair_token_S, pair_rank_S]
        # per pair, its slots on the destination: local expert and gate weight (-1 and 0: elsewhere)
        here_SK = rank_TK[pair_token_S] == pair_rank_S.unsqueeze(1)
        meta_dtype = torch.promote_types(top_k_weights_TK.dtype, torch.float32)  # exact small ints too
        w_SK = torch.where(here_SK, top_k_weights_TK[pair_token_S].to(meta_dtype), 0)
        local_SK = torch.where(here_SK, self.local_of_key_E[key_TK[pair_token_S]], -1).to(meta_dtype)
        x_SD = gather_rows(x_TD, pair_token_S, pair_pos_S)
        x_RD, slot_meta_R2K = exchange(output_splits, input_splits, self.group, x_SD, torch.cat((w_SK, local_SK), 1))
        w_RK, local_RK = slot_meta_R2K[:, :K], slot_meta_R2K[:, K:].detach().long()
        # expand received rows to their local experts, local-expert-major (stable: row order kept)
        order_Q = torch.argsort(torch.where(local_RK >= 0, local_RK, e).reshape(-1), stable=True)
        order_Q = order_Q[: sum(tokens_per_expert)]
        meta = AllToAllMeta(w_RK.to(top_k_weights_TK.dtype), order_Q, pair_token_S, pair_pos_S, input_splits,
                            output_splits, tokens_per_expert, counts_e, T)
        return x_RD, meta

    def combine(self, y_QD: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        """Expert outputs -> gate-weighted sum per received row (promoted dtype, fp32 gates) ->
        back to the source -> summed per token, returned in the rows' dtype."""
        y_RD = _ScatterWeightedSum.apply(y_QD, meta.weights_RK, meta.order_Q)
        return self._return_rows(y_RD, meta).to(y_QD.dtype)

    def _return_rows(self, y_RD: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        """One row per received pair back to its source (one all-to-all), summed per token."""
        (y_SD,) = exchange(meta.input_splits, meta.output_splits, self.group, y_RD)
        return _SumPairs.apply(y_SD, meta.pair_token_S, meta.pair_pos_S, meta.num_tokens)
