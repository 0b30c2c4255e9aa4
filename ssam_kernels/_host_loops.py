"""Per-tensor host loops: in C where ``ssam_kernels._host`` is built (``csrc/host/step_host.cpp``),
in Python otherwise. A Python loop costs about a microsecond per tensor (attribute reads), which a
model with hundreds of tensors pays on every call; the C loop costs nanoseconds.

* :func:`bump_versions`: the version counters of tensors a kernel wrote through their addresses
  (invisible to autograd and to caches keyed on versions), moved as torch's in-place ops move them.
* :func:`same_versions`: whether tensors (a plan's mask bits) were written in place since their
  versions were read.
* :func:`same_entries`, :func:`same_values`: whether an optimizer's state still holds the
  momentum buffers a planned step keeps, and no entry of it was replaced, added or removed.
* :func:`carve`: a list op's backup buffers, all in one allocation without an op per tensor.
* :func:`data_ptrs`: the data addresses of a list of tensors, for the multi-tensor launchers'
  address tables and alignment tests.
* :func:`c_fit`: the per-tensor checks of the public ops' arguments (``_checks.tensor_list``,
  ``same_shapes``, ``mask_list``, ``perturb.check_backup``) and of the mask bits an op is
  passed (``bitmask.check_mask_args``) find the first entry that does not fit in C; their
  Python loops then say what is wrong with it (the rules and messages live there).
* :func:`check_list_operands`: what the list ops (``perturb_``, ``restore_``,
  ``restore_sgd_step_``) index by, checked inside the op, so a direct
  ``torch.ops.ssam_kernels`` call gets a ``ValueError`` rather than a kernel reading or writing
  outside a tensor. (A masked backup's size is the mask's set-bit count, which only the device
  knows: the kernels bound their slots by the backup's size instead.)
"""

from __future__ import annotations

import itertools
import operator

import torch

# the dtypes the list ops' kernels take (float8 and others refused), and so every public op's
# floating-point tensors (``_checks`` re-exports it); csrc/host/step_host.cpp floating() is the same
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:  # optional: the fallbacks below do the same in Python
    from . import _host
except ImportError:
    _host = None
if _host is not None and not all(hasattr(_host, f) for f in ("bump_versions", "operands_misfit", "grad_addresses",
                                                            "data_ptrs", "tensors_misfit", "masks_misfit",
                                                            "bits_misfit", "backup_misfit", "same_entries",
                                                            "overlapping_pair", "same_versions", "same_values",
                                                            "first_elsewhere", "carve")):
    _host = None  # an older build of the module (a source tree not rebuilt): the Python loops


def bump_versions(tensors: list) -> None:
    """Each tensor's version counter moved on, as an in-place torch op moves it (None entries
    skipped)."""
    if _host is not None:
        _host.bump_versions(tensors if type(tensors) is list else list(tensors))
    else:
        torch._C._increment_version([t for t in tensors if t is not None])


def data_ptrs(tensors: list) -> tuple[int, ...]:
    """``data_ptr()`` of each tensor, 0 for None."""
    if _host is not None:
        return _host.data_ptrs(tensors if type(tensors) is list else list(tensors))
    return tuple(0 if t is None else t.data_ptr() for t in tensors)


def carve(sizes: list, like: torch.Tensor) -> list[torch.Tensor] | None:
    """New contiguous tensors of ``like``'s dtype and device in one allocation, each on 16
    bytes: ``sizes[i]`` a tensor (a piece shaped like it) or an int (a 1-D piece of that length).
    One allocation and no op per piece (a list op's backups: ``torch.empty_like`` per tensor is
    a dispatcher op and an allocation each, about 1 us per tensor here). None where the C loops
    do not run or ``like`` is not a plain CPU or CUDA tensor: the caller allocates."""
    if not c_loops():
        return None
    return _host.carve(sizes if type(sizes) is list else list(sizes), like)


def same_entries(dicts: list[dict], key: str, expected: list) -> bool:
    """Whether ``dicts[i].get(key) is expected[i]`` for every ``i`` (as many of each): an
    optimizer's per-parameter state still holding the tensors a step keeps (1.5 us for 300
    entries in C, 10 us in Python, on a CI core)."""
    if _host is not None and type(dicts) is list and type(expected) is list:
        return _host.same_entries(dicts, key, expected)
    return len(dicts) == len(expected) and all(
        map(operator.is_, map(dict.get, dicts, itertools.repeat(key, len(dicts))), expected))


def same_values(d: dict, expected: list) -> bool:
    """Whether ``d``'s values, in ``d``'s order, are the objects of ``expected`` (as many of
    each): an optimizer's state with no entry replaced, added or removed since its values were
    listed. No key is hashed (a tensor's hash is a Python call): 1.4 us for 300 entries in C,
    5 us in Python, on a CI core."""
    if _host is not None and isinstance(d, dict) and type(expected) is list:
        return _host.same_values(d, expected)
    return len(d) == len(expected) and all(map(operator.is_, d.values(), expected))


