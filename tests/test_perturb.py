import pytest
import torch
from helpers import (BACKENDS_WITH_EXT, LOW_PRECISION, ODD_SIZES, RecordOps, assert_tensors_equal, backend_dtypes, rand,
                     rand64, rand_mask)

from ssam_kernels import PerturbBackup, pack_mask, perturb_, restore_

DTYPES = [torch.float32] + LOW_PRECISION


def _expected(w, g, m, scale):
    new = (w.float() + scale * g.float()).to(w.dtype)
    return new if m is None else torch.where(m, new, w)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(DTYPES, BACKENDS_WITH_EXT))
@pytest.mark.parametrize("numel", ODD_SIZES)
def test_perturb_then_restore_is_bit_exact(dtype, numel, backend, gen, poison_triton):
    w = rand((numel,), dtype, gen)
    g = rand((numel,), dtype, gen)
    m = rand_mask((numel,), generator=gen)
    original = w.clone()
    with torch.no_grad(), poison_triton():
        backup = perturb_([w], [g], [pack_mask(m)], 0.37, backend=backend)
    assert torch.equal(w, _expected(original, g, m, 0.37))
    assert backup.values[0].numel() == int(m.sum())  # compact: masked values only
    w[m] = float("nan")  # poison what restore must overwrite
    with torch.no_grad():
        restore_([w], backup, backend=backend)
    assert torch.equal(w.view(torch.uint8), original.view(torch.uint8))  # bits, NaN-safe


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_many_tensors_mixed_masks_and_tensor_scale(backend, gen, poison_triton):
    shapes = [(0,), (1,), (3, 5), (2, 3, 3, 3), (4095,)]
    ws = [rand(s, generator=gen) for s in shapes]
    gs = [rand(s, generator=gen) for s in shapes]
    ms = [rand_mask(s, generator=gen) for s in shapes]
    entries = [ms[0], None, pack_mask(ms[2]), ms[3], pack_mask(ms[4])]
    originals = [w.clone() for w in ws]
    scale = torch.tensor(0.05) / (torch.tensor(3.0) + 1e-7)
    with torch.no_grad(), poison_triton():
        backup = perturb_(ws, gs, entries, scale, backend=backend)
    for w, o, g, e, m in zip(ws, originals, gs, entries, ms):
        assert torch.equal(w, _expected(o, g, None if e is None else m, scale))
    assert backup.nbytes() == 4 * (sum(int(m.sum()) for m in ms) - int(ms[1].sum()) + ms[1].numel())
    for w, m in zip(ws, ms):  # poison what restore must overwrite
        w[m] = float("nan")
    with torch.no_grad():
        restore_(ws, backup, backend=backend)
    assert_tensors_equal(ws, originals)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_chunks_with_nothing_or_everything_masked(backend, gen, poison_triton):
    # Per-chunk counts of 0 and of a full chunk (the Triton launcher's count pass leaves them in a
    # fresh allocation, poisoned here): empty masks, full masks, and a mask empty over its first
    # 8192-element chunk (the Triton chunk) and half full after it.
    late = rand_mask((3 * 8192 + 77,), generator=gen)
    late[:8192] = False
    ms = [torch.zeros(5, dtype=torch.bool), torch.ones(8192 + 3, dtype=torch.bool), late,
          torch.zeros(8192 * 2, dtype=torch.bool)]
    ws = [rand(m.shape, generator=gen) for m in ms]
    gs = [rand(m.shape, generator=gen) for m in ms]
    originals = [w.clone() for w in ws]
    with torch.no_grad(), poison_triton():
        backup = perturb_(ws, gs, [pack_mask(m) for m in ms], 0.25, backend=backend)
    assert_tensors_equal(ws, [_expected(o, g, m, 0.25) for o, g, m in zip(originals, gs, ms)])
    assert [v.numel() for v in backup.values] == [int(m.sum()) for m in ms]
    for w, m in zip(ws, ms):
        w[m] = float("nan")  # what restore must overwrite
    with torch.no_grad(), poison_triton():
        restore_(ws, backup, backend=backend)
    assert_tensors_equal(ws, originals)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_matches_official_add_for_fp32(backend, gen):
    # the official code: e = g * scale; e = e * mask; p.add_(e)
    w, g = rand((1000,), generator=gen), rand((1000,), generator=gen)
    m = rand_mask((1000,), generator=gen)
    scale = torch.tensor(0.05) / (g.norm() + 1e-7)
    official = w.clone().add_(g * scale * m.float())
    with torch.no_grad():
        perturb_([w], [g], [m], scale, backend=backend)
    assert torch.equal(w, official)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_unmasked_entries_untouched_even_negative_zero(backend):
    w = torch.tensor([-0.0, 1.0, -0.0])
    with torch.no_grad():
        perturb_([w], [torch.ones(3)], [torch.tensor([False, True, False])], 0.0, backend=backend)
    assert torch.signbit(w[0]) and torch.signbit(w[2])


