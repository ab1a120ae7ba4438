"""Pure unit tests: plan data, placement, local dispatch round trip, rank-0 exactness."""

from __future__ import annotations

import copy

import pytest
import torch

from reference import build_hf
from moe_dist.models.arch import UnsupportedModelError, arch_spec
from moe_dist.models.convert import adapter_grads, adapter_params, convert_model
from moe_dist.moe.dispatch import LocalDispatcher
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.plan import AdapterPlan


def test_plan_roundtrip_hash_and_diff():
    plan = AdapterPlan.uniform([0, 1], 4, 8, attention_layers=[0], experts={0: [1, 3], 1: [0]})
    again = AdapterPlan.from_json(plan.to_json())
    assert again == plan and again.hash() == plan.hash()
    assert plan.experts_with_adapters(0) == [1, 3]
    grown = AdapterPlan({**plan.expert_ranks, (0, 1, "gate_proj"): 16}, plan.attention_ranks)
    assert grown.hash() != plan.hash()
    assert plan.diff(grown) == ["layer 0 expert 1 gate_proj: rank 8 -> 16"]
    # zeros are not stored, so a plan with explicit zeros equals one without
    assert AdapterPlan({(0, 2, "up_proj"): 0}) == AdapterPlan()
    with pytest.raises(ValueError, match="w9"):
        AdapterPlan({(0, 0, "w9"): 4})
    with pytest.raises(ValueError, match="rank of"):
        AdapterPlan({(0, 0, "up_proj"): -1})


def test_placement_validation():
    assert ExpertPlacement.contiguous(8, 4).experts_of(1) == [2, 3]
    p = ExpertPlacement.from_lists([[3, 0], [1, 2]])
    assert p.owner == (0, 1, 1, 0)
    with pytest.raises(ValueError, match="own no expert"):
        ExpertPlacement((0, 0, 0, 0), 2)
    with pytest.raises(ValueError, match="placed twice"):
        ExpertPlacement.from_lists([[0, 1], [1, 2]])


