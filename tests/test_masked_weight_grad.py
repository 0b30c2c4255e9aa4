import pytest
import torch
from helpers import BACKENDS, GridRecorder, backend_dtypes, needs_interpreter, rand, rand_mask
from torch.utils.flop_counter import FlopCounterMode

from ssam_kernels import BackendUnavailableError, grad_norm, masked_weight_grad, pack_mask

# (rtol, atol per unit of sqrt(tokens)) of an fp32 result against the float64 oracle, by
# (backend, input dtype). Triton accumulates in fp32 from exact products (an fp16 or bf16 product
# has 22 or 16 significant bits: exact in fp32), so every input dtype has fp32's error: sums of
# the same products in another order. The reference multiplies in the inputs' dtype: each entry
# of dYᵀX is rounded to fp16/bf16 (half an ulp, 2**-11 or 2**-8 of it) before the fp32 out takes
# it, so it gets that dtype's error with room to spare.
FP32_TOL = (1e-5, 1e-5)
TOL = {("triton", torch.float32): FP32_TOL, ("triton", torch.float16): FP32_TOL, ("triton", torch.bfloat16): FP32_TOL,
       ("torch", torch.float32): FP32_TOL, ("torch", torch.float16): (2e-3, 2e-3),
       ("torch", torch.bfloat16): (1.6e-2, 1.6e-2)}
# a result in fp16/bf16 is rounded once more, from the fp32 sum: half an ulp, relative
ROUNDING = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}


def _tolerance(backend, dtype, out_dtype, tokens):
    """(rtol, atol) of a result in ``out_dtype`` from ``dtype`` inputs summed over ``tokens``: an
    entry sums ``tokens`` unit-variance products, so its size (and error) grows as sqrt(tokens)."""
    rtol, atol = TOL[backend, dtype]
    return rtol + ROUNDING[out_dtype], atol * tokens**0.5

SHAPES = [  # (leading dims, out, in)
    ((1,), 1, 1),
    ((3,), 3, 5),
    ((2, 7), 70, 45),   # ragged tiles in every dim
    ((33,), 64, 96),
]


def _oracle(dy, x, mask):
    full = dy.reshape(-1, dy.shape[-1]).double().t() @ x.reshape(-1, x.shape[-1]).double()
    return full * mask


