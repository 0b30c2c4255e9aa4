"""Host side of the multi-tensor launches: one Triton program per fixed-size chunk of any
tensor in a list, so a whole model's parameters go through one launch per dtype.

The kernels read small int64/int32 device tables:

* ``chunk_tensor[c]``, ``chunk_start[c]``: which tensor chunk ``c`` belongs to, and its first
  element. Chunks are in tensor order, so a running count over chunks is also a running
  count over the tensors laid end to end.
* ``numel[t]`` and one address table per operand (``ptrs[t]``: ``data_ptr()`` of tensor
  ``t``), cast back to typed pointers in the kernel.
* ``first_chunk[t]``: the index of tensor ``t``'s first chunk, for per-tensor scans over
  chunks such as the compact backup's offsets.

Chunk starts are multiples of CHUNK, so a chunk of a bit-packed mask starts on a byte, and a
tensor that starts on 16 bytes has every chunk start there too. The launchers check each
tensor's address and pass ``ALIGNED``; the kernels then work on ``[BLOCK // 8, 8]`` blocks
(one mask byte per row, rows contiguous) with 16-byte vector loads and stores. A chunk that
ends early (a tensor's tail) takes a bounds-checked copy of the same code; full chunks need no
per-element bounds, so nothing breaks the vectors up. Index math inside a chunk is int32.

The tables depend only on host values (the numels, the ``data_ptr()``s), so their device
copies are cached, keyed by exactly that content plus the device: a call that sees the same
list again (same sizes; same addresses, which the caching allocator usually hands out again)
makes no host-to-device copy at all, which keeps the launchers cheap on the CPU and lets them
be captured in a CUDA graph. A miss builds the table on the host (pinned on CUDA), copies it
with ``non_blocking=True`` and keeps the host tensor alive beside the device one; the first
use on another stream waits for that copy on the device (an event, no host sync). The cache
is a small LRU (:data:`CACHE_SIZE` entries), except that an entry used while the current CUDA
stream is capturing a graph is never evicted (the graph keeps reading its address); an entry
first made during a capture holds data only once that graph replays, so it is kept for that
graph and never handed out again. Nothing derived from tensor *contents* (e.g. mask bit
counts) is cached.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import reduce
from itertools import repeat
from operator import attrgetter, is_not, or_

import torch
import triton
import triton.language as tl

from .._device_tables import DeviceTableCache, _place
from .._host_loops import data_ptrs

CHUNK = 8192  # elements per program; a multiple of every BLOCK used with it


@triton.jit
def this_chunk(chunk_tensor, chunk_start, numel, CHUNK: tl.constexpr):
    """(chunk, tensor, first element, elements left in this chunk: an int32 <= CHUNK) of the
    running program. Chunks start on multiples of CHUNK, which the compiler is told."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.multiple_of(tl.load(chunk_start + c), CHUNK)
    left = tl.minimum(tl.load(numel + t) - start, CHUNK).to(tl.int32)
    return c, t, start, left


@triton.jit
def tensor_ptr(ptrs, t, ref, offset, ALIGNED: tl.constexpr):
    """Typed pointer to element ``offset`` of tensor ``t`` from an address table (``ref``: any
    tensor of the type). ALIGNED: the host checked that the tensor starts on 16 bytes and
    ``offset`` keeps it there, so the compiler may use 16-byte vector accesses."""
    p = tl.load(ptrs + t).to(ref.dtype) + offset
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def block_offsets(j, BLOCK: tl.constexpr):
    """Offsets ``j .. j + BLOCK`` as ``[BLOCK // 8, 8]``: row ``r`` holds the 8 elements of one
    mask byte, and each row is contiguous (vector accesses along it)."""
    return j + tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]


@triton.jit
def load_block(p, valid, FULL: tl.constexpr):
    """``p[...]``; where not FULL (a chunk's tail), only where ``valid``, else 0."""
    if FULL:
        return tl.load(p)
    else:
        return tl.load(p, mask=valid, other=0)


@triton.jit
def store_block(p, value, valid, FULL: tl.constexpr):
    if FULL:
        tl.store(p, value)
    else:
        tl.store(p, value, mask=valid)