def test_local_dispatch_roundtrip_and_gradient():
    """combine(dispatch(x)) with unit gates is x * K, rows are grouped by expert, and the
    gradient comes back through the permutation."""
    T, K, E, D = 13, 3, 6, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    disp = LocalDispatcher([5, 0, 1, 2, 3, 4], E)  # slot order differs from expert ids
    xs, meta = disp.dispatch(x, idx, torch.ones(T, K))
    assert sum(meta.tokens_per_expert) == T * K
    assert meta.tokens_per_expert[0] == int((idx == 5).sum())
    # rows of slot 0 are exactly the tokens routed to expert 5
    rows5 = xs[: meta.tokens_per_expert[0]]
    tok5 = torch.where((idx == 5).any(1))[0]
    torch.testing.assert_close(rows5, x[tok5])
    out = disp.combine(xs, meta)
    torch.testing.assert_close(out, x * K)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, float(K)))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_dispatch_combine_matches_dense_reference(dtype):
    """With random gates and a different linear map per expert, dispatch -> per-expert
    compute -> combine equals the dense sum_k w[t,k] * W[idx[t,k]] x[t], and the gradients
    of x and of the gates match it too (the fused gather and weighted-combine backward; fp32
    and bf16 rows take different backward paths). The reference runs in fp32."""
    T, K, E, D = 17, 3, 5, 4
    g = torch.Generator().manual_seed(1)
    W = torch.randn(E, D, D, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w0 = torch.rand(T, K, generator=g)
    x0 = torch.randn(T, D, generator=g).to(dtype)
    order = [2, 0, 4, 1, 3]
    disp = LocalDispatcher(order, E)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    xs, meta = disp.dispatch(x, idx, w)
    ys, start = [], 0
    for slot, n in enumerate(meta.tokens_per_expert):
        ys.append(xs[start:start + n] @ W[order[slot]].T)
        start += n
    out = disp.combine(torch.cat(ys), meta)
    assert out.dtype == dtype
    x_ref, w_ref = x0.float().requires_grad_(), w0.clone().requires_grad_()
    ref = (torch.einsum("tkij,tj->tki", W[idx].float(), x_ref) * w_ref.unsqueeze(-1)).sum(1)
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    upstream = torch.randn(T, D, generator=g)
    (out.float() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **tol)
    torch.testing.assert_close(w.grad, w_ref.grad, **tol)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_lora_cpu_kernel_equals_plain_formula(bias):
    """LoRALinear's fused CPU path (LoRA added in place into the base GEMM) gives the output
    and the input/adapter gradients of base(x) + s * x A^T B^T."""
    from moe_dist.adapters.lora import LoRAConfig, LoRALinear

    g = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(12, 10, bias=bias).requires_grad_(False)
    lin = LoRALinear(base, 4, LoRAConfig(alpha=8.0), "t")
    with torch.no_grad():
        lin.lora_B.copy_(torch.randn(10, 4, generator=g))
    x0 = torch.randn(2, 5, 12, generator=g)
    x = x0.clone().requires_grad_()
    y = lin(x)
    x_ref = x0.clone().requires_grad_()
    A, B = lin.lora_A.detach().clone().requires_grad_(), lin.lora_B.detach().clone().requires_grad_()
    y_ref = base(x_ref) + (x_ref @ A.T @ B.T) * 2.0
    torch.testing.assert_close(y, y_ref)
    up = torch.randn(2, 5, 10, generator=g)
    (y * up).sum().backward()
    (y_ref * up).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(lin.lora_A.grad, A.grad)
    torch.testing.assert_close(lin.lora_B.grad, B.grad)


def test_shared_input_projections_equal_each_projection_alone():
    """q, k, v linked into one kernel call (one with a bias, different widths as GQA has) give
    each projection's own output and gradients; the first call computes all three and the
    others are served from it; a member asked with another input turns the group off."""
    from moe_dist.adapters.lora import LoRAConfig, LoRALinear, link_shared_input

    g = torch.Generator().manual_seed(4)

    def members():
        torch.manual_seed(0)
        out = []
        for name, width, bias in (("q", 16, False), ("k", 8, True), ("v", 8, False)):
            lin = LoRALinear(torch.nn.Linear(12, width, bias=bias).requires_grad_(False), 4, LoRAConfig(alpha=8.0),
                             name)
            with torch.no_grad():
                lin.lora_B.copy_(torch.randn(width, 4, generator=torch.Generator().manual_seed(width)))
            out.append(lin)
        return out

    x0 = torch.randn(2, 5, 12, generator=g)
    ups = [torch.randn(2, 5, w, generator=g) for w in (16, 8, 8)]
    results = []
    for linked in (True, False):
        lins = members()
        group = link_shared_input(lins) if linked else None
        x = x0.clone().requires_grad_()
        ys = [lin(x) for lin in lins]
        if linked:
            assert group.enabled and group._weight is not None and not group._pending, "one call served all three"
            assert ys[0]._base is ys[2]._base is not None, "q and v are views of the one product"
        sum((y * u).sum() for y, u in zip(ys, ups)).backward()
        results.append((ys, x.grad, [p.grad for lin in lins for p in (lin.lora_A, lin.lora_B)]))
    (ys, gx, gp), (ys_ref, gx_ref, gp_ref) = results
    for a, b in zip(ys, ys_ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gx, gx_ref)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b)
    lins = members()
    group = link_shared_input(lins)
    q = lins[0](x0)
    k = lins[1](x0 + 1)  # k reads another input than q: computed alone, the group is off
    assert not group.enabled
    torch.testing.assert_close(q, members()[0](x0))
    torch.testing.assert_close(k, members()[1](x0 + 1))


def test_fused_silu_glu_is_bit_identical_to_autograd():
    """The SwiGLU with the one-buffer backward is taken for transformers' SiLU and gives
    exactly autograd's output and gradient."""
    from transformers.activations import ACT2FN

    from moe_dist.moe.activation import gated_act

    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(9, 2 * 6, generator=g)
    up = torch.randn(9, 6, generator=g)
    x = x0.clone().requires_grad_()
    h = gated_act(x, ACT2FN["silu"])
    assert "SiLUGLU" in type(h.grad_fn).__name__
    x_ref = x0.clone().requires_grad_()
    h_ref = torch.nn.functional.silu(x_ref[:, :6]) * x_ref[:, 6:]
    assert torch.equal(h, h_ref)
    (h * up).sum().backward()
    (h_ref * up).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    gelu = gated_act(x0, ACT2FN["gelu"])  # other activations: the plain path
    assert torch.equal(gelu, ACT2FN["gelu"](x0[:, :6]) * x0[:, 6:])

