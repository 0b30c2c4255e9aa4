"""``A @ B`` for a 2:4-sparse ``A`` on sparse tensor cores (cuSPARSELt), or dense.

``A`` is a dense-stored ``[m, k]`` fp16/bf16 matrix with at most two nonzeros in every group of
four along ``k`` (the contraction dimension, as sparse tensor cores need). cuSPARSELt needs
``m`` and ``k`` multiples of 16 and ``B``'s ``n`` a multiple of 8; PyTorch's CUTLASS sparse ops
run only on compute capability 8.x, so cuSPARSELt (sm_80 and sm_90) is the one sparse path.

It is reached two ways: torch's ``torch._cslt_compress`` / ``torch._cslt_sparse_mm``, which make
and destroy cuSPARSELt's descriptors and plan on every call (on the H200 at 4344f0b every 2:4 GEMM
of the ascent backward took 0.56-1.18 ms whatever its size, 0.11-0.38x dense: per-call host work),
and the extension's ``torch.ops.ssam_cslt`` ops (``csrc/cuda/cusparselt.cpp``), which keep them
per shape, dtype, layout and configuration ("planned" below). Each shape is tuned once: on each
path, cuSPARSELt's default algorithm and the one its own search picks (with its split-k on the
planned path), each with the result written as is or transposed (``transpose_result``), all
timed beside the dense GEMM and the compressions. ``gemm="auto"`` keeps the fastest where it beats
the dense GEMM with its compression included, else runs dense. Every time measured stays
readable (:func:`gemm_trials`), for ``bench_ascent_linear``. Shapes cuSPARSELt rejects run
dense, with one log line.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import flop_registry, register_flop_formula

from ._backend import eager_when_traced, on_device
from ._checks import _kind

log = logging.getLogger("ssam_kernels")

GEMMS = ("auto", "dense", "cusparselt")
SPARSE_DTYPES = (torch.float16, torch.bfloat16)

_CHOICE: dict[tuple, tuple[str, "CsltConfig | None"]] = {}  # measured auto choice per _key
_CONFIG: dict[tuple, "CsltConfig"] = {}  # the measured best configuration per _key
_SEARCHED: dict[tuple, "CsltConfig"] = {}  # cuSPARSELt's searched configuration per _key and path
_TRIALS: dict[tuple, dict[str, float]] = {}  # every time measured per _key, in ms
_TRIED: dict[tuple, dict[str, "CsltConfig"]] = {}  # the configurations timed per _key, by label
_LOGGED: set[tuple] = set()
# searched configurations kept (gemm="cusparselt" searches each new shape; with variable sequence
# lengths every token count is one): past this many the oldest is dropped, as the extension
# drops its least recently used cuSPARSELt plans past 256
MAX_SEARCHED = 256


@dataclass(frozen=True)
class CsltConfig:
    """How a cuSPARSELt product runs: through the extension's kept plans (``planned``) or
    ``torch._cslt_sparse_mm``; cuSPARSELt's algorithm, split-k (1: none) and split-k mode (-1:
    cuSPARSELt's choice); whether it writes the result transposed (``[n, m]``, returned as its
    ``[m, n]`` view)."""

    alg_id: int = 0
    transpose_result: bool = False
    split_k: int = 1
    split_k_mode: int = -1
    planned: bool = False

    def label(self) -> str:
        text = ("planned " if self.planned else "") + f"alg {self.alg_id}"
        if self.split_k != 1:
            text += f" split-k {self.split_k}"
        if self.split_k_mode > 0:  # (cuSPARSELt 0.8's modes past 2, data-parallel and stream-K, need no split)
            text += f" mode {self.split_k_mode}"
        return text + (" T" if self.transpose_result else "")


def _key(a: torch.Tensor, b: torch.Tensor) -> tuple:
    return a.device.index, a.dtype, tuple(a.shape), tuple(b.shape), b.stride()


def log_once(key: tuple, message: str) -> None:
    if key not in _LOGGED:
        if len(_LOGGED) >= MAX_SEARCHED * 4:  # (keys name shapes: a token count each, unbounded)
            _LOGGED.clear()
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
    if 0 in (m, k, n):  # (an empty token batch: cuSPARSELt's descriptors refuse a zero dimension)
        return f"shape [{m}, {k}] @ [{k}, {n}] is empty"
    if m % 16 or k % 16 or n % 8:
        return f"shape [{m}, {k}] @ [{k}, {n}]: cuSPARSELt needs m, k multiples of 16 and n of 8"
    return None


def cslt_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``torch._cslt_sparse_mm(compressed A, B)``: the products of A's kept half
    (2:4), ``m * k * n`` (a dense ``[m, k] @ [k, n]`` counts twice that). ``k`` is B's rows; ``m``
    and ``n`` come from the result (``[n, m]`` with ``transpose_result``), since the compressed
    A is a flat buffer."""
    k = b_shape[0]
    return out_shape[0] * out_shape[1] * k