@pytest.mark.parametrize("backend,dtype", backend_dtypes(LOW_PRECISION, BACKENDS_WITH_EXT))
def test_grads_of_other_dtype_and_non_contiguous(dtype, backend, gen):
    ws = [rand((17,), dtype, gen), rand((8, 5), generator=gen).t()]
    gs = [rand((17,), torch.float32, gen), rand((5, 8), dtype, gen)]
    ms = [None, rand_mask((5, 8), generator=gen)]
    expected = [_expected(w, g, m, 0.5) for w, g, m in zip(ws, gs, ms)]
    originals = [w.clone() for w in ws]
    with torch.no_grad():
        backup = perturb_(ws, gs, ms, 0.5, backend=backend)
        assert_tensors_equal(ws, expected)
        restore_(ws, backup, backend=backend)
    assert_tensors_equal(ws, originals)


@pytest.mark.cpu
def test_errors(gen):
    w = torch.zeros(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        perturb_([w], [torch.ones(4)], None, 1.0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="shape"):
            perturb_([torch.zeros(4)], [torch.ones(5)], None, 1.0)
        with pytest.raises(ValueError, match="shape"):
            perturb_([torch.zeros(4)], [torch.ones(4)], [torch.ones(5, dtype=torch.bool)], 1.0)
        with pytest.raises(TypeError, match="scale"):
            perturb_([torch.zeros(4)], [torch.ones(4)], None, "1")
        with pytest.raises(TypeError, match="scale"):
            perturb_([torch.zeros(4)], [torch.ones(4)], None, torch.ones(2))
        for bad in (float("nan"), float("inf"), -float("inf")):  # would write NaN / inf into every weight
            w = torch.zeros(4)
            with pytest.raises(ValueError, match="scale must be finite"):
                perturb_([w], [torch.ones(4)], None, bad)
            assert torch.equal(w, torch.zeros(4))
        with pytest.raises(TypeError, match="PerturbBackup"):
            restore_([torch.zeros(4)], [torch.zeros(4)])
        backup = perturb_([torch.zeros(4)], [torch.ones(4)], None, 1.0)
        with pytest.raises(ValueError, match="holds 1 tensors"):
            restore_([torch.zeros(4), torch.zeros(4)], PerturbBackup(backup.values, backup.masks + [None]))
        with pytest.raises(ValueError, match="float64"):
            restore_([torch.zeros(4, dtype=torch.float64)], backup)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_parameters_sharing_memory_are_refused_before_any_write(backend, gen):
    """One tensor twice, or overlapping views: the second entry would back up what the first
    already changed, and the restore left values perturbed. ValueError naming both, nothing
    written; views that share no byte are fine."""
    from ssam_kernels import restore_sgd_step_

    buffer = rand((12,), generator=gen)
    before = buffer.clone()
    g = [rand((12,), generator=gen), rand((12,), generator=gen)]
    with torch.no_grad():
        for params in ([buffer, buffer], [buffer[:8], buffer[4:]]):
            grads = [x[: p.numel()] for x, p in zip(g, params)]
            with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
                perturb_(params, grads, None, 0.5, backend=backend)
            assert torch.equal(buffer, before)
        halves = [buffer[:6], buffer[6:]]
        backup = perturb_(halves, [g[0][:6], g[1][6:]], None, 0.5, backend=backend)
        with pytest.raises(ValueError, match="share memory"):
            restore_([buffer[:6], buffer[:6]], backup, backend=backend)
        with pytest.raises(ValueError, match="share memory"):
            restore_sgd_step_([buffer[:6], buffer[:6]], [g[0][:6], g[1][6:]], [None, None], backup, lr=0.1,
                              backend=backend)
        # momentum buffers are written in place too: one for two params, or a param as its buffer
        momentum = torch.zeros(6)
        for buffers, names in (([momentum, momentum], r"momentum_buffers\[0\] and momentum_buffers\[1\]"),
                               ([halves[1], None], r"params\[1\] and momentum_buffers\[0\]")):
            with pytest.raises(ValueError, match=names + " share memory"):
                restore_sgd_step_(halves, [g[0][:6], g[1][6:]], buffers, backup, lr=0.1, momentum=0.9,
                                  backend=backend)
        restore_(halves, backup, backend=backend)
    assert torch.equal(buffer, before)


@pytest.mark.cpu
def test_restore_rejects_a_backup_of_the_wrong_size(gen):
    m = rand_mask((50,), generator=gen)
    m[0] = True
    with torch.no_grad():
        backup = perturb_([torch.zeros(50)], [torch.ones(50)], [pack_mask(m)], 1.0)
        short = PerturbBackup([backup.values[0][1:]], backup.masks)
        with pytest.raises(ValueError, match="selects"):
            restore_([torch.zeros(50)], short)


# --- float64: the math is float64 (fp32 math would round w + e to fp32 precision) -------------

def _scale_kinds():
    """A number, a float64 tensor (as ``rho / (norm + eps)`` from a float64 norm) and an fp32
    tensor, none of them exact in fp32 except the last."""
    return {"number": 1 / 3, "f64": torch.tensor(0.05, dtype=torch.float64) / 0.7, "f32": torch.tensor(1 / 3)}


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale_kind,grad_dtype", [("number", torch.float64), ("f64", torch.float32),
                                                    ("f32", torch.float64)])
