"""The multi-tensor launchers' device tables: cached by content (no host-to-device copy on a
hit), bounded, never evicted once a CUDA graph capture uses them, and never stale."""

import pytest
import torch
from helpers import assert_tensors_equal, interpreter_fma_is_fused, needs_ext, needs_interpreter, rand, rand_mask

from ssam_kernels import (BitMask, grad_norm, pack_mask, packed_nbytes, perturb_, restore_, restore_sgd_step_,
                          topk_mask)

pytest.importorskip("triton")
from ssam_kernels import _device_tables as device_tables  # noqa: E402
from ssam_kernels.triton_ops import multi_tensor as mt  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def cache(monkeypatch):
    """A fresh, small cache in place of the module's (so counts start at zero)."""
    fresh = mt.DeviceTableCache(maxsize=4)
    monkeypatch.setattr(mt, "_CACHE", fresh)
    return fresh


def _expected_chunks(numels, chunk=mt.CHUNK):
    owner, start, first = [], [], []
    for t, n in enumerate(numels):
        first.append(len(owner))
        for s in range(0, n, chunk):
            owner.append(t)
            start.append(s)
    return owner, start, first


def _check_chunk_table(table, numels):
    owner, start, first = _expected_chunks(numels)
    assert table.num_chunks == len(owner)
    assert table.chunk_tensor.dtype == torch.int32 and table.chunk_tensor.tolist() == owner
    assert table.chunk_start.dtype == torch.int64 and table.chunk_start.tolist() == start
    assert table.numel.dtype == torch.int64 and table.numel.tolist() == list(numels)
    assert table.first_chunk.tolist() == first


@pytest.mark.cpu
def test_same_list_gets_the_same_device_tables_without_a_copy(cache):
    ts = [torch.zeros(3), torch.zeros(mt.CHUNK * 2 + 1), torch.zeros(0), torch.zeros(5, 7)]
    numels = [t.numel() for t in ts]
    table, addresses = mt.chunk_table(numels, CPU), mt.address_table(ts, CPU)
    assert cache.misses == 2
    _check_chunk_table(table, numels)
    assert addresses.dtype == torch.int64 and addresses.tolist() == [t.data_ptr() for t in ts]
    assert mt.chunk_table(list(numels), CPU) is table  # same objects, no new copy
    assert mt.address_table(list(ts), CPU) is addresses
    assert cache.misses == 2


@pytest.mark.cpu
def test_other_sizes_or_addresses_get_other_correct_tables(cache):
    ts = [torch.zeros(10), torch.zeros(mt.CHUNK + 3)]
    table, addresses = mt.chunk_table([10, mt.CHUNK + 3], CPU), mt.address_table(ts, CPU)
    other = mt.chunk_table([mt.CHUNK + 3, 10], CPU)  # same sizes, other order
    assert other is not table
    _check_chunk_table(other, [mt.CHUNK + 3, 10])
    _check_chunk_table(mt.chunk_table([1] * 9, CPU), [1] * 9)
    us = [torch.zeros(10), torch.zeros(mt.CHUNK + 3)]  # same sizes, other addresses
    assert mt.chunk_table([u.numel() for u in us], CPU) is table  # sizes are all a chunk table holds
    other_addresses = mt.address_table(us, CPU)
    assert other_addresses is not addresses
    assert other_addresses.tolist() == [u.data_ptr() for u in us]
    assert addresses.tolist() == [t.data_ptr() for t in ts]  # the first one is untouched
    assert mt.address_table(ts[:1], CPU).tolist() == [ts[0].data_ptr()]


@pytest.mark.cpu
def test_lru_is_bounded_and_keeps_the_recently_used(cache):
    tables = [mt.chunk_table([n], CPU) for n in range(1, 5)]  # fills the 4 entries
    assert mt.chunk_table([1], CPU) is tables[0]  # touch the oldest: now the newest
    for n in range(5, 9):  # 4 more: evicts 2, 3, 4 and then 1
        mt.chunk_table([n], CPU)
        assert len(cache.lru) <= cache.maxsize
    assert len(cache.lru) == cache.maxsize == 4
    misses = cache.misses
    assert mt.chunk_table([8], CPU) is mt.chunk_table([8], CPU)
    assert cache.misses == misses
    again = mt.chunk_table([2], CPU)  # evicted: rebuilt, still right
    assert again is not tables[1] and cache.misses == misses + 1
    _check_chunk_table(again, [2])


