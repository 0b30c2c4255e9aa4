import pytest
import torch
from helpers import BACKENDS_WITH_EXT, backend_dtypes, needs_interpreter, poisoned_allocations, rand

from ssam_kernels import nm_mask


def _brute_force(row, n, m, magnitude=True):
    """Per group: the n indices of largest value, ties to the lower index, NaN lowest."""
    keep = []
    for start in range(0, len(row), m):
        group = row[start : start + m]
        key = [(-float("inf") if v != v else (abs(v) if magnitude else v)) for v in group]
        order = sorted(range(len(group)), key=lambda i: (-key[i], i))[:n]
        keep += [i in order for i in range(len(group))]
    return keep


@pytest.mark.parametrize("backend,dtype",
                         backend_dtypes([torch.float32, torch.float16, torch.bfloat16], BACKENDS_WITH_EXT))
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4), (1, 2), (5, 16)])
@pytest.mark.parametrize("cols", [1, 3, 4, 7, 8, 33, 64])
def test_against_brute_force(n, m, cols, backend, dtype, gen, poison_triton):
    # the brute force ranks the scores as the kernel sees them: rounded to the dtype (fp16 and
    # bf16 rounding makes ties of their own, beyond row 1's). Triton's output is allocated
    # poisoned (0x5A and 0 bytes mixed): an element the kernel leaves unwritten, kept or dropped, fails
    scores = rand((5, cols), dtype, gen)
    scores[1] = scores[1].round()  # ties
    scores[2, ::3] = float("nan")  # NaN ranks lowest
    scores[3, 1::3] = -scores[3, ::3][: len(scores[3, 1::3])]  # |x| ties between signs
    with poison_triton():
        out = nm_mask(scores, n, m, backend=backend)
    assert out.dtype == torch.bool and out.shape == scores.shape
    for r in range(5):
        assert out[r].tolist() == _brute_force(scores[r].tolist(), n, m), r


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_exactly_n_per_full_group_large(n, m, backend, gen, poison_triton):
    scores = rand((257, 4096), generator=gen)
    with poison_triton():  # (Triton: every element stored, the dropped ones too)
        out = nm_mask(scores, n, m, backend=backend)
    counts = out.view(257, -1, m).sum(-1)
    assert bool((counts == n).all())
    # the kept entries dominate the dropped ones in every group
    mag = scores.abs().view(257, -1, m)
    kept_min = torch.where(out.view_as(mag), mag, torch.inf).amin(-1)
    dropped_max = torch.where(out.view_as(mag), -torch.inf, mag).amax(-1)
    assert bool((kept_min >= dropped_max).all())


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_trailing_group_keeps_min_n_r(backend, poison_triton):
    with poison_triton():  # (Triton: the short group's dropped elements stored too)
        out = nm_mask(torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 7.0]]), 2, 4, backend=backend)
        assert out.tolist() == [[False, False, True, True, True, True, False]]
        out = nm_mask(torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0]]), 2, 4, backend=backend)
    assert out.tolist() == [[False, False, True, True, True]]  # a lone trailing element is kept (min(2, 1) = 1)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_a_group_longer_than_the_row_is_the_row(backend, gen, poison_triton):
    """M beyond the last dim: each row is one short group (top min(N, row) kept), computed
    without padding rows to M (M = 2**40 allocated 17 TB)."""
    scores = rand((3, 7), generator=gen)
    with poison_triton():
        out = nm_mask(scores, 2, 2**40, backend=backend)
        assert bool(nm_mask(scores, 9, 2**40, backend=backend).all())
    assert [out[r].tolist() for r in range(3)] == [_brute_force(scores[r].tolist(), 2, 7) for r in range(3)]


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_ties_keep_lower_index_and_nan_ranks_lowest(backend, poison_triton):
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, float("nan"), 0.0, float("nan"), -0.5]])
    with poison_triton():
        assert nm_mask(s, 2, 4, backend=backend).tolist() == [[True, True, False, False, False, True, False, True]]


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_magnitude_false_ranks_raw_values(backend, poison_triton):
    s = torch.tensor([[-9.0, 1.0, 2.0, -1.0]])
    with poison_triton():
        assert nm_mask(s, 2, 4, backend=backend).tolist() == [[True, False, True, False]]
        assert nm_mask(s, 2, 4, magnitude=False, backend=backend).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_higher_dims_and_dtypes(backend, gen, poison_triton):
    s = rand((2, 3, 8), generator=gen)
    # every dtype each backend takes (Triton's interpreter has no bf16), against the brute force
    # on the scores rounded to that dtype
    dtypes = (torch.float16, torch.float64) + ((torch.bfloat16,) if backend != "triton" else ())
    for dtype in dtypes:
        scores = s.to(dtype)
        with poison_triton():
            out = nm_mask(scores, 2, 4, backend=backend)
        assert out.shape == s.shape, dtype
        assert out.reshape(-1, 8).tolist() == [_brute_force(row, 2, 4) for row in scores.reshape(-1, 8).tolist()], dtype
        assert out.view(-1, 4).sum(-1).eq(2).all()
    with poison_triton():
        assert nm_mask(torch.zeros(0, 8), 2, 4, backend=backend).shape == (0, 8)


@pytest.mark.cpu
def test_errors():
    for n, m in [(4, 4), (0, 4), (5, 4)]:
        with pytest.raises(ValueError, match="1 <= n < m"):
            nm_mask(torch.ones(8), n, m)
    with pytest.raises(TypeError, match="int"):
        nm_mask(torch.ones(8), 2.0, 4)
    with pytest.raises(ValueError, match="at least one dimension"):
        nm_mask(torch.tensor(1.0), 1, 2)
    with pytest.raises(TypeError, match="floating"):
        nm_mask(torch.ones(8, dtype=torch.int32), 2, 4)
    with pytest.raises(TypeError, match="magnitude must be a bool, got int"):
        nm_mask(torch.ones(8), 2, 4, magnitude=1)


@pytest.mark.interpret
@needs_interpreter
def test_triton_takes_the_reference_beyond_int32_group_ids(gen, monkeypatch):
    """The Triton kernel numbers groups in int32: a call whose programs would number more than
    MAX_GROUPS (2**31) takes the reference; shown with the limit lowered (the launcher's
    allocations poisoned, the expected mask computed outside)."""
    import ssam_kernels.ops.nm_mask as ops_nm
    from ssam_kernels.triton_ops import nm_mask as triton_nm

    scores = rand((6, 40), generator=gen)  # 60 groups of 4: one program of 512
    calls = []
    reference = ops_nm.nm_mask_torch
    monkeypatch.setattr(ops_nm, "nm_mask_torch", lambda *a: calls.append(a[1:]) or reference(*a))
    expected = reference(scores, 2, 4, True)
    with poisoned_allocations():
        assert torch.equal(triton_nm.nm_mask_triton(scores, 2, 4, True), expected) and calls == []
        monkeypatch.setattr(triton_nm, "MAX_GROUPS", 512)  # one program's worth still fits
        assert torch.equal(triton_nm.nm_mask_triton(scores, 2, 4, True), expected) and calls == []
        monkeypatch.setattr(triton_nm, "MAX_GROUPS", 511)
        assert torch.equal(triton_nm.nm_mask_triton(scores, 2, 4, True), expected) and calls == [(2, 4, True)]