def test_float64_params_are_perturbed_in_float64(scale_kind, grad_dtype, masked, numel, backend, gen):
    w = rand64((numel,), gen)
    g = rand64((numel,), gen).to(grad_dtype)
    m = rand_mask((numel,), generator=gen) if masked else None
    scale = _scale_kinds()[scale_kind]
    s = scale.double() if isinstance(scale, torch.Tensor) else scale  # an fp32 scale is widened
    expected = w + s * g.double()  # plain torch in float64: one product, one sum, as the kernels
    if masked:
        expected = torch.where(m, expected, w)
    original = w.clone()
    with torch.no_grad():
        backup = perturb_([w], [g], None if m is None else [pack_mask(m)], scale, backend=backend)
    assert torch.equal(w, expected)  # bitwise: the same two float64 roundings
    w[torch.ones_like(w, dtype=torch.bool) if m is None else m] = float("nan")  # poison what restore must overwrite
    with torch.no_grad():
        restore_([w], backup, backend=backend)
    assert torch.equal(w.view(torch.uint8), original.view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_float64_zero_scale_leaves_weights_as_they_are(backend, gen):
    # SAM with rho = 0 must follow SGD exactly: w + 0 * g == w in float64 too
    ws = [rand64((4095,), gen), rand64((3, 5), gen)]
    gs = [rand64((4095,), gen), rand((3, 5), torch.float32, gen)]
    originals = [w.clone() for w in ws]
    for scale in (0.0, torch.tensor(0.0, dtype=torch.float64) / (torch.tensor(2.5, dtype=torch.float64) + 1e-7)):
        with torch.no_grad():
            perturb_(ws, gs, [None, rand_mask((3, 5), generator=gen)], scale, backend=backend)
        assert_tensors_equal(ws, originals)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(DTYPES, BACKENDS_WITH_EXT))
def test_float64_scale_for_narrower_params_is_read_in_fp32(dtype, backend, gen):
    # a float64 norm gives a float64 scale; fp32/fp16/bf16 params keep fp32 math (the scale
    # rounded to fp32 once), so the result is the fp32 one bit for bit
    ws = [rand((4095,), dtype, gen), rand((3, 5), dtype, gen)]
    gs = [rand((4095,), dtype, gen), rand64((3, 5), gen)]
    ms = [rand_mask((4095,), generator=gen), None]
    scale = torch.tensor(0.05, dtype=torch.float64) / (torch.tensor(0.7, dtype=torch.float64) + 1e-7)
    expected = [_expected(w, g, m, scale.float()) for w, g, m in zip(ws, gs, ms)]
    with torch.no_grad():
        perturb_(ws, gs, ms, scale, backend=backend)
    assert_tensors_equal(ws, expected)


