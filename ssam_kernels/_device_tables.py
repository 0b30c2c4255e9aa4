"""Small host tables (addresses, sizes, flags) copied to the device once and reused: a cache
keyed by their content, safe across streams and CUDA graph captures. Used by the Triton
launchers (``triton_ops.multi_tensor``) and by the planned step's kernels of every backend.

A miss builds the table on the host (pinned on CUDA), copies it with ``non_blocking=True`` and
keeps the host tensor alive beside the device one; the first use on another stream waits for
that copy on the device (an event, no host sync). The cache is a small LRU (:data:`CACHE_SIZE`
entries), except that an entry used while the current CUDA stream is capturing a graph is never
evicted (the graph keeps reading its address); an entry first made during a capture holds data
only once that graph replays, so it is kept for that graph and never handed out again.

A table built during a capture is copied from pinned memory set aside before it
(:class:`CaptureArena`), not from a new ``pin_memory()``: torch's pinned-memory allocator queries
CUDA events when it allocates, which a capture in the default (global) mode refuses in torch
builds without pytorch#167507.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

CACHE_SIZE = 256  # LRU entries (tables) kept; each is a few bytes per tensor or chunk
ARENA_BYTES = 4 << 20  # pinned bytes set aside for the tables captures build (a step's are ~20 B per 8k elements)


class CaptureArena:
    """Pinned host memory reserved outside any capture, handed out in 16-byte-aligned pieces to
    the tables a capture builds and never taken back (a captured graph reads its tables' host
    copies again at every replay, for as long as it lives)."""

    def __init__(self, nbytes: int = ARENA_BYTES):
        self.nbytes = nbytes
        self.block: torch.Tensor | None = None
        self.used = 0

    def reserve(self, pin: bool = True) -> None:
        """Set the memory aside (outside a capture): once, and again once half of it is taken
        (the tables made from the old block keep it alive)."""
        if self.block is None or self.used > self.nbytes // 2:
            self.block = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
            self.used = 0

    def copy(self, host: torch.Tensor) -> torch.Tensor | None:
        """``host`` (contiguous) copied into the arena, or None where it has no room left."""
        start = -(-self.used // 16) * 16
        end = start + host.numel() * host.element_size()
        if self.block is None or end > self.nbytes:
            return None
        out = self.block[start:end].view(host.dtype).view(host.shape)
        out.copy_(host)
        self.used = end
        return out


class _Entry:
    __slots__ = ("value", "buffer", "host", "event", "streams")

    def __init__(self, value, buffer: torch.Tensor, host: torch.Tensor, event, stream):
        self.value = value  # what the callers get: the device tensor or a ChunkTable of its views
        self.buffer = buffer  # the device tensor
        self.host = host  # the (pinned) source of the copy, alive as long as the entry
        self.event = event  # CUDA: recorded after the copy (None: made during a capture)
        self.streams = {stream}  # CUDA streams known to be ordered after the copy


class DeviceTableCache:
    """Content-keyed device copies of small host tables: a bounded LRU, plus an unbounded
    store for entries a CUDA graph capture used (never evicted)."""

    def __init__(self, maxsize: int = CACHE_SIZE):
        self.maxsize = maxsize
        self.lru: OrderedDict = OrderedDict()
        self.captured: dict = {}  # key -> entry a capture used (made before it: valid everywhere)
        self.made_in_capture: list = []  # entries made during a capture: kept, never handed out again
        self.misses = 0  # tables built (on CUDA, one host-to-device copy each; tests read it)
        self.arena = CaptureArena()  # the pinned sources of tables built during captures
        self.lock = threading.Lock()  # launchers may run in several threads (one per device)

    def clear(self) -> None:
        """Drop the evictable entries (the ones a captured graph uses stay)."""
        with self.lock:
            self.lru.clear()

    def get(self, key: tuple, device: torch.device, build):
        """The cached value for ``key`` (which must name ``device``); on a miss, ``build()``
        returns ``(host tensor, make)`` and ``make(device copy)`` the value."""
        with self.lock:
            return self._get(key, device, build)

    def _get(self, key: tuple, device: torch.device, build):
        cuda = device.type == "cuda"
        stream = torch.cuda.current_stream(device) if cuda else None
        capturing = _capturing(device)
        entry = self.captured.get(key)
        if entry is None:
            entry = self.lru.get(key)
            if entry is not None:
                if capturing:  # the graph will keep reading it: never evict it now
                    del self.lru[key]
                    self.captured[key] = entry
                else:
                    self.lru.move_to_end(key)
        if entry is not None:
            if cuda and stream.cuda_stream not in entry.streams and not capturing:
                # first use on another stream: order it after the copy (no host sync), and
                # keep the allocator from reusing the buffer before this stream is done
                stream.wait_event(entry.event)
                entry.buffer.record_stream(stream)
                entry.streams.add(stream.cuda_stream)
            # (a capture needs neither: torch.cuda.graph synchronizes before capturing, and
            # the entry is never freed)
            return entry.value
        host, make = build()
        if cuda and capturing:
            # from the memory set aside before the capture; where it is full (or was never set
            # aside), a pin_memory(), which newer torch allows there
            pinned = self.arena.copy(host.contiguous())
            host = pinned if pinned is not None else host.pin_memory()
        elif cuda:
            self.arena.reserve()  # for a capture that may follow
            host = host.pin_memory()
        self.misses += 1
        buffer = host.to(device, non_blocking=True)
        event = None
        if cuda and not capturing:
            event = torch.cuda.Event()
            event.record(stream)
        entry = _Entry(make(buffer), buffer, host, event, stream.cuda_stream if cuda else None)
        if capturing:  # its data appears only when that graph replays: for that graph alone
            self.made_in_capture.append(entry)
        else:
            self.lru[key] = entry
            while len(self.lru) > self.maxsize:
                self.lru.popitem(last=False)
        return entry.value


CACHE = DeviceTableCache()  # the planned steps' tables (multi_tensor keeps its own)


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _place(device: torch.device) -> tuple[torch.device, tuple]:
    """``device`` with its index, and the key suffix naming it."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, (device.type, device.index)