@triton.jit
def block_bits(bits, j, offs, left, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """The block's mask bits as 0/1 int32 ``[BLOCK // 8, 8]`` (0 past the chunk's end), each
    mask byte read once; ``bits`` points at the chunk's first byte."""
    rows = j // 8 + tl.arange(0, BLOCK // 8)
    if FULL:
        byte = tl.load(bits + rows)
    else:
        byte = tl.load(bits + rows, mask=rows * 8 < left, other=0)
    bit = (byte.to(tl.int32)[:, None] >> tl.arange(0, 8)[None, :]) & 1
    if not FULL:
        bit = tl.where(offs < left, bit, 0)
    return bit


@triton.jit
def block_slots(bit):
    """For a ``[BLOCK // 8, 8]`` block of mask bits: which elements are kept, each kept
    element's slot among the block's kept elements (in index order), which rows hold any, and
    how many there are."""
    row_count = tl.sum(bit, axis=1)
    row_before = tl.cumsum(row_count, axis=0) - row_count
    slot = row_before[:, None] + tl.cumsum(bit, axis=1) - bit
    return bit != 0, slot, row_count > 0, tl.sum(row_count, axis=0)


def f64_bits(value: float) -> int:
    """A host number as the int64 of its float64 bits, for a kernel to read back exactly with
    :func:`as_f64`: Triton passes a Python float argument as fp32, which would round a float64
    operand (a scale, a learning rate) before float64 math."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@triton.jit
def as_f64(bits):
    """The float64 whose bits :func:`f64_bits` passed (an i32 argument where they fit in one:
    widened first)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


def aligned(*tensors) -> bool:
    """Whether every tensor starts on 16 bytes (the kernels then use vector accesses)."""
    return all(aligned_at(data_ptrs(list(tensors))))


def aligned_at(*ptr_lists) -> list[bool]:
    """Per index ``i``: whether every operand's address ``ptr_lists[j][i]`` (from
    :func:`~ssam_kernels._host_loops.data_ptrs`; 0 where an operand has no tensor) is on 16
    bytes. The addresses are read once per operand list and reused for its address tables."""
    combined = ptr_lists[0]
    for ptrs in ptr_lists[1:]:  # (map over operator.or_: no Python frame per index)
        combined = list(map(or_, combined, ptrs))
    if not reduce(or_, combined, 0) & 15:  # all on 16 bytes, the usual case: no loop in Python
        return [True] * len(combined)
    return [not (p & 15) for p in combined]


@dataclass(frozen=True, eq=False)
class ChunkTable:
    """Device tables of one list of tensor sizes (views of one cached device buffer: treat as
    read-only)."""

    chunk_tensor: torch.Tensor  # int32 [chunks]
    chunk_start: torch.Tensor  # int64 [chunks]
    numel: torch.Tensor  # int64 [tensors]
    first_chunk: torch.Tensor  # int64 [tensors]: index of each tensor's first chunk
    num_chunks: int


_CACHE = DeviceTableCache()


def _align(n: int) -> int:
    return (n + 1) // 2 * 2  # int64 slots to a multiple of 16 bytes


def chunk_table(numels: list[int], device: torch.device, chunk: int = CHUNK) -> ChunkTable:
    """The chunk tables of tensors of these sizes on ``device`` (cached; see the module
    docstring)."""
    numels = tuple(map(int, numels))
    device, place = _place(device)
    key = ("chunks", chunk, numels) + place

    def build():
        counts = [(n + chunk - 1) // chunk for n in numels]
        chunks, tensors = sum(counts), len(numels)
        starts, owner, first = [], [], []
        for t, c in enumerate(counts):
            first.append(len(starts))
            starts.extend(range(0, c * chunk, chunk))
            owner.extend([t] * c)
        # one int64 buffer (one copy): chunk_start | numel | first_chunk | chunk_tensor (int32, two
        # per slot); every section starts on 16 bytes
        sections = [_align(chunks), _align(tensors), _align(tensors), _align((chunks + 1) // 2)]
        host = torch.zeros(sum(sections), dtype=torch.int64)
        at = [sum(sections[:i]) for i in range(len(sections))]
        for i, values in enumerate((starts, list(numels), first)):
            host[at[i]: at[i] + len(values)] = torch.tensor(values, dtype=torch.int64)
        host[at[3]:].view(torch.int32)[:chunks] = torch.tensor(owner, dtype=torch.int32)

        def make(buf: torch.Tensor) -> ChunkTable:
            return ChunkTable(
                chunk_tensor=buf[at[3]:].view(torch.int32)[:chunks],
                chunk_start=buf[at[0]: at[0] + chunks],
                numel=buf[at[1]: at[1] + tensors],
                first_chunk=buf[at[2]: at[2] + tensors],
                num_chunks=chunks,
            )

        return host, make

    return _CACHE.get(key, device, build)


def address_table(tensors: list[torch.Tensor], device: torch.device, ptrs=None) -> torch.Tensor:
    """int64 ``data_ptr()`` of each tensor (which must be contiguous), on ``device`` (cached
    by the addresses: see the module docstring). ``ptrs``: those addresses, where the caller
    already read them."""
    ptrs = data_ptrs(tensors) if ptrs is None else tuple(ptrs)
    device, place = _place(device)
    key = ("addresses", ptrs) + place
    return _CACHE.get(key, device, lambda: (torch.tensor(ptrs, dtype=torch.int64), lambda buf: buf))


def size_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 ``numel()`` of each tensor, on ``device`` (cached by the sizes): a kernel's bound
    on what it may touch in each tensor of a list whose sizes it cannot otherwise know."""
    sizes = tuple(map(torch.Tensor.numel, tensors))
    device, place = _place(device)
    key = ("sizes", sizes) + place
    return _CACHE.get(key, device, lambda: (torch.tensor(sizes, dtype=torch.int64), lambda buf: buf))


def operands_at(tensors: dict, ptrs: dict, idx: list[int], masked: bool) -> dict:
    """Per operand of a launch group: ``(tensors, addresses)`` at the group's indices ``idx``
    (``tensors`` and ``ptrs``: per operand name, one entry per index of the call); the
    ``bits`` operand empty where the group is not ``masked``."""
    def at(name, ts):
        if name == "bits" and not masked:
            return [], []
        if len(idx) == len(ts):  # every index, in order (group_by's indices increase): no copy
            return ts, ptrs[name]
        return [ts[i] for i in idx], [ptrs[name][i] for i in idx]

    return {name: at(name, ts) for name, ts in tensors.items()}


_dtype = attrgetter("dtype")


def dtypes(tensors: list) -> map:
    """Each tensor's dtype, lazily (for zipping into launch-group keys without a Python frame
    per tensor)."""
    return map(_dtype, tensors)


def present(entries: list) -> map:
    """Whether each entry is not None, lazily."""
    return map(is_not, entries, repeat(None))


def take(entries: list, idx: list[int]) -> list:
    """``entries`` at ``idx``: the list itself where ``idx`` is every index in order."""
    return entries if len(idx) == len(entries) else [entries[i] for i in idx]


def contiguous(tensors: list) -> list:
    """The tensors made contiguous: the list itself where they all are."""
    return tensors if all(map(torch.Tensor.is_contiguous, tensors)) else [t.contiguous() for t in tensors]


def contiguous_split(n: int, *lists) -> tuple[list[int], list[int]]:
    """``(fast, slow)``: the indices ``i < n`` where every ``lists[j][i]`` is contiguous (the
    launches take them), and the others (the reference does them)."""
    if all(all(map(torch.Tensor.is_contiguous, ts)) for ts in lists):  # the usual case: no Python loop
        return list(range(n)), []
    fast = [i for i in range(n) if all(ts[i].is_contiguous() for ts in lists)]
    return fast, sorted(set(range(n)) - set(fast))


def group_by(keys: list) -> dict:
    """Indices grouped by key, in first-seen order (one launch per group), increasing within
    each group."""
    if keys and keys.count(keys[0]) == len(keys):  # one group, the usual case: no Python loop
        return {keys[0]: list(range(len(keys)))}
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups
