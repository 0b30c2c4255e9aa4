"""The compiled extension: schemas and fake implementations (torch.library.opcheck), tracing
under torch.compile, and its ops beside the other backends. The op-by-op comparisons with the
references live in test_<op>.py (backend "ext")."""

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallConvBN, assert_tensors_equal, make_closure, needs_ext, rand, rand_mask

import ssam
import ssam_kernels as sk

pytestmark = [pytest.mark.cpu, needs_ext]


def _samples(gen):
    ws = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    gs = [rand((37,), generator=gen), rand((5, 16), generator=gen)]
    bits = [sk.pack_mask(rand_mask((37,), generator=gen)), None]
    empty_backup = [ws[0].new_empty((bits[0].count_int(),)), torch.empty_like(ws[1])]
    mask = rand_mask((9, 7), generator=gen)
    w24 = rand((64, 64), torch.float16, gen)
    x24 = w24 * sk.nm_mask(w24, 2, 4)
    values, meta = sk.compress_24(x24, backend="torch")
    backup = [ws[0][bits[0].to_bool()].clone(), ws[1].clone()]
    return {
        "pack_mask": (mask,),
        "unpack_mask": (sk.pack_mask(mask).bits, mask.numel()),
        "grad_norm": (gs, [bits[0].bits, None]),
        "perturb_": ([w.clone() for w in ws], gs, [bits[0].bits, None], empty_backup, torch.tensor(0.1)),
        "restore_": ([w.clone() for w in ws], backup, [bits[0].bits, None]),
        "nm_mask": (rand((6, 13), generator=gen), 2, 4, True),
        "compress_24": (x24,),
        "decompress_24": (values, meta),
    }


@pytest.mark.parametrize("name", ["pack_mask", "unpack_mask", "grad_norm", "perturb_", "restore_", "nm_mask",
                                  "compress_24", "decompress_24"])
def test_opcheck(name, gen):
    torch.library.opcheck(getattr(torch.ops.ssam, name).default, _samples(gen)[name])


def test_opcheck_float64(gen):
    # the fake grad_norm returns float64 where a tensor is float64, as the kernel does; perturb_
    # takes a float64 scale (what a float64 norm gives the optimizer)
    ws = [torch.randn(37, generator=gen, dtype=torch.float64), rand((5, 16), generator=gen)]
    gs = [torch.randn(37, generator=gen, dtype=torch.float64), rand((5, 16), generator=gen)]
    bits = [sk.pack_mask(rand_mask((37,), generator=gen)), None]
    backup = [ws[0].new_empty((bits[0].count_int(),)), torch.empty_like(ws[1])]
    torch.library.opcheck(torch.ops.ssam.grad_norm.default, (gs, [bits[0].bits, None]))
    torch.library.opcheck(torch.ops.ssam.perturb_.default,
                          (ws, gs, [bits[0].bits, None], backup, torch.tensor(0.1, dtype=torch.float64)))


def test_pack_unpack_match_python(gen):
    mask = rand_mask((1001,), generator=gen)
    assert torch.equal(torch.ops.ssam.pack_mask(mask), sk.pack_mask(mask).bits)
    assert torch.equal(torch.ops.ssam.unpack_mask(sk.pack_mask(mask).bits, 1001), mask)


def test_traces_under_torch_compile(gen):
    scores = rand((32, 64), generator=gen)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def select(s):
        return torch.ops.ssam.nm_mask(s * 2, 2, 4, True)

    assert torch.equal(select(scores), sk.nm_mask(scores * 2, 2, 4, backend="torch"))


def test_errors_surface_as_python_errors(gen):
    w = rand((32, 32), torch.float16, gen)
    x = w * sk.nm_mask(w, 2, 4)
    x[3, 4:7] = 1.0
    x[3, 7] = 0.0
    with pytest.raises(ValueError, match="row 3, group 1"):
        sk.compress_24(x, backend="ext")
    with pytest.raises(RuntimeError, match="holds 3 values but the mask sets 16"):
        torch.ops.ssam.perturb_([torch.zeros(16)], [torch.ones(16)], [torch.full((2,), 255, dtype=torch.uint8)],
                                [torch.zeros(3)], torch.tensor(1.0))


