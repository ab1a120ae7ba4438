"""CUDA's and NCCL's rules, checked on CPU (issue 28): what only a GPU would enforce fails here.

- device selection: each rank takes accelerator LOCAL_RANK before the process group or the model
  exists (a fake accelerator of 2 devices stands in for CUDA);
- every tensor constructor in moe_dist/ names its device (an AST walk: a tensor that reaches a
  collective without one is a CPU tensor in NCCL), and every collective checks its input's device;
- every torch._grouped_mm operand meets CUDA's preconditions (16-byte-aligned data pointers,
  strides, int32 offsets on the device), whatever ZeRO did to the parameters;
- one MoE layer's forward and backward synchronise with the host once (the split sizes).
The end-to-end check (EP 2, bf16, grouped kernel, a ZeRO anchor, HELLoRI's stage 2, torch's
all-to-all) is tests/test_precision.py::test_bf16_grouped_anchor_and_lori_stage2.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import run_distributed

ROOT = Path(__file__).resolve().parent.parent


# ---- device selection ---------------------------------------------------------------------------
class FakeAccelerator:
    """DeepSpeed's accelerator interface as a 2-GPU CUDA box answers it."""

    def __init__(self, count: int = 2):
        self.count, self.current, self.calls = count, 0, []

    def device_name(self, index=None):
        return "cuda"

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.calls.append(("set_device", index))
        self.current = index

    def current_device(self):
        return self.current

    def communication_backend_name(self):
        return "nccl"

    def is_bf16_supported(self):
        return True


class _Stop(Exception):
    pass


def test_each_rank_takes_its_local_device_before_the_process_group(monkeypatch):
    """launch/train.py as a launcher starts rank 1 of a 2-GPU host: the device is cuda:1 and is
    current before deepspeed.init_distributed (on the code before issue 28: cuda:0, unset)."""
    import deepspeed
    import deepspeed.accelerator

    import launch.train as train

    accel = FakeAccelerator()
    seen = {}

    def fake_init_distributed(dist_backend=None, **kwargs):
        seen.update(backend=dist_backend, current=accel.current, calls=list(accel.calls))
        raise _Stop  # what happens next needs real GPUs

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accel)
    monkeypatch.setattr(deepspeed, "init_distributed", fake_init_distributed)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = train.load_config(str(ROOT / "launch/recipes/tiny_lora.yaml"), [])
    with pytest.raises(_Stop):
        train.run(cfg)
    assert seen == {"backend": "nccl", "current": 1, "calls": [("set_device", 1)]}