# torch's FLOP counter has no formula for the sparse GEMM: without one, FlopCounterMode (and the
# FLOP columns of ssam-bench) would not see it
if torch.ops.aten._cslt_sparse_mm not in flop_registry:
    register_flop_formula(torch.ops.aten._cslt_sparse_mm)(cslt_flops)


def _dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


_PLANNED: list = []  # [why the planned path cannot run here, or None], once known


def planned_unavailable() -> str | None:
    """Why the extension's planned cuSPARSELt ops (``torch.ops.ssam_cslt``) cannot run in this
    process, or None. Opens cuSPARSELt on first use: the library torch's CUDA build loaded, else
    one from the ``nvidia`` wheels (``nvidia-cusparselt``)."""
    if not _PLANNED:
        _PLANNED.append(_open_planned())
    return _PLANNED[0]


PLANNED_ENV = "SSAM_CUSPARSELT_PLANNED"  # "0": torch's _cslt ops only (a switch for a misbehaving plan path)


def _open_planned() -> str | None:
    from ._backend import extension_error

    if os.environ.get(PLANNED_ENV, "1") == "0":
        return f"turned off ({PLANNED_ENV}=0)"
    if extension_error() is not None:
        return f"the extension did not load ({extension_error()})"
    if "ssam_cslt::mm" not in torch._C._dispatch_get_all_op_names():
        return "the extension was built without its CUDA part"
    tried = []
    for path in ("", *_wheel_libraries()):
        try:
            version = torch.ops.ssam_cslt.load(path)
        except RuntimeError as exc:
            tried.append(str(exc).splitlines()[0])
            continue
        log.info("sparse_mm_24: planned cuSPARSELt %s from %s", ".".join(map(str, version)), path or "libcusparseLt.so.0")
        return None
    return "; ".join(tried)


def _wheel_libraries() -> list[str]:
    """libcusparseLt.so.0 in the installed ``nvidia`` wheels (``nvidia/cusparselt/lib`` or
    ``nvidia/cu*/lib``)."""
    import glob
    import importlib.util
    import os

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec is not None and spec.submodule_search_locations else []
    return sorted({path for root in roots for pattern in ("cusparselt/lib", "cu*/lib")
                   for path in glob.glob(os.path.join(root, pattern, "libcusparseLt.so.0"))})


def compress(a: torch.Tensor, config: CsltConfig) -> torch.Tensor:
    """``a`` (2:4 along its last dim) compressed for :func:`cslt_mm` on ``config``'s path."""
    a = a.contiguous()
    return torch.ops.ssam_cslt.compress(a) if config.planned else torch._cslt_compress(a)


def cslt_mm(packed: torch.Tensor, b: torch.Tensor, config: CsltConfig) -> torch.Tensor:
    """``A @ b`` from A compressed by :func:`compress`, as ``config`` says."""
    if config.planned:
        out = torch.ops.ssam_cslt.mm(packed, b, config.alg_id, config.split_k, config.split_k_mode,
                                     config.transpose_result)
    elif config.split_k != 1:
        out = torch._cslt_sparse_mm(packed, b, alg_id=config.alg_id, transpose_result=config.transpose_result,
                                    split_k=config.split_k, split_k_mode=config.split_k_mode)
    else:
        out = torch._cslt_sparse_mm(packed, b, alg_id=config.alg_id, transpose_result=config.transpose_result)
    return out.t() if config.transpose_result else out


def _refuse_capture(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """A shape met first inside a CUDA graph capture: cuSPARSELt's search and the timings launch
    and wait on kernels of their own, which would break the capture (or be recorded in it)."""
    if a.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"sparse_mm_24({what}): a {tuple(a.shape)} @ {tuple(b.shape)} product met first inside a "
                           "CUDA graph capture cannot be searched or timed there: run the step once before capturing")


