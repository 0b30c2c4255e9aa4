"""Host side of the multi-tensor launches: one Triton program per fixed-size chunk of any
tensor in a list, so a whole model's parameters go through one launch per dtype.

The kernels read three small device tables:

* ``chunk_tensor[c]``, ``chunk_start[c]``: which tensor chunk ``c`` belongs to, and its first
  element. Chunks are in tensor order, so a running count over chunks is also a running
  count over the tensors laid end to end.
* ``numel[t]`` and one address table per operand (``ptrs[t]``: ``data_ptr()`` of tensor
  ``t``), cast back to typed pointers in the kernel.

Chunk starts are multiples of 8, so a chunk of a bit-packed mask starts on a byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

CHUNK = 8192  # elements per program; a multiple of every BLOCK used with it


@triton.jit
def this_chunk(chunk_tensor, chunk_start, numel):
    """(chunk, tensor, first element, tensor length) of the running program."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    return c, t, tl.load(chunk_start + c), tl.load(numel + t)


@triton.jit
def tensor_ptr(ptrs, t, ref):
    """Typed pointer to tensor ``t`` from an address table (``ref``: any tensor of the type)."""
    return tl.load(ptrs + t).to(ref.dtype)


@dataclass
class ChunkTable:
    chunk_tensor: torch.Tensor  # int32 [chunks]
    chunk_start: torch.Tensor  # int64 [chunks]
    numel: torch.Tensor  # int64 [tensors]
    first_chunk: torch.Tensor  # int64 [tensors]: index of each tensor's first chunk
    num_chunks: int


def chunk_table(numels: list[int], device: torch.device, chunk: int = CHUNK) -> ChunkTable:
    counts = torch.tensor([(n + chunk - 1) // chunk for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(first, counts)) * chunk
    return ChunkTable(
        chunk_tensor.to(device, non_blocking=True),
        chunk_start.to(device, non_blocking=True),
        torch.tensor(numels, dtype=torch.int64).to(device, non_blocking=True),
        first.to(device, non_blocking=True),
        int(counts.sum()),
    )


def address_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 ``data_ptr()`` of each tensor (which must be contiguous), on ``device``."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)


def group_by(keys: list, indices=None) -> dict:
    """Indices grouped by key, in first-seen order (one launch per group)."""
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i if indices is None else indices[i])
    return groups
