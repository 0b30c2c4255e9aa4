import pytest
import torch
from helpers import BACKENDS_WITH_EXT, LOW_PRECISION, ODD_SIZES, backend_dtypes, rand, rand_mask

from ssam_kernels import PerturbBackup, pack_mask, perturb_, restore_

DTYPES = [torch.float32] + LOW_PRECISION


def _expected(w, g, m, scale):
    new = (w.float() + scale * g.float()).to(w.dtype)
    return new if m is None else torch.where(m, new, w)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(DTYPES, BACKENDS_WITH_EXT))
@pytest.mark.parametrize("numel", ODD_SIZES)
def test_perturb_then_restore_is_bit_exact(dtype, numel, backend, gen):
    w = rand((numel,), dtype, gen)
    g = rand((numel,), dtype, gen)
    m = rand_mask((numel,), generator=gen)
    original = w.clone()
    with torch.no_grad():
        backup = perturb_([w], [g], [pack_mask(m)], 0.37, backend=backend)
    assert torch.equal(w, _expected(original, g, m, 0.37))
    assert backup.values[0].numel() == int(m.sum())  # compact: masked values only
    w[m] = float("nan")  # poison what restore must overwrite
    with torch.no_grad():
        restore_([w], backup, backend=backend)
    assert torch.equal(w.view(torch.uint8), original.view(torch.uint8))  # bits, NaN-safe


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_many_tensors_mixed_masks_and_tensor_scale(backend, gen):
    shapes = [(0,), (1,), (3, 5), (2, 3, 3, 3), (4095,)]
    ws = [rand(s, generator=gen) for s in shapes]
    gs = [rand(s, generator=gen) for s in shapes]
    ms = [rand_mask(s, generator=gen) for s in shapes]
    entries = [ms[0], None, pack_mask(ms[2]), ms[3], pack_mask(ms[4])]
    originals = [w.clone() for w in ws]
    scale = torch.tensor(0.05) / (torch.tensor(3.0) + 1e-7)
    with torch.no_grad():
        backup = perturb_(ws, gs, entries, scale, backend=backend)
    for w, o, g, e, m in zip(ws, originals, gs, entries, ms):
        assert torch.equal(w, _expected(o, g, None if e is None else m, scale))
    assert backup.nbytes() == 4 * (sum(int(m.sum()) for m in ms) - int(ms[1].sum()) + ms[1].numel())
    for w, m in zip(ws, ms):  # poison what restore must overwrite
        w[m] = float("nan")
    with torch.no_grad():
        restore_(ws, backup, backend=backend)
    assert all(torch.equal(w, o) for w, o in zip(ws, originals))


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
        assert all(torch.equal(w, e) for w, e in zip(ws, expected))
        restore_(ws, backup, backend=backend)
    assert all(torch.equal(w, o) for w, o in zip(ws, originals))


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
        with pytest.raises(TypeError, match="PerturbBackup"):
            restore_([torch.zeros(4)], [torch.zeros(4)])
        backup = perturb_([torch.zeros(4)], [torch.ones(4)], None, 1.0)
        with pytest.raises(ValueError, match="holds 1 tensors"):
            restore_([torch.zeros(4), torch.zeros(4)], PerturbBackup(backup.values, backup.masks + [None]))
        with pytest.raises(ValueError, match="float64"):
            restore_([torch.zeros(4, dtype=torch.float64)], backup)


@pytest.mark.cpu
def test_restore_rejects_a_backup_of_the_wrong_size(gen):
    m = rand_mask((50,), generator=gen)
    m[0] = True
    with torch.no_grad():
        backup = perturb_([torch.zeros(50)], [torch.ones(50)], [pack_mask(m)], 1.0)
        short = PerturbBackup([backup.values[0][1:]], backup.masks)
        with pytest.raises(ValueError, match="selects"):
            restore_([torch.zeros(50)], short)
