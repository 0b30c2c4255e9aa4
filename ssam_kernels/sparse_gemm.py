"""``A @ B`` for a 2:4-sparse ``A`` on sparse tensor cores (cuSPARSELt), or dense.

``A`` is a dense-stored ``[m, k]`` fp16/bf16 matrix with at most two nonzeros in every group of
four along ``k`` (the contraction dimension, as sparse tensor cores need). cuSPARSELt needs
``m`` and ``k`` multiples of 16 and ``B``'s ``n`` a multiple of 8; PyTorch's CUTLASS sparse ops
run only on compute capability 8.x, so cuSPARSELt (``torch._cslt_sparse_mm``, sm_80 and sm_90)
is the one sparse path. Its configuration is tuned once per shape, dtype and layout: the
algorithm cuSPARSELt's own search picks (``torch._cslt_sparse_mm_search``) beside its default,
each with the result written as is or transposed (``transpose_result``), all timed. ``gemm="auto"``
keeps the fastest of them where it beats the dense GEMM with the compression included, else
runs dense (on the H200 at 4344f0b, the untuned GEMM ran at 0.11-0.38x dense). Every time
measured stays readable (:func:`gemm_trials`), for ``bench_ascent_linear``. Shapes
cuSPARSELt rejects run dense, with one log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

log = logging.getLogger("ssam_kernels")

GEMMS = ("auto", "dense", "cusparselt")
SPARSE_DTYPES = (torch.float16, torch.bfloat16)

_CHOICE: dict[tuple, tuple[str, "CsltConfig | None"]] = {}  # measured auto choice per _key
_CONFIG: dict[tuple, "CsltConfig"] = {}  # cuSPARSELt's configuration per _key (searched, or measured best)
_TRIALS: dict[tuple, dict[str, float]] = {}  # every time measured per _key, in ms
_LOGGED: set[tuple] = set()


@dataclass(frozen=True)
class CsltConfig:
    """How ``torch._cslt_sparse_mm`` runs: cuSPARSELt's algorithm, and whether it writes the
    result transposed (``[n, m]``, returned as its ``[m, n]`` view)."""

    alg_id: int = 0
    transpose_result: bool = False

    def label(self) -> str:
        return f"alg {self.alg_id}" + (" T" if self.transpose_result else "")


def _key(a: torch.Tensor, b: torch.Tensor) -> tuple:
    return a.device.index, a.dtype, tuple(a.shape), tuple(b.shape), b.stride()


def log_once(key: tuple, message: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(message)


def cusparselt_unsupported(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why ``torch._cslt_sparse_mm(compress(a), b)`` cannot run here, or None."""
    if a.device.type != "cuda":
        return f"tensors are on {a.device}, cuSPARSELt runs on CUDA"
    if not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    if torch.cuda.get_device_capability(a.device) < (8, 0):
        return "sparse tensor cores need compute capability >= 8.0"
    if a.dtype not in SPARSE_DTYPES or b.dtype != a.dtype:
        return f"dtypes {a.dtype} @ {b.dtype}; cuSPARSELt here takes float16 or bfloat16 for both"
    (m, k), n = a.shape, b.shape[1]
    if m % 16 or k % 16 or n % 8:
        return f"shape [{m}, {k}] @ [{k}, {n}]: cuSPARSELt needs m, k multiples of 16 and n of 8"
    return None


def _cslt_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``torch._cslt_sparse_mm(compressed A, B)``: the products of A's kept half
    (2:4), ``m * k * n`` (a dense ``[m, k] @ [k, n]`` counts twice that). ``k`` is B's rows; ``m``
    and ``n`` come from the result (``[n, m]`` with ``transpose_result``), since the compressed
    A is a flat buffer."""
    k = b_shape[0]
    return out_shape[0] * out_shape[1] * k


# torch's FLOP counter has no formula for the sparse GEMM: without one, FlopCounterMode (and the
# FLOP columns of ssam-bench) would not see it
if torch.ops.aten._cslt_sparse_mm not in flop_registry:
    register_flop_formula(torch.ops.aten._cslt_sparse_mm)(_cslt_flops)


def _dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


def cslt_mm(packed: torch.Tensor, b: torch.Tensor, config: CsltConfig) -> torch.Tensor:
    """``A @ b`` from A compressed by ``torch._cslt_compress``, as ``config`` says."""
    out = torch._cslt_sparse_mm(packed, b, alg_id=config.alg_id, transpose_result=config.transpose_result)
    return out.t() if config.transpose_result else out


def _searched(packed: torch.Tensor, b: torch.Tensor, key: tuple) -> CsltConfig:
    """cuSPARSELt's own algorithm search for this shape (once per key; its default where the
    search fails)."""
    if key not in _CONFIG:
        try:
            _CONFIG[key] = CsltConfig(int(torch._cslt_sparse_mm_search(packed, b)))
        except (RuntimeError, AttributeError) as exc:  # a cuSPARSELt or torch without it, a shape it rejects
            log_once(("search",) + key, f"sparse_mm_24: cuSPARSELt's algorithm search failed ({exc}); default algorithm")
            _CONFIG[key] = CsltConfig()
    return _CONFIG[key]


def _cusparselt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # compressed every call: A changes every step (weights, or a fresh MVUE draw)
    packed = torch._cslt_compress(a.contiguous())
    return cslt_mm(packed, b, _searched(packed, b, _key(a, b)))


def _median_ms(fn, reps: int = 7) -> float:
    fn()  # warm-up (cuSPARSELt plans, cuBLAS heuristics)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def tune(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Time, once per shape, dtype and layout (cached): the dense GEMM, the compression, and
    the sparse GEMM in every configuration tried (the default and the searched algorithm, each
    with and without ``transpose_result``; one that cuSPARSELt refuses is skipped, with a log
    line); keep the fastest configuration for this shape.
    Returns the times in ms by label (``"dense"``, ``"compress"``, ``"alg 0"``, ``"alg 3 T"``...)."""
    key = _key(a, b)
    if key not in _TRIALS:
        packed = torch._cslt_compress(a.contiguous())
        configs = dict.fromkeys([CsltConfig(), _searched(packed, b, key)])
        configs = [CsltConfig(c.alg_id, t) for c in configs for t in (False, True)]
        trials = {"dense": _median_ms(lambda: _dense(a, b)),
                  "compress": _median_ms(lambda: torch._cslt_compress(a.contiguous()))}
        timed = []
        for config in configs:
            try:
                trials[config.label()] = _median_ms(lambda c=config: cslt_mm(packed, b, c))
                timed.append(config)
            except RuntimeError as exc:  # an algorithm id out of range for the transposed layout...
                if config == CsltConfig():
                    raise  # the default configuration is what every other path runs
                log_once(("config", config) + key, f"sparse_mm_24: cuSPARSELt {config.label()} failed ({exc}); skipped")
        _CONFIG[key] = min(timed, key=lambda c: trials[c.label()])
        _TRIALS[key] = trials
    return dict(_TRIALS[key])


