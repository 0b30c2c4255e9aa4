import pytest
import torch
from helpers import BACKENDS, backend_dtypes, needs_interpreter, rand

from ssam_kernels import mvue24
from ssam_kernels.ops.mvue24 import U_MAX, inclusion_probabilities, mvue24_torch

GROUPS = torch.tensor([
    [1.0, -2.0, 3.0, 0.5],     # no cap
    [10.0, 1.0, -1.0, 0.0],    # the top element is capped at p = 1
    [0.0, 3.0, 0.0, 0.0],      # one nonzero: kept as is
    [0.0, 0.0, 0.0, 0.0],      # all zero
    [2.0, -2.0, 2.0, 2.0],     # ties
    [0.0, 1e-3, -4.0, 0.0],    # two nonzeros: both kept exactly
])


def _assert_mvue_of(x, out):
    """``out`` is a 2:4 MVUE draw of the finite ``x``, checked without the reference: every group
    of 4 keeps min(its nonzeros, 2) elements, and a kept value is ``x_i / p_i`` rounded to x's
    dtype, exactly: each backend divides the fp32 values by the fp32 ``p`` correctly rounded
    (``torch``'s ``/``, Triton's ``div_rn``) and rounds once to the dtype."""
    assert out.dtype == x.dtype and out.shape == x.shape
    groups = x.reshape(-1, 4).float()
    kept = out.reshape(-1, 4) != 0  # |x_i / p_i| >= |x_i| > 0: a kept value is never 0
    assert torch.equal(kept.sum(-1), (groups != 0).sum(-1).clamp(max=2))
    p = inclusion_probabilities(groups.abs())
    assert bool((p[kept] > 0).all())
    assert torch.equal(out.reshape(-1, 4)[kept], (groups[kept] / p[kept]).to(x.dtype))


def _drawn_by(x, u):
    """The elements the uniforms ``u`` keep, from the module's definition and in float64, apart
    from the reference's code: element i of a group where ``[C_{i-1}, C_i)`` holds ``u`` or
    ``u + 1`` (``C`` the running sums of ``p``, ``C_3 = 2``) and ``p_i > 0``. Also the groups
    where that is clear: ``u`` and ``u + 1`` more than 1e-6 from every ``C_0..C_2`` (the fp32
    sums the kernels draw with are within a few fp32 ulps, 1.2e-7 below 2, of these)."""
    p = inclusion_probabilities(x.reshape(-1, 4).float().abs()).double()
    upper = p.cumsum(-1)
    upper[:, 3] = 2.0
    lower = torch.cat([torch.zeros_like(upper[:, :1]), upper[:, :3]], -1)
    u = u.reshape(-1, 1).double()
    keep = (((lower <= u) & (u < upper)) | ((lower <= u + 1) & (u + 1 < upper))) & (p > 0)
    clear = (((upper[:, :3] - u).abs() > 1e-6) & ((upper[:, :3] - u - 1).abs() > 1e-6)).all(-1)
    return keep, clear