def versions(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    """Each tensor's version counter (-1 for a tensor made in inference mode: it has none)."""
    return tuple(-1 if t.is_inference() else t._version for t in tensors)


def same_versions(tensors: list[torch.Tensor], expected: tuple[int, ...]) -> bool:
    """Whether :func:`versions` of ``tensors`` is still ``expected``: none of them written in
    place since (0.5 us for 300 tensors in C, 25 us in Python)."""
    if _host is not None and type(tensors) is list:
        return _host.same_versions(tensors, expected)
    return versions(tensors) == expected


def c_loops() -> bool:
    """Whether the C check loops run here: ``ssam_kernels._host`` is built, and this is not
    torch.compile tracing (Dynamo traces the Python rules, not a C function)."""
    return _host is not None and not torch.compiler.is_compiling()


def c_fit(loop: str, *args) -> bool | None:
    """Whether the C loop ``loop`` of ``ssam_kernels._host`` (``tensors_misfit``,
    ``masks_misfit``, ``bits_misfit``, ``backup_misfit``) finds every entry fitting; None where
    it does not run (:func:`c_loops`) or cannot read an entry (a nested tensor's or a traced
    tensor's symbolic sizes). On False the caller runs its Python loop, which says what does
    not fit, and raises :func:`unexplained_misfit` if that loop finds nothing; on None the
    Python loop alone decides."""
    if not c_loops():
        return None
    try:
        return getattr(_host, loop)(*args) < 0
    except RuntimeError:  # sizes() / numel() refused by the tensor: Python's rules decide
        return None


def unexplained_misfit(what: str) -> RuntimeError:
    """The C loop refused an entry the Python rules accept: a bug here, not in the caller."""
    return RuntimeError(f"{what}: ssam_kernels._host refused an entry that the Python check accepts")


def check_list_operands(op: str, params, shaped: dict, values, masks) -> None:
    """``ValueError``/``TypeError`` naming the first operand of list op ``op`` that does not fit.

    Every list has one entry per param. ``params[i]``: floating, all on one device;
    ``shaped[name][i]`` (gradients, momentum buffers): floating, as many elements, same device;
    ``values[i]`` (the backup): the param's dtype and device, all of it where ``masks[i]`` is
    None, else 1-D with at most as many values as the tensor has elements; ``masks[i]``: None, a
    bool tensor of as many elements, or 1-D contiguous uint8 bits (one byte per 8 elements).
    Floating means one of ``_checks.FLOAT_DTYPES``.
    """
    params, values, masks = list(params), list(values), list(masks)
    if not params:
        raise ValueError(f"{op}: params must not be empty")
    names, lists = list(shaped), [list(v) for v in shaped.values()]
    for name, entries in [*zip(names, lists), ("values", values), ("masks", masks)]:
        if len(entries) != len(params):
            raise ValueError(f"{op}: {name} has {len(entries)} entries but params has {len(params)}")
    shaped = dict(zip(names, lists))
    if _host is None:
        for i in range(len(params)):
            _check_one(op, i, params, shaped, values, masks)
        return
    first = _host.operands_misfit(params, lists, values, masks)
    if first >= 0:
        _check_one(op, first, params, shaped, values, masks)  # raises, saying what does not fit
        # the C loop and this one disagree: a bug here, not in the caller
        raise RuntimeError(f"{op}: ssam_kernels._host refused the operands of tensor {first}, the Python check did not")


def _check_one(op: str, i: int, params, shaped: dict, values, masks) -> None:
    def tensor(name: str, t) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
        return t

    w = tensor("params", params[i])
    device = tensor("params", params[0]).device
    n = w.numel()
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: params[{i}] must be a floating-point tensor {FLOAT_DTYPES}, got {w.dtype}")
    if w.device != device:
        raise ValueError(f"{op}: params[{i}] is on {w.device}, params[0] on {device}: one device per call")
    for name, entries in shaped.items():
        s = tensor(name, entries[i])
        if s.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name}[{i}] must be a floating-point tensor {FLOAT_DTYPES}, got {s.dtype}")
        if s.numel() != n or s.device != device:
            raise ValueError(f"{op}: {name}[{i}] has {s.numel()} elements on {s.device}; params[{i}] has {n} "
                             f"on {device}")
    v = tensor("values", values[i])
    if v.dtype != w.dtype or v.device != device:
        raise ValueError(f"{op}: values[{i}] is {v.dtype} on {v.device}; params[{i}] is {w.dtype} on {device}")
    m = masks[i]
    if m is None:
        if v.numel() != n:
            raise ValueError(f"{op}: values[{i}] holds {v.numel()} values; params[{i}] is unmasked, so it needs all "
                             f"{n}")
        return
    m = tensor("masks", m)
    if m.dtype == torch.uint8:
        if m.dim() != 1 or m.numel() != (n + 7) // 8 or not m.is_contiguous():
            raise ValueError(f"{op}: masks[{i}] must be the {(n + 7) // 8} contiguous bytes (1-D) of params[{i}]'s "
                             f"packed bits, got shape {tuple(m.shape)} (contiguous: {m.is_contiguous()})")
    elif m.dtype == torch.bool:
        if m.numel() != n:
            raise ValueError(f"{op}: masks[{i}] has {m.numel()} elements, params[{i}] has {n}")
    else:
        raise TypeError(f"{op}: masks[{i}] must be None, a bool tensor or uint8 packed bits, got {m.dtype}")
    if m.device != device:
        raise ValueError(f"{op}: masks[{i}] is on {m.device}, params[{i}] on {device}")
    if v.dim() != 1:
        raise ValueError(f"{op}: values[{i}] must be 1-D (one value per set bit of masks[{i}]), got shape "
                         f"{tuple(v.shape)}")
    if v.numel() > n:
        raise ValueError(f"{op}: values[{i}] holds {v.numel()} values, more than params[{i}]'s {n} elements")