def test_device_selection_by_launcher_and_its_errors():
    from moe_dist.parallel.device import select_device

    accel = FakeAccelerator()
    assert select_device(accel, {"OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == torch.device("cuda", 1)
    assert select_device(accel, {}) == torch.device("cuda", 0) and accel.calls[-1] == ("set_device", 0)
    with pytest.raises(RuntimeError, match=r"local rank 2 has no cuda device: 2 visible \(CUDA_VISIBLE_DEVICES=0,1\)"):
        select_device(accel, {"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"})

    class Cpu(FakeAccelerator):
        def device_name(self, index=None):
            return "cpu"

    assert select_device(Cpu(), {"LOCAL_RANK": "1"}) == torch.device("cpu")


def test_entry_points_select_the_device_before_the_process_group():
    """Every script that starts a process group does it through moe_dist.parallel.device (or
    calls select_device first)."""
    offenders = []
    for path in [*ROOT.glob("launch/*.py"), *ROOT.glob("bench/*.py")]:
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            calls = [(n.lineno, n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", ""))
                     for n in ast.walk(fn) if isinstance(n, ast.Call)]
            inits = [ln for ln, name in calls if name == "init_distributed"]
            selects = [ln for ln, name in calls if name == "select_device"]
            for ln in inits:
                direct = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                             and n.func.attr == "init_distributed" and getattr(n.func.value, "id", "") == "deepspeed"
                             and n.lineno == ln for n in ast.walk(fn))
                if direct and not any(s < ln for s in selects) and path.name != "gpu_parity.py":
                    offenders.append(f"{path.relative_to(ROOT)}:{ln}")
    assert not offenders, offenders


# ---- tensors that reach collectives ---------------------------------------------------------------
CONSTRUCTORS = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye",
                "rand", "randn", "randint", "randperm"}


def test_every_tensor_constructor_in_moe_dist_names_its_device():
    """`torch.zeros(n)` is a CPU tensor: all-reduced on NCCL it fails (HELLoRI's stage 2 and
    DMEP's statistics did). Host-only tensors say device="cpu", so each is a decision."""
    missing = []
    for path in sorted((ROOT / "moe_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CONSTRUCTORS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not missing, "\n".join(missing)


def test_collectives_refuse_a_tensor_off_the_backends_device(monkeypatch):
    import torch.distributed as dist

    from moe_dist.parallel import device as dev

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(RuntimeError, match=r"all_reduce: a cpu tensor \(2,\) sent to an NCCL collective"):
        dev.check_collective_device(torch.zeros(2, device="cpu"), None, "all_reduce")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    dev.check_collective_device(torch.zeros(2, device="cpu"), None, "all_reduce")


# ---- grouped GEMM operands ----------------------------------------------------------------------
def test_grouped_mm_check_catches_what_cuda_refuses_and_cpu_takes():
    from moe_dist.kernels.grouped import GroupedMMOperandError, aligned, grouped_mm

    buf = torch.randn(1 + 3 * 16 * 8, dtype=torch.bfloat16, device="cpu")
    w = buf[1:].view(3, 16, 8)  # a view 2 bytes into a buffer: what ZeRO's flat buffer gives
    x = torch.randn(10, 16, dtype=torch.bfloat16, device="cpu")
    offs = torch.tensor([3, 3, 10], dtype=torch.int32, device="cpu")
    torch._grouped_mm(x, w, offs=offs)  # the premise: CPU does not check alignment
    with pytest.raises(GroupedMMOperandError, match="mat_b data pointer .* is not 16-byte aligned"):
        grouped_mm(x, w, offs)
    with pytest.raises(GroupedMMOperandError, match="offsets must be 1-D int32"):
        grouped_mm(x, aligned(w), offs.long())
    out = grouped_mm(x, aligned(w), offs)
    torch.testing.assert_close(out, torch._grouped_mm(x, w.contiguous(), offs=offs))


def test_grouped_mm_backward_matches_torch_and_zeroes_empty_groups():
    from moe_dist.kernels.grouped import grouped_mm

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(10, 16, generator=g, device="cpu", requires_grad=True)
    w = torch.randn(3, 16, 8, generator=g, device="cpu", requires_grad=True)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32, device="cpu")  # group 1 has no rows
    up = torch.randn(10, 8, generator=g, device="cpu")
    (grouped_mm(x, w, offs) * up).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (torch._grouped_mm(x2, w2, offs=offs) * up).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert w.grad[1].abs().max() == 0


def test_adapter_operands_are_aligned_inside_an_unaligned_flat_buffer():
    """ZeRO without parameter_alignment: bucket Parameters are views of one flat buffer at odd
    element offsets (a 1-element anchor first). The bank's grouped operands still pass."""
    from moe_dist.adapters.expert_bank import ExpertLoRABank
    from moe_dist.adapters.lora import LoRAConfig
    from moe_dist.kernels.grouped import check_grouped_mm
    from moe_dist.plan import expert_proj_layout

    D, F = 16, 24
    layouts = {p: expert_proj_layout(p, D, F) for p in ("gate_proj", "up_proj", "down_proj")}
    ranks = {(e, p): 8 for e in (0, 1) for p in layouts}
    bank = ExpertLoRABank(0, [0, 1], ranks, layouts, LoRAConfig(alpha=16)).to(torch.bfloat16)
    params = list(bank.parameters())
    flat = torch.zeros(1 + sum(p.numel() for p in params), dtype=torch.bfloat16, device="cpu")
    offset = 1  # the anchor
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    assert any(p.data_ptr() % 16 for p in params)
    offs = torch.tensor([5, 9], dtype=torch.int32, device="cpu")
    for bucket in bank.buckets["down_proj"]:
        A, B = bank.stacked(bucket, torch.bfloat16)
        check_grouped_mm(torch.zeros(9, F, dtype=torch.bfloat16, device="cpu"), A, offs)
        check_grouped_mm(torch.zeros(9, A.shape[-1], dtype=torch.bfloat16, device="cpu"), B, offs)


def test_zero_config_aligns_every_parameter():
    from moe_dist.config import load_config
    from moe_dist.train.engine import deepspeed_config

    cfg = load_config(str(ROOT / "launch/recipes/tiny_lora.yaml"), [])
    assert deepspeed_config(cfg, bf16=True)["zero_optimization"]["parameter_alignment"] is True


# ---- host syncs ---------------------------------------------------------------------------------
SYNC_OPS = {"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "masked_select", "_segment_reduce_backward"}
HOST_METHODS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class HostSyncCounter(TorchDispatchMode):
    """Counts, during its scope, the operations that make a CUDA host wait for the device: a
    scalar read (`item`, `int(t)`, `bool(t)`), a device-to-host copy (`tolist`, `.cpu()`), a
    host-to-device copy of host data (`torch.tensor(list)`), and the ops that size their output
    from the data (nonzero, bincount, unique, masked_select, boolean indexing, repeat_interleave
    without output_size). On CPU none of them waits; counted, they are what a GPU would pay."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self._functions = _HostCalls(self)

    def note(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def __enter__(self):
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._functions.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.note(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and not (
                len(args) > 2 and args[2] is not None):
            self.note("repeat_interleave without output_size")
        elif name in ("index", "index_put", "index_put_") and any(
                i is not None and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])):
            self.note("boolean indexing")
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class _HostCalls(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS and name not in ("item",):  # item reaches _local_scalar_dense
            self.counter.note(f"Tensor.{name}")
        elif name == "to" and any(str(a) == "cpu" for a in [*args[1:], kwargs.get("device")]):
            self.counter.note("Tensor.to(cpu)")
        elif func in (torch.tensor, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor):
            self.counter.note("torch.tensor(host data)")
        return func(*args, **kwargs)


def _moe_layer(ep_size: int, ep_rank: int, group, dtype):
    from moe_dist.adapters.lora import LoRAConfig
    from moe_dist.moe.experts import ExpertParallelExperts
    from moe_dist.parallel.groups import ExpertGroups
    from moe_dist.parallel.placement import ExpertPlacement

    E, D, F = 8, 16, 24
    torch.manual_seed(0)
    placement = ExpertPlacement.contiguous(E, ep_size)
    # every layout the grouped kernel has: gate/up pairs, a lone up bucket, scattered slots, down
    ranks = {(e, "gate_proj"): 8 for e in range(E)} | {(e, "up_proj"): 8 for e in range(E)}
    ranks |= {(e, "down_proj"): (8 if e % 2 else 16) for e in range(E)} | {(3, "up_proj"): 4, (6, "gate_proj"): 0}
    mod = ExpertParallelExperts(0, E, D, F, torch.nn.functional.silu, placement,
                                ExpertGroups(ep_size, ep_rank, group, group), ranks, LoRAConfig(alpha=16),
                                dtype=dtype, adapter_dtype=dtype, biases=True, kernel="grouped")
    with torch.no_grad():
        for w in mod.base_weights().values():
            w.normal_(0, 0.2)
        for name, p in mod.adapters.named_parameters():
            p.normal_(0, 0.2)
    return mod.train()


def _count_layer_syncs(ep_size: int, ep_rank: int, group) -> dict[str, dict[str, int]]:
    mod = _moe_layer(ep_size, ep_rank, group, torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(1 + ep_rank)
    T, K = 12, 2
    x = torch.randn(T, 16, generator=g, device="cpu", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(8, generator=g, device="cpu")[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, device="cpu", requires_grad=True)
    mod(x, idx, w).float().sum().backward()  # once before counting: groups set up at first use
    x.grad = w.grad = None
    fwd, bwd = HostSyncCounter(), HostSyncCounter()
    with fwd:
        y = mod(x, idx, w)
    with bwd:
        y.float().sum().backward()
    assert x.grad is not None and any(p.grad is not None for p in mod.adapters.parameters())
    return {"forward": fwd.counts, "backward": bwd.counts}


BUDGET = {"forward": 1, "backward": 0}  # the split sizes the exchange needs on the host; nothing else


def _assert_budget(counts: dict[str, dict[str, int]]) -> None:
    for phase, limit in BUDGET.items():
        assert sum(counts[phase].values()) <= limit, (phase, counts)
    assert counts["forward"] == {"Tensor.tolist": 1}, counts


def test_one_host_sync_per_moe_layer_at_ep1():
    _assert_budget(_count_layer_syncs(1, 0, None))


def _ep2_over_torch_all_to_all(rank: int, world: int) -> None:
    """Through torch's all_to_all_single, the path NCCL runs (the shared-memory exchange is
    CPU-only machinery: its host work is not a device sync): the dispatcher against the dense
    reference in bf16 (with a rank that has no tokens), then the layer's host-sync count."""
    import os

    import torch.distributed as dist

    from test_dispatch_distributed import _check

    os.environ["MOE_DIST_HOST_EXCHANGE"] = "0"
    _check(rank, world, "bfloat16", "mixed")
    _check(rank, world, "bfloat16", "empty_rank")
    _assert_budget(_count_layer_syncs(2, rank, dist.group.WORLD))


def test_one_host_sync_per_moe_layer_at_ep2():
    run_distributed(_ep2_over_torch_all_to_all, 2)


def test_the_counter_sees_what_syncs():
    """The counter's premise: each pattern the layer used to have is counted."""
    t = torch.tensor([1, 0, 2], device="cpu")
    with HostSyncCounter() as c:
        torch.bincount(t)
        t.tolist()
        t.nonzero()
        t[t > 0]
        torch.tensor([1, 2], device="cpu")
        t.repeat_interleave(t)
        int(t[0])
    assert c.counts == {"bincount": 1, "Tensor.tolist": 1, "nonzero": 1, "boolean indexing": 1,
                        "torch.tensor(host data)": 1, "repeat_interleave without output_size": 1,
                        "_local_scalar_dense": 1, "Tensor.__int__": 1}, c.counts


# ---- flash attention on GPU ---------------------------------------------------------------------
def test_auto_attention_takes_installed_flash_attention_on_gpu(monkeypatch):
    from moe_dist.kernels import packed_attention as pa

    class Model:
        class config:
            _attn_implementation = "sdpa"

        def set_attn_implementation(self, name):
            self.config._attn_implementation = name

    monkeypatch.setattr(pa, "installed_flash_attention", lambda: "flash_attention_2")
    cuda = torch.device("cuda", 0)
    assert pa.use_attention_kernel(Model(), "auto", cuda, torch.bfloat16) == "flash_attention_2"
    Model.config._attn_implementation = "sdpa"
    assert pa.use_attention_kernel(Model(), "auto", cuda, torch.float32) == "sdpa"  # flash has no fp32
    monkeypatch.setattr(pa, "installed_flash_attention", lambda: None)
    assert pa.use_attention_kernel(Model(), "auto", cuda, torch.bfloat16) == "sdpa"
    monkeypatch.undo()
    assert pa.installed_flash_attention() is None  # no flash-attn on a CPU box


def test_flattened_packed_rows_give_the_same_loss_and_gradients():
    """What flash attention is handed (one row of B x S tokens, positions restarting per document,
    each row's first label ignored) gives the loss and gradients of the B packed rows: run here
    through sdpa, which takes the documents from the position ids in both layouts."""
    from reference import build_hf

    from moe_dist.kernels.packed_attention import flatten_packed_rows

    hf = build_hf("olmoe").float()
    g = torch.Generator(device="cpu").manual_seed(0)
    B, S = 3, 16
    ids = torch.randint(3, hf.config.vocab_size, (B, S), generator=g, device="cpu")
    pos = torch.tensor([list(range(6)) + list(range(10)), list(range(16)), list(range(9)) + list(range(7))],
                       device="cpu")
    labels = ids.clone()
    labels[0, :3] = labels[2, 9:12] = -100  # prompts
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels}
    assert flatten_packed_rows(batch, "sdpa") is batch
    flat = flatten_packed_rows(batch, "flash_attention_2")
    assert flat["input_ids"].shape == (1, B * S) and (flat["labels"].view(B, S)[:, 0] == -100).all()
    results = []
    for b in (batch, flat):
        hf.zero_grad()
        loss = hf(**b, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in hf.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
