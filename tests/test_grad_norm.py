import math

import pytest
import torch
from helpers import BACKENDS_WITH_EXT, LOW_PRECISION, ODD_SIZES, backend_dtypes, rand, rand64, rand_mask

from ssam_kernels import grad_norm, pack_mask


def _ref(tensors, masks=None):
    masks = masks or [None] * len(tensors)
    parts = [(t.double() if m is None else t.double() * m).reshape(-1) for t, m in zip(tensors, masks)]
    return torch.cat(parts).norm()


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("numel", ODD_SIZES)
def test_odd_sizes_fp32(numel, backend, gen, poison_triton):
    t = rand((numel,), generator=gen)
    masks = [rand_mask((numel,), generator=gen)]
    # Triton's buffer of per-chunk partial sums is allocated poisoned (NaN): a chunk whose
    # partial went unwritten makes the norm NaN, where a fresh allocation's zero would only
    # shrink it (within the tolerance for a short tail chunk)
    with poison_triton():
        plain, masked = grad_norm([t], backend=backend), grad_norm([t], masks, backend=backend)
    torch.testing.assert_close(plain.double(), _ref([t]), rtol=1e-6, atol=0)
    torch.testing.assert_close(masked.double(), _ref([t], masks), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(LOW_PRECISION, BACKENDS_WITH_EXT))
def test_low_precision_accumulates_in_fp32(dtype, backend, gen, poison_triton):
    # 10**6 fp16 squares would overflow / lose everything if accumulated in fp16
    t = (rand((10**6 + 3,), generator=gen) * 30).to(dtype)
    with poison_triton():
        out = grad_norm([t], backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref([t]), rtol=1e-6, atol=0)


# odd sizes for the masked low-precision cases: within one block, and past three 8192-element
# chunks (the kernels' full-chunk path) with a ragged tail; 10**6 + 3 is the unmasked case above
LOW_PRECISION_SIZES = [1, 3, 4095, 3 * 8192 + 5]