def tuned_config(a: torch.Tensor, b: torch.Tensor) -> CsltConfig:
    """The configuration :func:`tune` kept for this shape (tuning it first if needed)."""
    tune(a, b)
    return _CONFIG[_key(a, b)]


def gemm_trials() -> dict[tuple, dict[str, float]]:
    """Every shape tuned so far: ``(device index, dtype, a's shape, b's shape, b's strides)`` ->
    the times :func:`tune` measured."""
    return {k: dict(v) for k, v in _TRIALS.items()}


def _auto_choice(a: torch.Tensor, b: torch.Tensor) -> str:
    key = _key(a, b)
    if key not in _CHOICE:
        trials = tune(a, b)
        best = _CONFIG[key]
        sparse_ms = trials[best.label()] + trials["compress"]
        _CHOICE[key] = ("cusparselt" if sparse_ms < trials["dense"] else "dense", best)
        log.info("sparse_mm_24 %s @ %s %s: cuSPARSELt %.3f ms (%s, compression included), dense %.3f ms -> %s",
                 tuple(a.shape), tuple(b.shape), str(a.dtype).split(".")[-1], sparse_ms, best.label(),
                 trials["dense"], _CHOICE[key][0])
    return _CHOICE[key][0]


def resolve_gemm(gemm: str, a: torch.Tensor, b: torch.Tensor) -> str:
    """The path ``sparse_mm_24`` takes: ``"dense"`` or ``"cusparselt"``."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    if gemm == "dense":
        return "dense"
    why = cusparselt_unsupported(a, b)
    if why is not None:
        if gemm == "cusparselt":
            raise ValueError(f"gemm='cusparselt' cannot run: {why}")
        if a.device.type == "cuda":
            log_once(("shape", a.device.type, a.dtype, tuple(a.shape), tuple(b.shape)),
                     f"sparse_mm_24: dense GEMM for {tuple(a.shape)} @ {tuple(b.shape)} ({why})")
        return "dense"
    return "cusparselt" if gemm == "cusparselt" else _auto_choice(a, b)


def sparse_mm_24(a: torch.Tensor, b: torch.Tensor, *, gemm: str = "auto", check: bool = True) -> torch.Tensor:
    """``a @ b`` where ``a`` (``[m, k]``) is 2:4-sparse along ``k``. On cuSPARSELt the result may
    be the ``[m, n]`` view of a ``[n, m]`` tensor (where writing it transposed was faster).

    Args:
        gemm: ``"auto"`` (measured per shape, see the module docstring), ``"dense"`` or
            ``"cusparselt"`` (strict: ``ValueError`` where it cannot run).
        check: verify that ``a`` is 2:4 along ``k`` (one pass over ``a`` and a host sync;
            cuSPARSELt would silently drop extra nonzeros). Callers that built ``a`` 2:4 pass
            False.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[0] or a.device != b.device:
        raise ValueError(f"cannot multiply a {tuple(a.shape)} on {a.device} by b {tuple(b.shape)} on {b.device}")
    if a.shape[1] % 4:
        raise ValueError(f"a's contraction dim must be a multiple of 4 for 2:4 groups, got {a.shape[1]}")
    if check and bool(((a.reshape(-1, 4) != 0).sum(-1) > 2).any()):
        raise ValueError("a is not 2:4 sparse along its last dim (a group of 4 holds more than 2 nonzeros)")
    path = resolve_gemm(gemm, a, b)
    return _cusparselt(a, b) if path == "cusparselt" else _dense(a, b)
