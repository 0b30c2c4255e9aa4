import pytest
import torch
from helpers import BACKENDS, backend_dtypes, interpreter_fma_is_fused, rand, rand_mask

from ssam_kernels import pack_mask, perturb_, restore_sgd_step_
from ssam_kernels._checks import as_bool

HYPERS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(lr=0.1, momentum=0.5, dampening=0.1, maximize=True, weight_decay=0.01),
]
SHAPES = [(5,), (3, 4), (0,), (4095,), (9000,)]


def _inputs(dtype, gen, with_buffers):
    ws = [rand(s, dtype, gen) for s in SHAPES]
    gs = [rand(s, dtype, gen) for s in SHAPES]
    ms = [rand_mask(s, generator=gen) for s in SHAPES]
    ms[1] = None
    ms[3] = pack_mask(ms[3])
    bufs = [None if (i % 2 == 0 or not with_buffers) else rand(s, dtype, gen) for i, s in enumerate(SHAPES)]
    return ws, gs, ms, bufs


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hyper", HYPERS)
def test_reference_is_restore_then_torch_sgd_bitwise(hyper, dtype, gen):
    ws, gs, ms, _ = _inputs(dtype, gen, False)
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    sgd = torch.optim.SGD(params, **hyper)
    ours = [w.clone() for w in ws]
    buffers = [None] * len(ws)
    for _ in range(3):  # several steps: buffers are created, then updated in place
        g2 = [rand(s, dtype, gen) for s in SHAPES]
        with torch.no_grad():
            backup = perturb_(ours, gs, ms, 0.3, backend="torch")
            buffers = restore_sgd_step_(ours, g2, buffers, backup, backend="torch", **hyper)
        for p, g in zip(params, g2):
            p.grad = g.clone()
        sgd.step()
        for p, w in zip(params, ours):
            assert torch.equal(p.detach(), w)
    for p, b in zip(params, buffers):
        if "momentum" in hyper:
            assert torch.equal(sgd.state[p]["momentum_buffer"], b)
        else:
            assert b is None


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("backend,dtype", [p for p in backend_dtypes([torch.float32, torch.float16, torch.bfloat16])
                                           if p.values[0] != "torch"])
def test_kernel_matches_fp32_reference(hyper, dtype, backend, gen, poison_triton):
    ws, gs, ms, bufs = _inputs(dtype, gen, with_buffers="momentum" in hyper)
    ref_w = [w.to(torch.float32, copy=True) for w in ws]
    ref_b = [None if b is None else b.to(torch.float32, copy=True) for b in bufs]
    g2 = [rand(s, dtype, gen) for s in SHAPES]
    with torch.no_grad():
        backup = perturb_(ws, gs, ms, 0.3, backend="torch")
        for w, m in zip(ws, ms):  # poison: the restore must overwrite what the second pass left
            w[torch.ones_like(w, dtype=torch.bool) if m is None else as_bool(m)] = 7.0
        ref_backup = perturb_(ref_w, [g.float() for g in gs], ms, 0.3, backend="torch")
        with poison_triton():  # (momentum buffers the kernel makes: every entry written)
            out = restore_sgd_step_(ws, g2, bufs, backup, backend=backend, **hyper)
        ref = restore_sgd_step_(ref_w, [g.float() for g in g2], ref_b, ref_backup, backend="torch", **hyper)
    # fp32: bit for bit, a fused multiply-add exactly where the reference's torch ops have one
    # (triton 3.6's interpreter rounds tl.fma's product: within two ulps there); low precision:
    # the kernel rounds once from fp32, so it is within one ulp of the fp32 reference (torch's
    # own SGD rounds after every op)
    eps32 = torch.finfo(torch.float32).eps
    if dtype == torch.float32:
        exact = backend != "triton" or interpreter_fma_is_fused()
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=2 * eps32, atol=4 * eps32)
    else:
        tol = dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    for w, r in zip(ws, ref_w):
        torch.testing.assert_close(w, r.to(dtype), **tol)
    for b, r in zip(out, ref):
        assert (b is None) == (r is None)
        if b is not None:
            torch.testing.assert_close(b, r.to(dtype), **tol)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "torch"])