@pytest.mark.cpu
def test_inclusion_probabilities():
    p = inclusion_probabilities(GROUPS.abs())
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p.sum(-1), torch.tensor([2.0, 2.0, 1.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(p[0], 2 * GROUPS[0].abs() / GROUPS[0].abs().sum())
    torch.testing.assert_close(p[1], torch.tensor([1.0, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(p[5], torch.tensor([0.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbiased_with_the_right_inclusion_frequencies(backend):
    copies = 20000
    x = GROUPS.repeat(copies, 1).reshape(-1, 24)  # every row holds the six groups once
    p = inclusion_probabilities(GROUPS.abs())
    total = torch.zeros(6, 4, dtype=torch.float64)
    kept = torch.zeros(6, 4, dtype=torch.float64)
    seeds = 3
    for seed in range(seeds):
        out = mvue24(x, seed=seed, backend=backend).reshape(-1, 6, 4).double()
        total += out.sum(0)
        kept += (out != 0).sum(0)
    n = copies * seeds
    mean = total / n
    # the estimator of x_i takes x_i / p_i with probability p_i: variance x_i^2 (1 - p_i) / p_i
    var = torch.where(p > 0, GROUPS.double() ** 2 * (1 - p.double()) / p.double().clamp_min(1e-12), 0.0)
    assert bool(((mean - GROUPS.double()).abs() <= 5 * (var / n).sqrt() + 1e-9).all()), (mean, GROUPS)
    freq = kept / n
    bound = 5 * (p.double() * (1 - p.double()) / n).sqrt() + 1e-9
    nonzero = GROUPS != 0
    assert bool(((freq - p.double()).abs() <= bound)[nonzero].all()), (freq, p)


LOW_AND_FP32 = backend_dtypes([torch.float32, torch.float16, torch.bfloat16])


@pytest.mark.parametrize("backend,dtype", LOW_AND_FP32)
def test_keeps_exactly_two_of_four(backend, dtype, gen):
    x = rand((129, 64), dtype, gen)
    x[:5, :8] = 0  # all-zero groups
    x[5, 1:4] = 0  # a one-nonzero group
    out = mvue24(x, seed=11, backend=backend)
    _assert_mvue_of(x, out)
    assert out[:5, :8].eq(0).all() and out[5, 0] == x[5, 0]  # a lone nonzero is kept as is (p = 1)


@pytest.mark.parametrize("backend,dtype", LOW_AND_FP32)
def test_seeded_and_reproducible(backend, dtype, gen):
    x = rand((64, 32), dtype, gen)
    a = mvue24(x, seed=7, backend=backend)
    _assert_mvue_of(x, a)
    assert torch.equal(a, mvue24(x, seed=7, backend=backend))
    assert not torch.equal(a, mvue24(x, seed=8, backend=backend))


@pytest.mark.parametrize("backend,dtype", LOW_AND_FP32)
def test_given_uniforms_equal_the_reference(dtype, backend, gen):
    x = rand((3, 50, 64), dtype, gen)
    u = torch.rand(3, 50, 16, generator=gen)
    out = mvue24(x, uniforms=u, backend=backend)
    # apart from the reference (which the torch backend is): the drawn elements and their values
    _assert_mvue_of(x, out)
    keep, clear = _drawn_by(x, u)
    assert int(clear.sum()) >= 0.99 * clear.numel()
    assert torch.equal((out.reshape(-1, 4) != 0)[clear], keep[clear])
    assert torch.equal(out, mvue24(x, uniforms=u, backend="torch"))
    assert mvue24(torch.zeros(0, 8, dtype=dtype), seed=0, backend=backend).shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_groups_are_divided_exactly(backend, gen):
    tiny = torch.tensor([[1e-40, -2e-40, 3e-40, 5e-41],  # sum below fp32's smallest normal (2**-126)
                         [1e-39, 1e-41, -1e-41, 0.0],  # the top element is capped at p = 1
                         [0.0, 1e-45, 0.0, 0.0],  # one nonzero, the smallest subnormal
                         [1e-38, 2e-38, 0.0, 1e-45]])
    p = inclusion_probabilities(tiny.abs())
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p.sum(-1), torch.tensor([2.0, 2.0, 1.0, 2.0]))  # not shrunk by a floor
    x = tiny.repeat(16, 1).reshape(-1, 16)
    u = torch.rand(x.shape[0], 4, generator=gen)
    out = mvue24(x, uniforms=u, backend=backend)
    assert torch.equal(out, mvue24(x, uniforms=u, backend="torch"))
    assert bool(out.isfinite().all())
    _assert_mvue_of(x, out)  # (the reference's own check: the torch backend is the reference)
    keep, clear = _drawn_by(x, u)
    assert torch.equal((out.reshape(-1, 4) != 0)[clear], keep[clear])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_and_overflowing_groups(backend, gen):
    """A group holding an inf or NaN keeps its first non-finite element alone (it came out all
    zero, hiding an overflow from a GradScaler); a finite group whose magnitudes sum past fp32
    (the sum was inf, every p 0, the group zero) is drawn as its quarter is."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[inf, 0.0, 0.0, 0.0], [nan, 1.0, 2.0, 3.0], [0.0, -inf, 5.0, inf], [1.0, 2.0, nan, -inf],
                      [1e38, 3e38, 2e38, 1e38], [1e38, 3e38, 2e38, 1e38]])
    u = torch.rand(x.shape[0], 1, generator=gen)
    out = mvue24(x, uniforms=u, backend=backend)
    assert out[0].tolist() == [inf, 0, 0, 0] and out[2].tolist() == [0, -inf, 0, 0]
    assert out[1, 0].isnan() and out[1, 1:].tolist() == [0, 0, 0]
    assert out[3, 2].isnan() and out[3, [0, 1, 3]].tolist() == [0, 0, 0]
    quarter = mvue24(x[4:] / 4, uniforms=u[4:], backend=backend)
    assert torch.equal((out[4:] != 0), (quarter != 0)) and int((out[4:] != 0).sum()) == 4
    _assert_mvue_of(x[4:], out[4:])  # x_i / p_i, apart from the reference (which the torch backend is)
    keep, clear = _drawn_by(x[4:], u[4:])
    assert torch.equal((out[4:].reshape(-1, 4) != 0)[clear], keep[clear])
    torch.testing.assert_close(out, mvue24(x, uniforms=u, backend="torch"), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniforms_at_the_ends_draw_two(backend, gen):
    """The largest fp32 below 1 (``u + 1`` rounds to 2.0, which fell in no interval; or a capped
    element's interval, an ulp longer than 1 after rounding, took both draws: one value kept),
    1.0 and values outside [0, 1) (clamped) still keep exactly two of four."""
    x = torch.randn(64, 40, generator=gen)
    for value in (1.0 - 2**-24, 1.0, 1.5, -0.5, 0.0, float("nan")):
        u = torch.full((64, 10), value)
        out = mvue24(x, uniforms=u, backend=backend)
        assert bool(((out.reshape(-1, 4) != 0).sum(-1) == 2).all()), value
        clamped = u.nan_to_num(0.0).clamp(0.0, U_MAX)
        assert torch.equal(out, mvue24(x, uniforms=clamped, backend="torch"))
        _assert_mvue_of(x, out)  # apart from the reference, which the torch backend is
        keep, clear = _drawn_by(x, clamped)
        assert torch.equal((out.reshape(-1, 4) != 0)[clear], keep[clear]), value


@pytest.mark.cpu
def test_errors():
    x = torch.ones(4, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        mvue24(torch.ones(4, 6), seed=0)
    with pytest.raises(ValueError, match="exactly one of seed or uniforms"):
        mvue24(x)
    with pytest.raises(ValueError, match="exactly one of seed or uniforms"):
        mvue24(x, seed=0, uniforms=torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        mvue24(x, uniforms=torch.rand(4, 3))
    with pytest.raises(TypeError, match="uniforms must be a floating tensor, got a torch.int32 tensor"):
        mvue24(x, uniforms=torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        mvue24(x.double(), seed=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        mvue24(x, seed=1.5)
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
        mvue24(x, seed=2**64)


@pytest.mark.cpu
def test_every_seed_torch_takes_draws_its_stream():
    """The op's schema carries a signed 64-bit int: a seed at or above 2**63 still draws what
    torch.Generator().manual_seed(seed) draws (as its negative twin does)."""
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    big = 2**64 - 5
    assert torch.equal(mvue24(x, seed=big, backend="torch"), mvue24_torch(x, None, big))
    assert torch.equal(mvue24(x, seed=big, backend="torch"), mvue24(x, seed=-5, backend="torch"))


@pytest.mark.interpret
@needs_interpreter
def test_triton_takes_the_reference_beyond_int32_group_ids(gen, monkeypatch):
    """The Triton kernel numbers groups (Philox counters, uniforms' offsets) in int32: a call
    whose programs would number more than MAX_GROUPS (2**31) takes the reference; shown with the
    limit lowered."""
    import ssam_kernels.ops.mvue24 as ops_mvue
    from ssam_kernels.triton_ops import mvue24 as triton_mvue

    x = torch.randn(8, 64, generator=gen)  # 128 groups: one program
    calls = []
    reference = ops_mvue.mvue24_torch
    monkeypatch.setattr(ops_mvue, "mvue24_torch", lambda *a: calls.append(a[2]) or reference(*a))
    triton_mvue.mvue24_triton(x, None, 5)
    monkeypatch.setattr(triton_mvue, "MAX_GROUPS", triton_mvue.GROUPS_PER_PROGRAM)
    triton_mvue.mvue24_triton(x, None, 5)
    assert calls == []
    monkeypatch.setattr(triton_mvue, "MAX_GROUPS", triton_mvue.GROUPS_PER_PROGRAM - 1)
    assert torch.equal(triton_mvue.mvue24_triton(x, None, 5), reference(x, None, 5)) and calls == [5]
