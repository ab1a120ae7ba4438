"""The expert-parallel dispatcher on real gloo all-to-alls: each token sent once per
destination rank, outputs and gradients (rows and gates) equal to the single-process dense
reference, fp32 and bf16, including a rank that receives nothing and one with no tokens."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

E, K, D = 8, 3, 5


def _routing(seed: int, T: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts)
    rows = [pool[torch.randperm(len(experts), generator=g)[:K]] for _ in range(T)]
    idx = torch.stack(rows) if rows else torch.zeros(0, K, dtype=torch.long)
    return torch.randn(T, D, generator=g), idx, torch.rand(T, K, generator=g)


def _check(rank: int, world: int, dtype_name: str, case: str) -> None:
    import torch.distributed as dist

    from moe_dist.moe.dispatch import AllToAllDispatcher

    dtype = getattr(torch, dtype_name)
    experts_by_rank = [[0, 5, 2, 7], [4, 1, 6, 3]] if world == 2 else [[0, 5], [2, 7], [4, 1], [6, 3]]
    W = torch.randn(E, D, D, generator=torch.Generator().manual_seed(99))
    T = {"mixed": 11 + 3 * rank, "empty_rank": 0 if rank == 1 else 9, "all_to_rank0": 10}[case]
    pool = experts_by_rank[0] if case == "all_to_rank0" else list(range(E))
    x0, idx, w0 = _routing(rank, T, pool)
    x = x0.to(dtype).requires_grad_()
    w = w0.clone().requires_grad_()
    disp = AllToAllDispatcher(experts_by_rank, rank, dist.group.WORLD)
    xs, meta = disp.dispatch(x, idx, w)
    ys, start = [], 0
    for slot, n in enumerate(meta.tokens_per_expert):
        ys.append(xs[start:start + n] @ W[experts_by_rank[rank][slot]].T.to(dtype))
        start += n
    out = disp.combine(torch.cat(ys) if ys else xs, meta)
    assert out.dtype == dtype and out.shape == (T, D)
    upstream = torch.randn(T, D, generator=torch.Generator().manual_seed(7 + rank))
    (out.float() * upstream).sum().backward()
    # reference: the dense sum on this rank's own tokens, fp32
    x_ref, w_ref = x0.to(dtype).float().requires_grad_(), w0.clone().requires_grad_()
    ref = (torch.einsum("tkij,tj->tki", W[idx].to(dtype).float(), x_ref) * w_ref.unsqueeze(-1)).sum(1)
    (ref * upstream).sum().backward()
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **tol)
    torch.testing.assert_close(w.grad, w_ref.grad, **tol)
    # one row per (token, remote rank it reaches), one slot per remote routed expert
    owner = {e: r for r, xs_ in enumerate(experts_by_rank) for e in xs_}
    ranks_of = [{owner[int(e)] for e in row} for row in idx]
    assert disp.rows_sent["pairs"] == sum(len(rs - {rank}) for rs in ranks_of)
    assert disp.rows_sent["slots"] == sum(owner[int(e)] != rank for e in idx.reshape(-1))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_dispatch_combine_match_dense_reference(world, dtype_name):
    run_distributed(_check, world, dtype_name, "mixed")


@pytest.mark.parametrize("case", ["empty_rank", "all_to_rank0"])
def test_dispatch_with_ranks_that_send_or_receive_nothing(case):
    run_distributed(_check, 2, "float32", case)


def _check_host_exchange(rank: int, world: int) -> None:
    """The shared-memory exchange against gloo's all_to_all_single: random uneven splits
    (zeros included), fp32 and int64 rows, messages past the first outbox (it grows), many calls
    in a row; no file of its left in /dev/shm; a peer that never arrives is named in bounded time."""
    import time

    import torch.distributed as dist

    from moe_dist.parallel import host_exchange as hx

    group = dist.new_group(list(range(world)))
    exchange = hx.host_exchange(group)
    assert exchange is not None, "CPU ranks of one host with /dev/shm: the shared-memory exchange must be used"
    dist.barrier(group)  # every rank has unlinked its own files
    assert not list(hx.SHM_DIR.glob(exchange.base.name + "*")), "setup leaves no file behind"
    g = torch.Generator().manual_seed(5)  # the same on every rank: everyone knows every split
    for call in range(12):
        rows = 3000 if call == 7 else 40  # 3000 rows x 130 floats: past the 1 MiB first outbox
        splits = torch.randint(0, rows, (world, world), generator=g)
        splits[call % world, (call + 1) % world] = 0
        dtype = torch.int64 if call % 3 == 2 else torch.float32
        width = 1 if dtype == torch.int64 else 130
        inp = (torch.randn(int(splits[rank].sum()), width, generator=torch.Generator().manual_seed(call * 10 + rank))
               * 1000).to(dtype)
        outs = []
        for fn in (dist.all_to_all_single, hx.all_to_all_single):
            out = torch.empty(int(splits[:, rank].sum()), width, dtype=dtype)
            fn(out, inp, splits[:, rank].tolist(), splits[rank].tolist(), group=group)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), (call, rank)
    gens = [None] * world
    dist.all_gather_object(gens, exchange.gen, group=group)
    assert max(gens) >= 1, "the 3000-row call outgrew the first outbox: a new generation was mapped"
    dist.barrier(group)
    exchange.close()
    assert not list(hx.SHM_DIR.glob(exchange.base.name + "*"))
    # a peer that never arrives: named, in about the timeout
    exchange.timeout_s = 1.0
    if rank == 0:
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match=r"timed out after 1 s .*rank 1 of the group \(global rank 1\) did not arrive"):
            exchange.all_to_all(torch.empty(1, 1), torch.ones(1, 1), [1, 0], [1, 0])
        assert time.perf_counter() - t0 < 10
    dist.barrier()


def test_host_exchange_equals_gloo_and_names_a_missing_peer():
    run_distributed(_check_host_exchange, 2)


def _check_host_reductions(rank: int, world: int) -> None:
    """all_reduce / reduce / all_gather_into_tensor over shared memory against gloo's: every op
    the exchange takes, fp32 / fp64 / int64, a tensor over CHUNK_BYTES (several pieces), a
    non-contiguous one; the same bits on every rank; and DeepSpeed's collectives (ZeRO's path)
    routed through it once ds_comm.install() wrapped its backend."""
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    from moe_dist.parallel import ds_comm
    from moe_dist.parallel import host_exchange as hx

    group = dist.new_group(list(range(world)))
    big = hx.CHUNK_BYTES // 4 + 1000  # fp32 elements: two pieces
    cases = [(torch.float32, 1000, dist.ReduceOp.SUM), (torch.float32, big, dist.ReduceOp.SUM),
             (torch.float64, 7, dist.ReduceOp.MAX), (torch.int64, 33, dist.ReduceOp.MIN),
             (torch.float32, 65, dist.ReduceOp.PRODUCT)]
    for i, (dtype, n, op) in enumerate(cases):
        x = (torch.randn(n, generator=torch.Generator().manual_seed(100 * i + rank)) * 100).to(dtype)
        mine, theirs = x.clone(), x.clone()
        assert hx.all_reduce(mine, op, group)
        dist.all_reduce(theirs, op=op, group=group)
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-3)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        assert all(torch.equal(e, every[0]) for e in every), "every rank holds the same bits"
        dst = i % world
        mine, theirs = x.clone(), x.clone()
        assert hx.reduce(mine, dst, op, group)
        dist.reduce(theirs, dst, op=op, group=group)
        if rank == dst:
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-3)
        else:
            assert torch.equal(mine, x), "reduce leaves the other ranks' tensors alone"
        out, ref = torch.empty(world * n, dtype=dtype), torch.empty(world * n, dtype=dtype)
        assert hx.all_gather_into_tensor(out, x, group)
        dist.all_gather_into_tensor(ref, x, group=group)
        assert torch.equal(out, ref)
    strided = torch.arange(12.0).view(3, 4).t() * (rank + 1)  # not contiguous
    assert hx.all_reduce(strided, dist.ReduceOp.SUM, group)
    assert torch.equal(strided, torch.arange(12.0).view(3, 4).t() * sum(range(1, world + 1)))
    assert not hx.all_reduce(torch.ones(3), dist.ReduceOp.AVG, group), "AVG is left to torch.distributed"
    # DeepSpeed's own calls (ZeRO's gradient bucket, norm, partition gather) through the exchange
    assert ds_comm.install()
    calls = hx.host_exchange(dist.group.WORLD)
    before = calls.calls
    t = torch.full((5,), float(rank + 1))
    ds_dist.all_reduce(t)
    ds_dist.all_reduce(t, op=ds_dist.ReduceOp.MAX)
    gathered = torch.empty(world * 5)
    ds_dist.all_gather_into_tensor(gathered, t)
    ds_dist.reduce(t, 0)
    assert calls.calls == before + 4, "DeepSpeed's collectives went through the exchange"
    total = float(sum(range(1, world + 1)))
    assert torch.equal(gathered, torch.full((world * 5,), total)), gathered
    assert torch.equal(t, torch.full((5,), total * (world if rank == 0 else 1))), t
    ds_dist.all_reduce(t, async_op=True).wait()  # async: DeepSpeed's own backend (gloo)
    assert calls.calls == before + 4


@pytest.mark.parametrize("world", [2, 3])
def test_host_reductions_equal_gloo_and_carry_deepspeeds_collectives(world):
    run_distributed(_check_host_reductions, world)
