"""Tier cuda: the reference ops and optimizers on CUDA tensors equal their CPU results.

``SSAM_TEST_CUDA_DEVICE`` overrides the device (to dry-run these checks on a CPU)."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, assert_tensors_equal, rand, rand_mask

import ssam
import ssam_kernels as sk

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("SSAM_TEST_CUDA_DEVICE", "cuda")


@pytest.mark.memcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ops_match_cpu(dtype, gen):
    shapes = [(1,), (3, 5), (4095,), (10**6 + 3,)]
    ws = [rand(s, dtype, gen) for s in shapes]
    gs = [rand(s, dtype, gen) for s in shapes]
    ms = [rand_mask(s, generator=gen) for s in shapes]
    norm_cpu = sk.grad_norm(gs, ms)
    norm_dev = sk.grad_norm([g.to(DEVICE) for g in gs], [sk.pack_mask(m.to(DEVICE)) for m in ms])
    torch.testing.assert_close(norm_dev.cpu(), norm_cpu, rtol=1e-5, atol=0)
    wd = [w.to(DEVICE) for w in ws]
    originals = [w.clone() for w in ws]
    with torch.no_grad():
        backup = sk.perturb_(wd, [g.to(DEVICE) for g in gs], [m.to(DEVICE) for m in ms], 0.3)
        sk.perturb_(ws, gs, ms, 0.3)
        for a, b in zip(wd, ws):
            assert torch.equal(a.cpu(), b)
        sk.restore_(wd, backup)
    for a, w in zip(wd, originals):
        assert torch.equal(a.cpu().view(torch.uint8), w.view(torch.uint8))  # bit for bit (-0.0, NaN payloads)
    scores = [rand(s, dtype, gen) for s in shapes]
    for a, b in zip(sk.topk_mask([s.to(DEVICE) for s in scores], 0.3), sk.topk_mask(scores, 0.3)):
        assert torch.equal(a.cpu(), b)
    s2 = rand((64, 1000), dtype, gen)
    assert torch.equal(sk.nm_mask(s2.to(DEVICE), 2, 4).cpu(), sk.nm_mask(s2, 2, 4))


# 2:4 compression needs rows % 32 == 0 and cols % 32 == 0. Shapes with a partial last block for
# either kernel: Triton's tiles are 32 rows by 64 columns (cols % 64 == 32: 160, 96), the
# extension's blocks 256 threads of one (row, 16 columns) each (rows * cols / 16 = 960, 192: not
# multiples of 256); (128, 256) and (256, 512) fill every block of both.
COMPRESS_SHAPES = [(128, 256), (96, 160), (32, 96)]


@pytest.mark.memcheck
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_24_matches_cpu(dtype, gen):
    for shape in COMPRESS_SHAPES:
        w = rand(shape, dtype, gen)
        x = (w * sk.nm_mask(w, 2, 4)).to(DEVICE)
        values, meta = sk.compress_24(x)
        cpu_values, cpu_meta = sk.compress_24(x.cpu())
        assert torch.equal(values.cpu(), cpu_values) and torch.equal(meta.cpu(), cpu_meta), shape
        assert torch.equal(sk.decompress_24(values, meta), x), shape


def test_ssamf_step_matches_cpu(gen):
    """SSAM-F's Fisher mask and one step on the device, against the CPU's. Each device fits its
    own mask (at the same density: exactly the requested count), then the device run takes the
    CPU's masks: two Fisher scores within rounding of each other may order otherwise on another
    device and flip an entry, and this test is about the step (as tests/test_cuda_recipes.py).

    The weights then differ by fp32 summation order only (TF32 off): the device sums the
    convolution's weight gradient (16 samples x 16 positions: 256 terms), BatchNorm's statistics
    (256 terms), the cross-entropy's batch mean (16) and the squares of the 611 gradient entries
    (the norm) in other orders. An fp32 sum of n terms is within (n - 1) * 2**-24 of the exact
    one, relative to the sum of the terms' magnitudes (about sqrt(n) * 2**-24 typically), so two
    orders of 256 terms within 3e-5 of that: the step ``w - lr * g(w + e)`` (lr 0.1, |g| of
    order 1) moves each weight by ``lr * 3e-5 * sum |terms|``, a few 1e-6 at most, within
    rtol=1e-4 of the weight and atol=1e-5 for entries near 0."""
    torch.manual_seed(0)  # the pair starts from the same weights
    cpu_model = SmallConvBN()
    dev_model = SmallConvBN().to(DEVICE)
    dev_model.load_state_dict(cpu_model.state_dict())
    x, y = torch.randn(16, 2, 4, 4, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    results = []
    for model, dev in ((cpu_model, "cpu"), (dev_model, DEVICE)):
        opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, num_samples=16,
                         update_freq=1, lr=0.1, seed=0)
        xd, yd = x.to(dev), y.to(dev)
        opt.update_mask(model, [(xd, yd)])  # the device's own Fisher and mask
        density = opt.mask_density()
        if results:  # then the CPU's masks (see the docstring)
            opt._set_masks([m.to(dev) for m in results[0][2]])

        def closure():
            loss = F.cross_entropy(model(xd), yd)
            loss.backward()
            return loss

        F.cross_entropy(model(xd), yd).backward()
        opt.step(closure)
        results.append(([p.detach().cpu() for p in model.parameters()], density, [m.cpu() for m in opt.masks()]))
    assert results[0][1] == results[1][1]
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# --- the Triton backend on CUDA tensors, against the reference on the same tensors -----------

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ext_cuda():
    from ssam_kernels._backend import extension_error, extension_has_kernel

    if extension_error() is not None or not extension_has_kernel("grad_norm", "cuda"):
        pytest.fail("ssam_kernels._C has no CUDA kernels: build with SSAM_BUILD_EXT=1 on the GPU machine")


# both round scale*g before the add, as the reference does (Triton launched with
# enable_fp_fusion=False, the extension built with --fmad=false): bit for bit
@pytest.mark.memcheck
@pytest.mark.parametrize("backend", ["triton", "ext"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_norm_perturb_restore(backend, dtype, gen):
    if backend == "ext":
        _ext_cuda()
    shapes = [(0,), (1,), (3, 5), (4095,), (10**6 + 3,), (256, 33)]
    ws = [rand(s, dtype, gen, DEVICE) for s in shapes]
    gs = [rand(s, dtype, gen, DEVICE) for s in shapes]
    ms = [sk.pack_mask(rand_mask(s, generator=gen, device=DEVICE)) for s in shapes]
    ms[2] = None
    for masks in (None, ms):
        torch.testing.assert_close(sk.grad_norm(gs, masks, backend=backend), sk.grad_norm(gs, masks, backend="torch"),
                                   rtol=1e-5, atol=0)
    ref = [w.clone() for w in ws]
    originals = [w.clone() for w in ws]
    scale = torch.tensor(0.05, device=DEVICE) / (sk.grad_norm(gs) + 1e-7)
    with torch.no_grad():
        backup = sk.perturb_(ws, gs, ms, scale, backend=backend)
        ref_backup = sk.perturb_(ref, gs, ms, scale, backend="torch")
        for a, b in zip(ws, ref):
            assert torch.equal(a, b)
        for a, b in zip(backup.values, ref_backup.values):
            assert torch.equal(a, b)
        for w, m in zip(ws, ms):  # poison what restore must overwrite
            w[torch.ones_like(w, dtype=torch.bool) if m is None else m.to_bool()] = float("nan")
        sk.restore_(ws, backup, backend=backend)
    for a, b in zip(ws, originals):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# A masked kernel finds each chunk's slot in the compact backup by scanning its tensor's chunk
# counts 2048 chunks (16.8M elements) a step, carrying each step's total into the next: only a
# tensor longer than that reaches the carry (the interpret tier covers it with a smaller step
# for Triton; this is the extension's kernel, and Triton's at its real step). Not memcheck: 50M
# elements.
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_masked_backup_offsets_carry_across_scan_steps(backend, gen):
    if backend == "ext":
        _ext_cuda()
    chunk, step = 8192, 2048
    shapes = [(step * chunk + 5,), (0,), (chunk,), (2 * step * chunk + 3 * chunk + 1,)]
    ws = [rand(s, generator=gen, device=DEVICE) for s in shapes]
    gs = [rand(s, generator=gen, device=DEVICE) for s in shapes]
    ms = [sk.pack_mask(rand_mask(s, density, generator=gen, device=DEVICE)) for s, density in zip(shapes, [0.3, 0.5, 1.0, 0.7])]
    ref, originals = [w.clone() for w in ws], [w.clone() for w in ws]
    with torch.no_grad():
        backup = sk.perturb_(ws, gs, ms, 0.25, backend=backend)
        ref_backup = sk.perturb_(ref, gs, ms, 0.25, backend="torch")
        assert_tensors_equal(ws, ref, "weights")
        assert_tensors_equal(backup.values, ref_backup.values, "backup values")  # each in its slot
        for w, m in zip(ws, ms):  # poison what restore must overwrite
            w[m.to_bool()] = float("nan")
        sk.restore_(ws, backup, backend=backend)
    assert_tensors_equal(ws, originals, "restored weights")


@pytest.mark.memcheck
@pytest.mark.parametrize("backend", ["torch", "triton", "ext"])
def test_float64_norm_and_perturbation_are_float64(backend, gen):
    """Float64 params on the device: the norm accumulates in float64 and the perturbation is
    float64 math, against the float64 references on the CPU."""
    if backend == "ext":
        _ext_cuda()
    shapes = [(1,), (3, 5), (4095,), (10**6 + 3,)]
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ms = [rand_mask(s, generator=gen) for s in shapes]
    ms[1] = None
    dev_masks = [None if m is None else sk.pack_mask(m.to(DEVICE)) for m in ms]
    gd = [g.to(DEVICE) for g in gs]
    norm = sk.grad_norm(gd, dev_masks, backend=backend)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm.cpu(), sk.grad_norm(gs, ms, backend="torch"), rtol=1e-13, atol=0)
    scale = 0.05 / (norm + 1e-7)  # a float64 device scale, as the optimizer makes it
    wd = [w.to(DEVICE) for w in ws]
    originals = [w.clone() for w in wd]
    with torch.no_grad():
        backup = sk.perturb_(wd, gd, dev_masks, scale, backend=backend)
        sk.perturb_(ws, gs, ms, scale.cpu(), backend="torch")
        for a, b in zip(wd, ws):
            if backend == "triton":  # may contract w + scale*g into one FMA: an ulp of w + e, or
                # of scale*g (|scale*g| < 1e-2 here) where w + e cancels
                torch.testing.assert_close(a.cpu(), b, rtol=torch.finfo(torch.float64).eps, atol=1e-18)
            else:  # torch on the device; the extension, built with --fmad=false
                assert torch.equal(a.cpu(), b)
        sk.restore_(wd, backup, backend=backend)
    assert_tensors_equal(wd, originals)


@pytest.mark.memcheck
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_triton_masks_and_mvue(dtype, gen):
    scores = [rand(s, dtype, gen, DEVICE) for s in [(1,), (4095,), (10**6 + 3,), (64, 33)]]
    for k in (1, 12345, 600_000):
        a = sk.topk_mask(scores, k=k, backend="triton")
        b = sk.topk_mask(scores, k=k, backend="torch")
        assert_tensors_equal(a, b)
    s2 = rand((333, 1000), dtype, gen, DEVICE)
    for n, m in ((2, 4), (1, 4), (4, 8)):
        assert torch.equal(sk.nm_mask(s2, n, m, backend="triton"), sk.nm_mask(s2, n, m, backend="torch"))
    # MVUE's kernel takes 256 groups (1024 values) a program: 512 x 256 fills every program,
    # 333 x 100 (8325 groups) leaves the last one partial
    for shape in ((512, 256), (333, 100)):
        x = rand(shape, dtype, gen, DEVICE)
        u = torch.rand(shape[0], shape[1] // 4, generator=gen).to(DEVICE)
        out = sk.mvue24(x, uniforms=u, backend="triton")
        ref = sk.mvue24(x, uniforms=u, backend="torch")
        # bit for bit, as the interpret tier asserts (tests/test_mvue24.py): the same uniforms
        # (given, no Philox draw), and every step is an IEEE fp32 operation that both round
        # alike on the GPU: adds and compares in the same order (the sums left to right, as the
        # reference), the divisions correctly rounded on both sides (Triton's div_rn is PTX
        # div.rn.f32; torch's CUDA `/` is IEEE, built without fast math), no FMA contraction
        # (launched with enable_fp_fusion=False), one round-to-nearest-even to the dtype. randn
        # inputs are normal, as are their p and x / p, so no flush of subnormals could matter.
        assert_tensors_equal([out], [ref], f"mvue24 {shape}")
        assert bool(((sk.mvue24(x, seed=5, backend="triton").reshape(-1, 4) != 0).sum(-1) <= 2).all())


@pytest.mark.memcheck
@pytest.mark.parametrize("backend", ["triton", "ext"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_24_kernels(dtype, backend, gen):
    if backend == "ext":
        _ext_cuda()
    for rows, cols in [(256, 512)] + COMPRESS_SHAPES[1:]:
        w = rand((rows, cols), dtype, gen, DEVICE)
        x = w * sk.nm_mask(w, 2, 4)
        values, meta = sk.compress_24(x, backend=backend)
        ref_values, ref_meta = sk.compress_24(x, backend="torch")
        assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta), (rows, cols)
        assert torch.equal(sk.decompress_24(values, meta, backend=backend), x), (rows, cols)
        # unchecked, a group with three nonzeros leaves the other groups exact (values and
        # metadata): one in a middle block, one in the last group (a partial block's, in the
        # shapes with one)
        bad = [(min(37, rows - 1), 2), (rows - 1, cols // 4 - 1)]
        keep = torch.ones(rows, cols // 4, dtype=torch.bool, device=x.device)
        for r, g in bad:
            x[r, 4 * g:4 * g + 3] = 1.0
            keep[r, g] = False
        values, meta = sk.compress_24(x, check=False, backend=backend)
        back = sk.decompress_24(values, meta, backend="torch").view(rows, cols // 4, 4)
        assert torch.equal(back[keep], x.view(rows, cols // 4, 4)[keep]), (rows, cols)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cusparselt_compress_multiplies_like_dense(dtype, gen):
    if not torch.backends.cusparselt.is_available():
        pytest.fail("this torch build has no cuSPARSELt; the 2:4 sparse path cannot be tested")
    w = rand((256, 512), dtype, gen, DEVICE)
    a = w * sk.nm_mask(w, 2, 4)
    b = rand((512, 128), dtype, gen, DEVICE)
    out = torch._cslt_sparse_mm(sk.compress_24_cusparselt(a), b)
    ref = a.float() @ b.float()
    # fp32 accumulation of exact products, one rounding to the output dtype (half an ulp) plus
    # the summation order: within two ulps of the largest value (as test_ascent_linear)
    atol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=atol)


@pytest.mark.memcheck
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_triton_fused_sgd_step(dtype, gen):
    shapes = [(5,), (4095,), (10**6 + 3,)]
    ws = [rand(s, dtype, gen, DEVICE) for s in shapes]
    ms = [sk.pack_mask(rand_mask(s, generator=gen, device=DEVICE)) for s in shapes]
    gs = [rand(s, dtype, gen, DEVICE) for s in shapes]
    bufs = [None, rand(shapes[1], dtype, gen, DEVICE), rand(shapes[2], dtype, gen, DEVICE)]
    ref_w = [w.to(torch.float32, copy=True) for w in ws]
    ref_b = [None if b is None else b.to(torch.float32, copy=True) for b in bufs]
    hyper = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    with torch.no_grad():
        backup = sk.perturb_(ws, gs, ms, 0.3, backend="triton")
        ref_backup = sk.perturb_(ref_w, [g.float() for g in gs], ms, 0.3, backend="torch")
        out = sk.restore_sgd_step_(ws, gs, bufs, backup, backend="triton", **hyper)
        ref = sk.restore_sgd_step_(ref_w, [g.float() for g in gs], ref_b, ref_backup, backend="torch", **hyper)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    for a, b in zip(ws + out, ref_w + ref):
        torch.testing.assert_close(a, b.to(dtype), **tol)


# --- the compiled extension's CUDA kernels ----------------------------------------------------

@pytest.mark.memcheck
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_ext_cuda_masks(dtype, gen):
    _ext_cuda()
    s2 = rand((333, 1000), dtype, gen, DEVICE)
    for n, m in ((2, 4), (1, 4), (4, 8)):
        assert torch.equal(sk.nm_mask(s2, n, m, backend="ext"), sk.nm_mask(s2, n, m, backend="torch"))
    mask = rand_mask((1001,), generator=gen, device=DEVICE)
    assert torch.equal(torch.ops.ssam.pack_mask(mask), sk.pack_mask(mask).bits)
    assert torch.equal(torch.ops.ssam.unpack_mask(sk.pack_mask(mask).bits, 1001), mask)


def test_three_backends_agree_on_cuda(gen):
    _ext_cuda()
    g = [rand((4095,), generator=gen, device=DEVICE), rand((300, 77), generator=gen, device=DEVICE)]
    m = [sk.pack_mask(rand_mask(t.shape, generator=gen, device=DEVICE)) for t in g]
    norms = [sk.grad_norm(g, m, backend=b) for b in ("torch", "triton", "ext")]
    for n in norms[1:]:
        torch.testing.assert_close(n, norms[0], rtol=1e-5, atol=0)
    masks = [sk.nm_mask(g[1], 2, 4, backend=b) for b in ("torch", "triton", "ext")]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
