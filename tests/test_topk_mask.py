import pytest
import torch
from helpers import rand

from ssam_kernels import keep_count, topk_mask

pytestmark = pytest.mark.cpu


def _brute_force(scores, k):
    flat = [(-float("inf") if v != v else v) for s in scores for v in s.reshape(-1).tolist()]
    chosen = set(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k])
    return [i in chosen for i in range(len(flat))]


def _flat(masks):
    return [v for m in masks for v in m.reshape(-1).tolist()]


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
def test_exact_count_and_order(density, gen):
    shapes = [(1,), (3, 5), (0,), (4095,), (7, 3, 3)]
    scores = [rand(s, generator=gen) for s in shapes]
    masks = topk_mask(scores, density)
    total = sum(s.numel() for s in scores)
    k = int(density * total)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert sum(int(m.sum()) for m in masks) == k
    assert _flat(masks) == _brute_force(scores, k)


def test_heavy_ties_and_nan(gen):
    scores = [torch.randint(0, 3, (500,), generator=gen).float(), torch.full((7,), float("nan")), torch.ones(9)]
    for k in (0, 1, 100, 333, 516):
        masks = topk_mask(scores, k=k)
        assert _flat(masks) == _brute_force(scores, k)


def test_large_exact_count(gen):
    scores = [rand((10**6 + 3,), generator=gen), rand((1000, 3), generator=gen)]
    masks = topk_mask(scores, 0.37)
    assert sum(int(m.sum()) for m in masks) == keep_count(10**6 + 3 + 3000, 0.37)
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    dropped = torch.cat([s[~m] for s, m in zip(scores, masks)])
    assert kept.min() >= dropped.max()


def test_ranks_values_not_magnitudes():
    masks = topk_mask([torch.tensor([-5.0, 1.0, 2.0])], k=1)
    assert masks[0].tolist() == [False, False, True]


def test_mixed_dtypes(gen):
    scores = [rand((33,), torch.float16, gen), rand((20,), torch.float64, gen)]
    masks = topk_mask(scores, k=10)
    assert _flat(masks) == _brute_force(scores, 10)


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