@pytest.mark.cpu
def test_backups_are_allocated_by_the_call_aligned_and_of_their_own(gen):
    """perturb_ allocates the backup before the op runs (the op mutates and returns nothing):
    masked values of one dtype share one allocation, each starting on 16 bytes (the kernels'
    vectors); an unmasked tensor's backup is a contiguous tensor of its own."""
    ws = [rand((37,), generator=gen), rand((5, 16), generator=gen), rand((9,), generator=gen),
          rand((4, 3), torch.float16, gen), rand((6, 4), generator=gen).t()]
    gs = [rand(w.shape, w.dtype, gen) for w in ws]
    ms = [pack_mask(rand_mask(w.shape, generator=gen)) for w in ws]
    ms[1] = None
    originals = [w.clone() for w in ws]
    with torch.no_grad():
        backup = perturb_(ws, gs, ms, 0.1, backend="torch")
    values = backup.values
    assert all(v.data_ptr() % 16 == 0 for v in values)
    assert values[0].untyped_storage().data_ptr() == values[2].untyped_storage().data_ptr()  # one fp32 allocation
    assert values[3].untyped_storage().data_ptr() != values[0].untyped_storage().data_ptr()  # fp16: its own
    assert values[1].shape == ws[1].shape and values[1].is_contiguous()
    assert backup.masks == ms  # the caller's mask objects (their cached facts kept)
    with torch.no_grad():
        restore_(ws, backup, backend="torch")
    assert_tensors_equal(ws, originals)


@pytest.mark.cpu
@pytest.mark.parametrize("host_loop", ["c", "python"])
def test_backups_of_one_dtype_share_one_allocation_without_an_op_per_tensor(host_loop, gen, monkeypatch):
    """Where every param has one dtype (the usual list), perturb_ carves all backups, masked and
    unmasked, out of one allocation in C: each contiguous, on 16 bytes, an unmasked one shaped
    like its param (a transposed one too), the masked ones 1-D; one dispatcher op allocates them
    all (empty_like per tensor before). The Python allocation (no C module) gives the same
    backup values."""
    from ssam_kernels import _host_loops

    if host_loop == "python":
        monkeypatch.setattr(_host_loops, "_host", None)
    elif _host_loops._host is None:
        pytest.skip("ssam_kernels._host not built")

    ws = [rand((37,), generator=gen), rand((5, 16), generator=gen), rand((9,), generator=gen),
          rand((6, 4), generator=gen).t(), rand((3,), generator=gen)]
    gs = [rand(w.shape, w.dtype, gen) for w in ws]
    ms = [pack_mask(rand_mask(w.shape, generator=gen)) for w in ws]
    ms[1] = ms[3] = None
    originals = [w.clone() for w in ws]
    with torch.no_grad(), RecordOps() as ops:
        backup = perturb_(ws, gs, ms, 0.1, backend="torch")
    values = backup.values
    assert all(v.data_ptr() % 16 == 0 and v.is_contiguous() for v in values)
    assert values[1].shape == ws[1].shape and values[3].shape == ws[3].shape
    assert [v.dim() for v in values] == [1, 2, 1, 2, 1]
    for i in (0, 1, 3):  # the originals, not the perturbed values
        expected = originals[i] if ms[i] is None else originals[i][ms[i].to_bool()]
        assert torch.equal(values[i], expected.reshape(values[i].shape)), i
    storages = {v.untyped_storage().data_ptr() for v in values}
    names = ops.names()
    allocations = names.count("empty") + names.count("empty_like") + names.count("empty_strided")
    if host_loop == "c":
        assert len(storages) == 1 and allocations == 1, (storages, names)
    else:  # the masked ones share one; each unmasked one has its own
        assert len(storages) == 3 and allocations == 3, (storages, names)
    with torch.no_grad():
        restore_(ws, backup, backend="torch")
    assert_tensors_equal(ws, originals)


@pytest.mark.cpu
def test_carve_makes_contiguous_aligned_pieces_or_says_it_cannot():
    from ssam_kernels import _host_loops

    if _host_loops._host is None:
        pytest.skip("ssam_kernels._host not built")
    like = torch.zeros(1, dtype=torch.float16)
    pieces = _host_loops.carve([torch.zeros(3, 5).t(), 7, 0, torch.zeros(2, 2, dtype=torch.float64), 9], like)
    assert [tuple(p.shape) for p in pieces] == [(5, 3), (7,), (0,), (2, 2), (9,)]
    assert all(p.dtype == torch.float16 and p.is_contiguous() and p.data_ptr() % 16 == 0 for p in pieces)
    starts = [p.data_ptr() for p in pieces if p.numel()]  # (an empty tensor's address reads 0)
    assert starts == sorted(starts) and starts[1] - starts[0] == 16 * 2  # 15 fp16 values padded to 16
    assert starts[2] - starts[1] == 16 and starts[3] - starts[2] == 16  # 7 and 4 values padded to 8 (the empty: 0)
    assert all(p._base is None and not p.requires_grad for p in pieces)
    pieces[1].fill_(1.0)  # pieces do not overlap
    pieces[0].fill_(2.0)
    pieces[4].fill_(3.0)
    assert pieces[1].eq(1.0).all()
    with pytest.raises(TypeError, match=r"sizes\[1\] is neither a tensor nor an int"):
        _host_loops.carve([3, "x"], like)
    with pytest.raises(ValueError, match=r"sizes\[0\] is negative"):
        _host_loops.carve([-1], like)
    assert _host_loops.carve([3], torch.zeros(1, device="meta")) is None
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert _host_loops.carve([3], torch.empty(2)) is None


@pytest.mark.cpu
def test_a_bool_masks_backup_is_packed_so_restore_reads_no_count(gen):
    """perturb_ keeps bool masks as bit masks with their counts: restore_ then syncs nothing to
    check the backup, and a bool mask the caller changes afterwards cannot misplace it."""
    ws = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    ms = [rand_mask(w.shape, generator=gen) for w in ws]
    originals = [w.clone() for w in ws]
    with torch.no_grad():
        backup = perturb_(ws, [rand(w.shape, generator=gen) for w in ws], ms, 0.1)
        assert all(b.count_int() == int(m.sum()) for b, m in zip(backup.masks, ms))
        for m in ms:
            m.fill_(True)  # the caller reuses its mask tensors
        with RecordOps() as seen:
            restore_(ws, backup)
    assert seen.count(torch.ops.aten._local_scalar_dense.default) == 0, seen.names()
    assert_tensors_equal(ws, originals)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_padding_bits_change_no_op(backend, gen):
    """Kernels read no bit past numel; the counts that size backups must agree with them."""
    from ssam_kernels import BitMask, SAMStepPlan

    def fresh():
        out = [p.detach().clone() for p in params]
        for o, p in zip(out, params):
            o.grad = p.grad
        return out

    params = [torch.randn(n, generator=gen) for n in (21, 13, 1000)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    clean = [pack_mask(rand_mask(p.shape, generator=gen)) for p in params]
    dirty = [BitMask(m.bits.clone(), m.shape) for m in clean]
    for m in dirty[:2]:  # 21 and 13 entries: 3 padding bits each
        m.bits[-1] |= 0xFF << (m.numel % 8) & 0xFF
    want, got = fresh(), fresh()
    perturb_(want, [p.grad for p in params], clean, 0.5, backend=backend)
    backup = perturb_(got, [p.grad for p in params], dirty, 0.5, backend=backend)
    assert_tensors_equal(got, want)
    restore_(got, backup, backend=backend)
    assert_tensors_equal(got, params)
    want, got = fresh(), fresh()
    plans = [SAMStepPlan(ps, m, backend=backend) for ps, m in ((want, clean), (got, dirty))]
    for plan in plans:
        plan.perturb([0.5])
    assert_tensors_equal(got, want)
    if backend == "torch":  # the reference backs each parameter up whole: no count sizes its backup
        assert all(b.shape == p.shape for plan in plans for b, p in zip(plan._impl.backup, plan.params))
    else:  # the kernels' compact backups, sized from the counts of kept bits
        sizes = [[part.backup.numel() for part in plan._impl.parts] for plan in plans]
        assert len(sizes[0]) == 1 and sizes[0] == sizes[1]
        # (sizes are rounded up to 16 bytes, which could hide a few padding bits counted: the
        # per-block counts the plan sizes and places backups by must agree exactly)
        from ssam_kernels.ops.sam_step_tables import _block_counts

        block = plans[1]._impl.parts[0].block
        for d, c, p in zip(dirty, clean, params):
            assert torch.equal(_block_counts(d.bits, p.numel(), block), _block_counts(c.bits, p.numel(), block))
        assert [int(m.count_int()) for m in dirty] == [int(m.count_int()) for m in clean]
    plans[1].restore()
    assert_tensors_equal(got, params)