def test_non_contiguous_params_beside_contiguous_ones(backend, gen):
    """Transposed params (with their buffers) go to the reference inside a kernel backend's
    call while the contiguous ones are launched: each param gets its own mask's restore and its
    own buffer's step (the two sets' masks, backups and buffers kept apart)."""
    shapes = [(37,), (6, 4), (9, 5), (8,)]
    ws = [rand(s, generator=gen) for s in shapes]
    ws[1], ws[2] = rand((4, 6), generator=gen).t(), rand((5, 9), generator=gen).t()
    gs = [rand(s, generator=gen) for s in shapes]
    ms = [pack_mask(rand_mask(s, generator=gen)) for s in shapes]
    ms[3] = None
    bufs = [None] + [rand(s, generator=gen) for s in shapes[1:]]
    ref_w, ref_b = [w.clone() for w in ws], [None if b is None else b.clone() for b in bufs]
    g2 = [rand(s, generator=gen) for s in shapes]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    with torch.no_grad():
        backup = perturb_(ws, gs, ms, 0.3, backend=backend)
        ref_backup = perturb_(ref_w, gs, ms, 0.3, backend="torch")
        for w, m in zip(ws, ms):  # poison: the restore must overwrite what the second pass left
            w[torch.ones_like(w, dtype=torch.bool) if m is None else as_bool(m)] = 7.0
        out = restore_sgd_step_(ws, g2, bufs, backup, backend=backend, **hyper)
        ref = restore_sgd_step_(ref_w, g2, ref_b, ref_backup, backend="torch", **hyper)
    # fp32 math, bit for bit (as above; within two ulps where triton 3.6 interprets tl.fma)
    eps = torch.finfo(torch.float32).eps
    tol = 0 if backend != "triton" or interpreter_fma_is_fused() else 2 * eps
    for i in range(len(shapes)):
        torch.testing.assert_close(ws[i], ref_w[i], rtol=tol, atol=2 * tol, msg=f"params[{i}]")
        torch.testing.assert_close(out[i], ref[i], rtol=tol, atol=2 * tol, msg=f"buffers[{i}]")


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "torch"])
def test_kernel_float64_math_is_float64(hyper, backend, gen):
    ws, gs, ms, bufs = _inputs(torch.float64, gen, with_buffers="momentum" in hyper)
    ref_w = [w.clone() for w in ws]
    ref_b = [None if b is None else b.clone() for b in bufs]
    g2 = [rand(s, torch.float64, gen) for s in SHAPES]
    with torch.no_grad():
        backup = perturb_(ws, gs, ms, 0.3, backend=backend)
        ref_backup = perturb_(ref_w, gs, ms, 0.3, backend="torch")
        out = restore_sgd_step_(ws, g2, bufs, backup, backend=backend, **hyper)
        ref = restore_sgd_step_(ref_w, g2, ref_b, ref_backup, backend="torch", **hyper)
    # not bitwise: torch's SGD rounds after every op (its CPU add with alpha may fuse a
    # multiply-add) and the kernel rounds in its own order; a few float64 ulps apart, where
    # fp32 math would be ~1e-8 off
    tol = dict(rtol=1e-14, atol=1e-15)
    for w, r in zip(ws, ref_w):
        torch.testing.assert_close(w, r, **tol)
    for b, r in zip(out, ref):
        assert (b is None) == (r is None)
        if b is not None:
            assert b.dtype == torch.float64
            torch.testing.assert_close(b, r, **tol)