def _direct_call_errors():
    """Direct torch.ops calls that the Python layer would have rejected: each must raise before
    touching memory (the op checks guard memory safety on their own)."""
    ops = torch.ops.ssam
    short_bits = torch.zeros(1, dtype=torch.uint8)  # 8 bits for 16 elements
    values = torch.zeros(32, 16, dtype=torch.float16)
    meta = torch.zeros(32, 2, dtype=torch.int16)
    return [
        ("masks\\[0\\] holds 1 bytes, a tensor of 16 elements needs 2", lambda: ops.grad_norm([torch.ones(16)], [short_bits])),
        ("masks\\[0\\] must be a contiguous 1-D uint8", lambda: ops.grad_norm([torch.ones(16)], [torch.zeros(2, dtype=torch.int32)])),
        ("masks\\[0\\] holds 1 bytes", lambda: ops.restore_([torch.zeros(16)], [torch.zeros(8)], [short_bits])),
        ("scale must be a tensor of one floating value", lambda: ops.perturb_(
            [torch.zeros(16)], [torch.ones(16)], [None], [torch.zeros(16)], torch.ones(2))),
        ("values must be \\[32\\*i, 16\\*j\\]", lambda: ops.decompress_24(values[:16], meta[:16])),
        ("meta must be int16 \\[32, 2\\]", lambda: ops.decompress_24(values, meta[:, :1])),
        ("meta must be int16", lambda: ops.decompress_24(values, meta.to(torch.int32))),
        ("values and meta must be 2-D", lambda: ops.decompress_24(values.reshape(-1), meta)),
    ]


@pytest.mark.parametrize("case", range(len(_direct_call_errors())))
def test_direct_op_calls_check_their_arguments(case):
    message, call = _direct_call_errors()[case]
    with pytest.raises(RuntimeError, match=message):
        call()


def test_direct_2_4_op_calls_take_half_types_only():
    with pytest.raises(TypeError, match="compress_24: x must be float16 or bfloat16, got Float"):
        torch.ops.ssam.compress_24(torch.zeros(32, 32), True)
    with pytest.raises(TypeError, match="decompress_24: values must be float16 or bfloat16, got Float"):
        torch.ops.ssam.decompress_24(torch.zeros(32, 16), torch.zeros(32, 2, dtype=torch.int16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ext_takes_float64_like_the_reference(dtype, gen):
    ws = [rand((1000,), dtype, gen), rand((7, 9), dtype, gen)]
    gs = [rand((1000,), dtype, gen), rand((7, 9), dtype, gen)]
    masks = [rand_mask((1000,), generator=gen), None]
    # accumulation (fp32, float64 for float64) in another order than the reference's: within a
    # few fp32 ulps at least (test_grad_norm checks float64 tightly)
    torch.testing.assert_close(sk.grad_norm(gs, masks, backend="ext"), sk.grad_norm(gs, masks, backend="torch"),
                               rtol=1e-6, atol=0)
    ref, orig = [w.clone() for w in ws], [w.clone() for w in ws]
    backup = sk.perturb_(ws, gs, masks, 0.25, backend="ext")
    sk.perturb_(ref, gs, masks, 0.25, backend="torch")
    assert_tensors_equal(ws, ref)
    sk.restore_(ws, backup, backend="ext")
    assert_tensors_equal(ws, orig)
    assert torch.equal(sk.nm_mask(gs[1], 2, 4, backend="ext"), sk.nm_mask(gs[1], 2, 4, backend="torch"))


def test_three_backends_agree_in_the_optimizer(gen, monkeypatch):
    x, y = torch.randn(32, 2, 4, 4, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    results = {}
    for backend in ("torch", "ext") + (("triton",) if _triton_on_cpu() else ()):
        monkeypatch.setenv("SSAM_BACKEND", backend)
        torch.manual_seed(0)
        model = SmallConvBN()
        opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, drop_rate=0.5, T_end=5, lr=0.1,
                         momentum=0.9, fuse_sgd=False, seed=0)
        for epoch in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(make_closure(model, x, y, F.cross_entropy), epoch=epoch, batch_idx=0)
        results[backend] = [p.detach().clone() for p in model.parameters()]
    # three steps of fp32 math whose norms sum in another order per backend: a few ulps apart
    assert len(results) >= 2
    for backend, params in results.items():
        if backend != "torch":
            for a, b in zip(params, results["torch"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=backend)


def _triton_on_cpu():
    from helpers import TRITON_ON_CPU

    return TRITON_ON_CPU
