"""ascent_conv: the exact masked ascent gradient of a convolution, computed only for the output
channels that hold a masked entry; and its use by sparse_ascent("exact") on conv models."""

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, rand_mask
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssam_kernels import ascent_conv, pack_mask, sparse_ascent
from ssam_kernels.ops.bitmask import masked_rows

pytestmark = pytest.mark.cpu

# (dims, C_in, C_out, kernel, stride, padding, dilation, groups, spatial)
GEOMETRIES = [
    (1, 3, 5, 3, 1, 1, 1, 1, (11,)),
    (2, 4, 6, 3, 2, 1, 1, 1, (9, 7)),
    (2, 3, 7, 1, 1, 0, 1, 1, (5, 5)),
    (2, 4, 6, 3, 1, "same", 2, 1, (8, 8)),
    (2, 4, 6, 3, 1, "valid", 1, 2, (6, 5)),  # grouped: dW dense, then masked
    (3, 2, 4, 2, 1, (1, 0, 1), 1, 1, (4, 5, 3)),
    (2, 3, 5, 3, (2,), (1,), [2], 1, (9, 8)),  # one-element sequences: one value for every dim, as torch
]


def _row_mask(shape, gen, dtype_rows=0.5):
    """Random entries in a random half of the output channels; the other rows empty."""
    mask = rand_mask(shape, 0.5, gen)
    empty = torch.rand(shape[0], generator=gen) >= dtype_rows
    mask[empty] = False
    mask[0].view(-1)[0] = True  # at least one masked row
    return mask


def _conv(dims):
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]


