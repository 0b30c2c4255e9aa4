"""Shared test helpers: odd sizes, random tensors per dtype, small models."""

import torch
import torch.nn.functional as F
from torch import nn

ODD_SIZES = [1, 3, 4095, 10**6 + 3]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def rand(shape, dtype=torch.float32, generator=None, device="cpu"):
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


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
_needs_interpreter = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="needs triton with TRITON_INTERPRET=1 (set by conftest when no GPU is present)"
)

# Parametrize an op test over these: the reference in the cpu tier, Triton in the interpret tier.
BACKENDS = [
    pytest.param("torch", marks=pytest.mark.cpu),
    pytest.param("triton", marks=[pytest.mark.interpret, _needs_interpreter]),
]


def _extension_loaded() -> bool:
    from ssam_kernels._backend import extension_error

    return extension_error() is None


EXT_BUILT = _extension_loaded()
# ...plus the compiled extension's C++ CPU kernels (cpu tier), for the ops it implements. CI
# installs with the extension, so these run there; a pure-Python install skips them.
BACKENDS_WITH_EXT = BACKENDS + [
    pytest.param("ext", marks=[pytest.mark.cpu, pytest.mark.skipif(not EXT_BUILT, reason="ssam_kernels._C not built")]),
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
