import math

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


def _p64(x):
    """The inclusion probabilities of each group of 4 of the finite ``x``, in float64 from their
    definition (module docstring) and apart from the library's ``inclusion_probabilities``, which
    the reference and the kernels share: a group with at most two nonzeros keeps them (p = 1);
    else ``p_i = min(1, c |x_i|)`` with ``c`` making ``sum p = 2``, found by capping the largest
    magnitudes at 1 (largest first) while ``c`` times the next largest would pass 1, ``c`` then
    spreading what is left (``2 - capped``) over the rest in proportion to their magnitudes."""
    p = []
    for a in x.reshape(-1, 4).double().abs().tolist():
        if sum(v > 0 for v in a) <= 2:
            p.append([1.0 if v > 0 else 0.0 for v in a])
            continue
        order = sorted(range(4), key=lambda i: -a[i])
        capped = 0
        while (2 - capped) * a[order[capped]] > math.fsum(a[i] for i in order[capped:]):  # c |x| > 1
            capped += 1
        c = (2 - capped) / math.fsum(a[i] for i in order[capped:])
        p.append([1.0 if order.index(i) < capped else c * a[i] for i in range(4)])
    return torch.tensor(p, dtype=torch.float64).reshape(-1, 4)


# The fp32 p every backend computes against ``_p64``: at most three fp32 additions of positive
# terms and one division, each within 2**-24 relative, so within 4 * 2**-24; up to 7 * 2**-24
# where 2 max|x| is within rounding of the sum (the capped and uncapped formulas meet there,
# and the fp32 test and the exact one may take different sides)
P_RTOL = 8 * 2**-24


def _assert_mvue_of(x, out):
    """``out`` is a 2:4 MVUE draw of the finite ``x``, checked without the reference: every group
    of 4 keeps min(its nonzeros, 2) elements, and a kept value is ``x_i / p_i`` rounded to x's
    dtype, exactly: each backend divides the fp32 values by the fp32 ``p`` correctly rounded
    (``torch``'s ``/``, Triton's ``div_rn``) and rounds once to the dtype. That fp32 ``p``
    (``inclusion_probabilities``, shared by the backends) is checked against the float64 one
    of the definition (``_p64``), so a rule the backends share but the definition does not
    fails here."""
    assert out.dtype == x.dtype and out.shape == x.shape
    groups = x.reshape(-1, 4).float()
    kept = out.reshape(-1, 4) != 0  # |x_i / p_i| >= |x_i| > 0: a kept value is never 0
    assert torch.equal(kept.sum(-1), (groups != 0).sum(-1).clamp(max=2))
    p64 = _p64(groups)
    p = inclusion_probabilities(groups.abs())
    torch.testing.assert_close(p.double(), p64, rtol=P_RTOL, atol=0)
    assert bool((p64[kept] > 0).all())
    assert torch.equal(out.reshape(-1, 4)[kept], (groups[kept] / p[kept]).to(x.dtype))


def _drawn_by(x, u):
    """The elements the uniforms ``u`` keep, from the module's definition and in float64, apart
    from the reference's code and its ``p``: element i of a group where ``[C_{i-1}, C_i)`` holds
    ``u`` or ``u + 1`` (``C`` the running sums of ``_p64``, ``C_3 = 2``) and ``p_i > 0``. Also
    the groups where that is clear: ``u`` and ``u + 1`` more than 1e-6 from every ``C_0..C_2``
    (the fp32 sums the kernels draw with are within a few fp32 ulps, 1.2e-7 below 2, of these:
    each fp32 ``p`` within ``P_RTOL``, two fp32 additions)."""
    p = _p64(x)
    upper = p.cumsum(-1)
    upper[:, 3] = 2.0
    lower = torch.cat([torch.zeros_like(upper[:, :1]), upper[:, :3]], -1)
    u = u.reshape(-1, 1).double()
    keep = (((lower <= u) & (u < upper)) | ((lower <= u + 1) & (u + 1 < upper))) & (p > 0)
    clear = (((upper[:, :3] - u).abs() > 1e-6) & ((upper[:, :3] - u - 1).abs() > 1e-6)).all(-1)
    return keep, clear