@pytest.mark.cpu
def test_errors(gen):
    """Each refusal comes before anything is written: the weight stays at w + e (the backup
    still to be put back), and a good call then restores and steps it."""
    w = [torch.zeros(4)]
    g = [torch.ones(4)]
    with torch.no_grad():
        backup = perturb_(w, [torch.ones(4)], None, 1.0)
    perturbed = w[0].clone()
    assert torch.equal(perturbed, torch.ones(4))
    for kwargs, error, message in [
        (dict(momentum_buffers=[]), ValueError, "one entry"),
        (dict(lr=-1.0), ValueError, r"lr must be a finite number >= 0\.0, got -1\.0"),
        (dict(lr=float("inf")), ValueError, r"lr must be a finite number >= 0\.0, got inf"),
        (dict(momentum=-0.5), ValueError, r"momentum must be a finite number >= 0\.0, got -0\.5"),
        (dict(momentum=0.9, dampening=-0.1), ValueError, r"dampening must be a finite number >= 0\.0, got -0\.1"),
        (dict(weight_decay=-1e-4), ValueError, r"weight_decay must be a finite number >= 0\.0, got -0\.0001"),
        (dict(weight_decay=float("nan")), ValueError, r"weight_decay must be a finite number >= 0\.0, got nan"),
        (dict(momentum=0.9, nesterov="no"), TypeError, "nesterov must be a bool, got str"),
        (dict(maximize=1), TypeError, "maximize must be a bool, got int"),
        (dict(lr="0.1"), TypeError, "lr must be a real number, got str"),
        (dict(momentum=True), TypeError, "momentum must be a real number, got bool"),
        (dict(dampening=None), TypeError, "dampening must be a real number, got NoneType"),
        (dict(weight_decay=torch.tensor(0.1)), TypeError, "weight_decay must be a real number, got Tensor"),
        (dict(nesterov=True), ValueError, "nesterov needs momentum > 0 and dampening == 0"),
        (dict(momentum=0.9, dampening=0.5, nesterov=True), ValueError, "nesterov needs momentum > 0 and dampening"),
        (dict(momentum_buffers=[torch.ones(3)], momentum=0.9), ValueError, r"momentum_buffers\[0\]"),
        (dict(backup=None), TypeError, "PerturbBackup"),
    ]:
        args = dict(momentum_buffers=[None], backup=backup, lr=0.1)
        args.update(kwargs)
        with torch.no_grad(), pytest.raises(error, match=message):
            restore_sgd_step_(w, g, args.pop("momentum_buffers"), args.pop("backup"), **args)
        assert torch.equal(w[0], perturbed), kwargs
    with torch.no_grad():
        assert restore_sgd_step_(w, g, [None], backup, lr=0.5) == [None]
    assert torch.equal(w[0], torch.full((4,), -0.5))  # w = 0 restored, minus lr * g