@pytest.mark.parametrize("backend,dtype", backend_dtypes([torch.float32, torch.float16, torch.bfloat16]))
@pytest.mark.parametrize("lead,out_f,in_f", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("empty_rows", ["first_half", "scattered", "none"])
def test_equals_masked_dense_gradient(backend, dtype, lead, out_f, in_f, packed, empty_rows, gen):
    dy = rand(lead + (out_f,), dtype, gen)
    x = rand(lead + (in_f,), dtype, gen)
    mask = rand_mask((out_f, in_f), 0.3, gen)
    # rows without a masked entry: skipped (a block of them) or gathered around (scattered);
    # they must still come out 0
    if empty_rows == "first_half":
        mask[: out_f // 2] = False
    elif empty_rows == "scattered":
        mask[torch.rand(out_f, generator=gen) < 0.6] = False
    else:
        mask[:, 0] = True
    m = pack_mask(mask) if packed else mask
    expected = _oracle(dy, x, mask)
    tokens = dy.numel() // out_f
    for out_dtype in dict.fromkeys([torch.float32, dtype]):  # fp32, and the inputs' own dtype
        out = torch.full((out_f, in_f), float("nan"), dtype=out_dtype)  # poisoned
        res = masked_weight_grad(dy, x, m, out=out, backend=backend)
        assert res is out
        assert bool((out[~mask] == 0).all()), out_dtype
        rtol, atol = _tolerance(backend, dtype, out_dtype, tokens)
        torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol, msg=lambda msg: f"{out_dtype}: {msg}")
    # the default (out_dtype=None): a fresh result in the inputs' dtype, what `out` got above
    default = masked_weight_grad(dy, x, m, backend=backend)
    assert default.dtype == dtype and torch.equal(default, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dtype_and_empty_mask(backend, gen, poison_triton):
    dy, x = rand((9, 40), generator=gen), rand((9, 33), generator=gen)
    empty = torch.zeros(40, 33, dtype=torch.bool)
    with poison_triton():  # (the results are all zeros: a fresh zeroed allocation would hide unwritten rows)
        res = masked_weight_grad(dy.half(), x.half(), empty, out_dtype=torch.float32, backend=backend)
        zero_tokens = masked_weight_grad(dy[:0], x[:0], ~empty, backend=backend)
    assert res.dtype == torch.float32 and bool((res == 0).all())
    assert bool((zero_tokens == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_flop_counter_sees_the_masked_rows(backend, packed, gen):
    """Every backend runs through one op, ``torch.ops.ssam_kernels.masked_weight_grad``, whose
    FLOP formula counts the rows that hold a masked entry: a Triton launch is no longer invisible
    to FlopCounterMode."""
    dy, x = rand((64, 128), generator=gen), rand((64, 256), generator=gen)
    mask = torch.zeros(128, 256, dtype=torch.bool)
    rows = torch.randperm(128, generator=gen)[:32]
    mask[rows] = rand_mask((32, 256), 0.5, gen)
    mask[rows, 0] = True
    with FlopCounterMode(display=False) as counter:
        out = masked_weight_grad(dy, x, pack_mask(mask) if packed else mask, backend=backend)
    assert counter.get_total_flops() == 2 * 64 * 32 * 256  # a quarter of the dense 2 * 64 * 128 * 256
    assert set(counter.get_flop_counts()["Global"]) == {torch.ops.ssam_kernels.masked_weight_grad}
    torch.testing.assert_close(out.double(), _oracle(dy, x, mask), rtol=1e-5, atol=1e-5 * 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_passes_opcheck(backend, gen):
    """torch.library's own checks of the op: schema (the ``out`` mutation declared), fake
    (meta) kernel, autograd registration and AOT tracing, as torch.compile needs them."""
    from ssam_kernels.ops.bitmask import rows_first

    dy, x = rand((16, 8), generator=gen), rand((16, 12), generator=gen)
    mask = rand_mask((8, 12), 0.5, gen)
    mask[3] = False
    order, masked = rows_first(mask)
    args = (dy, x, pack_mask(mask).bits, order, masked, torch.empty(8, 12), backend)
    result = torch.library.opcheck(torch.ops.ssam_kernels.masked_weight_grad.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.cpu
def test_bad_input():
    dy, x, m = torch.zeros(4, 8), torch.zeros(4, 6), torch.ones(8, 6, dtype=torch.bool)
    with pytest.raises(TypeError, match="grad_output must be"):
        masked_weight_grad(dy.double(), x, m)
    with pytest.raises(ValueError, match="they must match"):
        masked_weight_grad(dy, x.half(), m)
    with pytest.raises(ValueError, match="share their leading dims"):
        masked_weight_grad(dy, torch.zeros(5, 6), m)
    with pytest.raises(ValueError, match=r"mask has shape \(6, 8\), expected \(8, 6\)"):
        masked_weight_grad(dy, x, m.t())
    with pytest.raises(TypeError, match="mask must be a bool tensor or a BitMask"):
        masked_weight_grad(dy, x, m.float())
    with pytest.raises(ValueError, match="out must be a contiguous"):
        masked_weight_grad(dy, x, m, out=torch.zeros(6, 8))
    with pytest.raises(ValueError, match="out_dtype"):
        masked_weight_grad(dy, x, m, out=torch.zeros(8, 6), out_dtype=torch.float16)
    with pytest.raises(TypeError, match="out_dtype must be one of .*, got torch.int32"):
        masked_weight_grad(dy, x, m, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out must be a float16/bfloat16/float32 tensor, got a torch.int64 tensor"):
        masked_weight_grad(dy, x, m, out=torch.zeros(8, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="grad_output must have at least 1 dim, got a 0-dim tensor"):
        masked_weight_grad(torch.tensor(1.0), x, m)
    with pytest.raises(ValueError, match="input must have at least 1 dim, got a 0-dim tensor"):
        masked_weight_grad(dy, torch.tensor(1.0), m)
    # out over an input: zeroed before the product (the reference then returned zeros)
    square = torch.ones(6, 6)
    with pytest.raises(ValueError, match="out shares memory with grad_output"):
        masked_weight_grad(square, torch.ones(6, 6), torch.ones(6, 6, dtype=torch.bool), out=square)
    with pytest.raises(ValueError, match="out shares memory with input"):
        masked_weight_grad(torch.ones(6, 6), square, torch.ones(6, 6, dtype=torch.bool), out=square)
    assert torch.equal(square, torch.ones(6, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_f, in_f", [(0, 5), (5, 0), (0, 0)])
def test_layers_without_features(backend, out_f, in_f, gen):
    """A Linear with 0 in- or out-features (F.linear takes it): an empty or all-zero gradient
    (reshape(-1, 0) raised)."""
    dy, x = rand((3, out_f), generator=gen), rand((3, in_f), generator=gen)
    out = masked_weight_grad(dy, x, torch.ones(out_f, in_f, dtype=torch.bool), backend=backend)
    assert out.shape == (out_f, in_f) and bool((out == 0).all())


@pytest.mark.cuda
@pytest.mark.memcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_triton_equals_reference(dtype):
    gen = torch.Generator().manual_seed(5)
    dy = rand((4099, 768), dtype, gen, "cuda")
    x = rand((4099, 3072 + 8), dtype, gen, "cuda")
    mask = rand_mask((768, 3072 + 8), 0.5, gen, "cuda")
    mask[:300] = False
    mask[torch.rand(768, generator=gen) < 0.5] = False  # and scattered ones: gathered rows
    out = torch.full(mask.shape, float("nan"), device="cuda")
    masked_weight_grad(dy, x, pack_mask(mask), out=out, backend="triton")
    ref = _oracle(dy, x, mask)
    assert bool((out[~mask] == 0).all())
    # fp32 accumulation of exact products for every dtype: conftest turns TF32 off in this tier
    # (fp32 runs PRECISION="ieee" on FMA units), and fp16/bf16 products are exact in fp32. On
    # tensor cores the sum of T = 4099 products is rounded about T / 16 times (once per MMA), and
    # may be truncated: up to an ulp (2**-23) of a partial sum each time, possibly all one way; on
    # FMA units the T round-to-nearest errors mostly cancel (~sqrt(T) * 2**-24 * scale). Twice
    # the first bound, ~6e-5 * scale, still fails TF32 inputs (2**-11 each) or an fp16/bf16
    # accumulator, off by 4e-4 * scale or more.
    scale = ref.abs().max().item()
    tol = 2 * 2**-23 * -(-dy.shape[0] // 16) * scale
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)


@pytest.mark.interpret
@needs_interpreter
def test_triton_interpreter_refuses_bfloat16(gen):
    """numpy, which the interpreter computes in, has no bfloat16: a clear error, not garbage."""
    dy, x = torch.randn(8, 4, generator=gen).bfloat16(), torch.randn(8, 16, generator=gen).bfloat16()
    with pytest.raises(BackendUnavailableError, match="cannot run bfloat16"):
        masked_weight_grad(dy, x, torch.ones(4, 16, dtype=torch.bool), backend="triton")
    with pytest.raises(BackendUnavailableError, match="cannot run bfloat16"):
        grad_norm([torch.randn(5).float(), torch.randn(3).bfloat16()], backend="triton")


@pytest.mark.cpu
def test_tf32_follows_torchs_matmul_precision_through_either_api():
    """The Triton kernel uses TF32 for fp32 where torch's own matmuls would. Reading the legacy
    allow_tf32 raises once a program has set both APIs; the new API is read instead. (In a
    subprocess: torch keeps refusing the legacy read for the rest of a process that mixed them,
    and the cuda tier's fixture reads it.)"""
    import subprocess
    import sys

    script = """
import torch
from ssam_kernels.triton_ops.masked_weight_grad import torch_matmul_tf32
matmul = torch.backends.cuda.matmul
if not hasattr(matmul, "fp32_precision"):
    print("legacy only")
    raise SystemExit(0)
matmul.fp32_precision = "ieee"
assert not torch_matmul_tf32()
matmul.allow_tf32 = True  # legacy, after the new API: torch's own flag read raises from now on
assert torch_matmul_tf32()
matmul.fp32_precision = "none"  # inherit the global setting
torch.backends.fp32_precision = "tf32"
assert torch_matmul_tf32()
torch.backends.fp32_precision = "ieee"
assert not torch_matmul_tf32()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "legacy only":
        pytest.skip("this torch has only the legacy allow_tf32 flag")
    assert done.stdout.strip() == "ok"


@pytest.mark.cpu
@pytest.mark.parametrize("out_f,in_f", [(64, 9_000_000), (9_000_000, 64)])
def test_triton_grid_fits_cuda_limits_on_wide_and_tall_layers(out_f, in_f, monkeypatch):
    # a second grid axis stops at 65535 blocks; the interpreter does not enforce it
    pytest.importorskip("triton")
    from ssam_kernels.triton_ops import masked_weight_grad as triton_wgrad

    recorder = GridRecorder()
    monkeypatch.setattr(triton_wgrad, "_masked_wgrad_kernel", recorder)
    monkeypatch.setattr(triton_wgrad, "for_gpu", lambda t: True)  # the GPU's tiles
    tokens = 16
    dy = torch.empty(tokens, out_f, dtype=torch.bfloat16, device="meta")
    x = torch.empty(tokens, in_f, dtype=torch.bfloat16, device="meta")
    bits = torch.empty(-(-out_f * in_f // 8), dtype=torch.uint8, device="meta")
    order = torch.empty(out_f, dtype=torch.int32, device="meta")
    out = torch.empty(out_f, in_f, dtype=torch.bfloat16, device="meta")
    triton_wgrad.masked_weight_grad_triton(dy, x, bits, order, out_f, out)
    assert recorder.within_cuda_limits(), recorder.grids
    bo, bi = triton_wgrad.GPU_CONFIGS["tensor_core"][:2]
    assert recorder.grids == [(-(-out_f // bo) * -(-in_f // bi),)]  # every tile, once