def _random_groups(gen):
    """Six fresh fp32 groups of 4, in random order within each: free; a capped top (its
    magnitude past the others' sum); one zero; two zeros (both nonzeros kept); a magnitude
    twice, with opposite signs; a capped top over three equal magnitudes."""
    g = torch.randn(6, 4, generator=gen)
    sign = torch.randint(0, 2, (6,), generator=gen) * 2.0 - 1.0
    g[1, 0] = sign[1] * g[1, 1:].abs().sum() * (1 + torch.rand((), generator=gen))
    g[2, 0] = 0.0
    g[3, :2] = 0.0
    g[4, 1] = -g[4, 0]
    g[5, 1:] = g[5, 1] * torch.tensor([1.0, -1.0, 1.0])
    g[5, 0] = sign[5] * g[5, 1].abs() * (3 + torch.rand((), generator=gen))
    return torch.stack([row[torch.randperm(4, generator=gen)] for row in g])


@pytest.mark.cpu
def test_inclusion_probabilities():
    p = inclusion_probabilities(GROUPS.abs())
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p.sum(-1), torch.tensor([2.0, 2.0, 1.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(p[0], 2 * GROUPS[0].abs() / GROUPS[0].abs().sum())
    torch.testing.assert_close(p[1], torch.tensor([1.0, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(p[5], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    # the float64 oracle on the same groups, worked by hand (within a few float64 roundings)
    hand = torch.tensor([[2 / 6.5, 4 / 6.5, 6 / 6.5, 1 / 6.5], [1.0, 0.5, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0],
                         [0.0] * 4, [0.5] * 4, [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(_p64(GROUPS), hand, rtol=4 * 2**-52, atol=0)


@pytest.mark.cpu
def test_inclusion_probabilities_match_the_definition(gen):
    """The library's fp32 ``p`` against the float64 one of the definition (``_p64``), within
    ``P_RTOL``, on fresh random groups: zeros (0 to 4 a group), ties (signs too), capped tops,
    magnitudes from subnormal to past fp32's sum (scaled by 1/4 first). And the oracle's own
    contract: ``p`` in [0, 1], summing to min(2, nonzeros), proportional to ``|x|`` below 1."""
    n = 4096
    x = torch.randn(n, 4, generator=gen)
    x[torch.rand(n, 4, generator=gen) < 0.2] = 0.0  # zeros: 0 to 4 a group (1 in 600 all zero)
    tie = torch.rand(n, generator=gen) < 0.3
    x[tie, 1] = x[tie, 0] * (torch.randint(0, 2, (int(tie.sum()),), generator=gen) * 2.0 - 1.0)
    top = torch.rand(n, generator=gen) < 0.3  # a top past the others' sum: capped at 1
    x[top, 2] = x[top].abs().sum(-1) * (1 + torch.rand(int(top.sum()), generator=gen))
    x = torch.stack([row[torch.randperm(4, generator=gen)] for row in x])
    x[: n // 8] *= 1e-40  # subnormal magnitudes (their sums exact in fp32)
    big = x[n // 8 : n // 4]  # the largest magnitude 3e38: sums past fp32's largest, or close
    x[n // 8 : n // 4] = big / big.abs().amax(-1, keepdim=True).clamp_min(1e-30) * 3e38
    x[n // 4 : 3 * n // 8] = x[n // 4 : 3 * n // 8].round()  # small integers: more ties
    p64 = _p64(x)
    nonzero = (x != 0).sum(-1)
    assert bool(((p64 >= 0) & (p64 <= 1)).all())
    torch.testing.assert_close(p64.sum(-1), nonzero.clamp(max=2).double(), rtol=4 * 2**-52, atol=0)
    below = (p64 > 0) & (p64 < 1)  # p_i = c |x_i|: one c per group
    ratio = torch.where(below, p64 / x.double().abs(), float("nan"))
    c = ratio.nan_to_num(0.0).amax(-1, keepdim=True)
    torch.testing.assert_close(ratio[below], c.expand_as(ratio)[below], rtol=4 * 2**-52, atol=0)
    torch.testing.assert_close(inclusion_probabilities(x.abs()).double(), p64, rtol=P_RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbiased_with_the_right_inclusion_frequencies(backend, gen, poison_triton):
    """Over many draws each element's mean estimate is ``x_i`` and it is kept with frequency
    ``p_i``: the float64 ``p`` of the definition (``_p64``, not the library's), on the hand-made
    GROUPS and six fresh random groups (``_random_groups``: zeros, ties, capped tops)."""
    groups = torch.cat([GROUPS, _random_groups(gen)])
    g = groups.shape[0]
    copies = 10000  # 120000 groups a draw, as many as the six GROUPS at 20000 copies before
    x = groups.repeat(copies, 1).reshape(-1, 4 * g)  # every row holds the groups once
    p = _p64(groups)
    total = torch.zeros(g, 4, dtype=torch.float64)
    kept = torch.zeros(g, 4, dtype=torch.float64)
    seeds = 3
    for seed in range(seeds):
        with poison_triton():  # (Triton: its output allocated poisoned, NaN: every element stored)
            out = mvue24(x, seed=seed, backend=backend)
        out = out.reshape(-1, g, 4).double()
        total += out.sum(0)
        kept += (out != 0).sum(0)
    n = copies * seeds
    mean = total / n
    # the estimator of x_i takes x_i / p_i with probability p_i: variance x_i^2 (1 - p_i) / p_i
    var = torch.where(p > 0, groups.double() ** 2 * (1 - p) / p.clamp_min(1e-12), 0.0)
    assert bool(((mean - groups.double()).abs() <= 5 * (var / n).sqrt() + 1e-9).all()), (mean, groups)
    freq = kept / n
    bound = 5 * (p * (1 - p) / n).sqrt() + 1e-9
    nonzero = groups != 0
    assert bool(((freq - p).abs() <= bound)[nonzero].all()), (freq, p)


LOW_AND_FP32 = backend_dtypes([torch.float32, torch.float16, torch.bfloat16])


@pytest.mark.parametrize("backend,dtype", LOW_AND_FP32)
def test_keeps_exactly_two_of_four(backend, dtype, gen, poison_triton):
    x = rand((129, 64), dtype, gen)
    x[:5, :8] = 0  # all-zero groups
    x[5, 1:4] = 0  # a one-nonzero group
    # Triton allocates its output poisoned (NaN): a dropped element it left unwritten fails,
    # where a fresh allocation's zeros would pass (half of every output is zeros)
    with poison_triton():
        out = mvue24(x, seed=11, backend=backend)
    _assert_mvue_of(x, out)
    assert out[:5, :8].eq(0).all() and out[5, 0] == x[5, 0]  # a lone nonzero is kept as is (p = 1)


@pytest.mark.parametrize("backend,dtype", LOW_AND_FP32)
def test_seeded_and_reproducible(backend, dtype, gen, poison_triton):
    x = rand((64, 32), dtype, gen)
    with poison_triton():
        a, again, other = (mvue24(x, seed=s, backend=backend) for s in (7, 7, 8))
    _assert_mvue_of(x, a)
    assert torch.equal(a, again)
    assert not torch.equal(a, other)


@pytest.mark.parametrize("backend,dtype", LOW_AND_FP32)
def test_given_uniforms_equal_the_reference(dtype, backend, gen, poison_triton):
    x = rand((3, 50, 64), dtype, gen)
    u = torch.rand(3, 50, 16, generator=gen)
    reference = mvue24(x, uniforms=u, backend="torch")
    with poison_triton():  # (Triton: its output allocated poisoned; the reference's outside)
        out = mvue24(x, uniforms=u, backend=backend)
        empty = mvue24(torch.zeros(0, 8, dtype=dtype), seed=0, backend=backend)
    # apart from the reference (which the torch backend is): the drawn elements and their values
    _assert_mvue_of(x, out)
    keep, clear = _drawn_by(x, u)
    assert int(clear.sum()) >= 0.99 * clear.numel()
    assert torch.equal((out.reshape(-1, 4) != 0)[clear], keep[clear])
    assert torch.equal(out, reference)
    assert empty.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_groups_are_divided_exactly(backend, gen, poison_triton):
    tiny = torch.tensor([[1e-40, -2e-40, 3e-40, 5e-41],  # sum below fp32's smallest normal (2**-126)
                         [1e-39, 1e-41, -1e-41, 0.0],  # the top element is capped at p = 1
                         [0.0, 1e-45, 0.0, 0.0],  # one nonzero, the smallest subnormal
                         [1e-38, 2e-38, 0.0, 1e-45]])
    p = inclusion_probabilities(tiny.abs())
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p.sum(-1), torch.tensor([2.0, 2.0, 1.0, 2.0]))  # not shrunk by a floor
    x = tiny.repeat(16, 1).reshape(-1, 16)
    u = torch.rand(x.shape[0], 4, generator=gen)
    reference = mvue24(x, uniforms=u, backend="torch")
    with poison_triton():
        out = mvue24(x, uniforms=u, backend=backend)
    assert torch.equal(out, reference)
    assert bool(out.isfinite().all())
    _assert_mvue_of(x, out)  # (the reference's own check: the torch backend is the reference)
    keep, clear = _drawn_by(x, u)
    assert torch.equal((out.reshape(-1, 4) != 0)[clear], keep[clear])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_and_overflowing_groups(backend, gen, poison_triton):
    """A group holding an inf or NaN keeps its first non-finite element alone (it came out all
    zero, hiding an overflow from a GradScaler); a finite group whose magnitudes sum past fp32
    (the sum was inf, every p 0, the group zero) is drawn as its quarter is."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[inf, 0.0, 0.0, 0.0], [nan, 1.0, 2.0, 3.0], [0.0, -inf, 5.0, inf], [1.0, 2.0, nan, -inf],
                      [1e38, 3e38, 2e38, 1e38], [1e38, 3e38, 2e38, 1e38]])
    u = torch.rand(x.shape[0], 1, generator=gen)
    reference = mvue24(x, uniforms=u, backend="torch")
    with poison_triton():
        out = mvue24(x, uniforms=u, backend=backend)
        quarter = mvue24(x[4:] / 4, uniforms=u[4:], backend=backend)
    assert out[0].tolist() == [inf, 0, 0, 0] and out[2].tolist() == [0, -inf, 0, 0]
    assert out[1, 0].isnan() and out[1, 1:].tolist() == [0, 0, 0]
    assert out[3, 2].isnan() and out[3, [0, 1, 3]].tolist() == [0, 0, 0]
    assert torch.equal((out[4:] != 0), (quarter != 0)) and int((out[4:] != 0).sum()) == 4
    _assert_mvue_of(x[4:], out[4:])  # x_i / p_i, apart from the reference (which the torch backend is)
    keep, clear = _drawn_by(x[4:], u[4:])
    assert torch.equal((out[4:].reshape(-1, 4) != 0)[clear], keep[clear])
    torch.testing.assert_close(out, reference, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniforms_at_the_ends_draw_two(backend, gen, poison_triton):
    """The largest fp32 below 1 (``u + 1`` rounds to 2.0, which fell in no interval; or a capped
    element's interval, an ulp longer than 1 after rounding, took both draws: one value kept),
    1.0 and values outside [0, 1) (clamped) still keep exactly two of four."""
    x = torch.randn(64, 40, generator=gen)
    for value in (1.0 - 2**-24, 1.0, 1.5, -0.5, 0.0, float("nan")):
        u = torch.full((64, 10), value)
        clamped = u.nan_to_num(0.0).clamp(0.0, U_MAX)
        reference = mvue24(x, uniforms=clamped, backend="torch")
        with poison_triton():
            out = mvue24(x, uniforms=u, backend=backend)
        assert bool(((out.reshape(-1, 4) != 0).sum(-1) == 2).all()), value
        assert torch.equal(out, reference)
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