def _search(packed: torch.Tensor, b: torch.Tensor, planned: bool) -> CsltConfig:
    """What cuSPARSELt's search picks for this product on one path (it runs it several times)."""
    if planned:
        alg, split_k, mode, _ = torch.ops.ssam_cslt.search(packed, b, False)
        # (mode 0 is cuSPARSELt's "invalid": unset, as -1)
        return CsltConfig(alg, False, split_k, mode if mode > 0 else -1, planned=True)
    return CsltConfig(int(torch._cslt_sparse_mm_search(packed, b)))


def _searched(packed: torch.Tensor, b: torch.Tensor, key: tuple, planned: bool) -> CsltConfig:
    """cuSPARSELt's own search for this shape on one path (once per key): its pick as it reads
    back (algorithm, split-k, split-k mode), else that pick with cuSPARSELt's default mode, else
    the default configuration. A pick is run once before it is kept, since a configuration read
    back from a search is not always one cuSPARSELt accepts to plan again; the default is kept
    untried (it is what every path falls back to). Running out of memory is raised, not kept."""
    search_key = key + (planned,)
    if search_key not in _SEARCHED:
        while len(_SEARCHED) >= MAX_SEARCHED:  # the oldest goes (a shape per token count: unbounded)
            del _SEARCHED[next(iter(_SEARCHED))]
        default = CsltConfig(planned=planned)
        try:
            found = _search(packed, b, planned)
        except (RuntimeError, AttributeError) as exc:  # a cuSPARSELt or torch without it, a shape it rejects
            if isinstance(exc, torch.OutOfMemoryError):  # (memory runs short for a while, not for good)
                raise
            log_once(("search", planned) + key,
                     f"sparse_mm_24: cuSPARSELt's algorithm search failed ({exc}); default algorithm")
            found = default
        for config in dict.fromkeys([found, replace(found, split_k_mode=-1)]):
            if config == default:
                break
            try:
                cslt_mm(packed, b, config)
                break
            except (RuntimeError, ValueError) as exc:  # (the extension's ops raise ValueError for what they refuse)
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                log_once(("searched", config) + key,
                         f"sparse_mm_24: cuSPARSELt's searched {config.label()} failed to run ({exc})")
        else:
            config = default
        _SEARCHED[search_key] = config
    return _SEARCHED[search_key]


def _config(a: torch.Tensor, b: torch.Tensor) -> CsltConfig:
    """The configuration a product of this shape runs: the tuned one, else the searched one on
    the planned path where it can run, else on torch's."""
    key = _key(a, b)
    if key in _CONFIG:
        return _CONFIG[key]
    planned = planned_unavailable() is None
    found = _SEARCHED.get(key + (planned,))
    if found is not None:
        return found
    # the search's products are not part of the caller's computation (as tune's timings)
    with on_device(a.device), _disable_current_modes():
        _refuse_capture(a, b, "gemm='cusparselt'")  # (a's device current: its stream is the one captured)
        return _search_config(a, b, key, planned)


def _search_config(a: torch.Tensor, b: torch.Tensor, key: tuple, planned: bool) -> CsltConfig:
    try:
        packed = compress(a, CsltConfig(planned=planned))
    except RuntimeError as exc:  # cuSPARSELt refused this operand on the planned path: torch's, from now on
        if not planned or isinstance(exc, torch.OutOfMemoryError):  # (memory runs short for a while, not for good)
            raise
        log_once(("planned compress",) + key, f"sparse_mm_24: planned cuSPARSELt compression failed ({exc}); "
                 "torch's path for this shape")
        _SEARCHED[key + (True,)] = found = _searched(compress(a, CsltConfig()), b, key, False)
        return found
    return _searched(packed, b, key, planned)


# (kept out of compiled graphs: the planned compression's size is cuSPARSELt's, which pads small
# operands, so its fake's shape can be wrong; and a new shape searches with host syncs)
@eager_when_traced
def _cusparselt(a: torch.Tensor, b: torch.Tensor, keep: tuple | None = None) -> torch.Tensor:
    config = _config(a, b)
    return cslt_mm(_compressed(a, config, keep), b, config)


