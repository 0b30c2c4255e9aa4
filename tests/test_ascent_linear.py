import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, rand, rand_mask
from torch.utils.flop_counter import FlopCounterMode

from ssam_kernels import ascent_linear, mvue24, pack_mask, sparse_mm_24
from ssam_kernels.ops.ascent_linear import is_24_along_out, mvue_last_dim
from ssam.structure import nm_select, parse_structure


def _grads(out, inputs, gen):
    dy = torch.randn(out.shape, generator=gen).to(out.dtype)
    return torch.autograd.grad(out, inputs, dy), dy


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_exact_is_dense_gradient_times_mask(backend, packed, gen):
    x, w, b = rand((3, 5, 24), generator=gen), rand((36, 24), generator=gen), rand((36,), generator=gen)
    mask, bias_mask = rand_mask(w.shape, 0.5, gen), rand_mask(b.shape, 0.5, gen)
    mask[:20] = False
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    out = ascent_linear(xs, ws, bs, "exact", mask=pack_mask(mask) if packed else mask, bias_mask=bias_mask,
                        backend=backend)
    (dx, dw, db), dy = _grads(out, (xs, ws, bs), gen)
    xr, wr, br = _leaf(x), _leaf(w), _leaf(b)
    ref_out = F.linear(xr, wr, br)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # forward unchanged
    rdx, rdw, rdb = torch.autograd.grad(ref_out, (xr, wr, br), dy)
    torch.testing.assert_close(dx, rdx, rtol=0, atol=0)
    torch.testing.assert_close(dw, rdw * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, rdb * bias_mask, rtol=0, atol=0)
    assert bool((dw[~mask] == 0).all())


@pytest.mark.cpu
@pytest.mark.parametrize("structure", ["2:4:out", "unstructured"])
def test_implicit_input_gradient_flows_through_the_masked_weight(structure, gen):
    x, w = rand((10, 32), generator=gen), rand((16, 32), generator=gen)
    if structure == "unstructured":
        mask = rand_mask(w.shape, 0.5, gen)
    else:
        mask = nm_select([torch.randn(w.shape, generator=gen)], parse_structure(structure))[0]
    assert is_24_along_out(mask) == (structure != "unstructured")
    assert is_24_along_out(pack_mask(mask)) == (structure != "unstructured")
    xs, ws = _leaf(x), _leaf(w)
    (dx, dw), dy = _grads(ascent_linear(xs, ws, None, "implicit", mask=mask), (xs, ws), gen)
    torch.testing.assert_close(dx, dy @ (w * mask), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, dy.t() @ x, rtol=1e-6, atol=1e-6)  # weight gradient dense


@pytest.mark.parametrize("backend", BACKENDS)
def test_mvue_draw_pads_and_keeps_two_of_four(backend, gen):
    a = rand((6, 10), generator=gen)  # 10 is not a multiple of 4: padded to 12
    est = mvue_last_dim(a, torch.Generator().manual_seed(1), backend)
    assert est.shape == (6, 12) and bool((est[:, 10:] == 0).all())
    assert bool(((est != 0).reshape(-1, 4).sum(-1) == 2).all())  # every group has >= 2 nonzeros here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["mvue", "mvue_dx"])
def test_mvue_gradients_are_unbiased(backend, mode, gen):
    tokens = 6 if backend == "torch" else 8  # the reference also covers padding of the tokens
    x, w = rand((tokens, 12), generator=gen), rand((8, 12), generator=gen)
    dy = rand((tokens, 8), generator=gen)
    exact_dw, exact_dx = dy.t() @ x, dy @ w
    draws, seeds = 3000 if backend == "torch" else 400, torch.Generator().manual_seed(7)
    dws, dxs = [], []
    for _ in range(draws):
        xs, ws = _leaf(x), _leaf(w)
        dx, dw = torch.autograd.grad(ascent_linear(xs, ws, None, mode, generator=seeds, backend=backend), (xs, ws), dy)
        dws.append(dw.double())
        dxs.append(dx.double())
    dws, dxs = torch.stack(dws), torch.stack(dxs)
    for samples, exact in ((dws, exact_dw), (dxs, exact_dx)):
        sem = samples.std(0) / draws**0.5  # standard error of the mean, per entry
        assert bool(((samples.mean(0) - exact.double()).abs() <= 5 * sem + 1e-6).all())
    assert bool((dws.std(0) > 0).any())  # the weight gradient is really an estimate
    if mode == "mvue":
        torch.testing.assert_close(dxs[0].float(), exact_dx, rtol=1e-6, atol=1e-6)  # input gradient exact
    else:
        assert bool((dxs.std(0) > 0).any())


