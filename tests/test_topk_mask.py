import pytest
import torch
from helpers import BACKENDS, backend_dtypes, needs_interpreter, rand

from ssam_kernels import keep_count, topk_mask


def _brute_force(scores, k):
    flat = [(-float("inf") if v != v else v) for s in scores for v in s.reshape(-1).tolist()]
    chosen = set(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k])
    return [i in chosen for i in range(len(flat))]


def _flat(masks):
    return [v for m in masks for v in m.reshape(-1).tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
def test_exact_count_and_order(density, backend, gen, poison_triton):
    shapes = [(1,), (3, 5), (0,), (4095,), (7, 3, 3)]
    scores = [rand(s, generator=gen) for s in shapes]
    # Triton allocates its masks (and its per-chunk histograms) poisoned: 0x5A and 0 bytes mixed,
    # so an element the kernel leaves unwritten, kept or dropped, fails (a fresh allocation is
    # often zero: a dropped one would pass)
    with poison_triton():
        masks = topk_mask(scores, density, backend=backend)
    total = sum(s.numel() for s in scores)
    k = int(density * total)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert sum(int(m.sum()) for m in masks) == k
    assert _flat(masks) == _brute_force(scores, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heavy_ties_nan_inf_and_signed_zero(backend, gen, poison_triton):
    scores = [torch.randint(-1, 2, (500,), generator=gen).float(), torch.full((7,), float("nan")), torch.ones(9),
              torch.tensor([float("-inf"), -0.0, 0.0, float("inf"), -0.0])]
    scores[0][scores[0] == 0] = -0.0  # -0 and +0 tie
    for k in (0, 1, 100, 333, 516, 520):
        with poison_triton():
            masks = topk_mask(scores, k=k, backend=backend)
        assert _flat(masks) == _brute_force(scores, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_exact_count(backend, gen, poison_triton):
    scores = [rand((10**6 + 3,), generator=gen), rand((1000, 3), generator=gen)]
    with poison_triton():
        masks = topk_mask(scores, 0.37, backend=backend)
    assert sum(int(m.sum()) for m in masks) == keep_count(10**6 + 3 + 3000, 0.37)
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    dropped = torch.cat([s[~m] for s, m in zip(scores, masks)])
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_values_not_magnitudes(backend, poison_triton):
    with poison_triton():
        masks = topk_mask([torch.tensor([-5.0, 1.0, 2.0])], k=1, backend=backend)
    assert masks[0].tolist() == [False, False, True]


@pytest.mark.parametrize("backend,dtype", backend_dtypes([torch.float16, torch.bfloat16]))
def test_dtypes(backend, dtype, gen, poison_triton):
    # the brute force ranks the scores as given: rounded to their dtype (Python floats hold them exactly)
    mixed = [rand((33,), dtype, gen), rand((20,), torch.float64, gen)]
    with poison_triton():  # (mixed dtypes: Triton takes the reference)
        assert _flat(topk_mask(mixed, k=10, backend=backend)) == _brute_force(mixed, 10)
    low = [rand((300,), dtype, gen).round(), rand((20, 3), dtype, gen)]  # ties, then a NaN
    low[1][4, 1] = float("nan")
    for k in (57, 359):
        with poison_triton():
            masks = topk_mask(low, k=k, backend=backend)
        assert [m.shape for m in masks] == [s.shape for s in low]
        assert _flat(masks) == _brute_force(low, k), k


@pytest.mark.cpu
def test_errors():
    s = [torch.ones(10)]
    with pytest.raises(ValueError, match="exactly one"):
        topk_mask(s)
    with pytest.raises(ValueError, match="exactly one"):
        topk_mask(s, 0.5, k=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        topk_mask(s, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        topk_mask(s, k=11)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_mask(s, k=2.0)
    with pytest.raises(TypeError, match="density"):
        topk_mask(s, "0.5")
    with pytest.raises(ValueError, match="empty"):
        topk_mask([], 0.5)
    from ssam_kernels.ops.topk_mask import keep_count

    assert keep_count(10, 0.55) == 5
    for total, density in ((10, 1.5), (10, -0.5), (-3, 0.5), (10.0, 0.5)):  # (15 and -5 before)
        with pytest.raises(ValueError, match="total must be|density must be"):
            keep_count(total, density)


@pytest.mark.interpret
@needs_interpreter
def test_triton_takes_the_reference_beyond_int32_counts(gen, monkeypatch):
    """The Triton histograms count in int32: a call with more scores than MAX_TOTAL (2**31 - 1)
    takes the reference (its counts are int64); shown with the limit lowered."""
    from ssam_kernels.triton_ops import topk_mask as triton_topk

    scores = [rand((40,), generator=gen), rand((25,), generator=gen)]
    calls = []
    monkeypatch.setattr(triton_topk, "topk_mask_torch", lambda s, k: calls.append(k) or [x > 0 for x in s])
    triton_topk.topk_mask_triton(scores, 10)
    assert calls == []  # within the limit: the kernels
    monkeypatch.setattr(triton_topk, "MAX_TOTAL", 64)
    triton_topk.topk_mask_triton(scores, 10)
    assert calls == [10]
