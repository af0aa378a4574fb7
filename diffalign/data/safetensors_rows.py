"""Write a safetensors file one block of rows at a time, so a tensor larger than RAM can still be written.

``safetensors.torch.save_file`` needs every tensor whole in memory. The format itself is simple — an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte range, then the raw bytes —
so once the shapes are known the header can be written first and each block of rows put at its offset. The
result is an ordinary safetensors file (``safe_open`` reads it; rows are sliced without loading the rest).
"""

from __future__ import annotations

import json
import struct
from typing import BinaryIO

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


class RowWriter:
    """Tensors ``names`` of shape [rows, *row_shape] and ``dtype``, laid out one after another in ``fh``; fill
    them with ``write(name, start, block)``. Rows never written read back as zeros."""

    def __init__(self, fh: BinaryIO, names: list[str], rows: int, row_shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None):
        if dtype not in _DTYPES:
            raise ValueError(f"RowWriter: unsupported dtype {dtype}")
        self.fh, self.rows, self.row_shape, self.dtype = fh, rows, tuple(row_shape), dtype
        self.row_bytes = torch.empty(row_shape, dtype=dtype).nelement() * torch.empty((), dtype=dtype).element_size()
        header: dict = {"__metadata__": dict(metadata or {})}
        self.offsets: dict[str, int] = {}
        for n, name in enumerate(names):
            begin = n * rows * self.row_bytes
            header[name] = {"dtype": _DTYPES[dtype], "shape": [rows, *self.row_shape],
                            "data_offsets": [begin, begin + rows * self.row_bytes]}
            self.offsets[name] = begin
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.data_start = 8 + len(text)
        fh.seek(0)
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(self.data_start + len(names) * rows * self.row_bytes)

    def write(self, name: str, start: int, block: torch.Tensor) -> None:
        """Rows ``start … start + len(block)`` of tensor ``name``."""
        if tuple(block.shape[1:]) != self.row_shape or block.dtype != self.dtype:
            raise ValueError(f"{name}: rows of shape {tuple(block.shape[1:])} {block.dtype} do not match the "
                             f"file's {self.row_shape} {self.dtype}")
        if not 0 <= start <= self.rows - len(block):
            raise IndexError(f"{name}: rows {start}…{start + len(block)} outside 0…{self.rows}")
        self.fh.seek(self.data_start + self.offsets[name] + start * self.row_bytes)
        self.fh.write(block.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
