"""Read and write safetensors files one tensor at a time.

`safetensors.torch.save_file` takes the whole state dict and serialises it through a bytes
copy of every tensor, so writing a 5 GB shard holds ~10 GB. An export only ever changes
tensors in place (same names, shapes, order), so the output header is known before any data:
`ShardWriter` writes it first, then each tensor's bytes as it comes, and peak memory is the
tensor in hand. The files are ordinary safetensors (8-byte little-endian header length,
JSON header padded to 8 bytes, then the data in header order); `safe_open` reads them back
in the tests. Reading goes through safetensors itself, one file open per tensor (mapped pages
count in the RSS until the file is closed, see moe_dist/models/loading.py).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def tensor_specs(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """({name: (dtype name, shape)} in file order, the file's __metadata__), from the header only."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", None) or {}
    ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in ordered}, meta


def read_tensor(path: Path, name: str, index: int | None = None) -> torch.Tensor:
    """The tensor, or only row `index` of its first dimension (one expert of a stack)."""
    with safe_open(str(path), "pt") as fh:
        return fh.get_tensor(name) if index is None else fh.get_slice(name)[index]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class ShardWriter:
    """Write a safetensors file whose tensors (names, dtypes, shapes, order) are declared up front.

    `write(name, tensor)` must follow the declared order; `close()` checks every tensor came."""

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path, self.specs = Path(path), dict(specs)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, (dtype, shape) in self.specs.items():
            if dtype not in _ITEMSIZE:
                raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which this writer does not know")
            size = _numel(shape) * _ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._order = list(self.specs)
        self._next = 0
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"{self.path}: wrote {name!r}, expected {want!r} next")
        dtype, shape = self.specs[name]
        if DTYPE_NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self._fh.write(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._fh.close()
            raise ValueError(f"{self.path}: {len(self._order) - self._next} declared tensors never written "
                             f"(first {self._order[self._next]!r})")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