# compressed operands kept for reuse (sparse_mm_24's ``keep``): (id of the source, path, dtype,
# shape) -> (weak reference to the source, the companion, the versions, the compressed operand):
# one per source and shape, replaced when the companion or a version changes (a new mask, an
# optimizer step), gone when the source is freed
_KEPT: dict[tuple, tuple] = {}


def _versions(version: int, companion) -> tuple:
    return version, companion._version if isinstance(companion, torch.Tensor) else None


def _compressed(a: torch.Tensor, config: CsltConfig, keep: tuple | None) -> torch.Tensor:
    if keep is None:  # A changes with every call (a fresh MVUE draw)
        return compress(a, config)
    source, version, companion = keep
    slot = (id(source), config.planned, a.dtype, tuple(a.shape))
    versions = _versions(version, companion)
    entry = _KEPT.get(slot)
    if entry is not None and entry[0]() is source and entry[1] is companion and entry[2] == versions:
        return entry[3]
    packed = compress(a, config)
    _KEPT[slot] = (weakref.ref(source, lambda _, slot=slot: _KEPT.pop(slot, None)), companion, versions, packed)
    return packed


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
    """Time, once per shape, dtype and layout (cached): the dense GEMM, each path's compression
    (``"compress"``: torch's, ``"planned compress"``), and the sparse GEMM in every configuration
    tried (on each path, the default and the searched algorithm, each with and without
    ``transpose_result``; one that cuSPARSELt refuses is skipped, with a log line); keep the
    configuration whose GEMM plus its path's compression is fastest (``A`` is compressed on
    every call). Returns the times in ms by label (``"dense"``,
    ``"compress"``, ``"alg 0"``, ``"planned alg 3 split-k 2 T"``...); :func:`tuned_configs` maps
    the labels of the configurations to them."""
    key = _key(a, b)
    if key not in _TRIALS:
        # the timed GEMMs are not part of the caller's computation: out of sight of its modes
        # (a FlopCounterMode would count them, an op counter see them)
        with on_device(a.device), _disable_current_modes():  # the events time the current device's stream
            _refuse_capture(a, b, "gemm='auto'")
            _tune(a, b, key)
    return dict(_TRIALS[key])


def _tune(a: torch.Tensor, b: torch.Tensor, key: tuple) -> None:
    trials = {"dense": _median_ms(lambda: _dense(a, b))}
    configs: dict[str, CsltConfig] = {}
    paths = [False] + ([True] if planned_unavailable() is None else [])
    for planned in paths:
        default = CsltConfig(planned=planned)
        try:
            packed = compress(a, default)
            trials["planned compress" if planned else "compress"] = _median_ms(lambda c=default: compress(a, c))
        except (RuntimeError, ValueError) as exc:  # (the extension's ops raise ValueError for operands they refuse)
            if not planned:
                raise
            log_once(("planned compress",) + key, f"sparse_mm_24: planned cuSPARSELt compression failed ({exc}); "
                     "torch's path only")
            continue
        for found in dict.fromkeys([default, _searched(packed, b, key, planned)]):
            for transpose in (False, True):
                config = replace(found, transpose_result=transpose)
                try:
                    trials[config.label()] = _median_ms(lambda c=config, p=packed: cslt_mm(p, b, c))
                    configs[config.label()] = config
                except (RuntimeError, ValueError) as exc:  # an algorithm id out of range for the transposed layout...
                    if config == CsltConfig():
                        raise  # torch's default configuration is what every other path falls back to
                    log_once(("config", config) + key,
                             f"sparse_mm_24: cuSPARSELt {config.label()} failed ({exc}); skipped")
    _CONFIG[key] = min(configs.values(), key=lambda c: trials[c.label()] + _compress_ms(trials, c))
    _TRIALS[key] = trials
    _TRIED[key] = configs


def _compress_ms(trials: dict[str, float], config: CsltConfig) -> float:
    return trials["planned compress" if config.planned else "compress"]


def tuned_configs(a: torch.Tensor, b: torch.Tensor) -> dict[str, CsltConfig]:
    """Every configuration :func:`tune` timed for this shape, by label (tuning it first if needed)."""
    tune(a, b)
    return dict(_TRIED[_key(a, b)])


def tuned_config(a: torch.Tensor, b: torch.Tensor) -> CsltConfig:
    """The configuration :func:`tune` kept for this shape (tuning it first if needed)."""
    tune(a, b)
    return _CONFIG[_key(a, b)]


