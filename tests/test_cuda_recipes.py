"""Tier cuda: what users run on a GPU. Each recipe trains a few real steps of SAM, SSAM-F and
SSAM-D on the device with the kernels ``auto`` picks there, and compares them with the same
steps on the CPU with the reference backend.

The device run gets the CPU run's masks (a Fisher score tie may order otherwise on another
device, and SSAM-D's random masks come from the device's generator): the recipes test the
steps, not the mask choice. SSAM-D's drop/grow update is compared on the device between
``auto`` and the reference backend, each update from the same weights, masks and generator
state, so the same masks, bit for bit.
Tolerances: fp32 runs differ by summation order only (TF32 off); autocast runs by the rounding
of the low-precision products, so their weight updates are compared by norm, to a few units of
the dtype's epsilon.

``SSAM_TEST_CUDA_DEVICE=cpu`` dry-runs the tier on a CPU (device side: ``auto``'s CPU kernels).
"""

import importlib.util
import os

import pytest
import torch
from helpers import assert_tensors_equal
import torch.nn.functional as F
from torch import nn

import ssam
from ssam.budget import measure_costs

pytestmark = pytest.mark.cuda
DEVICE = torch.device(os.environ.get("SSAM_TEST_CUDA_DEVICE", "cuda"))
STEPS = 3