@pytest.mark.cpu
def test_entries_a_capture_uses_are_never_evicted(cache, monkeypatch):
    capturing = [False]
    monkeypatch.setattr(device_tables, "_capturing", lambda device: capturing[0])
    ts = [torch.zeros(4), torch.zeros(9)]
    before = mt.address_table(ts, CPU)  # made outside the capture: valid everywhere
    capturing[0] = True
    assert mt.address_table(ts, CPU) is before  # used by the capture: moved out of the LRU
    made = mt.chunk_table([4, 9], CPU)  # made during the capture: kept for it alone
    assert mt.chunk_table([4, 9], CPU) is not made
    _check_chunk_table(made, [4, 9])
    capturing[0] = False
    for n in range(1, 3 * cache.maxsize):  # churn the LRU
        mt.chunk_table([n], CPU)
    assert len(cache.lru) == cache.maxsize
    assert mt.address_table(ts, CPU) is before  # still there
    assert any(e.value is made for e in cache.made_in_capture)
    fresh = mt.chunk_table([4, 9], CPU)  # outside the capture, not the capture's entry
    assert fresh is not made
    _check_chunk_table(fresh, [4, 9])


def _reference_step(ws, gs, ms, g2, bufs, hyper, k):
    norm = torch.cat([(g.double() * m).reshape(-1) for g, m in zip(gs, ms)]).norm()
    expected_w = [torch.where(m, (w.float() + 0.3 * g.float()), w) for w, g, m in zip(ws, gs, ms)]
    ref_w = [w.clone() for w in ws]
    ref_b = [None if b is None else b.clone() for b in bufs]
    with torch.no_grad():
        backup = perturb_(ref_w, gs, ms, 0.3, backend="torch")
        ref_b = restore_sgd_step_(ref_w, g2, ref_b, backup, backend="torch", **hyper)
    ref_topk = topk_mask(g2, k=k, backend="torch")
    return norm, expected_w, ref_w, ref_b, ref_topk


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("persistent", [True, False], ids=["same-tensors", "fresh-tensors"])
def test_results_stay_right_over_repeated_calls(persistent, gen):
    # Every call sees new values and new mask contents. With persistent tensors (written in
    # place) every address table legitimately hits the cache after the first step; with fresh
    # tensors each step the old ones are freed, so addresses may or may not come back. Either
    # way nothing derived from contents (mask bit counts, chunk offsets) may be reused.
    shapes = [(3, 5), (mt.CHUNK + 100,), (1,), (4095,), (2 * mt.CHUNK + 8,)]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    keep = ([torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes],
            [torch.zeros(s, dtype=torch.bool) for s in shapes])
    bits = [torch.zeros(packed_nbytes(s.numel()), dtype=torch.uint8) for s in map(torch.Size, shapes)]
    bufs = [None] * len(shapes)
    ref_bufs = [None] * len(shapes)
    table = None
    for step, density in enumerate([0.5, 0.1, 0.9, 0.0, 1.0, 0.5]):
        values = [rand(s, generator=gen) for s in shapes], [rand(s, generator=gen) for s in shapes]
        masks = [rand_mask(s, density, generator=gen) for s in shapes]
        if persistent:
            ws, gs, ms = keep
            for dst, src in zip(ws + gs + ms, values[0] + values[1] + masks):
                dst.copy_(src)
        else:
            ws, gs, ms = values[0], values[1], masks
        g2 = [rand(s, generator=gen) for s in shapes]
        k = [7, 0, 1000, 50, 13000, 2 * mt.CHUNK][step]
        norm, expected_w, ref_w, ref_bufs, ref_topk = _reference_step(ws, gs, ms, g2, ref_bufs, hyper, k)
        if persistent:  # new BitMasks over the same bits storage: same addresses, new contents
            entries = [BitMask(b.copy_(pack_mask(m).bits), m.shape) for b, m in zip(bits, ms)]
        else:  # bool tensors and BitMasks
            entries = [pack_mask(m) if (i + step) % 2 else m for i, m in enumerate(ms)]

        torch.testing.assert_close(grad_norm(gs, entries, backend="triton").double(), norm, rtol=1e-6, atol=0)
        original = [w.clone() for w in ws]
        with torch.no_grad():
            backup = perturb_(ws, gs, entries, 0.3, backend="triton")
        assert_tensors_equal(ws, expected_w)
        assert [v.numel() for v in backup.values] == [int(m.sum()) for m in ms]
        with torch.no_grad():
            restore_(ws, backup, backend="triton")
        assert_tensors_equal(ws, original)
        with torch.no_grad():
            backup = perturb_(ws, gs, entries, 0.3, backend="triton")
            bufs = restore_sgd_step_(ws, g2, bufs, backup, backend="triton", **hyper)
        # bit for bit: a fused multiply-add where the reference's torch ops have one (within two
        # ulps where triton 3.6's interpreter rounds tl.fma's product)
        tol = 0 if interpreter_fma_is_fused() else 2 * torch.finfo(torch.float32).eps
        for w, r in zip(ws, ref_w):
            torch.testing.assert_close(w, r, rtol=tol, atol=2 * tol)
        for b, r in zip(bufs, ref_bufs):
            torch.testing.assert_close(b, r, rtol=tol, atol=2 * tol)
        assert [m.tolist() for m in topk_mask(g2, k=k, backend="triton")] == [m.tolist() for m in ref_topk]

        numels = [w.numel() for w in ws]
        if table is None:
            table = mt.chunk_table(numels, CPU)
        assert mt.chunk_table(numels, CPU) is table  # same sizes every step: one table
        if persistent:
            misses = mt._CACHE.misses
            mt.address_table(ws, CPU), mt.address_table(gs, CPU), mt.address_table(bits, CPU)
            assert mt._CACHE.misses == misses  # these addresses were seen in this very step
        if not persistent:
            bufs = [b.clone() for b in bufs]  # the next step's buffers live elsewhere
            ref_bufs = [b.clone() for b in ref_bufs]


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("tile", [4, 2048])
def test_chunk_offsets_count_within_each_tensor_across_scan_steps(tile, gen):
    # the compact backup's offset of each chunk: the set bits of its tensor's chunks before it.
    # tile=4: tensors of 4 to 11 chunks take two or three steps of the scan (each step carries the
    # last one's total); empty tensors and one-chunk ones between them, a density per tensor
    from ssam_kernels._host_loops import data_ptrs
    from ssam_kernels.triton_ops.perturb import chunk_offsets

    numels = [3 * mt.CHUNK + 1, 0, 1, 4 * mt.CHUNK, 11 * mt.CHUNK - 5, 0, mt.CHUNK, 9 * mt.CHUNK + 7]
    masks = [rand_mask((n,), density, generator=gen) for n, density in zip(numels, [0.5, 0.5, 1, 0.9, 0.1, 0, 1, 0.5])]
    bits = [pack_mask(m).bits for m in masks]
    offsets = chunk_offsets(mt.chunk_table(numels, CPU), bits, CPU, data_ptrs(bits), tile=tile)
    expected = []
    for m in masks:
        counts = [int(c.sum()) for c in m.split(mt.CHUNK)] if m.numel() else []  # (no chunk when empty)
        expected += [sum(counts[:i]) for i in range(len(counts))]
    assert offsets.tolist() == expected