def gemm_trials() -> dict[tuple, dict[str, float]]:
    """Every shape tuned so far: ``(device index, dtype, a's shape, b's shape, b's strides)`` ->
    the times :func:`tune` measured."""
    return {k: dict(v) for k, v in _TRIALS.items()}


# Shapes ``gemm="auto"`` tunes; past this many, a new shape runs dense. A shape's tuning times
# dozens of GEMMs with a host sync each: with variable sequence lengths every new token count is
# a new shape, and tuning each one would cost more than the sparse GEMMs could win back.
MAX_TUNED_SHAPES = 64


def _auto_choice(a: torch.Tensor, b: torch.Tensor) -> str:
    key = _key(a, b)
    if key not in _CHOICE:
        if len(_CHOICE) >= MAX_TUNED_SHAPES:
            log_once(("tuned shapes",), f"sparse_mm_24(gemm='auto'): {MAX_TUNED_SHAPES} shapes tuned already (variable "
                     "sequence lengths?); new shapes run dense (gemm='cusparselt' runs them sparse)")
            return "dense"
        trials = tune(a, b)
        best = _CONFIG[key]
        sparse_ms = trials[best.label()] + _compress_ms(trials, best)
        _CHOICE[key] = ("cusparselt" if sparse_ms < trials["dense"] else "dense", best)
        log.info("sparse_mm_24 %s @ %s %s: cuSPARSELt %.3f ms (%s, compression included), dense %.3f ms -> %s",
                 tuple(a.shape), tuple(b.shape), str(a.dtype).split(".")[-1], sparse_ms, best.label(),
                 trials["dense"], _CHOICE[key][0])
    return _CHOICE[key][0]


def resolve_gemm(gemm: str, a: torch.Tensor, b: torch.Tensor) -> str:
    """The path ``sparse_mm_24`` takes: ``"dense"`` or ``"cusparselt"``."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    if gemm == "dense" or 0 in (*a.shape, b.shape[1]):  # (an empty product: nothing to multiply, in any mode)
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


def sparse_mm_24(a: torch.Tensor, b: torch.Tensor, *, gemm: str = "auto", check: bool = True,
                 keep: tuple | None = None) -> torch.Tensor:
    """``a @ b`` where ``a`` (``[m, k]``) is 2:4-sparse along ``k``. On cuSPARSELt the result may
    be the ``[m, n]`` view of a ``[n, m]`` tensor (where writing it transposed was faster).

    Args:
        gemm: ``"auto"`` (measured per shape, see the module docstring), ``"dense"`` or
            ``"cusparselt"`` (strict: ``ValueError`` where it cannot run; an empty product,
            nothing to multiply, runs dense in every mode).
        check: verify that ``a`` is 2:4 along ``k`` (one pass over ``a`` and a host sync;
            cuSPARSELt would silently drop extra nonzeros). Callers that built ``a`` 2:4 pass
            False.
        keep: ``(source, version, companion)`` when ``a`` is a function of the tensor ``source``
            as it was at ``source._version == version`` and of the object ``companion`` (e.g. a
            mask; a tensor one at its current version) alone: ``a``'s compressed form is kept and
            reused by later calls with the same source, version and companion (``W ⊙ M`` across
            the micro-batches of one step: the optimizer's in-place update moves ``W``'s
            version). None: compressed on every call.
    """
    if keep is not None and not (isinstance(keep, tuple) and len(keep) == 3 and isinstance(keep[0], torch.Tensor)
                                 and isinstance(keep[1], int)):
        raise TypeError(f"keep must be None or a (source tensor, version int, companion) tuple, got {keep!r}")
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_kind(t)}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have one dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[0] or a.device != b.device:
        raise ValueError(f"cannot multiply a {tuple(a.shape)} on {a.device} by b {tuple(b.shape)} on {b.device}")
    if a.shape[1] % 4:
        raise ValueError(f"a's contraction dim must be a multiple of 4 for 2:4 groups, got {a.shape[1]}")
    if check and bool(((a.reshape(-1, 4) != 0).sum(-1) > 2).any()):
        raise ValueError("a is not 2:4 sparse along its last dim (a group of 4 holds more than 2 nonzeros)")
    path = resolve_gemm(gemm, a, b)
    return _cusparselt(a, b, keep) if path == "cusparselt" else _dense(a, b)