def _case(geometry, gen, dtype=torch.float32):
    dims, cin, cout, k, stride, padding, dilation, groups, spatial = geometry
    x = torch.randn(3, cin, *spatial, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(cout, cin // groups, *(k,) * dims, generator=gen).to(dtype).requires_grad_(True)
    b = torch.randn(cout, generator=gen).to(dtype).requires_grad_(True)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, w, b, kwargs


def _close(actual, expected, dtype):
    """fp32: the row-sparse dW is the same reduction as the dense one on fewer channels (oneDNN
    may block it differently: ~1e-6 relative). bf16: compared with fp32 math on the same bf16
    operands; each result is an fp32 accumulation rounded once to bf16 (2^-8 relative), and
    2^-7 of the largest entry absorbs the accumulation order where sums cancel."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.float(), expected, rtol=2**-7, atol=2**-7 * scale)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}d-s{g[4]}-p{g[5]}-g{g[7]}")
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_the_dense_ones_masked(geometry, packed, dtype, gen):
    x, w, b, kwargs = _case(geometry, gen, dtype)
    mask, bias_mask = _row_mask(w.shape, gen), rand_mask(b.shape, 0.5, gen)
    conv = _conv(geometry[0])
    dy = torch.randn(conv(x, w, b, **kwargs).shape, generator=gen).to(dtype)
    # the reference in fp32 on the same (bf16-representable) values
    x32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (x, w, b))
    ref = torch.autograd.grad(conv(x32, w32, b32, **kwargs), (x32, w32, b32), dy.float())
    m, bm = (pack_mask(mask), pack_mask(bias_mask)) if packed else (mask, bias_mask)
    out = ascent_conv(x, w, b, m, bias_mask=bm, **kwargs)
    torch.testing.assert_close(out, conv(x, w, b, **kwargs), rtol=0, atol=0)
    dx, dw, db = torch.autograd.grad(out, (x, w, b), dy)
    assert dw.dtype == dtype and dx.dtype == dtype and db.dtype == dtype
    _close(dx, ref[0], dtype)
    _close(dw, ref[1] * mask, dtype)
    assert torch.all(dw[~mask] == 0)
    _close(db, ref[2] * bias_mask, dtype)


def test_accumulates_into_existing_grads_and_skips_unneeded_ones(gen):
    x, w, b, kwargs = _case(GEOMETRIES[1], gen)
    x = x.detach()  # no input gradient wanted
    mask = _row_mask(w.shape, gen)
    w.grad = torch.full_like(w, 3.0)  # poisoned: autograd must add to it, not overwrite
    ascent_conv(x, w, None, mask, **kwargs).square().sum().backward()
    ref = torch.autograd.grad(F.conv2d(x, w, None, **kwargs).square().sum(), w)[0]
    torch.testing.assert_close(w.grad, 3.0 + ref * mask, rtol=1e-5, atol=1e-5)
    assert x.grad is None


def test_weight_gradient_flops_scale_with_the_masked_channels(gen):
    """dX as dense autograd; dW only for the output channels with a masked entry: counted
    FLOPs = forward + dX + (rows / C_out) x dW."""
    x = torch.randn(4, 8, 10, 10, generator=gen, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, generator=gen, requires_grad=True)
    mask = torch.zeros(w.shape, dtype=torch.bool)
    mask[[1, 5, 6, 11], 2, 1, 0] = True  # 4 of 16 channels
    assert masked_rows(mask).tolist() == [1, 5, 6, 11]
    with FlopCounterMode(display=False) as counter:
        ascent_conv(x, w, None, mask, padding=1).sum().backward()
    conv = 2 * 4 * 16 * 8 * 9 * 100  # forward = dX = dense dW
    assert counter.get_total_flops() == conv + conv + conv * 4 // 16


def test_no_masked_row_gives_a_zero_weight_gradient(gen):
    x, w, b, kwargs = _case(GEOMETRIES[1], gen)
    out = ascent_conv(x, w, b, torch.zeros(w.shape, dtype=torch.bool), **kwargs)
    dx, dw = torch.autograd.grad(out.sum(), (x, w))
    assert torch.count_nonzero(dw) == 0
    torch.testing.assert_close(dx, torch.autograd.grad(F.conv2d(x, w, b, **kwargs).sum(), x)[0])


def test_bad_input(gen):
    x, w, b, _ = _case(GEOMETRIES[1], gen)
    mask = torch.ones(w.shape, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask is required"):
        ascent_conv(x, w, b, None)
    with pytest.raises(ValueError, match="mask has shape"):
        ascent_conv(x, w, b, mask[:, :1])
    with pytest.raises(TypeError, match="mask must be"):
        ascent_conv(x, w, b, mask.float())
    with pytest.raises(TypeError, match="weight must be"):
        ascent_conv(x, w[0, 0], b, mask[0, 0])
    with pytest.raises(ValueError, match="x must be a batched 4-D"):
        ascent_conv(x[0], w, b, mask)
    with pytest.raises(ValueError, match="channels"):
        ascent_conv(x[:, :2], w, b, mask)
    with pytest.raises(ValueError, match="stride"):
        ascent_conv(x, w, b, mask, stride=0)
    with pytest.raises(ValueError, match="padding"):
        ascent_conv(x, w, b, mask, padding="full")
    with pytest.raises(ValueError, match="asymmetrically"):
        ascent_conv(x, w[:, :, :2, :2], b, mask[:, :, :2, :2], padding="same")
    with pytest.raises(ValueError, match="bias_mask given"):
        ascent_conv(x, w, None, mask, bias_mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="groups"):
        ascent_conv(x, w, b, mask, groups=0)
    with pytest.raises(TypeError, match=r"this layer's weight \(shape \(6, 4, 3, 3\)\) is torch.float64"):
        ascent_conv(x.double(), w.double(), b.double(), mask)
    with pytest.raises(ValueError, match=r"bias must be None or a \[6\] tensor, got a torch.float32 tensor"):
        ascent_conv(x, w, b[:5], mask)
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1"):
        ascent_conv(x, w, b, mask, stride=2, padding="same")


class _ConvNet(nn.Module):
    """Convs the interception must catch (module, functional, 'same', a reflect-padded one that
    nn.Conv2d pads itself) and ones it must leave to plain autograd (grouped: slicing channels
    would break the groups; asymmetric 'same')."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding="same", padding_mode="reflect")
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.c4 = nn.Conv2d(8, 6, 2, padding="same")  # asymmetric: plain conv
        self.w5 = nn.Parameter(torch.randn(4, 6, 1, 1) * 0.3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c3(torch.relu(self.c2(h))))
        h = F.conv2d(torch.relu(self.c4(h)), self.w5)
        return self.fc(h.mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # c4, on purpose
@pytest.mark.parametrize("model_type", [_ConvNet, SmallConvBN])
def test_exact_mode_on_conv_models_yields_the_masked_gradient(model_type, gen):
    torch.manual_seed(0)
    model = model_type()
    x = torch.randn(5, 3 if model_type is _ConvNet else 2, 4, 4, generator=gen)
    masks = {p: (_row_mask(p.shape, gen) if p.dim() > 1 else rand_mask(p.shape, 0.5, gen)) for p in model.parameters()}
    for m in masks.values():  # an empty mask freezes its parameter (grad None: tested in test_sparse_ascent)
        m.view(-1)[0] = True
    ref = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    with sparse_ascent({p: pack_mask(m) for p, m in masks.items()}, "exact"), FlopCounterMode(display=False) as count:
        model(x).square().sum().backward()
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad * masks[p], r * masks[p], rtol=1e-5, atol=1e-6)
        if p.dim() == 4 and model_type is _ConvNet and all(p is not q for q in (model.c3.weight, model.c4.weight)):
            # intercepted: the rows without a masked entry are skipped (exact zeros); inside
            # the computed rows nothing is masked (the masked norm reads only masked entries)
            # (a weight whose every row holds one runs plain autograd: the dense gradient)
            idle = ~masks[p].reshape(p.shape[0], -1).any(1)
            assert torch.all(p.grad[idle] == 0)
            torch.testing.assert_close(p.grad[~idle], r[~idle], rtol=1e-5, atol=1e-6)
    with FlopCounterMode(display=False) as dense:
        model(x).square().sum().backward()
    assert count.get_total_flops() < dense.get_total_flops()


def test_autocast_runs_the_conv_in_bf16_and_returns_grads_in_the_parameters_dtypes(gen):
    x, w, b, kwargs = _case(GEOMETRIES[1], gen)
    mask = _row_mask(w.shape, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ascent_conv(x, w, b, mask, **kwargs)
        ref_out = F.conv2d(x, w, b, **kwargs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same bf16 convolution
    dy = torch.randn(out.shape, generator=gen).to(torch.bfloat16)
    dx, dw, db = torch.autograd.grad(out, (x, w, b), dy)
    rx, rw, rb = torch.autograd.grad(ref_out, (x, w, b), dy)
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.float32,) * 3
    # both from bf16 operands: the row-sparse dW rounds like the dense one (same oneDNN kernel
    # on fewer channels), to bf16's 2^-8 relative
    scale = rw.abs().max().item()
    torch.testing.assert_close(dw, rw * mask, rtol=2**-7, atol=2**-7 * scale)
    torch.testing.assert_close(dx, rx, rtol=0, atol=0)
    torch.testing.assert_close(db, rb, rtol=2**-7, atol=2**-7 * rb.abs().max().item())
