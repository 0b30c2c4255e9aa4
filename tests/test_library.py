"""One identity per op: every public op is ``torch.ops.ssam_kernels.<op>``, with CPU and CUDA
kernels that pick among its backends, a fake implementation, torch.library's own checks
(schema and its mutations, fake tensors, autograd registration, AOT tracing) passing on each
backend, and the dispatcher, ``torch.compile`` and ``FlopCounterMode`` seeing one op whichever
kernel computes it."""

import contextlib
import os

import pytest
import torch
from helpers import BACKENDS, BACKENDS_WITH_EXT, RecordOps, assert_tensors_equal, rand, rand_mask
from torch.utils.flop_counter import FlopCounterMode

import ssam_kernels as sk
from ssam_kernels._library import TABLES

OPS = ["grad_norm", "perturb_", "restore_", "restore_sgd_step_", "nm_mask", "topk_mask", "compress_24",
       "decompress_24", "mvue24", "masked_weight_grad"]


def _samples(gen) -> dict:
    """Schema arguments (without ``backend``) per op."""
    ws = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    gs = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    mask = sk.pack_mask(rand_mask((37,), generator=gen))
    values = [ws[0][mask.to_bool()].clone(), ws[1].clone()]
    w24 = rand((64, 64), torch.float16, gen)
    x24 = w24 * sk.nm_mask(w24, 2, 4, backend="torch")
    packed, meta = sk.compress_24(x24, backend="torch")
    dy, x = rand((16, 8), generator=gen), rand((16, 12), generator=gen)
    wmask = rand_mask((8, 12), 0.5, gen)
    order, masked = sk.ops.bitmask.rows_first(wmask)
    return {
        "grad_norm": (gs, [mask.bits, None]),
        "perturb_": ([w.clone() for w in ws], gs, [mask.bits, None], sk.ops.perturb.backup_buffers(ws, [mask, None], [mask.count_int(), -1]),
                     0.1, None),
        "restore_": ([w.clone() for w in ws], values, [mask.bits, None]),
        "restore_sgd_step_": ([w.clone() for w in ws], gs, [torch.empty(37), torch.zeros(5, 16)], [True, False], values,
                              [mask.bits, None], 0.1, 0.9, 0.0, 0.01, False, False),
        "nm_mask": (rand((6, 13), generator=gen), 2, 4, True),
        "topk_mask": ([rand((7, 3), generator=gen), rand((11,), generator=gen)], 9),
        "compress_24": (x24, True),
        "decompress_24": (packed, meta),
        "mvue24": (rand((6, 16), generator=gen), None, 5),
        "masked_weight_grad": (dy, x, sk.pack_mask(wmask).bits, order, masked, torch.empty(8, 12)),
    }


def _op(name):
    return getattr(torch.ops.ssam_kernels, name).default


def _with_backends(names):
    """(name, backend) params for each backend an op has (see ``backend_info()``): no case is
    collected that could never run."""
    return [pytest.param(name, b.values[0], marks=b.marks, id=f"{name}-{b.values[0]}")
            for name in names for b in BACKENDS_WITH_EXT if b.values[0] in TABLES[name].impls]


@pytest.mark.cpu
@pytest.mark.parametrize("name", OPS)
def test_every_public_op_is_one_dispatcher_op(name):
    qualname = f"ssam_kernels::{name}"
    for key in ("CPU", "CUDA", "Meta", "MPS", "XPU", "PrivateUse1"):  # other devices: the reference
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (name, key)
    assert name in TABLES and "torch" in TABLES[name].impls
    assert _op(name)._schema.arguments[-1].name == "backend"
    assert set(OPS) | {"sam_step"} == set(TABLES)  # no op outside the list (a new one gets its checks here)


@pytest.mark.parametrize("name, backend", _with_backends(OPS))
def test_opcheck(name, backend, gen):
    result = torch.library.opcheck(_op(name), (*_samples(gen)[name], backend))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("name, backend", _with_backends(["perturb_", "restore_", "restore_sgd_step_"]))
def test_a_mutating_op_moves_the_version_counters_of_what_it_writes(name, backend, gen):
    """Kernels writing through addresses are invisible to autograd; the op bumps the version
    counter of every tensor its schema writes (``Tensor(a!)``), as torch's in-place ops do."""
    args = _samples(gen)[name]
    arguments = _op(name)._schema.arguments
    written = [i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write]
    assert written and all(isinstance(args[i], list) for i in written)
    before = {i: [t._version for t in args[i]] for i in written}
    _op(name)(*args, backend)
    for i in written:
        assert all(t._version > v for t, v in zip(args[i], before[i])), arguments[i].name


