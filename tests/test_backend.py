import subprocess
import sys

import pytest
import torch

import ssam_kernels
from ssam_kernels import BackendUnavailableError, grad_norm
from ssam_kernels._backend import OpBackends

pytestmark = pytest.mark.cpu


def test_auto_runs_the_backend_it_reports(monkeypatch):
    # which implementation ran, seen directly (backends often agree bit for bit)
    table, ran = ssam_kernels._library.TABLES["grad_norm"], []
    for name, fn in list(table.impls.items()):
        monkeypatch.setitem(table.impls, name, lambda *a, _name=name, _fn=fn: ran.append(_name) or _fn(*a))
    t = [torch.randn(1000)]
    chosen = ssam_kernels.backend_info("cpu")["ops"]["grad_norm"]["auto"]
    auto = grad_norm(t, backend="auto")
    assert ran == [chosen]
    torch.testing.assert_close(auto, grad_norm(t, backend="torch"), rtol=1e-6, atol=0)
    assert ran == [chosen, "torch"]


def test_device_arguments_are_checked():
    with pytest.raises(TypeError, match="device must be a str or torch.device, got int"):
        ssam_kernels.backend_info(123)
    with pytest.raises(ValueError, match="device must name a torch device .* got 'tpu'"):
        ssam_kernels.auto_backend("grad_norm", "tpu")
    assert ssam_kernels.auto_backend("grad_norm", torch.device("cpu")) == ssam_kernels.auto_backend("grad_norm", "cpu")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        grad_norm([torch.ones(3)], backend="cuda")


def test_env_preference_falls_back_where_it_cannot_run(monkeypatch):
    op = OpBackends("demo")
    op.register("torch", lambda: "torch")
    monkeypatch.setenv("SSAM_BACKEND", "torch")
    assert op.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("SSAM_BACKEND", "ext")  # no ext implementation: auto's choice
    assert op.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("SSAM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SSAM_BACKEND='bogus'"):
        op.resolve("auto", torch.device("cpu"))
    # an explicit backend= is strict, whatever the environment says
    monkeypatch.setenv("SSAM_BACKEND", "torch")
    with pytest.raises(BackendUnavailableError, match="backend='ext'.*no 'ext' implementation"):
        op.resolve("ext", torch.device("cpu"))


def test_env_preference_is_used_where_it_can_run(monkeypatch):
    op = OpBackends("demo")
    op.register("torch", lambda: "torch")
    op.register("ext", lambda: "ext", devices=("cpu",))
    monkeypatch.setattr(ssam_kernels._backend, "_runtime_available", lambda b: True)
    monkeypatch.setenv("SSAM_BACKEND", "ext")
    assert op.resolve("auto", torch.device("cpu")) == "ext"


def test_auto_prefers_registered_fast_backend_on_its_device(monkeypatch):
    op = OpBackends("demo")
    op.register("torch", lambda: "torch")
    op.register("triton", lambda: "triton", devices=("cuda",))
    monkeypatch.setattr(ssam_kernels._backend, "_runtime_available", lambda b: True)
    assert op.resolve("auto", torch.device("cuda")) == "triton"
    assert op.resolve("auto", torch.device("cpu")) == "torch"
    with pytest.raises(BackendUnavailableError, match="does not run on cpu"):
        op.resolve("triton", torch.device("cpu"))


def test_backend_info_lists_every_op():
    info = ssam_kernels.backend_info()
    expected = {"grad_norm", "perturb_", "restore_", "nm_mask", "topk_mask", "compress_24", "decompress_24"}
    assert expected <= set(info["ops"])
    assert info["extension"] is (info["extension_error"] is None)
    for name, v in info["ops"].items():  # on CPU: the C++ kernels where built, else the reference
        assert v["auto"] == ("ext" if info["extension"] and "ext" in v["implemented"] else "torch"), name


def test_import_never_needs_triton_or_extension():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['ssam_kernels._C'] = None\n"
        "import ssam_kernels, ssam, torch\n"
        "print(ssam_kernels.grad_norm([torch.ones(4)]).item())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2.0"


def test_extension_loader_reports_why(monkeypatch):
    from importlib.machinery import ModuleSpec

    from ssam_kernels import _backend

    _backend.extension_error.cache_clear()
    try:
        monkeypatch.setattr(_backend.importlib.util, "find_spec", lambda name: None)
        assert "was not built" in _backend.extension_error()
        _backend.extension_error.cache_clear()
        spec = ModuleSpec("ssam_kernels._C", None, origin="/nonexistent/_C.so")
        monkeypatch.setattr(_backend.importlib.util, "find_spec", lambda name: spec)
        assert "_C.so" in _backend.extension_error()
        with pytest.raises(BackendUnavailableError, match="did not load"):
            op = OpBackends("demo")
            op.register("ext", lambda: None)
            op.resolve("ext", torch.device("cpu"))
    finally:
        _backend.extension_error.cache_clear()


def test_ext_on_a_device_needs_a_registered_kernel():
    from ssam_kernels._backend import extension_has_kernel

    assert not extension_has_kernel("no_such_op", "cpu")
    assert not extension_has_kernel("grad_norm", "mps")


def test_auto_backend_matches_backend_info_and_rejects_unknown_ops():
    import ssam_kernels

    info = ssam_kernels.backend_info("cpu")["ops"]
    for op, facts in info.items():
        assert ssam_kernels.auto_backend(op, "cpu") == facts["auto"]
    with pytest.raises(ValueError, match="op must be one of"):
        ssam_kernels.auto_backend("no_such_op", "cpu")


def test_an_op_may_order_auto_itself(monkeypatch):
    """masked_weight_grad's auto on CUDA is cuBLAS (torch) until its Triton kernel measures
    faster; the other ops keep AUTO_ORDER; an explicit backend still runs Triton."""
    monkeypatch.setattr(ssam_kernels._backend, "_runtime_available", lambda b: True)
    table = ssam_kernels._library.TABLES
    assert table["masked_weight_grad"].resolve("auto", torch.device("cuda")) == "torch"
    assert table["masked_weight_grad"].resolve("triton", torch.device("cuda")) == "triton"
    assert table["grad_norm"].resolve("auto", torch.device("cuda")) == "triton"
    op = OpBackends("demo", auto_order={"cuda": ("torch", "triton")})
    op.register("torch", lambda: "torch")
    op.register("triton", lambda: "triton", devices=("cuda",))
    assert op.resolve("auto", torch.device("cuda")) == "torch"


def test_eager_when_traced_runs_the_function_eagerly_inside_a_compiled_caller():
    """What ``eager_when_traced`` wraps (kernels writing through address tables, cuSPARSELt's
    searched products) runs as Python on real tensors where torch.compile traces its caller,
    whose graph breaks there; traced instead, the function would see ``is_compiling()`` True."""
    from ssam_kernels._backend import eager_when_traced

    seen = []

    @eager_when_traced
    def f(x):
        seen.append((torch.compiler.is_compiling(), type(x).__name__))
        return x + 1

    @torch.compile(backend="eager")
    def caller(x):
        return f(x * 2) * 3

    x = torch.arange(4.0)
    torch.testing.assert_close(caller(x), (x * 2 + 1) * 3)
    torch.testing.assert_close(f(x), x + 1)
    assert seen == [(False, "Tensor")] * 2