@pytest.mark.parametrize("backend,dtype", backend_dtypes(LOW_PRECISION, BACKENDS_WITH_EXT))
@pytest.mark.parametrize("numel", LOW_PRECISION_SIZES)
@pytest.mark.parametrize("masked", [None, "bool", "bitmask"])
def test_low_precision_masked_odd_sizes(masked, numel, dtype, backend, gen, poison_triton):
    t = (rand((numel,), generator=gen) * 30).to(dtype)  # sums of squares to 1e7: past fp16's 65504
    mask = rand_mask((numel,), generator=gen)
    masks = None if masked is None else [mask if masked == "bool" else pack_mask(mask)]
    with poison_triton():
        out = grad_norm([t], masks, backend=backend)
    assert out.dim() == 0 and out.dtype == torch.float32
    # fp16/bf16 squares are exact in fp32 (22 and 16 significant bits): only the fp32 sums round,
    # a few ulps (2**-24 ~ 6e-8) over these lane and tree sums, against the float64 oracle
    expected = _ref([t], None if masked is None else [mask])
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_many_tensors_with_masks_and_empty(backend, gen, poison_triton):
    shapes = [(0,), (1,), (3, 5), (7, 1, 3), (4095,), (64, 33)]
    ts = [rand(s, generator=gen) for s in shapes]
    ms = [rand_mask(s, generator=gen) for s in shapes]
    mixed = [ms[0], None, pack_mask(ms[2]), ms[3], pack_mask(ms[4]), ms[5]]
    expected = _ref(ts, [ms[0], None, ms[2], ms[3], ms[4], ms[5]])
    with poison_triton():  # (Triton: several launches share the partials buffer, each its slice)
        out = grad_norm(ts, mixed, backend=backend)
    assert out.dim() == 0 and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_all_masked_out_is_zero_and_all_empty(backend, gen, poison_triton):
    t = rand((9,), generator=gen)
    with poison_triton():
        assert grad_norm([t], [torch.zeros(9, dtype=torch.bool)], backend=backend).item() == 0.0
        assert grad_norm([torch.zeros(0), torch.zeros(0, 3)], backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_mixed_dtypes_and_non_contiguous(backend, gen, poison_triton):
    ts = [rand((33, 8), generator=gen).t(), rand((100,), torch.float16, gen), rand((7,), torch.float64, gen)]
    with poison_triton():
        out = grad_norm(ts, backend=backend)
    torch.testing.assert_close(out.double(), _ref(ts), rtol=1e-6, atol=0)


@pytest.mark.cpu
def test_errors():
    with pytest.raises(ValueError, match="empty"):
        grad_norm([])
    with pytest.raises(TypeError, match="list or tuple"):
        grad_norm(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        grad_norm([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="shape"):
        grad_norm([torch.ones(3)], [torch.ones(4, dtype=torch.bool)])
    with pytest.raises(TypeError, match="bool tensor"):
        grad_norm([torch.ones(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match="entries"):
        grad_norm([torch.ones(3)], [None, None])


# --- float64: accumulation and result in float64 ---------------------------------------------

def _exact(tensors, masks=None):
    """The float64 norm from an exactly rounded sum (math.fsum) of the float64 squares."""
    masks = masks or [None] * len(tensors)
    squares = [(t.double() if m is None else t.double()[m]).square().reshape(-1) for t, m in zip(tensors, masks)]
    return math.sqrt(math.fsum(torch.cat(squares).tolist()))


# Not bitwise: each backend sums in its own order. A float64 sum of <= 10**6 positive terms in
# these orders (lanes of at most a few hundred terms, then tree or chunk sums) is within a few
# hundred ulps of the exact one in the worst case; fp32 accumulation would be ~1e-8 off.
FP64_RTOL = 1e-13


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_float64_accumulates_in_float64(masked, numel, backend, gen, poison_triton):
    t = rand64((numel,), gen)
    masks = [rand_mask((numel,), generator=gen)] if masked else None
    with poison_triton():
        out = grad_norm([t], masks, backend=backend)
    assert out.dim() == 0 and out.dtype == torch.float64
    assert out.item() == pytest.approx(_exact([t], masks), rel=FP64_RTOL, abs=0)


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_any_float64_tensor_makes_the_whole_norm_float64(backend, gen, poison_triton):
    # the fp32/fp16 tensors' squares are exact in float64 too, so the exact sum is the reference
    shapes = [(0,), (4095,), (3, 5), (10**5 + 3,), (7,)]
    dtypes = [torch.float64, torch.float32, torch.float16, torch.float32, torch.float64]
    ts = [rand64(s, gen).to(d) for s, d in zip(shapes, dtypes)]
    ms = [rand_mask(s, generator=gen) for s in shapes]
    for masks in (None, [ms[0], pack_mask(ms[1]), None, ms[3], pack_mask(ms[4])]):
        with poison_triton():
            out = grad_norm(ts, masks, backend=backend)
        assert out.dim() == 0 and out.dtype == torch.float64
        bool_masks = None if masks is None else [ms[0], ms[1], None, ms[3], ms[4]]
        assert out.item() == pytest.approx(_exact(ts, bool_masks), rel=FP64_RTOL, abs=0)
    with poison_triton():
        assert grad_norm(ts[2:4], backend=backend).dtype == torch.float32  # no float64 tensor: fp32 as before


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_float64_empty_or_all_masked_out_is_a_float64_zero(backend, gen, poison_triton):
    with poison_triton():
        outs = (grad_norm([torch.zeros(0, dtype=torch.float64)], backend=backend),
                grad_norm([rand64((9,), gen)], [torch.zeros(9, dtype=torch.bool)], backend=backend))
    for out in outs:
        assert out.dtype == torch.float64 and out.item() == 0.0


@pytest.mark.cpu
def test_differentiable_where_a_tensor_requires_grad(gen):
    """Where a tensor requires a gradient, the norm's is ``v / ||v||`` on the masked entries
    and 0 elsewhere (gradcheck in float64; bool and bit masks), 0 at ``v = 0`` as torch's
    vector_norm gives; a tensor that does not require one gets none. Under no_grad (an
    optimizer's call) the result has no graph."""
    a, b, c = rand64((5,), gen), rand64((3, 7), gen), rand64((4,), gen)
    m = rand_mask((3, 7), generator=gen)
    for mask in (m, pack_mask(m)):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: grad_norm([x, y, c], [None, mask, None]), (x, y))
        grad_norm([x, y, c], [None, mask, None]).backward()
        ref = torch.cat([a, b[m], c]).norm()
        torch.testing.assert_close(x.grad, a / ref, rtol=1e-14, atol=0)
        torch.testing.assert_close(y.grad, torch.where(m, b / ref, 0.0), rtol=1e-14, atol=0)
    zero = torch.zeros(6, dtype=torch.float32, requires_grad=True)
    grad_norm([zero]).backward()
    assert torch.equal(zero.grad, torch.zeros(6))
    low = rand((8,), torch.bfloat16, gen).requires_grad_()
    grad_norm([low]).backward()
    assert low.grad.dtype == torch.bfloat16  # the gradient in its tensor's dtype
    with torch.no_grad():
        assert grad_norm([x, y]).grad_fn is None