@pytest.mark.cpu
@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=pytest.mark.skipif(
    "ext" not in TABLES["perturb_"].impls or not sk.backend_info()["extension"], reason="ssam_kernels._C not built"))])
def test_autograd_catches_a_saved_weight_that_perturb_wrote(backend):
    w = torch.randn(10, requires_grad=True)
    loss = (w * w).sum()  # saves w for the backward
    with torch.no_grad():
        backup = sk.perturb_([w], [torch.randn(10)], None, 0.1, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.no_grad():
        sk.restore_([w], backup, backend=backend)


@pytest.mark.cpu
def test_the_dispatcher_sees_one_op_whichever_kernel_runs(gen):
    """The reference's aten ops, the C++ kernel and a Triton launch alike are one
    ``ssam_kernels`` op to a dispatch mode (what torch.compile and profilers key on)."""
    t = [rand((100,), generator=gen), rand((3, 5), generator=gen)]
    for backend in ("torch", sk.auto_backend("grad_norm")):
        with RecordOps() as seen:
            sk.grad_norm(t, backend=backend)
        assert seen.ops == [torch.ops.ssam_kernels.grad_norm.default], backend


@pytest.mark.cpu
def test_a_step_traces_whole_under_torch_compile(gen):
    """norm, perturb, restore in one graph (fullgraph: no break at any op)."""
    ws = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    gs = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    mask = sk.pack_mask(rand_mask((37,), generator=gen))
    originals = [w.clone() for w in ws]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def cycle(ws, gs, bits):
        norm = torch.ops.ssam_kernels.grad_norm(gs, [bits, None], "auto")
        values = [torch.empty(mask.count_int()), torch.empty(5, 16)]
        torch.ops.ssam_kernels.perturb_(ws, gs, [bits, None], values, 0.0, (0.05 / norm).to(ws[0].dtype), "auto")
        moved = [w.clone() for w in ws]
        torch.ops.ssam_kernels.restore_(ws, values, [bits, None], "auto")
        return norm, moved

    norm, moved = cycle(ws, gs, mask.bits)
    torch.testing.assert_close(norm, sk.grad_norm(gs, [mask, None], backend="torch"))
    assert_tensors_equal(ws, originals)  # restored exactly
    assert not torch.equal(moved[1], originals[1])  # and perturbed in between


@pytest.mark.cpu
def test_public_functions_trace_whole_under_torch_compile(gen):
    """The public functions' argument checks run as Python under torch.compile (Dynamo cannot
    trace ssam_kernels._host's C loops, which check them in eager mode): no graph break."""
    gs = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    mask = sk.pack_mask(rand_mask((37,), generator=gen))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def norm(gs, mask):
        return sk.grad_norm(gs, [mask, None])

    torch.testing.assert_close(norm(gs, mask), sk.grad_norm(gs, [mask, None], backend="torch"))


@pytest.mark.cpu
def test_numbers_that_change_between_calls_trace_whole_under_torch_compile(gen):
    """A float argument that changes between calls (a scale, a scheduled learning rate) is
    traced as a symbol on the recompile: the argument checks take it without reading it
    (math.isfinite of a symbolic float broke the graph). Same results as eager."""
    ws, gs, g2 = ([rand((37,), generator=gen)] for _ in range(3))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ws, gs, g2, scale, lr):
        backup = sk.perturb_(ws, gs, None, scale)
        return sk.restore_sgd_step_(ws, g2, [None], backup, lr=lr, momentum=0.9)

    eager = [w.clone() for w in ws]
    with torch.no_grad():
        for scale, lr in ((0.1, 0.1), (0.2, 0.05), (0.3, 0.01)):
            step(ws, gs, g2, scale, lr)
            backup = sk.perturb_(eager, gs, None, scale, backend="torch")
            sk.restore_sgd_step_(eager, g2, [None], backup, lr=lr, momentum=0.9, backend="torch")
            torch.testing.assert_close(ws, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.cpu
@pytest.mark.parametrize("scale", ["number", "cpu tensor"])
def test_public_perturb_and_restore_trace_whole_under_torch_compile(gen, scale):
    """A CPU scale tensor is read on the host in eager mode; a traced graph cannot read it there
    (a data-dependent float), so it goes to the params' device. A mask whose count is not known
    yet sizes its backup by a data-dependent symbol. Same results as eager, no graph break."""
    ws = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    gs = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    keep = rand_mask((37,), generator=gen)
    s = 0.05 if scale == "number" else torch.tensor(0.05, dtype=torch.float64)
    originals = [w.clone() for w in ws]
    eager = [w.clone() for w in ws]
    eager_backup = sk.perturb_(eager, gs, [keep, None], s, backend="torch")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def cycle(ws, gs, mask, s):
        backup = sk.perturb_(ws, gs, [mask, None], s)
        moved = [w.clone() for w in ws]
        sk.restore_(ws, backup)
        return moved, backup.values

    mask = sk.pack_mask(keep)
    assert "_count" not in mask.__dict__  # the count is found inside the graph
    moved, values = cycle(ws, gs, mask, s)
    assert_tensors_equal(moved, eager)
    assert_tensors_equal(values, eager_backup.values)
    assert_tensors_equal(ws, originals)
    assert mask.count_int() == int(keep.sum())


@pytest.mark.cpu
def test_flop_counting_sees_the_gemm_op_whichever_backend(gen):
    dy, x = rand((16, 8), generator=gen), rand((16, 12), generator=gen)
    mask = rand_mask((8, 12), 0.5, gen)
    mask[:3] = False
    rows = int(mask.any(1).sum())
    with FlopCounterMode(display=False) as counter:
        sk.masked_weight_grad(dy, x, mask, backend="torch")
    assert counter.get_total_flops() == 2 * 16 * rows * 12


@pytest.mark.cpu
def test_a_bad_backend_is_refused_before_or_at_dispatch():
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.nm_mask(torch.randn(8), 2, 4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be a str"):
        sk.nm_mask(torch.randn(8), 2, 4, backend=None)
    with pytest.raises(sk.BackendUnavailableError, match="no 'ext' implementation"):
        sk.mvue24(torch.randn(8), seed=1, backend="ext")


def _raw_operands(gen, dtype=torch.float32):
    """Good raw-op operands: a masked tensor (37 elements, packed bits) and an unmasked one."""
    ws = [rand((37,), dtype, gen), rand((5, 16), dtype, gen)]
    gs = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    mask = sk.pack_mask(rand_mask((37,), generator=gen))
    return ws, gs, mask, sk.ops.perturb.backup_buffers(ws, [mask, None], [mask.count_int(), -1])


def _bad_raw_calls(gen):
    """(what is wrong, call) pairs: each call hands a raw op operands its kernels would index
    outside of, and each must raise before anything is written."""
    ws, gs, mask, values = _raw_operands(gen)
    bits = [mask.bits, None]
    P, R, S = (torch.ops.ssam_kernels.perturb_, torch.ops.ssam_kernels.restore_,
               torch.ops.ssam_kernels.restore_sgd_step_)
    count = mask.count_int()

    def sgd_backend(b):
        return "auto" if b == "ext" else b  # restore_sgd_step_ has no extension kernel

    return [
        ("grads has 1 entries", lambda b: P(ws, gs[:1], bits, values, 0.1, None, b)),
        (r"grads\[1\] has 79 elements", lambda b: P(ws, [gs[0], gs[1].flatten()[:79]], bits, values, 0.1, None, b)),
        (r"grads\[0\] must be a floating-point", lambda b: P(ws, [gs[0].int(), gs[1]], bits, values, 0.1, None, b)),
        (r"values\[1\] holds 79 values; params\[1\] is unmasked",
         lambda b: P(ws, gs, bits, [values[0], torch.empty(79)], 0.1, None, b)),
        (r"values\[0\] is torch.float64", lambda b: P(ws, gs, bits, [values[0].double(), values[1]], 0.1, None, b)),
        (r"values\[0\] holds 38 values, more than", lambda b: P(ws, gs, bits, [torch.empty(38), values[1]], 0.1, None,
                                                                  b)),
        (r"values\[0\] must be 1-D", lambda b: P(ws, gs, bits, [torch.empty(2, 3), values[1]], 0.1, None, b)),
        (r"masks\[0\] must be the 5 contiguous bytes \(1-D\)",
         lambda b: P(ws, gs, [mask.bits.reshape(1, 5), None], values, 0.1, None, b)),
        (r"masks\[0\] must be the 5 contiguous bytes",
         lambda b: P(ws, gs, [mask.bits[:4], None], values, 0.1, None, b)),
        (r"masks\[0\] must be the 5 contiguous bytes",
         lambda b: P(ws, gs, [torch.zeros(10, dtype=torch.uint8)[::2], None], values, 0.1, None, b)),
        (r"masks\[0\] has 36 elements", lambda b: P(ws, gs, [torch.ones(36, dtype=torch.bool), None],
                                                    [torch.empty(36), values[1]], 0.1, None, b)),
        (r"masks\[1\] must be None, a bool tensor or uint8", lambda b: P(ws, gs, [mask.bits, torch.ones(5, 16)],
                                                                        [values[0], torch.empty(5)], 0.1, None, b)),
        ("scale_tensor must be one floating-point value",
         lambda b: P(ws, gs, bits, values, 0.0, torch.ones(2), b)),
        (r"params\[0\] must be a floating-point", lambda b: P([torch.zeros(37, dtype=torch.int32), ws[1]], gs, bits,
                                                              values, 0.1, None, b)),
        ("masks has 1 entries", lambda b: R(ws, values, bits[:1], b)),
        # (with no tensor at all the dispatcher itself refuses: it has no device to dispatch on)
        ("params must not be empty", lambda b: P([], [], [], [], 0.0, torch.ones(()), b)),
        (r"values\[1\] holds 81 values; params\[1\] is unmasked",
         lambda b: R(ws, [torch.empty(count), torch.empty(81)], bits, b)),
        (r"momentum_buffers\[1\] has 5 elements",
         lambda b: S(ws, gs, [torch.empty(37), torch.zeros(5)], [True, False], values, bits, 0.1, 0.9, 0.0, 0.0,
                     False, False, sgd_backend(b))),
        ("fresh has 1 entries",
         lambda b: S(ws, gs, [torch.empty(37), torch.zeros(5, 16)], [True], values, bits, 0.1, 0.9, 0.0, 0.0, False,
                     False, sgd_backend(b))),
    ], ws


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
@pytest.mark.parametrize("host_loop", ["c", "python"])
def test_raw_list_ops_refuse_operands_their_kernels_would_overrun(gen, backend, host_loop, monkeypatch):
    """Called directly, perturb_, restore_ and restore_sgd_step_ check what their kernels index
    by (in C where ssam_kernels._host is built, else in Python: the same rules and messages)."""
    from ssam_kernels import _host_loops

    if host_loop == "python":
        monkeypatch.setattr(_host_loops, "_host", None)
    elif _host_loops._host is None:
        pytest.skip("ssam_kernels._host not built")
    calls, ws = _bad_raw_calls(gen)
    before = [w.clone() for w in ws]
    for what, call in calls:
        with pytest.raises((ValueError, TypeError), match=what):
            call(backend)
        assert_tensors_equal(ws, before, f"weights after the refused call ({what}): nothing written")


def _bad_raw_array_calls(gen):
    """(what is wrong, op, arguments) for the raw ops of whole arrays: each hands a kernel an
    operand it would index past (transposed, short, misshaped)."""
    ops = torch.ops.ssam_kernels
    x = rand((8, 16), generator=gen)
    half = rand((64, 32), torch.float16, gen)
    values, meta = sk.compress_24(half * sk.nm_mask(half, 2, 4))
    dy, xs = rand((5, 4), generator=gen), rand((5, 3), generator=gen)
    bits, order = torch.zeros(2, dtype=torch.uint8), torch.arange(4, dtype=torch.int32)
    return [
        ("mvue24: x must be contiguous", ops.mvue24, (x.t(), None, 1)),
        ("mvue24: x's last dim must be a multiple of 4", ops.mvue24, (rand((3, 6), generator=gen), None, 1)),
        (r"mvue24: uniforms must have shape \[8, 4\]", ops.mvue24, (x, torch.rand(8, 3), None)),
        ("mvue24: uniforms must be contiguous", ops.mvue24, (x, torch.rand(4, 8).t(), None)),
        ("mvue24: give exactly one", ops.mvue24, (x, None, None)),
        ("compress_24: x must be contiguous", ops.compress_24, (half.t().contiguous().t(), True)),
        ("compress_24: x gives a dense shape", ops.compress_24, (half[:48].contiguous(), True)),
        ("compress_24: x must have shape", ops.compress_24, (half.reshape(-1), True)),
        (r"decompress_24: meta must have shape \[64, 2\]", ops.decompress_24, (values, meta[:, :1].contiguous())),
        ("decompress_24: values must be contiguous", ops.decompress_24, (values.t().contiguous().t(), meta)),
        ("decompress_24: meta must be a tensor of dtype torch.int16", ops.decompress_24, (values, meta.int())),
        ("masked_weight_grad: out must be contiguous", ops.masked_weight_grad,
         (dy, xs, bits, order, 4, torch.empty(3, 4).t())),
        (r"masked_weight_grad: input must have shape \[5, \*\]", ops.masked_weight_grad,
         (dy, xs[:4], bits, order, 4, torch.empty(4, 3))),
        (r"masked_weight_grad: bits must have shape \[2\]", ops.masked_weight_grad,
         (dy, xs, bits[:1], order, 4, torch.empty(4, 3))),
        (r"masked_weight_grad: row_order must have shape \[4\]", ops.masked_weight_grad,
         (dy, xs, bits, order[:3], 3, torch.empty(4, 3))),
        (r"masked_weight_grad: masked_rows must be in \[0, 4\]", ops.masked_weight_grad,
         (dy, xs, bits, order, 5, torch.empty(4, 3))),
        ("masked_weight_grad: input must be a tensor of dtype torch.float32", ops.masked_weight_grad,
         (dy, xs.double(), bits, order, 4, torch.empty(4, 3))),
    ]


@pytest.mark.parametrize("backend", BACKENDS_WITH_EXT)
def test_raw_array_ops_refuse_operands_their_kernels_would_overrun(gen, backend):
    """Called directly, mvue24, compress_24, decompress_24 and masked_weight_grad check the
    shapes and layouts their kernels index by (the public functions make them so): a
    transposed operand came out wrong on CPU and would be read or written out of bounds on a
    GPU."""
    for what, op, args in _bad_raw_array_calls(gen):
        chosen = backend if backend in TABLES[op._qualified_op_name.split("::")[1]].impls else "auto"
        with pytest.raises((ValueError, TypeError), match=what):
            op(*args, chosen)


_CUDA_DEVICE = os.environ.get("SSAM_TEST_CUDA_DEVICE", "cuda")
# (backend, device): Triton interpreted on CPU; on a GPU, Triton's and the CUDA extension's kernels
_BOUND_CASES = [pytest.param("triton", "cpu", marks=BACKENDS[1].marks, id="triton-interpreted")] + [
    pytest.param(b, _CUDA_DEVICE, marks=[pytest.mark.cuda, pytest.mark.memcheck], id=f"{b}-cuda")
    for b in ("triton", "ext")]


@pytest.mark.parametrize("op", ["perturb_", "restore_", "restore_sgd_step_"])
@pytest.mark.parametrize("backend,device", _BOUND_CASES)
def test_raw_list_op_kernels_never_touch_a_backup_past_its_end(gen, op, backend, device):
    """A masked backup smaller than its mask's count (which the op cannot know without reading
    the device) is neither written nor read past its end by the Triton kernels: the values after
    it, poisoned, stay as they were, and the positions without a slot are left alone, so perturb_
    then restore_ still gives the weights back bit for bit. The extension refuses it."""
    if backend == "ext" and op == "restore_sgd_step_":
        backend = "triton"  # no extension kernel for it: auto's cuda choice
    ws = [rand((3 * 8192 + 77,), generator=gen, device=device)]  # several chunks and a tail
    gs = [rand(ws[0].shape, generator=gen, device=device)]
    mask = sk.pack_mask(rand_mask(ws[0].shape, generator=gen, device=device))
    count = mask.count_int()
    short = count // 2  # the backup holds the first half of the masked values only
    room = torch.full((count + 64,), 1234.5, device=device)
    values = [room[:short]]
    original = ws[0].clone()
    first = torch.nonzero(mask.to_bool()).flatten()[:short]  # the positions with a slot
    ops = torch.ops.ssam_kernels
    if backend == "ext":  # the extension counts the bits (on CUDA once per mask version) and refuses
        with pytest.raises(RuntimeError, match="holds"):
            if op == "perturb_":
                ops.perturb_(ws, gs, [mask.bits], values, 0.25, None, backend)
            else:
                ops.restore_(ws, values, [mask.bits], backend)
        assert torch.equal(ws[0], original) and torch.all(room[short:] == 1234.5)
        return
    if op == "perturb_":
        ops.perturb_(ws, gs, [mask.bits], values, 0.25, None, backend)
        assert torch.equal(values[0], original[first])
        expect = original.clone()
        expect[first] = (original[first] + 0.25 * gs[0][first])
        assert torch.equal(ws[0], expect)  # no slot, no perturbation
        ops.restore_(ws, values, [mask.bits], backend)
        assert torch.equal(ws[0], original)
    else:
        values[0].copy_(rand((short,), generator=gen, device=device))
        expect = original.clone()
        expect[first] = values[0]
        if op == "restore_":
            ops.restore_(ws, values, [mask.bits], backend)
            assert torch.equal(ws[0], expect)
        else:
            ops.restore_sgd_step_(ws, gs, [], [], values, [mask.bits], 0.5, 0.0, 0.0, 0.0, False, False, backend)
            assert torch.equal(ws[0], expect - 0.5 * gs[0])  # torch's SGD: one fused multiply-add in fp32
    assert torch.all(room[short:] == 1234.5)


@pytest.mark.cpu
def test_an_older_host_module_build_falls_back_to_the_python_loops(monkeypatch):
    """A source tree whose ssam_kernels._host predates a loop (not rebuilt) must not break the
    ops: the wrapper uses the Python loops instead of failing on the missing function."""
    import importlib
    import sys
    import types

    from ssam_kernels import _host_loops

    old_build = types.ModuleType("ssam_kernels._host")
    old_build.bump_versions = old_build.grad_addresses = lambda *a: None  # no operands_misfit
    monkeypatch.setitem(sys.modules, "ssam_kernels._host", old_build)
    monkeypatch.setattr(sk, "_host", old_build, raising=False)
    try:
        importlib.reload(_host_loops)
        assert _host_loops._host is None
        w = torch.zeros(3)
        with pytest.raises(ValueError, match=r"grads\[0\] has 2 elements"):
            torch.ops.ssam_kernels.perturb_([w], [torch.zeros(2)], [None], [torch.zeros(3)], 0.1, None, "auto")
    finally:
        monkeypatch.undo()
        importlib.reload(_host_loops)


def _list_shaped(mask):
    """``mask`` with its shape as a list (what BitMask's constructor would have made a torch.Size)."""
    out = sk.BitMask.__new__(sk.BitMask)
    out.__dict__.update(bits=mask.bits, shape=list(mask.shape))
    return out


def _public_check_cases():
    """(what, call) pairs: each public argument check on one bad input (the message expected
    names it), and on good inputs (None expected)."""
    from ssam_kernels import _checks
    from ssam_kernels.ops.bitmask import check_mask_args
    from ssam_kernels.ops.perturb import PerturbBackup, check_backup

    ws = [torch.zeros(4), torch.zeros(2, 3)]
    meta = torch.empty(2, 3, device="meta")
    bits = [sk.pack_mask(torch.tensor([True, False, True, True])), sk.pack_mask(torch.ones(2, 3, dtype=torch.bool))]
    good_backup = PerturbBackup([torch.zeros(3), torch.zeros(6)], bits)
    return [
        (None, lambda: _checks.tensor_list("params", ws)),
        (None, lambda: _checks.tensor_list("idx", [torch.zeros(2, dtype=torch.long)], floating=False)),
        (r"params\[1\] must be a tensor, got int", lambda: _checks.tensor_list("params", [ws[0], 3])),
        (r"params\[1\] must be a floating-point", lambda: _checks.tensor_list("params", [ws[0], torch.zeros(2).long()])),
        (None, lambda: _checks.same_shapes("grads", [torch.ones(4), torch.ones(2, 3)], "params", ws)),
        (r"grads\[1\] has shape \(3, 2\), params\[1\] has \(2, 3\)",
         lambda: _checks.same_shapes("grads", [torch.ones(4), torch.ones(3, 2)], "params", ws)),
        (r"grads\[1\] is on meta, params\[1\] is on cpu", lambda: _checks.same_shapes("grads", [ws[0], meta], "params", ws)),
        (None, lambda: _checks.mask_list([None, torch.ones(2, 3, dtype=torch.bool)], ws, "params")),
        (None, lambda: _checks.mask_list(bits, ws, "params")),
        (r"masks\[1\] has shape \(3, 2\), params\[1\] has \(2, 3\)",
         lambda: _checks.mask_list([None, torch.ones(3, 2, dtype=torch.bool)], ws, "params")),
        (r"masks\[0\] has shape \(2, 2\), params\[0\] has \(4,\)",
         lambda: _checks.mask_list([sk.pack_mask(torch.ones(2, 2, dtype=torch.bool)), None], ws, "params")),
        (r"masks\[1\] is on meta", lambda: _checks.mask_list([None, torch.ones(2, 3, dtype=torch.bool, device="meta")],
                                                            ws, "params")),
        (r"masks\[1\] is on meta", lambda: _checks.mask_list([None, sk.BitMask(torch.zeros(1, dtype=torch.uint8,
                                                                                            device="meta"), (2, 3))],
                                                            ws, "params")),
        (r"masks\[0\] must be a bool tensor, a BitMask or None, got a torch.float32 tensor",
         lambda: _checks.mask_list([torch.ones(4), None], ws, "params")),
        (r"masks\[1\] must be a bool tensor, a BitMask or None, got int", lambda: _checks.mask_list([None, 1], ws, "params")),
        (None, lambda: check_backup(ws, good_backup)),
        (r"backup.values\[1\] must be a tensor", lambda: check_backup(ws, PerturbBackup([torch.zeros(3), 6], bits))),
        (r"backup.values\[0\] is torch.float64", lambda: check_backup(ws, PerturbBackup(
            [torch.zeros(3, dtype=torch.float64), torch.zeros(6)], bits))),
        (r"backup.values\[1\] has shape \(6,\), params\[1\] has \(2, 3\)",
         lambda: check_backup(ws, PerturbBackup([torch.zeros(3), torch.zeros(6)], [bits[0], None]))),
        (r"backup.values\[1\] must be 1-D", lambda: check_backup(ws, PerturbBackup([torch.zeros(3), torch.zeros(2, 3)],
                                                                                   bits))),
        (r"backup.values\[0\] holds 4 values but masks\[0\] selects 3",
         lambda: check_backup(ws, PerturbBackup([torch.zeros(4), torch.zeros(6)], bits))),
        (None, lambda: check_mask_args([bits[0].bits, None], ws)),
        (None, lambda: check_mask_args([None, torch.ones(2, 3, dtype=torch.bool)], ws)),
        (r"masks has 1 entries but the tensors it masks 2", lambda: check_mask_args([bits[0].bits], ws)),
        (None, lambda: _checks.mask_list([_list_shaped(bits[0]), None], ws, "params")),  # a shape given as a list
        (r"grads\[0\] has shape", lambda: _checks.same_shapes(  # sizes C cannot read: Python decides
            "grads", [torch.nested.nested_tensor([torch.zeros(3), torch.zeros(2)], layout=torch.jagged)], "params",
            [torch.zeros(2, 3)])),
        (r"BitMask.bits has 2 bytes; a mask of shape \(4,\) needs 1",
         lambda: check_mask_args([torch.zeros(2, dtype=torch.uint8), None], ws)),
        (r"BitMask.bits must be a contiguous 1-D tensor",
         lambda: check_mask_args([None, torch.zeros(1, 1, dtype=torch.uint8)], ws)),
        (None, lambda: sk.restore_sgd_step_([torch.zeros(4), torch.zeros(2, 3)], [torch.ones(4), torch.ones(2, 3)],
                                            [None, torch.zeros(2, 3)], PerturbBackup(
                                                [torch.zeros(3), torch.zeros(6)], bits), lr=0.1, momentum=0.9)),
        (r"momentum_buffers\[1\] must be None or a tensor shaped like params\[1\] on its device",
         lambda: sk.restore_sgd_step_(ws, ws, [None, torch.zeros(3, 2)], good_backup, lr=0.1, momentum=0.9)),
        (r"momentum_buffers\[1\] must be None or a tensor", lambda: sk.restore_sgd_step_(
            ws, ws, [torch.zeros(4), 5], good_backup, lr=0.1, momentum=0.9)),
        (r"momentum_buffers\[1\] must be None or a tensor", lambda: sk.restore_sgd_step_(
            ws, ws, [torch.zeros(4), meta], good_backup, lr=0.1, momentum=0.9)),
        (None, lambda: _refuse_if(_checks.spans_devices(ws), "spans devices")),
        (r"spans devices", lambda: _refuse_if(_checks.spans_devices([ws[0], ws[1], meta]), "spans devices")),
        (r"spans devices", lambda: _refuse_if(_checks.spans_devices([meta, ws[0]]), "spans devices")),
    ]


def _refuse_if(condition: bool, what: str) -> None:
    if condition:
        raise ValueError(what)


@pytest.mark.cpu
@pytest.mark.parametrize("host_loop", ["c", "python"])
def test_public_argument_checks_say_the_same_from_the_c_loops_and_python(host_loop, monkeypatch):
    """The public ops' per-tensor argument checks (tensor lists, shapes, masks, backups, mask
    bits) find a misfit in C where ssam_kernels._host is built and explain it in Python: the
    same accepted inputs and the same errors as the Python loops alone."""
    from ssam_kernels import _host_loops

    if host_loop == "python":
        monkeypatch.setattr(_host_loops, "_host", None)
    elif _host_loops._host is None:
        pytest.skip("ssam_kernels._host not built")
    for what, call in _public_check_cases():
        if what is None:
            call()
        else:
            with pytest.raises((ValueError, TypeError), match=what):
                call()


class _DeviceRecorder:
    """Stands in for ``torch.cuda.device``: records the device index each context makes current."""

    def __init__(self):
        self.entered = []

    def __call__(self, index):
        recorder = self

        class _Context:
            def __enter__(self):
                recorder.entered.append(index)

            def __exit__(self, *exc):
                return False

        return _Context()


@pytest.mark.cpu
def test_a_launch_makes_the_tensors_cuda_device_current(monkeypatch):
    """Triton launches on the current CUDA device: ``on_device`` switches to the tensors' device
    where another one is current, and only there (checked without a second GPU by standing in
    for torch.cuda's current device)."""
    from ssam_kernels import _backend

    recorder = _DeviceRecorder()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", recorder)
    for device in ("cuda:1", "cuda:0", "cuda", "cpu"):
        with _backend.on_device(torch.device(device)):
            pass
    assert recorder.entered == [1]
    # the plan's launch context: grad mode off and the device switched, each only where needed
    from ssam_kernels.ops.sam_step import _launching

    recorder.entered.clear()
    for device, grad in (("cuda:1", False), ("cuda:0", False), ("cpu", True), ("cpu", False)):
        with torch.set_grad_enabled(grad), _launching(torch.device(device)):
            assert not torch.is_grad_enabled()
    assert recorder.entered == [1]


@pytest.mark.cpu
def test_the_cuda_kernels_and_the_plan_launch_on_their_tensors_device(monkeypatch, gen):
    """Every op's CUDA kernel runs inside ``on_device`` of its first tensor argument (in a list or
    not), its CPU kernel without one, and every launch of a plan inside ``on_device`` of its
    parameters' device (checked on CPU tensors by calling the CUDA kernels directly)."""
    from ssam_kernels import _library
    from ssam_kernels.ops import sam_step

    seen = []

    def recording(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_library, "on_device", recording)
    samples = _samples(gen)
    assert sorted(_library.OPS) == sorted(OPS)
    for name in OPS:
        args = samples[name]
        first = next(a if isinstance(a, torch.Tensor) else a[0] for a in args
                     if isinstance(a, torch.Tensor) or (isinstance(a, list) and isinstance(a[0], torch.Tensor)))
        for kernel_device, guarded in ((torch.device("cuda"), [first.device]), (torch.device("cpu"), [])):
            seen.clear()
            _library.OPS[name]._kernel(kernel_device, *args, "torch")
            assert seen == guarded, (name, kernel_device)

    monkeypatch.setattr(sam_step, "_launching", recording)
    params = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    seen.clear()
    plan = sam_step.SAMStepPlan(params, backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    plan.perturb([0.05])
    plan.restore()
    plan.perturb([0.05])
    plan.restore_sgd([sam_step.SGDGroup(lr=0.1)])
    plan.set_buffers([None, None])
    assert seen == [params[0].device] * 6  # made, 2 perturbs, restore, restore_sgd, set_buffers