def test_rank_zero_expert_is_exactly_the_base_expert():
    """An expert without an adapter computes bit-identically to a model with no adapters,
    while its neighbours carry non-zero adapters."""
    hf = build_hf("olmoe")
    plan = AdapterPlan({(l, e, p): 8 for l in (0, 1) for e in range(8) if e != 3 for p in ("gate_proj", "up_proj", "down_proj")})
    with_adapters = convert_model(copy.deepcopy(hf), plan)
    with torch.no_grad():
        for k, p in adapter_params(with_adapters).items():
            if k.endswith("lora_B"):
                p.normal_()
    without = convert_model(copy.deepcopy(hf), AdapterPlan())
    x = torch.randn(20, 64)
    idx = torch.full((20, 2), 3)
    idx[:, 1] = 3
    w = torch.rand(20, 2)
    for layer in (0, 1):
        a = with_adapters.model.layers[layer].mlp.experts(x, idx, w)
        b = without.model.layers[layer].mlp.experts(x, idx, w)
        assert torch.equal(a, b)
        # and the adapters do act on other experts
        a2 = with_adapters.model.layers[layer].mlp.experts(x, idx.clone().fill_(4), w)
        b2 = without.model.layers[layer].mlp.experts(x, idx.clone().fill_(4), w)
        assert not torch.allclose(a2, b2)


def test_expert_adapters_are_views_of_one_parameter_per_rank_bucket():
    """ZeRO sees one Parameter per (projection, rank) bucket and side, not one per adapter;
    each logical key is a view of its bucket (writes land in it, its gradient is its slice),
    and a view taken before the storage moved (an engine build) is refused, not misread."""
    from moe_dist.param_views import grad_of, storage_param, view_offset

    hf = build_hf("olmoe")
    ranks = {(l, e, p): (4 if e % 2 else 8) for l in (0, 1) for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    m = convert_model(copy.deepcopy(hf), AdapterPlan(ranks))
    bank = m.model.layers[0].mlp.experts.adapters
    assert len(list(bank.parameters())) == 2 * 3 * 2  # A and B x 3 projections x ranks {4, 8}
    assert bank.lora_A["down_proj_r8"].shape == (4, 8, 32) and bank.lora_B["down_proj_r8"].shape == (4, 64, 8)
    views = bank.adapter_params()
    assert len(views) == 8 * 3 * 2
    key = "layers.0.experts.4.down_proj.lora_B"  # expert 4: the third of the rank-8 bucket
    assert storage_param(views[key]) is bank.lora_B["down_proj_r8"] and view_offset(views[key]) == 2 * 64 * 8
    with torch.no_grad():
        views[key].fill_(2.0)
    assert torch.all(bank.lora_B["down_proj_r8"][2] == 2.0) and not bank.lora_B["down_proj_r8"][1].any()
    m(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    assert torch.equal(grad_of(views[key]), bank.lora_B["down_proj_r8"].grad[2])
    assert torch.equal(adapter_grads(m)[key], bank.lora_B["down_proj_r8"].grad[2])
    with torch.no_grad():  # what DeepSpeed does when it flattens a group
        bucket = bank.lora_B["down_proj_r8"]
        bucket.data = torch.zeros(bucket.numel() + 10)[10:].view(bucket.shape)
    with pytest.raises(RuntimeError, match="stale"):
        view_offset(views[key], key)
    assert view_offset(bank.adapter_params()[key]) == 2 * 64 * 8


def test_unsupported_model_says_why():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="llama.*no MoE block.*dmep"):
        arch_spec(LlamaConfig(num_hidden_layers=2))


def test_lori_freezes_A_and_masks_B():
    hf = build_hf("mixtral")
    plan = AdapterPlan.uniform([0], 8, 4, lori=True)
    m = convert_model(copy.deepcopy(hf), plan)
    params = adapter_params(m)
    assert all(not p.requires_grad for k, p in params.items() if k.endswith("lora_A"))
    bank = m.model.layers[0].mlp.experts.adapters
    key = next(iter(bank.lori_masks()))
    mask = bank.lori_masks()[key]  # a view of its bucket's mask: set in place
    mask.zero_()
    mask[:, 0] = 1
    with torch.no_grad():
        bank.adapter_params()[key].fill_(1.0)
    out = m(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8)))
    out.loss.backward()
    grad = adapter_grads(m)[key]
    assert torch.all(grad[:, 1:] == 0) and grad[:, 0].abs().sum() > 0


