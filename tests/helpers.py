"""Shared test helpers: odd sizes, random tensors per dtype, small models."""

import collections
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

ODD_SIZES = [1, 3, 4095, 10**6 + 3]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def rand(shape, dtype=torch.float32, generator=None, device="cpu"):
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def rand64(shape, generator=None):
    """Float64 values with all 53 bits in use (``rand`` casts fp32 values, which fp32 math
    would keep exact)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def rand_mask(shape, density=0.5, generator=None, device="cpu"):
    return (torch.rand(shape, generator=generator) < density).to(device)


class MLP(nn.Module):
    def __init__(self, din=10, hidden=16, dout=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(din, hidden), nn.Tanh(), nn.Linear(hidden, dout))

    def forward(self, x):
        return self.net(x)


class SmallConvBN(nn.Module):
    """conv + BN + linear: the shape of the paper's nets, small enough for a loop oracle."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def regression_batch(generator, n=8, din=10, dout=4):
    return torch.randn(n, din, generator=generator), torch.randn(n, dout, generator=generator)


def hand_written_sam_step(model, x, y, rho, lr, momentum, adaptive, bufs):
    """One SAM step written out by hand: e = rho g / (||g|| + 1e-7) (ASAM: w^2 g / (||w g|| +
    1e-7)), the gradient at w + e, back to exactly w, torch's SGD with momentum (no dampening;
    ``bufs``: one momentum buffer or None per parameter, updated in place)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(F.mse_loss(model(x), y), params)
    with torch.no_grad():
        scaled = [p.abs() * g if adaptive else g for p, g in zip(params, grads)]
        scale = rho / (torch.cat([s.reshape(-1) for s in scaled]).norm() + 1e-7)
        saved = [p.clone() for p in params]
        for p, g in zip(params, grads):
            p.add_((p * p * g if adaptive else g) * scale)
    grads = torch.autograd.grad(F.mse_loss(model(x), y), params)
    with torch.no_grad():
        for i, (p, s, g) in enumerate(zip(params, saved, grads)):
            p.copy_(s)
            bufs[i] = g.clone() if bufs[i] is None else bufs[i].mul_(momentum).add_(g)
            p.add_(bufs[i], alpha=-lr)


def make_closure(model, x, y, loss_fn=F.mse_loss):
    """The closure SAM-style optimizers take: loss at the current weights, backward, return."""

    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


# --- backends under test --------------------------------------------------------------------
import importlib.util  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

TRITON_ON_CPU = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="needs triton with TRITON_INTERPRET=1 (set by conftest when no GPU is present)"
)

# Parametrize an op test over these: the reference in the cpu tier, Triton in the interpret tier.
BACKENDS = [
    pytest.param("torch", marks=pytest.mark.cpu),
    pytest.param("triton", marks=[pytest.mark.interpret, needs_interpreter]),
]


def _extension_loaded() -> bool:
    from ssam_kernels._backend import extension_error

    return extension_error() is None


EXT_BUILT = _extension_loaded()
needs_ext = pytest.mark.skipif(not EXT_BUILT, reason="ssam_kernels._C not built")
# ...plus the compiled extension's C++ CPU kernels (cpu tier), for the ops it implements. CI
# installs with the extension, so these run there; a pure-Python install skips them.
BACKENDS_WITH_EXT = BACKENDS + [
    pytest.param("ext", marks=[pytest.mark.cpu, needs_ext]),
]


def backend_dtypes(dtypes, backends=None):
    """(backend, dtype) params: every dtype for the reference; Triton's interpreter has no bf16
    (the cuda tier runs Triton in bf16)."""
    return [
        pytest.param(b.values[0], d, marks=b.marks, id=f"{b.values[0]}-{str(d).split('.')[-1]}")
        for b in (BACKENDS if backends is None else backends)
        for d in dtypes
        if not (b.values[0] == "triton" and d == torch.bfloat16)
    ]


# --- the optimizers in every ascent mode (frontend tests) -------------------------------------
ASCENT_MODES = ("dense", "exact", "implicit", "mvue", "mvue_dx")
# (optimizer, ascent_backward): SAM, and each sparse optimizer in every ascent mode
OPTIMIZER_CONFIGS = [("SAM", "dense")] + [(k, m) for k in ("SSAMF", "SSAMD") for m in ASCENT_MODES]


def make_optimizer(kind, mode, model, seed=1, **base_kwargs):
    """SAM, SSAMF or SSAMD over SGD on ``model``, set up so ``mode`` can run: ``exact`` needs the
    masked norm, the 2:4 modes a ``2:4:out`` mask."""
    import ssam

    params = model.parameters()
    base_kwargs.setdefault("lr", 0.1)
    if kind == "SAM":
        return ssam.SAM(params, torch.optim.SGD, rho=0.05, **base_kwargs)
    two_four = mode in ("implicit", "mvue", "mvue_dx")
    common = dict(rho=0.05, sparsity=None if two_four else 0.5, structure="2:4:out" if two_four else "unstructured",
                  norm="masked" if mode == "exact" else "full", ascent_backward=mode, seed=seed, **base_kwargs)
    if kind == "SSAMF":
        return ssam.SSAMF(params, torch.optim.SGD, num_samples=8, update_freq=1, **common)
    return ssam.SSAMD(params, torch.optim.SGD, drop_rate=0.5, T_end=10, **common)


def setup_training(kind, mode, gen, **optimizer_kwargs):
    """A seeded MLP, its optimizer (momentum 0.9) with a fitted mask, and a regression batch."""
    x, y = regression_batch(gen, n=16)
    torch.manual_seed(0)
    model = MLP()
    opt = make_optimizer(kind, mode, model, momentum=0.9, **optimizer_kwargs)
    fit_mask(opt, model, x, y)
    return model, opt, x, y


def fit_mask(opt, model, x, y):
    """SSAM-F's first mask, from the regression batch ``(x, y)``; nothing for the others."""
    import ssam

    if isinstance(opt, ssam.SSAMF):
        opt.update_mask(model, torch.utils.data.TensorDataset(x, y), loss_fn=F.mse_loss)


