"""The host side of the planned step's kernel backends (Triton, the extension): the tables a
plan makes once, and the per-step work around the launches. See ``ssam_kernels.ops.sam_step``.

Per weight dtype a :class:`Part`: every block of ``block`` elements of its tensors (in memory
order) gets a row: its tensor, first element, and backup slot of its first kept element (from
per-block set-bit counts: one host sync per weight dtype, at plan time); the rows with a kept element are listed
apart (the perturbation and the restore take only them). One int64 buffer holds every table, and
one flat buffer the backup (each tensor's part of it starting on 16 bytes).
"""

from __future__ import annotations

import array
import functools
import operator

import torch

from .._device_tables import CACHE, _place
from .bitmask import padding_cleared, popcount_bytes
from .perturb import aligned_length


def _block_counts(bits: torch.Tensor, numel: int, block: int) -> torch.Tensor:
    """Set bits of each ``block``-element block of a packed mask (int64, on the mask's device)."""
    per_block = block // 8
    blocks = -(-numel // block)
    padded = torch.zeros(blocks * per_block, dtype=torch.uint8, device=bits.device)
    padded[: bits.numel()] = padding_cleared(bits, numel)  # (as the kernels read them)
    return popcount_bytes(padded).view(blocks, per_block).sum(1)


def _host_counts(counts: list) -> list:
    """The device tensors of ``counts`` as host lists (None stays None), in one copy: one host
    sync on a GPU for the whole plan, not one per masked tensor."""
    present = [c for c in counts if c is not None]
    flat = torch.cat(present).tolist() if present else []
    out, at = [], 0
    for c in counts:
        if c is None:
            out.append(None)
        else:
            out.append(flat[at: at + c.numel()])
            at += c.numel()
    return out


class Part:
    """The tensors of one weight dtype: their tables (made once) and flat backup."""

    def __init__(self, plan, index: list[int], masks: list, block: int):
        params = [plan.params[i] for i in index]
        device = plan.device
        self.index = index
        self.dtype = params[0].dtype
        self.ref = params[0]
        self.block = block
        numels = [p.numel() for p in params]
        bits = [None if m is None else m.bits for m in masks]
        self.bits = [b for b in bits if b is not None]  # kept alive: the kernels read their addresses
        self.bits_ref = self.bits[0] if self.bits else torch.zeros(16, dtype=torch.uint8, device=device)
        counts = _host_counts([None if b is None else _block_counts(b, n, block) for b, n in zip(bits, numels)])
        blk_tensor, blk_start, blk_base, kept_blocks = [], [], [], []
        offset = 0
        for t, (n, c) in enumerate(zip(numels, counts)):
            before = 0
            for b in range(-(-n // block)):
                if c is None or c[b]:
                    kept_blocks.append(len(blk_tensor))
                blk_tensor.append(t)
                blk_start.append(b * block)
                blk_base.append(offset + (b * block if c is None else before))
                before += 0 if c is None else c[b]
            offset += aligned_length(n if c is None else before, self.dtype)
        self.backup = torch.empty(offset, dtype=self.dtype, device=device)
        self.blocks = len(blk_tensor)
        self.kept_blocks = len(kept_blocks)
        self.norm_blocks = self.kept_blocks if plan.masked_norm else self.blocks
        # (the backup is a fresh allocation: aligned under torch's allocators, not under every one)
        self.aligned = all(t.data_ptr() % 16 == 0 for t in (*params, *self.bits, self.backup))
        # one int64 copy: blk_start | blk_base | numel | w_ptrs | bits_ptrs | rows of int32 pairs
        i64 = [blk_start, blk_base, numels, [p.data_ptr() for p in params], [0 if b is None else b.data_ptr() for b in bits]]
        i32 = [blk_tensor, kept_blocks, list(range(self.blocks)), [plan.groups[i] for i in index]]
        host, views = _pack_tables(i64, i32)
        table = host.to(device)
        (self.blk_start, self.blk_base, self.numel, self.w_ptrs, self.bits_ptrs,
         self.blk_tensor, self.kept, self.all, self.tensor_group) = (v(table) for v in views)
        self.norm_rows = self.kept if plan.masked_norm else self.all
        self.buf_ptrs = torch.zeros(len(index), dtype=torch.int64, device=device)  # none until made
        # momentum buffer not started yet (torch's SGD: buf = d); an empty tensor's is the plan's
        # to make (SAMStepPlan._start_empty): no kernel step of its starts one
        self.fresh = [n > 0 for n in numels]
        self.any_fresh = any(self.fresh)
        self.spare: dict[int, torch.Tensor] = {}  # buffers made ahead for tensors not stepped yet


def _pack_tables(i64: list[list[int]], i32: list[list[int]]):
    """One host int64 tensor holding the lists (each section 16-byte aligned), and per list a
    function giving its view in a copy of that tensor."""
    at, sections = 0, []
    for values in i64:
        sections.append((at, len(values), torch.int64))
        at += -(-len(values) // 2) * 2
    for values in i32:
        sections.append((at, len(values), torch.int32))
        at += -(-len(values) // 4) * 2
    host = torch.zeros(max(at, 2), dtype=torch.int64)
    for (start, n, dtype), values in zip(sections, i64 + i32):
        if n:
            host[start:].view(dtype)[:n] = torch.tensor(values, dtype=dtype)
    return host, [lambda buf, s=s, n=n, d=d: buf[s:].view(d)[:n] for s, n, d in sections]


class KernelStep:
    """The host side of a kernel backend of :class:`~ssam_kernels.SAMStepPlan`: one part per
    weight dtype, its tables, the per-step tables (gradient addresses, rho, hyper-parameters,
    momentum flags: the last of each remembered, so a steady step looks nothing up), and the
    momentum buffers. A backend supplies ``block_size(dtype)`` and the four launches."""

    partial_multiple = 1  # the norm's partial sums are padded with zeros to a multiple of this

    def block_size(self, dtype: torch.dtype) -> int:
        raise NotImplementedError

    def __init__(self, plan, memory_masks):
        self.plan = plan
        self.cache = CACHE
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(plan.params):
            by_dtype.setdefault(p.dtype, []).append(i)
        self.parts = [Part(plan, idx, [memory_masks[i] for i in idx], self.block_size(plan.params[idx[0]].dtype))
                      for idx in by_dtype.values()]
        self.norm_programs = sum(part.norm_blocks for part in self.parts)
        # (zeros past the last program's: a backend may read them, ``partial_multiple`` at a time)
        length = max(-(-self.norm_programs // self.partial_multiple) * self.partial_multiple, 1)
        self.partial = torch.zeros(length, dtype=plan.norm_dtype, device=plan.device)
        self.counter = torch.zeros(1, dtype=torch.int32, device=plan.device)
        self.device, self.place = _place(plan.device)
        self.memo: dict[str, tuple] = {}
        # rho per group -> each tensor's rho, in the table's order (one part's tensors after another)
        order = [plan.groups[i] for part in self.parts for i in part.index]
        self.rho_of_tensors = operator.itemgetter(*order) if len(order) > 1 else lambda rho: (rho[order[0]],)
        self.captured = False  # a step ran while its stream captured a CUDA graph
        # the streams steps ran on (CUDA): the plan's memory was allocated on the one it was made
        # on; a step on another waits for its making, and the caching allocator is told the
        # memory is in use there, so dropping the plan cannot hand it out under that stream's work
        self.streams = {_stream_id(self.device)}
        self.other_streams: list = []  # (their torch.cuda.Stream objects)
        self.made = None
        if self.device.type == "cuda" and None not in self.streams:
            self.made = torch.cuda.Event()
            self.made.record()

    def _order_stream(self) -> None:
        """Before a step's launches: on a stream no step ran on yet, wait for the plan's making
        and mark its memory as used there (``record_stream``). One stream-id read otherwise."""
        stream = _stream_id(self.device)
        if stream in self.streams or stream is None or self.made is None:
            return  # (a capture: torch.cuda.graph synchronizes before it, and a captured plan is kept)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.made)
        plan = self.plan
        # the plan's own memory: its flags and partials, each part's tables, backup, mask bits
        # (packed or permuted copies where the masks were bool or laid out otherwise) and the
        # momentum buffers it made (an optimizer's own buffers are marked too: harmless)
        owned = [plan.inv, plan.flags, self.partial, self.counter, *(b for b in plan.buffers if b is not None)]
        for part in self.parts:
            owned += [part.backup, part.blk_start, part.bits_ref, part.buf_ptrs, *part.bits, *part.spare.values()]
        for t in owned:
            t.record_stream(current)
        self.streams.add(stream)
        self.other_streams.append(current)

    def _record(self, t: torch.Tensor) -> None:
        """Memory the plan allocates after its making: marked as used on the streams its steps
        already ran on (the current one allocates it)."""
        for stream in self.other_streams:
            t.record_stream(stream)

    def _table(self, kind: str, key: tuple, make=None, dtype=torch.int64) -> torch.Tensor:
        """The device table of ``key`` (``make()`` its values; default the key itself), from the
        shared content-keyed cache; the last one of each kind is remembered here, so a step whose
        tables did not change makes no cache lookup (on CUDA: for the same stream)."""
        stream = _stream_id(self.device)
        last = self.memo.get(kind)
        if last is not None and last[0] == key and last[1] == stream and stream is not None:
            return last[2]
        table = self.cache.get((kind, key) + self.place, self.device,
                               lambda: (torch.tensor(key if make is None else make(), dtype=dtype), lambda buf: buf))
        if stream is not None:
            self.memo[kind] = (key, stream, table)
        else:
            self.captured = True
        return table

    def _values(self, kind: str, key, make) -> torch.Tensor:
        """A float64 device table of ``make()``'s values, remembered by ``key``: the plan's own
        buffer, rewritten in place when ``key`` changes (a learning-rate schedule changes the
        hyper-parameters every step: no new cached table, device allocation and event per
        value). The write is ordered on the stream after the earlier steps' reads; on a CUDA
        device it copies from pinned memory, which torch's host allocator keeps until the copy
        has run. A step on another stream gets a new buffer (the old one may still be read
        there); inside a capture, a cached table fixed for that graph."""
        stream = _stream_id(self.device)
        if stream is None:  # (the shared cache is keyed by content: other plans' tables may hold the same)
            return self._table(kind, tuple(make()), dtype=torch.float64)
        last = self.memo.get(kind)
        if last is not None and last[0] == key and last[1] == stream:
            return last[2]
        values = torch.frombuffer(array.array("d", make()), dtype=torch.float64)  # (no dispatcher op, no copy)
        if last is not None and last[1] == stream and last[2].numel() == values.numel():
            buffer = last[2]
        else:
            buffer = torch.empty(values.numel(), dtype=torch.float64, device=self.device)
        buffer.copy_(values.pin_memory() if self.device.type == "cuda" else values, non_blocking=True)
        self.memo[kind] = (key, stream, buffer)
        return buffer

    def _grad_tables(self, grads: tuple[int, ...], kind: str) -> list[tuple[torch.Tensor, bool]]:
        """Per part: the device table of its gradients' addresses, and whether all start on 16
        bytes (remembered with the last addresses of each kind: one check per change)."""
        last = self.memo.get(kind + "+")
        if last is not None and last[0] == grads:
            keys = last[1]
        else:
            keys = [(grads, _aligned16(grads))] if len(self.parts) == 1 else [
                (mine, _aligned16(mine)) for mine in (tuple(grads[i] for i in part.index) for part in self.parts)]
            self.memo[kind + "+"] = (grads, keys)
        return [(self._table(f"{kind}{n}", key), aligned) for n, (key, aligned) in enumerate(keys)]

    def perturb(self, grads, rho) -> None:
        self._order_stream()
        plan = self.plan
        tables = self._grad_tables(grads, "ascent")
        rho_tables = self._rho_tables(rho)
        if self.norm_programs == 0:  # no gradient entry counts: the norm is 0
            plan.inv.fill_(1.0 / (0.0 + plan.eps) if plan.eps else 0.0)
            plan.flags[0].zero_()
        first, launched = 0, False
        try:
            for part, (g_ptrs, g_aligned) in zip(self.parts, tables):
                if part.norm_blocks:
                    self.launch_norm(part, g_ptrs, g_aligned, first)
                    launched = True
                first += part.norm_blocks
        except BaseException:
            if launched:  # the step's last norm block never ran: its counter would start the next step part-way
                self.counter.zero_()
            raise
        for part, (g_ptrs, g_aligned), tensor_rho in zip(self.parts, tables, rho_tables):
            if part.kept_blocks:
                self.launch_perturb(part, g_ptrs, g_aligned, tensor_rho)

    def _rho_tables(self, rho: tuple[float, ...]) -> list[torch.Tensor]:
        """Per part, each tensor's rho (float64, on the device): views of one table."""
        table = self._values("rho", rho, lambda: self.rho_of_tensors(rho))
        last = self.memo.get("rho views")
        if last is not None and last[0] is table:
            return last[1]
        views, at = [], 0
        for part in self.parts:
            views.append(table[at: at + len(part.index)])
            at += len(part.index)
        self.memo["rho views"] = (table, views)
        return views

    def restore(self) -> None:
        self._order_stream()
        for part in self.parts:
            if part.kept_blocks:
                self.launch_restore(part)

    def restore_sgd(self, grads, sgd) -> list[int]:
        self._order_stream()
        tables = self._grad_tables(grads, "descent")
        hyper = self._values("hyper", sgd, lambda: [v for h in sgd for v in h.values()])
        momentum = any(h.momentum != 0 for h in sgd)
        made = []
        for part, (g_ptrs, g_aligned) in zip(self.parts, tables):
            fresh = self._fresh_flags(part, grads, sgd) if momentum else self._no_fresh(part)
            if part.blocks:
                self.launch_restore_sgd(part, g_ptrs, g_aligned, hyper, fresh, momentum)
            if momentum:
                made += self._started(part, grads, sgd)
        return made

    # --- the launches (one per part) ---------------------------------------------------------

    def launch_norm(self, part: "Part", g_ptrs: torch.Tensor, g_aligned: bool, first: int) -> None:
        """partial[first + i] for the part's norm blocks; the step's last block writes plan.inv."""
        raise NotImplementedError

    def launch_perturb(self, part: "Part", g_ptrs: torch.Tensor, g_aligned: bool, tensor_rho: torch.Tensor) -> None:
        raise NotImplementedError

    def launch_restore(self, part: "Part") -> None:
        raise NotImplementedError

    def launch_restore_sgd(self, part: "Part", g_ptrs: torch.Tensor, g_aligned: bool, hyper: torch.Tensor,
                           fresh: torch.Tensor, momentum: bool) -> None:
        raise NotImplementedError

    # --- momentum buffers: made on a tensor's first step, as torch's SGD does ------------------

    def _no_fresh(self, part: "Part") -> torch.Tensor:
        return self._table(f"fresh{id(part)}", (0,) * len(part.index), dtype=torch.int8)

    def _fresh_flags(self, part: "Part", grads, sgd) -> torch.Tensor:
        plan = self.plan
        if not part.any_fresh:
            return self._no_fresh(part)
        missing = [t for t, i in enumerate(part.index) if part.fresh[t] and plan.buffers[i] is None
                   and t not in part.spare and sgd[plan.groups[i]].momentum != 0]
        if missing:  # one allocation for every tensor still without a buffer
            params = [plan.params[part.index[t]] for t in missing]
            flat = torch.zeros(sum(aligned_length(p.numel(), p.dtype) for p in params), dtype=part.dtype,
                               device=plan.device)
            self._record(flat)
            at = 0
            for t, p in zip(missing, params):
                part.spare[t] = flat.as_strided(p.shape, p.stride(), at)
                at += aligned_length(p.numel(), p.dtype)
            self._buffer_table(part)
        return self._table(f"fresh{id(part)}", tuple(int(f) for f in part.fresh), dtype=torch.int8)

    def _buffer_table(self, part: "Part") -> None:
        plan = self.plan
        if _stream_id(self.device) is None:  # kept on the part, read by eager steps too: not a capture's table
            raise RuntimeError("a plan's momentum buffers are set up at its first step, which cannot run inside "
                               "a CUDA graph capture: run a step eagerly (a warm-up) before capturing")
        ptrs = []
        for t, i in enumerate(part.index):
            buf = plan.buffers[i] if plan.buffers[i] is not None else part.spare.get(t)
            ptrs.append(0 if buf is None else buf.data_ptr())
        part.buf_ptrs = self._table(f"buffers{id(part)}", tuple(ptrs))  # (no pageable copy: capturable)
        part.aligned = part.aligned and all(a % 16 == 0 for a in ptrs)

    def _started(self, part: "Part", grads, sgd) -> list[int]:
        """Mark the tensors whose buffer this step started; hand their buffers to the plan."""
        plan = self.plan
        made = []
        if not part.any_fresh:
            return made
        for t, i in enumerate(part.index):
            if part.fresh[t] and grads[i] != 0 and sgd[plan.groups[i]].momentum != 0:
                part.fresh[t] = False
                if plan.buffers[i] is None:
                    plan.buffers[i] = part.spare.pop(t)
                made.append(i)
        part.any_fresh = any(part.fresh)
        return made

    def buffers_changed(self) -> None:
        for part in self.parts:
            part.spare.clear()
            part.fresh = [self.plan.buffers[i] is None and self.plan.params[i].numel() > 0 for i in part.index]
            part.any_fresh = any(part.fresh)
            self._buffer_table(part)


def _aligned16(addresses: tuple[int, ...]) -> bool:
    return functools.reduce(operator.or_, addresses, 0) % 16 == 0


def _stream_id(device: torch.device) -> int | None:
    """The current stream of ``device`` (CUDA; 0 elsewhere), cheaply; None while it captures a
    CUDA graph: the memo is bypassed then, every table going through the cache, which keeps the
    tables a graph reads from eviction and hands a table made during a capture to no one else."""
    if device.type != "cuda":
        return 0
    if torch._C._cuda_isCurrentStreamCapturing():  # (the plan's device is current: see _launching)
        return None
    return torch._C._cuda_getCurrentRawStream(device.index)