class Net(nn.Module):
    """A 3x3 conv, BatchNorm, a 1x1 conv without bias, two linears: the layer kinds the ascent
    modes treat differently."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pointwise = nn.Conv2d(8, 8, 1, bias=False)
        self.fc1 = nn.Linear(8 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.pointwise(torch.relu(self.bn(self.conv(x)))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def _batch(gen, n=16):
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _optimizer(kind, mode, model, x, y, structure="unstructured", **kw):
    params = model.parameters()
    if kind == "SAM":
        return ssam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, **kw)
    two_four = mode in ("implicit", "mvue", "mvue_dx")
    common = dict(rho=0.05, sparsity=None if two_four else 0.5, structure="2:4:out" if two_four else structure,
                  norm="masked" if mode == "exact" else "full", ascent_backward=mode, seed=0, lr=0.05, momentum=0.9,
                  **kw)
    if structure == "budget":
        common["sparsity"] = 0.5
    if kind == "SSAMF":
        opt = ssam.SSAMF(params, torch.optim.SGD, num_samples=8, update_freq=1, **common)
        opt.update_mask(model, torch.utils.data.TensorDataset(x, y))
        return opt
    if structure == "budget":
        common["ascent_costs"] = measure_costs(model, list(model.parameters()), x[:1])
    return ssam.SSAMD(params, torch.optim.SGD, drop_rate=0.5, T_end=10, **common)


def _closure(model, opt, x, y, dtype, scaler, poison=None):
    calls = []

    def closure():
        xb, yb = opt.batch(x, y)  # the ascent's share of the batch with ascent_fraction < 1
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(xb), yb)
        if poison is not None and len(calls) == poison:
            loss = loss * float("nan")
        calls.append(1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    return closure


def _setup(device, backend, monkeypatch, gen_state, channels_last=False):
    """``backend`` (``"auto"`` or a backend's name) chosen for what follows, and the seeded net with
    the batch drawn from ``gen_state``, on ``device``."""
    if backend == "auto":
        monkeypatch.delenv("SSAM_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SSAM_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(gen_state)
    x, y = _batch(gen)
    torch.manual_seed(0)
    model = Net()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    return model.to(device), x.to(device), y.to(device)


def _train(device, backend, monkeypatch, kind, mode, gen_state, *, dtype=torch.float32, scaler=False,
           structure="unstructured", masks=None, steps=STEPS, channels_last=False, compile_model=False,
           captured=False, **kw):
    """``steps`` SAM-style steps on ``device`` with ``backend`` (``"auto"`` or ``"torch"``);
    returns the weights before and after (on the CPU), the masks and the optimizer.
    ``captured``: the first step runs eagerly (the warm-up), the others replay a CUDA graph of
    the whole step, captured as ``ssam-bench step --graphs captured`` does."""
    model, x, y = _setup(device, backend, monkeypatch, gen_state, channels_last)
    opt = _optimizer(kind, mode, model, x, y, structure, **kw)
    if masks is not None:  # the CPU run's masks (see the module docstring)
        opt._set_masks([m.to(device) for m in masks])
    grad_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if scaler else None
    forward = torch.compile(model, backend="aot_eager") if compile_model else model
    before = [p.detach().cpu().clone() for p in model.parameters()]

    def step():
        opt.zero_grad()
        opt.step(_closure(forward, opt, x, y, dtype, grad_scaler), grad_scaler=grad_scaler)

    if captured:
        from ssam_bench.bench_step import capture_step

        graph = capture_step(step, device, warmup=1)
        for _ in range(steps - 1):
            graph.replay()
        torch.cuda.synchronize(device)
    else:
        for _ in range(steps):
            step()
    after = [p.detach().cpu().clone() for p in model.parameters()]
    out_masks = opt.masks() if hasattr(opt, "masks") else None
    return before, after, [m.cpu() for m in out_masks] if out_masks is not None else None, opt


def _pair(monkeypatch, gen, kind, mode, **kw):
    """The CPU reference run, then the device run with its masks (``_train``'s steps pass no
    epoch: no mask update, so the masks it returns are the ones the run started with)."""
    state = gen.get_state()
    ref = _train(torch.device("cpu"), "torch", monkeypatch, kind, mode, state, **kw)
    dev = _train(DEVICE, "auto", monkeypatch, kind, mode, state, masks=ref[2], **kw)
    return ref, dev


def _assert_updates_close(ref, dev, rel):
    """The device's weight updates against the reference's, by norm over every parameter."""
    (b0, a0, *_), (b1, a1, *_) = ref, dev
    for p0, p1 in zip(b0, b1):
        assert torch.equal(p0, p1)  # the same start
    d0 = torch.cat([(a - b).flatten() for a, b in zip(a0, b0)])
    d1 = torch.cat([(a - b).flatten() for a, b in zip(a1, b1)])
    assert torch.isfinite(d1).all() and d0.norm() > 0
    ratio = float((d1 - d0).norm() / d0.norm())
    print(f"|update difference| / |update|: {ratio:.3g} (bound {rel:.3g})")  # (-rP shows it: to set the bound)
    assert ratio <= rel, f"{ratio:.3g} > {rel}"


FP32_CONFIGS = [("SAM", "dense", "unstructured"), ("SSAMF", "dense", "unstructured"),
                ("SSAMF", "exact", "unstructured"), ("SSAMF", "exact", "budget"), ("SSAMF", "implicit", "2:4:out"),
                ("SSAMD", "dense", "unstructured"), ("SSAMD", "exact", "budget")]


@pytest.mark.parametrize(("kind", "mode", "structure"), FP32_CONFIGS)
def test_fp32_steps_match_the_cpu_reference(kind, mode, structure, monkeypatch, gen):
    """fp32, every deterministic ascent mode (exact on convs and linears, budget rows, the
    implicit 2:4 product): summation order apart, the CPU's weights."""
    ref, dev = _pair(monkeypatch, gen, kind, mode, structure=structure)
    for a, b in zip(ref[1], dev[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


CAPTURED_CONFIGS = [("SAM", "dense", "unstructured", 1.0), ("SSAMF", "exact", "unstructured", 1.0),
                    ("SSAMF", "exact", "budget", 1.0), ("SSAMF", "dense", "unstructured", 0.5),
                    ("SSAMD", "exact", "budget", 1.0)]


@pytest.mark.parametrize(("kind", "mode", "structure", "fraction"), CAPTURED_CONFIGS)
def test_a_captured_whole_step_replays_to_the_eager_steps(kind, mode, structure, fraction, monkeypatch, gen):
    """``opt.step(closure)`` captured whole in a CUDA graph (both passes: the exact ascent
    backward, by plain autograd where every row is masked and on row ranges with budget masks,
    a sub-batch ascent; the optimizer's), as ``ssam-bench step --graphs captured`` times it: its
    replays give the eager device steps' weights. The same kernels run in the same order (TF32
    off, deterministic cuDNN), hence the tight tolerance."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device (this is a dry run of the cuda tier)")
    state = gen.get_state()
    kw = dict(structure=structure, ascent_fraction=fraction)
    eager = _train(DEVICE, "auto", monkeypatch, kind, mode, state, **kw)
    replayed = _train(DEVICE, "auto", monkeypatch, kind, mode, state, masks=eager[2], captured=True, **kw)
    for a, b in zip(eager[1], replayed[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(eager[0], eager[1]))  # the steps moved the weights


@pytest.mark.parametrize("mode", ["mvue", "mvue_dx"])
def test_mvue_modes_train_and_replay(mode, monkeypatch, gen):
    """MVUE draws come from each device's own stream: no CPU twin. On the device: weights move
    and stay finite, and the same seed replays the same weights bit for bit."""
    state = gen.get_state()
    runs = [_train(DEVICE, "auto", monkeypatch, "SSAMF", mode, state) for _ in range(2)]
    before, after = runs[0][0], runs[0][1]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert_tensors_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(("dtype", "rel"), [(torch.bfloat16, 2.0**-4), (torch.float16, 2.0**-7)])
@pytest.mark.parametrize(("kind", "mode"), [("SAM", "dense"), ("SSAMF", "exact"), ("SSAMD", "dense")])
def test_autocast_steps_match_the_cpu_reference(kind, mode, dtype, rel, monkeypatch, gen):
    """Autocast on both devices (fp16 with a GradScaler): the weights stay fp32, and the updates
    agree to 8 epsilons of the dtype by norm (bf16: 2^-4 = 8 * 2^-7; fp16: 2^-7 = 8 * 2^-10):
    every product rounds to the dtype on each device, in another order. The bound is an estimate,
    not yet measured on a GPU: re-derive it from the first GPU run's ratios (each test prints
    its ratio: ``pytest -rP``)."""
    ref, dev = _pair(monkeypatch, gen, kind, mode, dtype=dtype, scaler=dtype == torch.float16)
    assert all(p.dtype == torch.float32 for p in dev[1])
    _assert_updates_close(ref, dev, rel)


@pytest.mark.parametrize("bad_pass", [0, 1])
@pytest.mark.parametrize(("kind", "mode"), [("SAM", "dense"), ("SSAMF", "exact")])
def test_grad_scaler_skips_a_step_with_nan_in_either_pass(kind, mode, bad_pass, monkeypatch, gen):
    """fp16 + GradScaler on the device: a NaN loss in the ascent (0) or descent (1) pass skips
    the step, weights bit for bit as before it, and halves the scale."""
    monkeypatch.delenv("SSAM_BACKEND", raising=False)
    x, y = _batch(gen)
    torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))  # fresh weights, replayable
    model = Net().to(DEVICE)
    x, y = x.to(DEVICE), y.to(DEVICE)
    opt = _optimizer(kind, mode, model, x, y)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    opt.zero_grad()
    opt.step(_closure(model, opt, x, y, torch.float16, scaler), grad_scaler=scaler)  # updates the scaler
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    opt.zero_grad()
    opt.step(_closure(model, opt, x, y, torch.float16, scaler, poison=bad_pass), grad_scaler=scaler)
    assert not opt.perturbed
    assert_tensors_equal(before, model.parameters())
    assert scaler.get_scale() == scale / 2


def test_sub_batch_ascent_matches_the_cpu_reference(monkeypatch, gen):
    ref, dev = _pair(monkeypatch, gen, "SSAMF", "exact", ascent_fraction=0.5)
    for a, b in zip(ref[1], dev[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_clipping_and_accumulation_match_the_cpu_reference(monkeypatch, gen):
    """max_grad_norm on the descent gradient, and the ascent gradient accumulated over two
    micro-batches inside ``opt.ascent()`` (the two-step API)."""
    state = gen.get_state()
    results = []
    for device, backend in ((torch.device("cpu"), "torch"), (DEVICE, "auto")):
        model, x, y = _setup(device, backend, monkeypatch, state)
        opt = _optimizer("SSAMF", "exact", model, x, y)
        if results:
            opt._set_masks([m.to(device) for m in results[0][1]])
        for _ in range(STEPS):
            opt.zero_grad()
            with opt.ascent():
                for xs, ys in zip(x.split(8), y.split(8)):
                    (F.cross_entropy(model(xs), ys) * 0.5).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(max_grad_norm=0.5)
        results.append(([p.detach().cpu() for p in model.parameters()], [m.cpu() for m in opt.masks()]))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_resume_continues_bit_for_bit(monkeypatch, gen, tmp_path):
    """Save model + optimizer after two steps on the device, load them into fresh ones, take a
    third: the weights of the uninterrupted run, bit for bit."""
    monkeypatch.delenv("SSAM_BACKEND", raising=False)
    x, y = _batch(gen)
    x, y = x.to(DEVICE), y.to(DEVICE)
    runs = []
    for resume in (False, True):
        torch.manual_seed(0)
        model = Net().to(DEVICE)
        opt = _optimizer("SSAMF", "exact", model, x, y)
        for _ in range(2):
            opt.zero_grad()
            opt.step(_closure(model, opt, x, y, torch.float32, None))
        if resume:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
            torch.manual_seed(1)
            model = Net().to(DEVICE)
            opt = _optimizer("SSAMF", "exact", model, x, y)
            saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        opt.zero_grad()
        opt.step(_closure(model, opt, x, y, torch.float32, None))
        runs.append([p.detach().clone() for p in model.parameters()])
    uninterrupted, resumed = runs
    assert_tensors_equal(resumed, uninterrupted, "weights after the resumed step")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_ssamd_drop_grow_updates_match_the_reference_backend(backend, monkeypatch, gen):
    """SSAM-D's update on the device (drop the lowest |grad|, grow at random from the device's
    generator): ``backend`` (``auto``, the compiled kernels where they are; ``triton``) and the
    reference backend make the same masks bit for bit at each of three updates, at the requested
    density, and close weights.

    A step leaves the two runs' weights ulps apart (the kernels sum the norm in another order),
    and the next gradient with them: a drop score within rounding of the threshold could then
    rank otherwise and flip an entry. So each ``backend`` step starts from the reference run's
    weights before that step (copied in): its gradient at ``w``, the drop score, is then the
    reference's bit for bit (same device and autograd kernels, TF32 off, deterministic cuDNN;
    BatchNorm's running statistics do not enter a training-mode forward), the masks going in are
    equal (the previous update's, compared) and the generators, seeded alike, have drawn alike:
    what is compared is the update itself, given the same inputs. The weights after the last
    step differ by summation order (the norm, and the momentum buffers of the earlier steps)."""
    if backend == "triton" and importlib.util.find_spec("triton") is None:  # (SSAM_BACKEND is a preference)
        pytest.fail("triton is not installed: this case would compare another backend with the reference")
    state = gen.get_state()
    runs = []
    for run_backend in ("torch", backend):
        model, x, y = _setup(DEVICE, run_backend, monkeypatch, state)
        opt = _optimizer("SSAMD", "dense", model, x, y)
        starts, masks = [], []
        for epoch in range(3):
            if runs:  # the reference run's weights before this step (see the docstring)
                with torch.no_grad():
                    for p, w in zip(model.parameters(), runs[0][0][epoch]):
                        p.copy_(w)
            starts.append([p.detach().clone() for p in model.parameters()])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(_closure(model, opt, x, y, torch.float32, None), epoch=epoch, batch_idx=0)
            masks.append([m.cpu() for m in opt.masks()])
            assert abs(opt.mask_density() - 0.5) < 0.01
        assert opt.mask_updates == 3
        runs.append((starts, masks, [p.detach().cpu() for p in model.parameters()]))
    for epoch, (m0, m1) in enumerate(zip(runs[0][1], runs[1][1])):
        assert_tensors_equal(m1, m0, f"masks after the update at epoch {epoch}")
    for a, b in zip(runs[0][2], runs[1][2]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["channels_last", "compiled"])
def test_channels_last_and_compiled_models_match_the_cpu_reference(variant, monkeypatch, gen):
    """A channels_last model (as the benchmarks run convnets) and a ``torch.compile``d one,
    through SSAM-F's exact ascent: the CPU reference's weights."""
    kw = {"channels_last": True} if variant == "channels_last" else {"compile_model": True}
    ref, dev = _pair(monkeypatch, gen, "SSAMF", "exact", **kw)
    for a, b in zip(ref[1], dev[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_the_fisher_on_the_device_is_the_cpu_one_from_per_layer_gradients(monkeypatch, gen):
    """SSAM-F's Fisher on the device: the per-layer method (on a GPU its per-sample weight
    gradients batched, one grouped convolution per layer), equal to the CPU's up to fp32
    summation order."""
    import ssam.fisher

    chosen = []
    methods = ssam.fisher._methods
    monkeypatch.setattr(ssam.fisher, "_methods", lambda *args: chosen.append(methods(*args)) or chosen[-1])
    torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))  # fresh weights, replayable
    model = Net()
    x, y = _batch(gen, 24)
    ref = ssam.fisher.empirical_fisher(model, list(model.parameters()), [(x, y)], 24, chunk_size=16)
    model.to(DEVICE)
    fisher = ssam.fisher.empirical_fisher(model, list(model.parameters()), [(x.to(DEVICE), y.to(DEVICE))], 24,
                                          chunk_size=16)
    layerwise = chosen[-1][0]
    assert type(layerwise) is ssam.fisher._Layerwise and layerwise.batched == (DEVICE.type != "cpu")
    assert layerwise.independence_checked  # it ran (no fallback to vmap)
    for f, r in zip(fisher, ref):
        torch.testing.assert_close(f.cpu(), r, rtol=1e-4, atol=1e-6 * r.abs().max().item())