@pytest.mark.parametrize("arch,lori", [("qwen2_moe", False), ("qwen2_moe", True), ("gpt_oss", False)])
def test_cpu_expert_loop_equals_the_grouped_kernel(arch, lori, monkeypatch):
    """The fused expert MLP (CPU default for SiLU-gated experts; 1 and 2 threads), the
    per-expert loop (compiled, with experts spread over 2 threads, and its Python fallback) and
    the grouped-matmul path (GPU default) give the same logits and the same gradient for every
    adapter, x and frozen-A included; gpt-oss with its expert biases and clamped gate on loop
    and grouped (the fused kernel refuses it)."""
    import shutil

    import moe_dist.kernels.expert_loop as expert_loop
    from reference import set_b_values
    from test_parity_distributed import mixed_plan
    from moe_dist.moe.experts import ExpertParallelExperts

    native = expert_loop.native_loop()
    if shutil.which("c++") or shutil.which("g++"):
        assert native is not None, "a C++ compiler is present but the CPU expert kernel did not build"

    hf = build_hf(arch)
    plan = mixed_plan(hf.config)
    plan = AdapterPlan(expert_ranks=plan.expert_ranks, attention_ranks=plan.attention_ranks, lori=lori)
    model = convert_model(copy.deepcopy(hf), plan)
    set_b_values(adapter_params(model))
    for m in model.modules():
        if hasattr(m, "lori_masks"):
            for mask in m.lori_masks().values():
                mask.copy_((torch.arange(mask.numel()).reshape(mask.shape) % 2 == 0).float())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    threads = torch.get_num_threads()
    fused = ("fused", "fused_1thread") if native is not None and arch != "gpt_oss" else ()
    for variant in ("grouped", "loop_python", "loop", *fused):
        for m in model.modules():
            if isinstance(m, ExpertParallelExperts):
                m.set_kernel(variant.split("_")[0])
        monkeypatch.setattr(expert_loop, "_native_module", None if variant == "loop_python" else native)
        # the compiled kernels spread experts over threads (CI runs with 1); with one thread the
        # fused kernel adds into the output rows as each expert finishes, with two after all
        torch.set_num_threads(1 if variant.endswith("1thread") else 2)
        try:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, use_cache=False).logits
            (logits.float() ** 2).mean().backward()
        finally:
            torch.set_num_threads(threads)
        grads = {k: g.clone() for k, g in adapter_grads(model).items()}
        assert set(grads) == {k for k, p in adapter_params(model).items() if p.requires_grad}, variant
        results[variant] = (logits.detach(), grads)
    for variant in ("loop_python", "loop", *fused):
        torch.testing.assert_close(results[variant][0], results["grouped"][0], rtol=1e-5, atol=1e-5)
        assert results[variant][1].keys() == results["grouped"][1].keys()
        for k, g in results["grouped"][1].items():
            torch.testing.assert_close(results[variant][1][k], g, rtol=1e-4, atol=1e-6, msg=f"{variant} {k}")
    assert any(g.abs().sum() > 0 for k, g in results["loop"][1].items() if ".experts." in k)
    if fused:  # the thread count changes where the adds happen, not their order
        torch.testing.assert_close(results["fused"][0], results["fused_1thread"][0], rtol=0, atol=0)
    elif arch == "gpt_oss":  # asked for by name, the fused kernel says why it cannot run these experts
        experts = next(m for m in model.modules() if isinstance(m, ExpertParallelExperts))
        with pytest.raises(ValueError, match="moe.kernel=fused: layer 0 has expert biases"):
            experts.set_kernel("fused")
    # the loop keeps what backward needs in saved tensors: a retained graph backs up twice
    model.zero_grad(set_to_none=True)
    loss = (model(input_ids=ids, use_cache=False).logits.float() ** 2).mean()
    loss.backward(retain_graph=True)
    loss.backward()
    twice = adapter_grads(model)
    assert twice.keys() == results["loop"][1].keys()
    for k, g in twice.items():
        torch.testing.assert_close(g, 2 * results["loop"][1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_packed_attention_kernel_equals_sdpa_with_the_block_causal_mask():
    """The compiled packed-document attention against torch's sdpa with transformers-style
    block-causal masks: documents longer than one 128-row query block, grouped key/value heads,
    a value head dim other than the query's, transformers' transposed (strided) q/k/v, and
    position ids shared by every row ([1, S]); output and q/k/v gradients, at 1 and 2 threads
    (bit-identical: threads split (row, key/value head) units, not sums)."""
    import torch.nn.functional as F

    from moe_dist.kernels.expert_loop import native_loop
    from moe_dist.kernels.packed_attention import block_causal_mask, packed_causal_attention

    import shutil

    if native_loop() is None:
        assert not (shutil.which("c++") or shutil.which("g++")), "a C++ compiler is present but the kernels did not build"
        pytest.skip("no C++ compiler: no compiled CPU kernels here")
    g = torch.Generator().manual_seed(0)
    B, H, KV, S, Dq, Dv = 3, 4, 2, 300, 16, 12
    starts = [[0, 200], [0, 5, 6, 150], [0]]
    pos = torch.stack([torch.cat([torch.arange(e - s) for s, e in zip(r, r[1:] + [S])]) for r in starts])
    q = torch.randn(B, H, S, Dq, generator=g).requires_grad_()
    k = torch.randn(B, S, KV, Dq, generator=g).transpose(1, 2).requires_grad_()  # as transformers hands them over
    v = torch.randn(B, S, KV, Dv, generator=g).transpose(1, 2).requires_grad_()
    g_o = torch.randn(B, S, H, Dv, generator=g)
    for position_ids in (pos, pos[1:2]):
        mask = block_causal_mask(position_ids, B, S)
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1),
                                              attn_mask=mask, scale=0.3).transpose(1, 2)
        want_grads = torch.autograd.grad(want, (q, k, v), g_o)
        runs = []
        threads = torch.get_num_threads()
        for n in (1, 2):
            torch.set_num_threads(n)
            try:
                got = packed_causal_attention(q, k, v, position_ids, 0.3)
                runs.append((got, torch.autograd.grad(got, (q, k, v), g_o)))
            finally:
                torch.set_num_threads(threads)
        torch.testing.assert_close(runs[0][0], want, rtol=1e-5, atol=1e-5)
        for a, b in zip(runs[0][1], want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(runs[0][0], runs[1][0]) and all(map(torch.equal, runs[0][1], runs[1][1]))
    with pytest.raises(ValueError, match="position ids of shape"):
        packed_causal_attention(q, k, v, pos[:, :10], 0.3)


def test_fused_rms_norm_swaps_only_modules_with_its_formula():
    """A module named *RMSNorm that computes (1 + w) * x / rms(x) (Gemma-style) keeps its own
    forward; kernels.rms_norm=fused says why when nothing matches; the swapped forward falls
    back to the module's own off CPU fp32 (here: float64)."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    from moe_dist.kernels.rms_norm import swappable, use_norm_kernel

    class OffsetRMSNorm(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.zeros(d)), 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    model = torch.nn.Sequential(OlmoeRMSNorm(16), OffsetRMSNorm(16))
    model[0].weight.data.normal_()
    assert swappable(model[0]) and not swappable(model[1])
    assert use_norm_kernel(model, "auto", torch.device("cpu"), torch.float32) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
    with pytest.raises(ValueError, match="kernels.rms_norm=fused cannot run here: no RMSNorm module matches"):
        use_norm_kernel(torch.nn.Sequential(OffsetRMSNorm(4)), "fused", torch.device("cpu"), torch.float32)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(model[0].double()(x), OlmoeRMSNorm.forward(model[0], x))


def test_fused_gate_up_target_is_validated():
    from moe_dist.config import ConfigError, RunConfig, load_config

    cfg = RunConfig()
    cfg.ds_config = "ds_configs/zero2.json"
    for bad in (["gate_up_proj", "gate_proj", "down_proj"], ["gate_proj", "w9"], []):
        cfg.lora.expert_targets = bad
        with pytest.raises(ConfigError, match="lora.expert_targets"):
            cfg.validate(2, 8)
    # Lists in YAML; on the command line a comma string (or [a, b]) is a list too.
    for given in ("gate_up_proj, down_proj", "[gate_up_proj, down_proj]"):
        cfg = load_config(None, [f"lora.expert_targets={given}", "ds_config=ds_configs/zero2.json"])
        assert cfg.lora.expert_target_list() == ("gate_up_proj", "down_proj")
        cfg.validate(2, 8)
    with pytest.raises(ConfigError, match="lora.expert_targets"):
        load_config(None, ["lora.expert_targets=gate_proj,w9"]).validate(2, 8)
    with pytest.raises(ValueError, match="both a gate_up_proj"):
        AdapterPlan({(0, 1, "gate_up_proj"): 8, (0, 1, "up_proj"): 8})


def test_launcher_ranks_share_the_cores(monkeypatch):
    """Under a launcher that sets no thread count, each of the host's ranks gets cores / ranks
    OpenMP threads (set before torch loads in a real launch); a user's OMP_NUM_THREADS wins,
    and a world of one keeps torch's default."""
    import os

    from launch.train import share_cores_between_local_ranks

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    share_cores_between_local_ranks()
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    share_cores_between_local_ranks()
    assert os.environ["OMP_NUM_THREADS"] == "7"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    share_cores_between_local_ranks()
    assert "OMP_NUM_THREADS" not in os.environ
