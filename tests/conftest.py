import importlib.util
import json
import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through its interpreter (the interpret tier).
# It must be chosen before triton is first imported.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# cuBLAS's GEMMs repeat their bits only with a fixed workspace (the cuda tier's deterministic
# algorithms, below); read when its first handle is made, so set before any test runs
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


TIERS = ("cpu", "interpret", "compile", "cuda")

# The compile tier compiles, for real GPU targets, every kernel launch the interpret tier makes:
# each launch's arguments are recorded here (as descriptors) while it runs.
RECORDED_LAUNCHES: dict[str, None] = {}  # JSON lines, in first-seen order
UNRECORDED_LAUNCHES: list[str] = []


def _record_interpreted_launches() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    from ssam_bench.compile_kernels import describe_launch

    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not self.fn.__module__.startswith("ssam_kernels."):  # a test's own probe kernel
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        try:
            RECORDED_LAUNCHES.setdefault(json.dumps(describe_launch(self, args, kwargs), sort_keys=True))
        except TypeError as exc:
            UNRECORDED_LAUNCHES.append(f"{getattr(self.fn, '__qualname__', self)}: {exc}")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _record_interpreted_launches()


def pytest_collection_modifyitems(config, items):
    untiered = [i.nodeid for i in items if sum(i.get_closest_marker(t) is not None for t in TIERS) != 1]
    if untiered:
        raise pytest.UsageError(f"tests need exactly one tier marker of {TIERS}: {untiered[:5]}")
    # the compile tier last: it compiles what the interpret tier launched
    items[:] = [i for i in items if i.get_closest_marker("compile") is None] + \
        [i for i in items if i.get_closest_marker("compile") is not None]
    if os.environ.get("SSAM_BUILD_EXT") == "1":  # the extension is required (CI): its tests may not skip
        from ssam_kernels._backend import extension_error

        if extension_error() is not None:
            raise pytest.UsageError(f"SSAM_BUILD_EXT=1 but ssam_kernels._C does not load: {extension_error()}")
    if torch.cuda.is_available() or os.environ.get("SSAM_TEST_CUDA_DEVICE", "cuda") != "cuda":
        return  # a GPU, or a dry run of the cuda tier on another device (SSAM_TEST_CUDA_DEVICE)
    skip = pytest.mark.skip(reason="no CUDA device here; run the cuda tier on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _exact_cuda_math(request):
    """In the cuda tier, fp32 on the device means fp32: no TF32 (cuDNN's default for
    convolutions rounds their inputs to 10 bits, against CPU results compared at 1e-4), and
    deterministic algorithms (tests replay a run and compare the bits): cuDNN's, and torch's
    wherever it has one, with a warning naming any op that has none (so a replay that differs
    says which op did; an error would stop tests that compare no bits); with them, torch fills
    its fresh allocations (torch.empty) with NaN, which poisons what a kernel leaves unwritten.
    fp16/bf16 GEMMs reduce in fp32 (cuBLAS may otherwise round split-K partial sums to the
    inputs' dtype), so a low-precision result is rounded once, as the tests' bounds assume."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    flags = (torch.backends.cudnn, "allow_tf32"), (matmul, "allow_tf32"), (torch.backends.cudnn, "deterministic"), \
        (matmul, "allow_fp16_reduced_precision_reduction"), (matmul, "allow_bf16_reduced_precision_reduction")
    saved = [getattr(obj, name) for obj, name in flags]
    saved_algorithms = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    for (obj, name), value in zip(flags, (False, False, True, False, False)):
        setattr(obj, name, value)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    for (obj, name), value in zip(flags, saved):
        setattr(obj, name, value)
    torch.use_deterministic_algorithms(saved_algorithms[0], warn_only=saved_algorithms[1])


@pytest.fixture
def gen():
    """A CPU generator with a fresh seed per test, printed so a failure can be replayed:
    ``SSAM_TEST_SEED=<seed> pytest <test>`` runs it with that seed (tests seed torch's global
    generator themselves where they use it)."""
    replay = os.environ.get("SSAM_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed} (replay: SSAM_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def fused_sgd_everywhere(monkeypatch):
    """Let the optimizers fuse restore + SGD on CPU too. They fuse only where
    ``restore_sgd_step_`` has a kernel (the reference is slower than restore + torch's SGD),
    and on CPU it has none; the fused path's logic is tested with the reference kernel."""
    import ssam

    monkeypatch.setattr(ssam.SAM, "_fast_fused_sgd", staticmethod(lambda device: True))


@pytest.fixture
def poison_triton(request):
    """For a test parametrized by ``backend``: ``with poison_triton(): out = op(...,
    backend=backend)`` runs the block under ``poisoned_allocations`` where the backend is
    "triton" (its launchers allocate their outputs in Python), and leaves it alone for the
    others (the reference builds its results from whole-tensor ops; the extension allocates in
    C++)."""
    import helpers  # (not at the top: it reads TRITON_INTERPRET, which this file sets first)

    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if "backend" not in params:
        raise pytest.UsageError(f"poison_triton needs a test parametrized by backend: {request.node.nodeid}")
    return lambda: helpers.poisoned_allocations(params["backend"] == "triton")