@pytest.mark.cpu
def test_gradients_come_back_in_parameter_dtypes_under_autocast(gen):
    x, w, b = rand((8, 16), generator=gen), rand((12, 16), generator=gen), rand((12,), generator=gen)
    mask = rand_mask(w.shape, 0.5, gen)
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    xr, wr, br = _leaf(x), _leaf(w), _leaf(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ascent_linear(xs, ws, bs, "exact", mask=mask)
        ref = F.linear(xr, wr, br)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dy = torch.randn(out.shape, generator=gen).bfloat16()
    grads = torch.autograd.grad(out, (xs, ws, bs), dy)
    rgrads = torch.autograd.grad(ref, (xr, wr, br), dy)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    # bf16 products summed over 8 tokens: one bf16 rounding (2^-8) of values ~ sqrt(8)
    torch.testing.assert_close(grads[1], rgrads[1] * mask, rtol=1e-2, atol=3e-2)
    torch.testing.assert_close(grads[0], rgrads[0], rtol=0, atol=0)


@pytest.mark.cpu
def test_bad_input(gen):
    x, w = torch.zeros(4, 8), torch.zeros(6, 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        ascent_linear(x, w, None, "sparse")
    with pytest.raises(ValueError, match="needs the weight's mask"):
        ascent_linear(x, w, None, "exact")
    with pytest.raises(ValueError, match=r"mask has shape \(8, 6\), expected \(6, 8\)"):
        ascent_linear(x, w, None, "implicit", mask=torch.ones(8, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bias_mask given for a layer without bias"):
        ascent_linear(x, w, None, "exact", mask=torch.ones(6, 8, dtype=torch.bool), bias_mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must be \[..., 8\]"):
        ascent_linear(torch.zeros(4, 7), w, None, "mvue")
    with pytest.raises(ValueError, match="gemm must be one of"):
        ascent_linear(x, w, None, "mvue", gemm="cutlass")
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        ascent_linear(x, w, None, "mvue", generator=123)  # (failed in the backward, on an attribute)


@pytest.mark.parametrize("mode", ["exact", "implicit", "mvue", "mvue_dx"])
@pytest.mark.parametrize("in_f, out_f", [(0, 8), (8, 0)])
@pytest.mark.cpu
def test_layers_without_features_take_every_mode(mode, in_f, out_f, gen):
    """F.linear takes a layer with 0 in- or out-features; so does each mode's backward (its
    reshape(-1, 0) raised)."""
    x, w, b = _leaf(rand((3, in_f), generator=gen)), _leaf(rand((out_f, in_f), generator=gen)), _leaf(torch.zeros(out_f))
    out = ascent_linear(x, w, b, mode, mask=torch.ones(out_f, in_f, dtype=torch.bool))
    dx, dw, db = torch.autograd.grad(out.sum(), (x, w, b))
    assert (dx.shape, dw.shape, db.shape) == (x.shape, w.shape, b.shape) and bool((dw == 0).all())


@pytest.mark.cpu
def test_operands_torch_would_refuse_are_named_at_the_call():
    """A bias not [out], operands of two dtypes outside autocast, a sparse input, a backend that
    cannot run the mode's kernel: ValueError/TypeError at the call (a RuntimeError from torch,
    a NotImplementedError from the dispatcher, or a failure first in backward() before)."""
    from ssam_kernels import ascent_conv

    x, w, m = torch.zeros(4, 8), torch.zeros(6, 8), torch.ones(6, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        ascent_linear(x, w, torch.zeros(5), "exact", mask=m)
    for bias, kind in ((1.0, "float"), ([0.0] * 6, "list"), (torch.zeros(6, dtype=torch.int64), "torch.int64 tensor")):
        with pytest.raises(TypeError, match=f"bias must be None or a floating tensor, got (a )?{kind}"):
            ascent_linear(x, w, bias, "exact", mask=m)
    with pytest.raises(ValueError, match="must share a dtype outside autocast"):
        ascent_linear(x.double(), w, None, "exact", mask=m)
    with pytest.raises(TypeError, match="x must be a dense"):
        ascent_linear(x.to_sparse(), w, None, "exact", mask=m)
    with pytest.raises(ValueError, match="backend must be one of"):
        ascent_linear(x, w, None, "exact", mask=m, backend="bogus")
    with pytest.raises(ValueError, match="mvue24 has no 'ext' implementation"):
        ascent_linear(x, w, None, "mvue", backend="ext")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs mixed dtypes in its own
        ascent_linear(x.double(), w, None, "exact", mask=m)
    cw, cm = torch.zeros(3, 2, 3, 3), torch.ones(3, 2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="must share a dtype outside autocast"):
        ascent_conv(torch.zeros(1, 2, 5, 5, dtype=torch.float64), cw, None, cm)


@pytest.mark.cpu
def test_searched_configurations_are_bounded(monkeypatch):
    """gemm="cusparselt" searches each new shape once (a token count each under variable
    sequence lengths): past MAX_SEARCHED the oldest goes. (Off a GPU the search fails and its
    default is kept, which is what this counts.)"""
    import ssam_kernels.sparse_gemm as g

    monkeypatch.setattr(g, "_SEARCHED", {})
    monkeypatch.setattr(g, "MAX_SEARCHED", 3)
    keys = [(0, torch.float16, (16, 32), (32, n), (n, 1)) for n in (8, 16, 24, 32, 40)]
    for key in keys:
        g._searched(torch.zeros(16, 32, dtype=torch.float16), torch.zeros(32, 8, dtype=torch.float16), key, False)
    assert list(g._SEARCHED) == [k + (False,) for k in keys[2:]]


@pytest.mark.cpu
def test_a_searched_configuration_is_kept_only_once_it_has_run(monkeypatch):
    """cuSPARSELt's search (the planned path's reads back a split-k mode too) may give a
    configuration that planning it again refuses (a split-k mode of cuSPARSELt 0.8 with
    split-k 1, say): each pick is run once before it is kept; refused, the pick with
    cuSPARSELt's default mode is tried, then the default."""
    import ssam_kernels.sparse_gemm as g

    planned = True
    picked = g.CsltConfig(7, False, 1, 4, planned=planned)
    a, b = torch.zeros(16, 32, dtype=torch.float16), torch.zeros(32, 8, dtype=torch.float16)
    for refused, kept in [((), picked), ((picked,), g.replace(picked, split_k_mode=-1)),
                          ((picked, g.replace(picked, split_k_mode=-1)), g.CsltConfig(planned=planned))]:
        ran = []

        def mm(packed, b, config, refused=refused, ran=ran):
            ran.append(config)
            if config in refused:
                raise ValueError("cuSPARSELt refused this configuration")
            return b

        monkeypatch.setattr(g, "_SEARCHED", {})
        monkeypatch.setattr(g, "_search", lambda packed, b, planned: picked)
        monkeypatch.setattr(g, "cslt_mm", mm)
        key = (0, torch.float16, (16, 32), (32, 8), (8, 1))
        assert g._searched(a, b, key, planned) == kept
        assert ran == [picked, g.replace(picked, split_k_mode=-1)][:len(refused) + 1][:2]
        assert g._searched(a, b, key, planned) == kept and len(ran) == min(len(refused) + 1, 2)  # (once per key)


class _CudaStandIn:
    """What the configuration lookup reads of a CUDA operand (no GPU here)."""

    def __init__(self, *shape):
        self.shape, self.dtype, self.is_cuda, self.device = shape, torch.float16, True, torch.device("cuda", 0)

    def stride(self):
        return (self.shape[1], 1)


@pytest.mark.cpu
def test_a_new_shape_inside_a_graph_capture_is_refused_not_searched(monkeypatch):
    """cuSPARSELt's search launches and waits on its own kernels: inside a CUDA graph capture
    a shape not searched yet is refused with what to do (and nothing is kept for it)."""
    import ssam_kernels.sparse_gemm as g

    monkeypatch.setattr(g, "_SEARCHED", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    searched = []
    monkeypatch.setattr(g, "_search_config", lambda *args: searched.append(args))
    monkeypatch.setattr(g, "on_device", lambda device: contextlib.nullcontext())  # (no CUDA device to make current)
    with pytest.raises(RuntimeError, match="run the step once before capturing"):
        g._config(_CudaStandIn(16, 32), _CudaStandIn(32, 8))
    with pytest.raises(RuntimeError, match="run the step once before capturing"):
        g.tune(_CudaStandIn(16, 32), _CudaStandIn(32, 8))
    assert not searched and not g._SEARCHED


@pytest.mark.cpu
@pytest.mark.parametrize("gemm", ["auto", "cusparselt"])
@pytest.mark.parametrize("shapes", [((0, 32), (32, 8)), ((16, 32), (32, 0))])
def test_an_empty_product_runs_dense_in_every_mode(gemm, shapes):
    """An empty token batch (the ascent's MVUE dW or implicit dX with no tokens): nothing to
    multiply, so even the strict mode runs it dense (cuSPARSELt refuses zero dimensions)."""
    (m, k), (_, n) = shapes
    out = sparse_mm_24(torch.zeros(m, k, dtype=torch.float16), torch.zeros(k, n, dtype=torch.float16), gemm=gemm)
    assert out.shape == (m, n) and out.dtype == torch.float16


@pytest.mark.cpu
def test_sparse_mm_24_dense_path_and_checks(gen):
    a = mvue24(rand((16, 32), generator=gen), seed=3)
    b = rand((32, 8), generator=gen)
    torch.testing.assert_close(sparse_mm_24(a, b), a @ b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        sparse_mm_24(torch.ones(16, 32), b)
    with pytest.raises(ValueError, match="gemm='cusparselt' cannot run"):
        sparse_mm_24(a, b, gemm="cusparselt")
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse_mm_24(torch.zeros(4, 6), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="cannot multiply"):
        sparse_mm_24(a, b.t())


@pytest.mark.cpu
def test_the_sparse_gemm_is_flop_counted():
    """torch has no FLOP formula for cuSPARSELt's GEMM; the package registers one: the kept
    half of a dense [m, k] @ [k, n] (m * k * n), m and n read from the result."""
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry[torch.ops.aten._cslt_sparse_mm]
    compressed = torch.empty(768 * 4096 // 2 * 9 // 8, dtype=torch.float16)  # a flat buffer, no shape of A
    b, out = torch.empty(4096, 1024, dtype=torch.float16), torch.empty(768, 1024, dtype=torch.float16)
    assert formula(compressed, b, out_val=out) == 768 * 4096 * 1024
    assert formula(compressed, b, transpose_result=True, out_val=out.t()) == 768 * 4096 * 1024


def _fake_cusparselt(monkeypatch, gemm_ms, compress_ms, dense_ms, planned=True, refuse=()):
    """sparse_gemm's tuning on a fake clock: each fake kernel advances it by its cost, so the
    selection logic runs here (the real times come from the cuda tier and bench_ascent_linear)."""
    import ssam_kernels.sparse_gemm as g

    clock = [0.0]

    def spend(ms):
        clock[0] += ms

    def median_ms(fn):
        start = clock[0]
        fn()
        return clock[0] - start

    def mm(packed, b, config):
        if config.label() in refuse:
            raise RuntimeError("cuSPARSELt refused the configuration")
        spend(gemm_ms(config))

    for name in ("_TRIALS", "_CONFIG", "_TRIED", "_CHOICE", "_SEARCHED"):
        monkeypatch.setattr(g, name, {})
    monkeypatch.setattr(g, "_median_ms", median_ms)
    monkeypatch.setattr(g, "_dense", lambda a, b: spend(dense_ms))
    monkeypatch.setattr(g, "compress", lambda a, config: spend(compress_ms[config.planned]))
    monkeypatch.setattr(g, "cslt_mm", mm)
    monkeypatch.setattr(g, "_searched", lambda packed, b, key, p: g.CsltConfig(3, False, 2 if p else 1, 1 if p else -1, p))
    monkeypatch.setattr(g, "planned_unavailable", lambda: None if planned else "no extension here")
    return g


@pytest.mark.cpu
def test_the_planned_cusparselt_path_can_be_turned_off(monkeypatch):
    """SSAM_CUSPARSELT_PLANNED=0 leaves torch's _cslt ops alone (read once per process), and the
    reason says so, whatever else would have stopped the planned path."""
    from ssam_kernels import sparse_gemm as g

    monkeypatch.setattr(g, "_PLANNED", [])
    monkeypatch.setenv(g.PLANNED_ENV, "0")
    assert g.planned_unavailable() == "turned off (SSAM_CUSPARSELT_PLANNED=0)"
    monkeypatch.setenv(g.PLANNED_ENV, "1")
    assert g.planned_unavailable() == "turned off (SSAM_CUSPARSELT_PLANNED=0)"  # decided once
    monkeypatch.setattr(g, "_PLANNED", [])
    assert g.planned_unavailable() != "turned off (SSAM_CUSPARSELT_PLANNED=0)"


@pytest.mark.cpu
def test_tuning_keeps_the_fastest_gemm_with_its_compression_and_auto_runs_dense_unless_it_wins(monkeypatch):
    a, b = torch.zeros(32, 64, dtype=torch.float16), torch.zeros(64, 16, dtype=torch.float16)

    def gemm_ms(c):  # the planned path's searched, transposed configuration is the fastest GEMM
        return (0.30 if c.planned else 0.80) - 0.05 * c.transpose_result - 0.1 * (c.alg_id == 3)

    g = _fake_cusparselt(monkeypatch, gemm_ms, {False: 0.5, True: 0.02}, 1.0, refuse=("alg 3 T",))
    trials = g.tune(a, b)
    labels = {"alg 0", "alg 0 T", "alg 3", "planned alg 0", "planned alg 0 T", "planned alg 3 split-k 2 mode 1",
              "planned alg 3 split-k 2 mode 1 T"}
    assert set(trials) == labels | {"dense", "compress", "planned compress"}  # the refused one skipped
    assert set(g.tuned_configs(a, b)) == labels
    assert g.tuned_config(a, b) == g.CsltConfig(3, True, 2, 1, planned=True)
    assert trials["planned alg 3 split-k 2 mode 1 T"] == pytest.approx(0.15)
    assert g.resolve_gemm("auto", a, b) == "dense"  # these CPU tensors never reach cuSPARSELt
    assert g._auto_choice(a, b) == "cusparselt"  # 0.15 + 0.02 against dense 1.0

    # a faster GEMM loses to one whose compression is cheaper: the sum decides
    g = _fake_cusparselt(monkeypatch, lambda c: 0.2 if not c.planned else 0.35, {False: 0.5, True: 0.02}, 1.0)
    assert g.tuned_config(a, b).planned
    # torch's path alone where the planned one cannot run; dense where sparse + compress is slower
    g = _fake_cusparselt(monkeypatch, lambda c: 0.7, {False: 0.5, True: 0.02}, 1.0, planned=False)
    assert not any(c.planned for c in g.tuned_configs(a, b).values()) and "planned compress" not in g.tune(a, b)
    assert g._auto_choice(a, b) == "dense"  # 0.7 + 0.5 against 1.0


@pytest.mark.cpu
def test_auto_tunes_a_bounded_number_of_shapes(monkeypatch):
    """Variable sequence lengths make a new shape of every token count: past MAX_TUNED_SHAPES,
    auto runs a new shape dense instead of timing dozens of GEMMs for it."""
    g = _fake_cusparselt(monkeypatch, lambda c: 0.1, {False: 0.1, True: 0.01}, 1.0)
    monkeypatch.setattr(g, "MAX_TUNED_SHAPES", 2)
    tuned = []
    original = g.tune
    monkeypatch.setattr(g, "tune", lambda a, b: tuned.append(b.shape[1]) or original(a, b))
    a = torch.zeros(32, 64, dtype=torch.float16)
    choices = [g._auto_choice(a, torch.zeros(64, n, dtype=torch.float16)) for n in (16, 24, 32, 16)]
    assert choices == ["cusparselt", "cusparselt", "dense", "cusparselt"] and tuned == [16, 24]


@pytest.mark.cpu
def test_tuning_runs_out_of_sight_of_the_callers_modes(monkeypatch):
    """The GEMMs timed while tuning are not the caller's computation: a FlopCounterMode around
    the first product of a shape counts nothing of them."""
    a, b = torch.zeros(32, 64, dtype=torch.float16), torch.zeros(64, 16, dtype=torch.float16)
    g = _fake_cusparselt(monkeypatch, lambda c: 0.5, {False: 0.5, True: 0.02}, 1.0)
    monkeypatch.setattr(g, "_median_ms", lambda fn: (a.float() @ b.float(), fn(), 1.0)[-1])  # a real product per timing
    with FlopCounterMode(display=False) as counter:
        g.tune(a, b)
    assert counter.get_total_flops() == 0


# --- sparse tensor cores ---------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cusparselt_equals_dense(dtype):
    if not torch.backends.cusparselt.is_available():
        pytest.fail("this CUDA torch has no cuSPARSELt; the sparse path cannot be tested")
    gen = torch.Generator().manual_seed(3)
    a = mvue24(rand((768, 4096), dtype, gen, "cuda"), seed=1)
    for b in (rand((4096, 1024), dtype, gen, "cuda"), rand((1024, 4096), dtype, gen, "cuda").t()):
        ref = (a.double() @ b.double())
        with FlopCounterMode(display=False) as flops:
            out = sparse_mm_24(a, b, gemm="cusparselt")
        assert flops.get_total_flops() == 768 * 4096 * b.shape[1]  # the kept half, counted
        # each output sums 2048 kept products in fp32 and rounds once to the dtype
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * ref.abs().max().item()
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["implicit", "mvue", "mvue_dx"])
def test_cuda_sparse_paths_equal_their_dense_references(mode):
    """With the MVUE draws fixed by the seed, the cuSPARSELt and dense GEMM paths see the same
    sparse operands, so their gradients agree to bf16 rounding."""
    if not torch.backends.cusparselt.is_available():
        pytest.fail("this CUDA torch has no cuSPARSELt; the sparse path cannot be tested")
    gen = torch.Generator().manual_seed(4)
    x = rand((8, 1024, 768), torch.bfloat16, gen, "cuda")
    w = rand((3072, 768), torch.bfloat16, gen, "cuda")
    mask = nm_select([torch.randn(w.shape, generator=gen)], parse_structure("2:4:out"))[0].cuda()
    dy = rand((8, 1024, 3072), torch.bfloat16, gen, "cuda")
    grads = {}
    for gemm in ("dense", "cusparselt"):
        xs, ws = _leaf(x), _leaf(w)
        out = ascent_linear(xs, ws, None, mode, mask=mask, generator=torch.Generator().manual_seed(9), gemm=gemm)
        grads[gemm] = torch.autograd.grad(out, (xs, ws), dy)
    # fp32 sums of the same bf16 products in two orders, each rounded once to bf16: within an
    # ulp of each other's value, 2^-7 of the largest
    for sparse, dense in zip(grads["cusparselt"], grads["dense"]):
        scale = dense.float().abs().max().item()
        torch.testing.assert_close(sparse.float(), dense.float(), rtol=0, atol=2**-7 * scale)


@pytest.mark.cuda
def test_implicit_mode_compresses_its_masked_weight_once_per_weight_version(monkeypatch):
    """Micro-batches of one step reuse (W ⊙ M)'s compressed form; the optimizer's in-place
    update (a new version of W) makes it anew; the input gradients stay right."""
    import ssam_kernels.sparse_gemm as g

    if not torch.backends.cusparselt.is_available():
        pytest.fail("this CUDA torch has no cuSPARSELt; the sparse path cannot be tested")
    gen = torch.Generator().manual_seed(6)
    w = rand((64, 32), torch.bfloat16, gen, "cuda").requires_grad_(True)
    mask = nm_select([torch.randn(w.shape, generator=gen)], parse_structure("2:4:out"))[0].cuda()
    xs = [rand((2, 48, 32), torch.bfloat16, gen, "cuda").requires_grad_(True) for _ in range(3)]
    dy = rand((2, 48, 64), torch.bfloat16, gen, "cuda")
    made, real = [], g.compress
    monkeypatch.setattr(g, "compress", lambda a, config: made.append(config) or real(a, config))

    def dx(x):
        (grad,) = torch.autograd.grad(ascent_linear(x, w, None, "implicit", mask=mask, gemm="cusparselt"), x, dy)
        ref = dy.double() @ (w.detach().double() * mask)  # exact bf16 products, summed in fp64
        # the GEMM's one rounding to bf16 (at most 2^-8 of a value) and its fp32 sum: within 2^-7
        # of the largest
        torch.testing.assert_close(grad.double(), ref, rtol=0, atol=2**-7 * ref.abs().max().item())

    dx(xs[0])  # the first call also searches cuSPARSELt's configuration
    before = len(made)
    dx(xs[1])
    dx(xs[2])
    assert len(made) == before  # kept
    with torch.no_grad():
        w.add_(0.5)
    dx(xs[0])
    assert len(made) == before + 1


@pytest.mark.cuda
def test_cusparselt_configurations_are_tuned_and_each_multiplies_right():
    """tune() times the dense GEMM, each path's compression and every cuSPARSELt configuration
    tried (on torch's path and the planned one: default and searched algorithm, result written
    as is or transposed), keeps the fastest GEMM + compression; each configuration computes the
    product."""
    from ssam_kernels.sparse_gemm import compress, cslt_mm, planned_unavailable, tune, tuned_config, tuned_configs

    if not torch.backends.cusparselt.is_available():
        pytest.fail("this CUDA torch has no cuSPARSELt; the sparse path cannot be tested")
    gen = torch.Generator().manual_seed(5)
    a = mvue24(rand((768, 3072), torch.bfloat16, gen, "cuda"), seed=1)
    b = rand((3072, 1024), torch.bfloat16, gen, "cuda")
    trials = tune(a, b)
    configs = tuned_configs(a, b)
    assert {"dense", "compress", "alg 0", "alg 0 T"} <= set(trials) and all(ms > 0 for ms in trials.values())
    planned = planned_unavailable() is None
    assert ("planned compress" in trials) == planned and ("planned alg 0" in configs) == planned
    assert set(trials) == {"dense", "compress", "planned compress"} & set(trials) | set(configs)
    best = tuned_config(a, b)
    path_ms = {label: ms + trials["planned compress" if c.planned else "compress"]
               for label, ms in trials.items() if (c := configs.get(label)) is not None}
    assert best.label() == min(path_ms, key=path_ms.get)
    ref = a.double() @ b.double()
    tol = 1.6e-2 * ref.abs().max().item()  # 1536 kept products summed in fp32, rounded once to bf16
    for config in configs.values():
        out = cslt_mm(compress(a, config), b, config)
        assert out.shape == (768, 1024)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_planned_cusparselt_multiplies_right_on_every_layout_and_reuses_its_plans(dtype):
    """The extension's cuSPARSELt ops (descriptors and plans kept per shape): cuSPARSELt opens
    on a CUDA machine with the extension built; each B layout (row-major, the transpose of a
    row-major tensor, a strided slice), result as is or transposed, default and searched
    algorithm: the product within the dtype's rounding; a second call (the kept plan) on torch's
    compression of the same operand gives the same bits (without split-k, whose partial sums
    may meet in another order)."""
    from ssam_kernels.sparse_gemm import CsltConfig, _key, _searched, compress, cslt_mm, planned_unavailable

    why = planned_unavailable()
    assert why is None, f"the planned cuSPARSELt path cannot run: {why}"
    gen = torch.Generator().manual_seed(9)
    a = mvue24(rand((256, 512), dtype, gen, "cuda"), seed=2)
    packed = torch._cslt_compress(a)  # the planned GEMM reads torch's format too
    assert compress(a, CsltConfig(planned=True)).shape[0] == packed.shape[0] == 256  # torch >= 2.10's layout: [m, ...]
    wide = rand((512, 192), dtype, gen, "cuda")
    for b in (rand((512, 64), dtype, gen, "cuda"), rand((64, 512), dtype, gen, "cuda").t(), wide[:, 8:72]):
        # searched per B layout: an algorithm id's range depends on it
        alg, split_k, mode, max_alg = torch.ops.ssam_cslt.search(packed, b, False)
        assert 0 <= alg <= max(max_alg, 0) and split_k >= 1
        searched = _searched(packed, b, _key(a, b) + ("test",), True)  # what gemm="cusparselt" keeps: run once
        # (a search of its own, timed again: it may pick another algorithm than the one above)
        assert searched.planned and 0 <= searched.alg_id <= max(max_alg, 0), searched
        ref = a.double() @ b.double()
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * ref.abs().max().item()
        for config in (CsltConfig(planned=True), CsltConfig(transpose_result=True, planned=True), searched):
            first = cslt_mm(compress(a, config), b, config)
            torch.testing.assert_close(first.double(), ref, rtol=0, atol=tol)
            again = cslt_mm(packed, b, config)
            assert torch.equal(again, first) if config.split_k == 1 else torch.allclose(again, first, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="multiples of 16"):
        torch.ops.ssam_cslt.compress(a[:, :24].contiguous()[:40])
    with pytest.raises(ValueError, match="cuSPARSELt reads"):  # fewer bytes than a compressed [256, 512] operand
        torch.ops.ssam_cslt.mm(packed[:, :8].contiguous(), rand((512, 64), dtype, gen, "cuda"), 0, 1, -1, False)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        torch.ops.ssam_cslt.compress(a.float())


@pytest.mark.cuda
@pytest.mark.memcheck
def test_planned_cusparselt_search_and_product_stay_in_their_buffers():
    """cuSPARSELt's search runs variants (split-k among them) in the workspace sized for the
    default plan: under gpu_check's memcheck sub-tier an access past it is reported; here, the
    product after the search is right (a small shape: the search runs every algorithm)."""
    from ssam_kernels.sparse_gemm import CsltConfig, _key, _searched, cslt_mm, planned_unavailable

    why = planned_unavailable()
    assert why is None, f"the planned cuSPARSELt path cannot run: {why}"
    gen = torch.Generator().manual_seed(5)
    a = mvue24(rand((64, 128), torch.float16, gen, "cuda"), seed=1)
    b = rand((128, 32), torch.float16, gen, "cuda")
    packed = torch.ops.ssam_cslt.compress(a)
    searched = _searched(packed, b, _key(a, b) + ("memcheck",), True)  # the configuration gemm="cusparselt" keeps
    ref = a.double() @ b.double()
    for config in (CsltConfig(planned=True), searched):
        out = cslt_mm(packed, b, config)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3 * ref.abs().max().item())


@pytest.mark.cuda
def test_planned_cusparselt_runs_past_its_plan_limit_and_zeroes_its_padding():
    """Past 256 kept plans (one per token count under variable sequence lengths) the least
    recently used is destroyed: 300 token counts, each product right, the first count's plan
    made again after its eviction (how many plans are kept is not visible from Python: this
    runs the eviction path, it does not count). A compressed operand starts zeroed (cuSPARSELt
    need not write all of its padded size, nor the tail past it), so two compressions of one
    operand are equal whatever memory they got (48 rows: rows of 96 bytes, which cuSPARSELt's
    sizes need not fill)."""
    from ssam_kernels.sparse_gemm import planned_unavailable

    why = planned_unavailable()
    assert why is None, f"the planned cuSPARSELt path cannot run: {why}"
    gen = torch.Generator().manual_seed(4)
    a = mvue24(rand((48, 64), torch.float16, gen, "cuda"), seed=3)
    compressed = []
    for fill in (0xAB, 0x5C):  # freed memory of another content under each compression
        torch.empty(1 << 16, dtype=torch.uint8, device="cuda").fill_(fill)
        compressed.append(torch.ops.ssam_cslt.compress(a))
    assert torch.equal(compressed[0].view(torch.uint8), compressed[1].view(torch.uint8))
    packed = compressed[0]
    for n in [8 * i for i in range(1, 301)] + [8]:
        b = rand((64, n), torch.float16, gen, "cuda")
        ref = a.double() @ b.double()
        out = torch.ops.ssam_cslt.mm(packed, b, 0, 1, -1, False)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3 * ref.abs().max().item())

@pytest.mark.cpu
def test_a_kept_compressed_operand_is_reused_until_its_source_or_companion_changes(monkeypatch):
    import gc

    import ssam_kernels.sparse_gemm as g

    made = []
    monkeypatch.setattr(g, "compress", lambda a, config: made.append(a.clone()) or made[-1])
    monkeypatch.setattr(g, "_KEPT", {})
    w = torch.randn(32, 16)
    mask = pack_mask(torch.rand(32, 16) < 0.5)
    config = g.CsltConfig()

    def compressed(source, companion=mask):
        return g._compressed((source * 2).t().contiguous(), config, (source, source._version, companion))

    first = compressed(w)
    assert compressed(w) is first and len(made) == 1  # same weight, version and mask: kept
    w.add_(1.0)  # the optimizer's step moves the version
    assert not torch.equal(compressed(w), first) and len(made) == 2
    assert compressed(w) is made[-1] and len(made) == 2
    compressed(w, pack_mask(torch.rand(32, 16) < 0.5))  # another mask: compressed anew
    assert len(made) == 3
    compressed(w)  # and the first mask again: anew (one entry per weight)
    assert len(made) == 4
    bool_mask = torch.rand(32, 16) < 0.5
    compressed(w, bool_mask)
    bool_mask[0, 0] = ~bool_mask[0, 0]  # a tensor companion changed in place
    compressed(w, bool_mask)
    assert len(made) == 6
    assert g._compressed(w.t().contiguous(), config, None) is made[-1] and len(made) == 7  # keep=None: every call
    assert len(g._KEPT) == 1  # one entry per source and shape: a new mask or version replaces it
    del w
    gc.collect()
    assert not g._KEPT  # a freed source's entry leaves
    with pytest.raises(TypeError, match="keep must be None or a"):
        sparse_mm_24(torch.zeros(16, 16), torch.zeros(16, 8), check=False, keep=(1, 2, 3))