@pytest.mark.cpu
def test_a_new_momentum_buffer_is_made_like_torchs(gen):
    """A None buffer becomes a new one, allocated by the call in the grad's dtype and layout (as
    torch's SGD clones the direction), holding the direction; existing buffers are updated in
    place and returned as themselves."""
    w = rand((4, 3, 2, 2), generator=gen).to(memory_format=torch.channels_last)
    g = rand((4, 3, 2, 2), generator=gen).to(memory_format=torch.channels_last)
    v, b = rand((7,), generator=gen), rand((7,), generator=gen)
    gv = rand((7,), generator=gen)
    with torch.no_grad():
        backup = perturb_([w, v], [g, gv], None, 0.0, backend="torch")
        out = restore_sgd_step_([w, v], [g, gv], [None, b], backup, lr=0.1, momentum=0.9, backend="torch")
    assert out[1] is b
    assert out[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(out[0], g)
    with torch.no_grad():
        backup = perturb_([w], [g], None, 0.0, backend="torch")
        assert restore_sgd_step_([w], [g], [None], backup, lr=0.1, backend="torch") == [None]  # no momentum


def _absmax(t):
    return float(t.abs().max()) if t.numel() else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_buffers_of_several_dtypes_in_one_call(backend, gen):
    """fp32 weights whose momentum buffers are fp16 and fp32 in turn (a state loaded from
    elsewhere): each buffer is read and written in its own dtype (a launch that took the first
    buffer's dtype for all would read the others as garbage and write past the narrower ones),
    and an fp16 buffer's step is torch's, which rounds ``momentum * buf`` to fp16 (a kernel
    backend hands those to the reference: its launches do one dtype's math)."""
    ws, gs, ms, _ = _inputs(torch.float32, gen, False)
    bufs = [rand(s, torch.float16 if i % 2 == 0 else torch.float32, gen) for i, s in enumerate(SHAPES)]
    ref_w, ref_b = [w.clone() for w in ws], [b.to(torch.float32, copy=True) for b in bufs]
    torch_w, torch_b = [w.clone() for w in ws], [b.clone() for b in bufs]
    bufs_before = [b.clone() for b in ref_b]  # (ref_b is updated in place)
    g2 = [rand(s, torch.float32, gen) for s in SHAPES]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    with torch.no_grad():
        backup = perturb_(ws, gs, ms, 0.3, backend="torch")
        ref_backup = perturb_(ref_w, gs, ms, 0.3, backend="torch")
        torch_backup = perturb_(torch_w, gs, ms, 0.3, backend="torch")
        out = restore_sgd_step_(ws, g2, bufs, backup, backend=backend, **hyper)
        ref = restore_sgd_step_(ref_w, g2, ref_b, ref_backup, backend="torch", **hyper)
        restore_sgd_step_(torch_w, g2, torch_b, torch_backup, backend="torch", **hyper)
    eps32, eps16 = torch.finfo(torch.float32).eps, torch.finfo(torch.float16).eps
    for i, (w, r, b, rb) in enumerate(zip(ws, ref_w, out, ref)):
        assert b.dtype == bufs[i].dtype and b.data_ptr() == bufs[i].data_ptr()  # updated in place
        tol = dict(rtol=torch.finfo(b.dtype).eps, atol=1e-3 if b.dtype == torch.float16 else 1e-6)
        torch.testing.assert_close(b, rb.to(b.dtype), **tol)
        if b.dtype == torch.float32:
            # the fp32 reference's math, bit for bit (a fused multiply-add where torch's SGD has
            # one: within an ulp where the interpreter does not fuse)
            fused = backend != "triton" or interpreter_fma_is_fused()
            torch.testing.assert_close(w, r, rtol=0 if fused else 2 * eps32, atol=0 if fused else 4 * eps32)
        else:
            # torch's ops in the buffer's fp16, as the reference backend runs them: it rounds
            # momentum * buf and then the new buffer to fp16 (half an fp16 ulp of each, under
            # eps16 * max|buf| together) and steps the weight with that buffer; so the weights
            # differ from the fp32 reference's by lr times that, plus the fp32 rounding of each
            # weight (eps32 |w|)
            assert torch.equal(w, torch_w[i]) and torch.equal(b, torch_b[i]), f"params[{i}] / buffers[{i}]"
            atol = hyper["lr"] * eps16 * max(_absmax(bufs_before[i]), _absmax(rb))
            torch.testing.assert_close(w, r, rtol=eps32, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_dtype,g_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                             (torch.float16, torch.float32)])
def test_gradients_of_another_dtype_than_their_weight_step_as_torchs(backend, w_dtype, g_dtype, gen):
    """A gradient of another dtype than its weight (``Tensor.grad_dtype`` allows it): torch
    promotes, so an fp64 gradient makes an fp32 weight's step fp64; every backend's step is the
    reference's, bit for bit (a kernel that read the gradient as the weight's dtype, or did the
    weight's dtype's math, differed in ~40% of the entries)."""
    ws, _, ms, bufs = _inputs(w_dtype, gen, True)
    gs = [rand(s, g_dtype, gen) for s in SHAPES]
    g2 = [rand(s, g_dtype, gen) for s in SHAPES]
    bufs = [None if b is None else b.to(g_dtype) for b in bufs]  # (torch's buffer: a clone of the gradient)
    ref_w, ref_b = [w.clone() for w in ws], [None if b is None else b.clone() for b in bufs]
    hyper = dict(lr=0.7, momentum=0.9, weight_decay=0.3)
    with torch.no_grad():
        backup = perturb_(ws, gs, ms, 0.3, backend="torch")
        ref_backup = perturb_(ref_w, gs, ms, 0.3, backend="torch")
        out = restore_sgd_step_(ws, g2, bufs, backup, backend=backend, **hyper)
        ref = restore_sgd_step_(ref_w, g2, ref_b, ref_backup, backend="torch", **hyper)
    for i in range(len(SHAPES)):
        assert torch.equal(ws[i], ref_w[i]), f"params[{i}]"
        assert torch.equal(out[i], ref[i]), f"buffers[{i}]"
