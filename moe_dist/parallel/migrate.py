"""Move tensors between the ranks of a process group in one all-to-all round.

Both sides know what travels (the manifest is derived from placements and the plan, which
every rank holds), so no sizes are exchanged first: each rank packs what it sends to each
peer into one byte buffer, one `all_to_all_single` moves everything, and the receiver views
its buffer back into tensors. Peak extra memory is one send and one receive buffer: exactly
what this rank sends and receives, nothing else. Works on gloo (CPU) and NCCL (device
buffers) alike: bytes are bytes, bf16 included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from moe_dist.parallel.device import check_collective_device

_ALIGN = 16  # every tensor starts 16-byte aligned, so viewing bytes as any dtype is legal


@dataclass(frozen=True)
class TensorSpec:
    name: str  # for error messages only
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype, device="cpu").element_size()
        return n + (-n % _ALIGN)


def _pack(tensors: Sequence[torch.Tensor], specs: Sequence[TensorSpec], out_B: torch.Tensor) -> None:
    offset = 0
    for t, spec in zip(tensors, specs, strict=True):
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise ValueError(f"rank {_rank()}: {spec.name} is {tuple(t.shape)} {t.dtype}, the manifest says "
                             f"{spec.shape} {spec.dtype}")
        n = t.numel() * t.element_size()
        out_B[offset:offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        offset += spec.nbytes


def _unpack(buf_B: torch.Tensor, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    out, offset = [], 0
    for spec in specs:
        n = torch.Size(spec.shape).numel() * torch.empty((), dtype=spec.dtype, device="cpu").element_size()
        out.append(buf_B[offset:offset + n].view(spec.dtype).view(spec.shape))
        offset += spec.nbytes
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def exchange(outgoing: Sequence[Sequence[torch.Tensor]], send_specs: Sequence[Sequence[TensorSpec]],
             recv_specs: Sequence[Sequence[TensorSpec]], group, device: torch.device) -> list[list[torch.Tensor]]:
    """Collective over `group`: `outgoing[p]` goes to group rank p, described by
    `send_specs[p]`; returns what each peer sent, described by `recv_specs[p]` (views into
    one receive buffer on `device`). Lists are indexed by rank within the group."""
    size = len(send_specs)
    send_sizes = [sum(s.nbytes for s in specs) for specs in send_specs]
    recv_sizes = [sum(s.nbytes for s in specs) for specs in recv_specs]
    send_B = torch.empty(sum(send_sizes), dtype=torch.uint8, device=device)
    offset = 0
    for p in range(size):
        _pack(outgoing[p], send_specs[p], send_B[offset:offset + send_sizes[p]])
        offset += send_sizes[p]
    recv_B = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
    if size > 1:  # every member joins, even one with nothing to send or receive
        check_collective_device(send_B, group, "expert move")
        dist.all_to_all_single(recv_B, send_B, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                               group=group)
    else:
        recv_B.copy_(send_B)
    del send_B
    received, offset = [], 0
    for p in range(size):
        received.append(_unpack(recv_B[offset:offset + recv_sizes[p]], recv_specs[p]))
        offset += recv_sizes[p]
    return received