@pytest.mark.cpu
def test_the_capture_arena_hands_out_aligned_pieces_it_never_takes_back():
    arena = device_tables.CaptureArena(nbytes=64)
    assert arena.copy(torch.arange(3)) is None  # not set aside yet: the caller pins instead
    arena.reserve(pin=False)
    block = arena.block
    arena.reserve(pin=False)
    assert arena.block is block  # once
    a = arena.copy(torch.arange(3, dtype=torch.int64))  # bytes 0-24
    b = arena.copy(torch.tensor([[7, 8]], dtype=torch.int32))  # 32-40, shaped as given
    assert a.tolist() == [0, 1, 2] and b.tolist() == [[7, 8]] and b.dtype == torch.int32
    assert b.data_ptr() - a.data_ptr() == 32 and a.data_ptr() == block.data_ptr()
    assert arena.copy(torch.zeros(4, dtype=torch.int64)) is None  # 48 + 32 > 64: no room
    c = arena.copy(torch.ones(2, dtype=torch.int64))  # 48-64: fits exactly
    assert c.tolist() == [1, 1] and a.tolist() == [0, 1, 2] and b.tolist() == [[7, 8]]  # nothing overwritten
    assert arena.copy(torch.zeros(1, dtype=torch.int8)) is None


@pytest.mark.cuda
def test_tables_first_made_in_a_capture_come_from_pinned_memory_set_aside_before(monkeypatch, gen):
    """A capture that builds tables (tensors the cache has not seen, as a captured training step's
    new gradients are) copies them from the arena reserved at the first eager miss, not from a
    pin_memory() inside the capture; the graph replays right."""
    cache = mt.DeviceTableCache(maxsize=8)
    monkeypatch.setattr(mt, "_CACHE", cache)
    grad_norm([rand((10,), generator=gen, device="cuda")], backend="triton")  # compiles; sets the arena aside
    assert cache.arena.block is not None and cache.arena.block.is_pinned() and cache.arena.used == 0
    gs = [rand(s, generator=gen, device="cuda") for s in [(3, 5), (mt.CHUNK + 100,), (4095,)]]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        norm = grad_norm(gs, backend="triton")
    assert cache.made_in_capture and cache.arena.used > 0
    for _ in range(2):
        for g in gs:
            g.copy_(rand(g.shape, generator=gen, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(norm.double(), torch.cat([g.double().flatten() for g in gs]).norm(), rtol=1e-6,
                                   atol=0)


@pytest.mark.cuda
@pytest.mark.memcheck
def test_a_captured_graph_keeps_its_tables(monkeypatch, gen):
    # Warm up eagerly (tables cached, kernels compiled), capture grad_norm + restore_, churn the
    # LRU, replay: the graph's tables were moved out of the LRU and still hold their data.
    cache = mt.DeviceTableCache(maxsize=8)
    monkeypatch.setattr(mt, "_CACHE", cache)

    def churn():
        assert cache.captured and not cache.made_in_capture  # every table came from the warm-up
        for n in range(1, 4 * cache.maxsize):
            mt.chunk_table([n], torch.device("cuda"))

    _captured_norm_and_restore_replay(gen, "triton", after_capture=churn)


def _captured_norm_and_restore_replay(gen, backend, after_capture=lambda: None):
    """Warm-up (perturb_ + restore_, grad_norm), then grad_norm + restore_ captured in a CUDA
    graph; each replay, after an eager perturb_ of new gradients, gives their masked norm and
    the original weights."""
    shapes = [(3, 5), (mt.CHUNK + 100,), (4095,)]
    ws = [rand(s, generator=gen, device="cuda") for s in shapes]
    gs = [rand(s, generator=gen, device="cuda") for s in shapes]
    ms = [pack_mask(rand_mask(s, generator=gen, device="cuda")) for s in shapes]
    original = [w.clone() for w in ws]
    with torch.no_grad():
        restore_(ws, perturb_(ws, gs, ms, 0.3, backend=backend), backend=backend)
        grad_norm(gs, ms, backend=backend)
        backup = perturb_(ws, gs, ms, 0.3, backend=backend)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            norm = grad_norm(gs, ms, backend=backend)
            restore_(ws, backup, backend=backend)
    after_capture()
    for _ in range(2):
        for g in gs:
            g.copy_(rand(g.shape, generator=gen, device="cuda"))
        with torch.no_grad():
            perturb_(ws, gs, ms, 0.3, backend=backend)  # the graph's restore_ undoes it
        graph.replay()
        torch.cuda.synchronize()
        assert_tensors_equal(ws, original)
        expected = torch.cat([g.double()[m.to_bool()] for g, m in zip(gs, ms)]).norm()
        torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.memcheck
@needs_ext
def test_the_extension_list_ops_replay_from_a_graph_captured_on_a_side_stream(gen):
    """The extension's tables are cached per stream and torch.cuda.graph captures on a side
    stream, so a captured call builds its tables: from pinned memory set aside before the
    capture (csrc/cuda/ops_cuda.cpp CaptureArena), not a pinned allocation inside it, which a
    global-mode capture refuses in torch without pytorch#167507. Replays give the eager results."""
    _captured_norm_and_restore_replay(gen, "ext")  # (the eager warm-up sets the arena aside)