# Triton's interpreter is slow, and the frontend's logic is the same on every backend: under
# it, one config per optimizer, covering the masked-norm, 2:4 and MVUE paths
INTERPRETED_CONFIGS = [("SAM", "dense"), ("SSAMF", "exact"), ("SSAMD", "mvue")]


def backend_configs(configs=OPTIMIZER_CONFIGS, keep=lambda backend, kind, mode: True):
    """(backend, kind, mode) params: every config on the reference and the extension, the
    INTERPRETED_CONFIGS among them under Triton; ``keep`` filters further."""
    return [
        pytest.param(b.values[0], k, m, marks=b.marks, id=f"{k}-{m}-{b.values[0]}")
        for b in BACKENDS_WITH_EXT
        for k, m in configs
        if (b.values[0] != "triton" or (k, m) in INTERPRETED_CONFIGS) and keep(b.values[0], k, m)
    ]


# the three optimizers on each step path: the planned step (extension; Triton for SAM, the
# others are slow interpreted), the per-list ops on the reference
STEP_PATHS = backend_configs([("SAM", "dense"), ("SSAMF", "dense"), ("SSAMD", "dense")],
                             keep=lambda backend, kind, mode: backend != "triton" or kind == "SAM")


def weights_of(model) -> list[torch.Tensor]:
    """Copies of a model's parameters, to compare with later."""
    return [p.detach().clone() for p in model.parameters()]


# CUDA's launch limits: grid axis 0 up to 2**31 - 1 blocks, axes 1 and 2 up to 65535
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


class GridRecorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's grid and runs nothing, so a
    launcher can be driven with meta tensors of shapes too large to run here."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None

    def within_cuda_limits(self):
        return bool(self.grids) and all(
            len(g) <= 3 and all(0 < n <= limit for n, limit in zip(g, CUDA_GRID_LIMITS)) for g in self.grids)


def interpreter_fma_is_fused() -> bool:
    """Whether Triton's CPU interpreter computes tl.fma with one rounding (3.9 does, 3.6 not)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(a, b, c, out):
        tl.store(out, tl.fma(tl.load(a), tl.load(b), tl.load(c)))

    a, b = torch.tensor([1.0 + 2**-23]), torch.tensor([1.0 - 2**-23])
    c, out = torch.tensor([-1.0]), torch.empty(1)
    probe[(1,)](a, b, c, out)
    return float(out) == -(2**-46)  # the exact a * b + c; rounding a * b first gives 0


# --- counting dispatcher ops ------------------------------------------------------------------

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.item.default,
           torch.ops.aten.masked_select.default}


class RecordOps(TorchDispatchMode):
    """Every dispatcher op a block runs, in order (``ops``), and those among them that wait for
    the device (``syncing``: a scalar read, ``nonzero``, ``masked_select``, boolean indexing)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncing = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        bool_index = func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if func in SYNCING or bool_index:
            self.syncing.append(func)
        return func(*args, **(kwargs or {}))

    def names(self) -> list[str]:
        return [f.overloadpacket.__name__ for f in self.ops]

    def count(self, *funcs) -> int:
        """How many of the ops are among ``funcs`` (overloads)."""
        return sum(f in funcs for f in self.ops)

    def kernels(self) -> collections.Counter:
        """The ops that run a kernel (views launch nothing), by name."""
        return collections.Counter(f.overloadpacket.__name__ for f in self.ops if not f.is_view)


def assert_tensors_equal(got, want, what: str = "tensors") -> None:
    """``got[i]`` equals ``want[i]`` exactly (``torch.equal``: shape and values) for every ``i``,
    and there are as many of each; else an AssertionError naming the first that differs and how."""
    got, want = list(got), list(want)
    assert len(got) == len(want), f"{what}: {len(got)} tensors, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if torch.equal(a, b):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(f"{what}[{i}]: {tuple(a.shape)} {a.dtype}, expected {tuple(b.shape)} {b.dtype}")
        differ = a != b
        detail = f"{int(differ.sum())} of {a.numel()} elements differ"
        if a.is_floating_point():
            detail += f", largest |difference| {float((a.double() - b.double()).abs().nan_to_num(float('inf')).max()):.3g}"
        raise AssertionError(f"{what}[{i}]: {detail}")



# --- poisoned allocations ---------------------------------------------------------------------
# The Triton launchers allocate their outputs with torch.empty / torch.empty_like and rely on
# their kernels to write every element. A fresh CPU allocation often comes back zeroed, and zeros
# (or False) are most of the right answers of a mask or a sparse result: a kernel that skipped
# storing them would pass. Under ``poisoned_allocations`` those allocations come back filled
# with values no kernel writes by accident, so an element left unwritten fails the comparison.
POISON_BYTE = 0x5A  # integer dtypes: this byte (int8 0x5A, int16 0x5A5A, ...)


def _poison_bits(n: int, device) -> torch.Tensor:
    """A fixed pseudo-random 0/1 pattern of ``n`` elements (int64; the same on every device and
    run, drawn from no generator): where a dtype has only two answers (bool), poisoning with
    one of them cannot tell a kernel that skips storing that answer from a correct one, so such
    memory gets both, mixed. Element 0 gets 1 (True), so a one-element output still catches an
    unwritten False, as an all-True poison did."""
    # a murmur-style mix of the index (period 2^32); each product stays below 2^63 for n < 2^31
    x = (torch.arange(n, dtype=torch.int64, device=device) * 0x9E3779B1) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x5BD1E995) & 0xFFFFFFFF
    return (((x ^ (x >> 15)) >> 11) & 1) ^ 1


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh allocation in place. Floating and complex: NaN. Bool: True and False mixed
    (``_poison_bits``). One-byte integers, which the launchers view as bool: ``POISON_BYTE`` and
    0 mixed, the same way (0x5A is neither 0 nor 1 and, read as bool, true). Wider integers:
    ``POISON_BYTE`` in every byte. The whole storage is filled through a flat view, so any strides
    (gaps, overlaps) work; tensors with no bytes, meta tensors and non-strided layouts are left
    alone."""
    if t.layout != torch.strided or t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
        return t
    with torch.no_grad():
        flat = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
        if t.dtype == torch.bool:
            flat.copy_(_poison_bits(flat.numel(), t.device))
        elif t.is_floating_point() or t.is_complex():
            flat.fill_(float("nan"))
        elif t.element_size() == 1:
            flat.view(torch.uint8).copy_(_poison_bits(flat.numel(), t.device) * POISON_BYTE)
        else:
            flat.view(torch.uint8).fill_(POISON_BYTE)
    return t


def _poisoning(allocate):
    def poisoned(*args, **kwargs):
        out = allocate(*args, **kwargs)
        # with out=, the memory is the caller's (it may share a storage): left as it is
        return out if kwargs.get("out") is not None else poison_(out)

    return poisoned


# patched on the torch module and the Tensor class: the ops modules call them through these
_ALLOCATORS = [(torch, "empty"), (torch, "empty_like"), (torch, "empty_strided"), (torch.Tensor, "new_empty"),
               (torch.Tensor, "new_empty_strided")]


@contextlib.contextmanager
def poisoned_allocations(active: bool = True):
    """Within the block, ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` and
    ``Tensor.new_empty(_strided)`` called from Python return poisoned memory (``poison_``);
    nothing changes where ``active`` is false. Allocations made in C++ (the extension, torch's
    own ops) are not affected. Compute a test's expected values outside the block where they
    come from Python code that allocates this way."""
    if not active:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        for owner, name in _ALLOCATORS:
            mp.setattr(owner, name, _poisoning(getattr(owner, name)))
        yield
