"""Turn an existing model's ascent pass sparse without changing the model: a context manager.

Inside ``with sparse_ascent(masks, mode):`` every ``F.linear`` call whose weight is a key of
``masks`` (``nn.Linear``, and functional ``F.linear(x, self.weight)`` in custom modules) runs
:class:`~ssam_kernels.ops.ascent_linear.AscentLinearFunction`; every other op runs as usual.
Calls made inside another function that dispatches on torch functions itself (the projections
inside ``nn.MultiheadAttention``, i.e. ``F.multi_head_attention_forward``) are not seen and keep
dense autograd: their gradients are ordinary ones, which the optimizer masks as usual. In
``"exact"`` mode only work is removed, never added: a layer whose every row (output feature /
channel) holds a masked entry runs plain autograd, and one with rows to skip computes its weight
gradient for the rows holding a masked entry only (one product on views of a contiguous range
of rows, zeros padded around it; gathered where the rows are scattered), for ``F.linear`` and
``F.conv1d/2d/3d`` alike (grouped convolutions, unbatched inputs and an asymmetric ``"same"``
padding run plain autograd: exact everywhere, nothing skipped); parameters whose mask is empty
are frozen (``requires_grad=False``) for the duration, so autograd computes neither their
gradient nor any input gradient below the lowest layer that still needs one. Gradients are exact on every masked entry and zero on
skipped rows; inside computed rows they are not masked (the optimizer's masked norm and
perturbation read only the masked entries: masking there would be an op for nothing). On exit
everything is as it was. Run the ascent forward *and* backward inside the block; the descent
pass outside it. A ``torch.utils.checkpoint`` region inside recomputes its forward during the
backward, where no mode is active: give it :meth:`sparse_ascent.recompute` as its recompute
context (a reentrant checkpoint has no such hook; see there).

The interception is a ``TorchFunctionMode``: it catches functional calls too and leaves the
modules untouched, for a Python call per torch call made inside the block (a few microseconds
each: 0.78 ms of a 5.5 ms ascent pass of a thin ResNet-18 on a 2-core CPU). So in ``"exact"``
mode a block runs it only where some trainable masked weight has rows to skip: with every row
of every mask holding a masked entry (the usual case for unstructured masks on wide layers),
the block runs no mode, and the pass costs what a dense one does.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._backend import BACKENDS
from ._checks import mask_facts
from .ops.ascent_conv import CONVS, AscentConvFunction, conv_padding
from .ops.ascent_linear import MODES, AscentConfig, AscentLinearFunction, _check_config
from .ops.bitmask import BitMask, row_span
from .sparse_gemm import GEMMS

ASCENT_MODES = ("dense",) + MODES
_CONV_FUNCS = frozenset(CONVS.values())
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _call_args(args, kwargs, names, defaults):
    values = list(args) + list(defaults[len(args):])
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
    return values


def _linear_args(args, kwargs):
    return _call_args(args, kwargs, ("input", "weight", "bias"), (None, None, None))


_EXACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtype(op: str, weight: torch.Tensor) -> None:
    """The exact mode's dtypes, on every masked layer (those run by plain autograd too: one
    contract whatever the mask holds)."""
    if weight.dtype not in _EXACT_DTYPES:
        raise TypeError(f"{op}: mode 'exact' takes float16/bfloat16/float32 layers; this layer's weight "
                        f"(shape {tuple(weight.shape)}) is {weight.dtype}")


def _every_row(mask) -> bool:
    """Whether every row (output feature / channel) of the mask holds a set entry: the exact
    backward then has no weight-gradient row to skip. Cached on a BitMask."""
    return row_span(mask)[2] == mask.shape[0]


def _is_empty(mask) -> bool:
    if isinstance(mask, BitMask):
        return mask.count_int() == 0
    return not bool(mask.any())


def _warn_if_cut_off(watched: list[torch.Tensor]) -> None:
    """After an exact pass that froze parameters: warn if a masked, trainable parameter has no
    gradient. Freezing cuts autograd off below the frozen layers only, so this one was cut off
    by something else the freezing made happen: a reentrant checkpoint region whose inputs no
    longer require a gradient (torch's own warning names no parameter). A parameter the
    forward does not use gets the same warning: it has no gradient in a dense pass either."""
    missing = [p for p in watched if p.grad is None]
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing[:4]) + (", ..." if len(missing) > 4 else "")
        warnings.warn(
            f"sparse_ascent('exact'): {len(missing)} masked parameter(s) got no gradient in the ascent pass "
            f"(shapes {shapes}), so they will not be perturbed. The pass froze the parameters with empty masks; "
            "a torch.utils.checkpoint region with use_reentrant=True whose inputs come only from frozen layers "
            "passes no gradient: use use_reentrant=False with the recompute context "
            "(SparseSAM.recompute_context / sparse_ascent.recompute).", stacklevel=3)


def _row_sparse_conv_args(x, weight, stride, padding, dilation, groups):
    """(stride, padding, dilation) as int tuples for a convolution call whose weight gradient
    the exact mode takes row by row, or None where it runs plain autograd: an unbatched input,
    a grouped convolution (slicing channels would break the groups), a strided or asymmetric
    ``"same"`` padding, arguments torch itself must judge."""
    if not isinstance(x, torch.Tensor) or x.dim() != weight.dim() or groups != 1:
        return None
    dims = weight.dim() - 2
    stride, dilation = _spatial(stride, dims), _spatial(dilation, dims)
    if stride is None or dilation is None:
        return None
    if isinstance(padding, str):
        if padding not in ("same", "valid") or (padding == "same" and any(s != 1 for s in stride)):
            return None  # torch says what is wrong
        ints = conv_padding(padding, tuple(weight.shape[2:]), dilation)
    else:
        ints = _spatial(padding, dims)
    return None if ints is None else (stride, ints, dilation)


def row_sparse_weight(func, args, kwargs) -> torch.Tensor | None:
    """The weight of a ``F.linear`` / ``F.conv*`` call whose weight gradient the exact mode
    computes row by row where the weight's mask leaves rows out, or None (another function, or
    a call it runs by plain autograd whatever the mask). The budget's cost model reads this, so
    that it counts a row skipped exactly where the exact backward skips it."""
    if func is F.linear:
        x, weight, _ = _linear_args(args, kwargs)
        ok = isinstance(weight, torch.Tensor) and isinstance(x, torch.Tensor) and weight.dim() == 2
        return weight if ok else None
    if func in _CONV_FUNCS:
        x, weight, _, stride, padding, dilation, groups = _call_args(
            args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), _CONV_DEFAULTS)
        if isinstance(weight, torch.Tensor) and _row_sparse_conv_args(x, weight, stride, padding, dilation, groups):
            return weight
    return None


def _spatial(value, dims: int) -> tuple[int, ...] | None:
    """A convolution's int-or-sequence argument as torch reads it (an int, or a one-element
    sequence, for every spatial dim), or None for what torch itself must judge."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) == 1:
            return tuple(value) * dims
        if len(value) == dims:
            return tuple(value)
    return None


class sparse_ascent(TorchFunctionMode):
    """Context manager: the ascent backward of ``mode`` for the layers whose weights have masks.

    Args:
        masks: ``{parameter: mask}``, each mask a bool tensor or BitMask shaped like its
            parameter (or None: all entries masked). Parameters not in it keep dense autograd.
        mode: ``"dense"`` (no change), ``"exact"``, ``"implicit"``, ``"mvue"`` or
            ``"mvue_dx"`` (see :mod:`ssam_kernels.ops.ascent_linear`). ``"exact"``
            computes the linear and convolution weight gradients only for the rows (output
            features / channels) holding a masked entry, exact on every masked entry, and
            skips parameters with empty masks (module docstring); it is exact for a
            perturbation normalised over the masked gradient only. A key that is not a leaf
            (a weight computed from parameters, which read its whole gradient) runs plain
            autograd.
        generator: draws the MVUE seeds (None: torch's global generator).
        gemm: ``"auto"``, ``"dense"`` or ``"cusparselt"`` for the 2:4 GEMMs.
        backend: ``ssam_kernels`` backend of the masked weight gradient and the MVUE draws.
    """

    def __init__(self, masks: Mapping[torch.Tensor, object], mode: str, *, generator: torch.Generator | None = None,
                 gemm: str = "auto", backend: str = "auto"):
        super().__init__()
        if mode not in ASCENT_MODES:
            raise ValueError(f"mode must be one of {ASCENT_MODES}, got {mode!r}")
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping {{parameter: mask}}, got {type(masks).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.mode = mode
        self._masks: dict[int, tuple[torch.Tensor, object]] = {}
        for p, m in masks.items():
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"masks' keys must be tensors, got {type(p).__name__}")
            if m is not None:
                shape, device = mask_facts(f"the mask of a {tuple(p.shape)} parameter", m, none_ok=True)
                if shape != p.shape or device != p.device:
                    raise ValueError(
                        f"a mask of shape {tuple(shape)} on {device} for a parameter of shape {tuple(p.shape)} on {p.device}"
                    )
            self._masks[id(p)] = (p, m)
        self._generator = generator
        self._gemm = gemm
        self._backend = backend
        self._frozen: list[torch.Tensor] = []
        self._watched: list[torch.Tensor] = []
        self._pushed: list[bool] = []  # per active entry: whether it runs the mode
        # "exact" (masks are fixed per block): the parameters with empty masks, frozen for the
        # pass where trainable leaves; the weights whose calls the mode may reroute (rows to
        # skip, or a dtype the mode refuses, which the call reports), if trainable leaves when
        # the block is entered. With none, the block runs no mode: every torch call inside one
        # pays for it (a Python call each), and a mode rerouting nothing changes nothing
        masked = [(p, m) for p, m in self._masks.values() if m is not None] if mode == "exact" else []
        self._empty = [p for p, m in masked if _is_empty(m)]
        self._reroutable = [p for p, m in masked
                            if p.dim() >= 2 and (p.dtype not in _EXACT_DTYPES or not _every_row(m))]

    def _mask_of(self, t: torch.Tensor | None):
        """(known, mask) for a tensor: known is False for tensors not in ``masks``."""
        if t is None:
            return False, None
        entry = self._masks.get(id(t))
        if entry is None or entry[0] is not t:
            return False, None
        return True, entry[1]

    def _config(self, weight: torch.Tensor, bias: torch.Tensor | None) -> AscentConfig | None:
        """How this layer's backward runs, or None for plain ``F.linear``."""
        known, mask = self._mask_of(weight)
        if not known or weight.dim() != 2:
            return None
        if self.mode == "exact":
            # frozen (empty mask, or by the user); or a weight computed from parameters, whose
            # gradient the parameters read whole: plain autograd
            if not weight.requires_grad or not weight.is_leaf:
                return None
            _check_dtype("ascent_linear", weight)
            if mask is None or _every_row(mask):  # nothing to skip: plain autograd
                return None
        if mask is None and self.mode == "implicit":  # all entries: W ⊙ M = W (the MVUE modes read no mask)
            mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        bias_known, bias_mask = self._mask_of(bias)
        return AscentConfig(self.mode, mask, bias_mask if bias_known else None, self._generator, self._gemm,
                            self._backend, masked=self.mode != "exact")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.mode != "dense" and torch.is_grad_enabled():
            x, weight, bias = _linear_args(args, kwargs)
            if isinstance(weight, torch.Tensor) and isinstance(x, torch.Tensor):
                config = self._config(weight, bias)
                if config is not None and (weight.requires_grad or x.requires_grad):
                    _check_config(weight, bias, config)
                    return AscentLinearFunction.apply(x, weight, bias, config)
        if func in _CONV_FUNCS and self.mode == "exact" and torch.is_grad_enabled():
            out = self._exact_conv(*_call_args(args, kwargs, ("input", "weight", "bias", "stride", "padding",
                                                               "dilation", "groups"), _CONV_DEFAULTS))
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _exact_conv(self, x, weight, bias, stride, padding, dilation, groups):
        """The row-sparse masked convolution for a masked, trainable weight, or None (plain
        convolution: an unmasked or frozen weight, an unbatched input, an asymmetric
        ``"same"`` padding)."""
        known, mask = self._mask_of(weight)
        if not known or mask is None or not weight.requires_grad or not weight.is_leaf or not isinstance(x, torch.Tensor):
            return None
        _check_dtype("ascent_conv", weight)
        if _every_row(mask):  # nothing to skip: plain autograd
            return None
        parsed = _row_sparse_conv_args(x, weight, stride, padding, dilation, groups)
        if parsed is None:
            return None
        return AscentConvFunction.apply(x, weight, bias, mask, None, *parsed, groups, False)

    def recompute(self) -> TorchFunctionMode:
        """The context for ``torch.utils.checkpoint`` to recompute this block's checkpointed
        forward in. The autograd engine runs a backward, and so a checkpoint's recomputation,
        outside every ``TorchFunctionMode``: the layers would take plain autograd there and save
        other tensors than their first forward did (a ``CheckpointError``). Inside the block::

            checkpoint(fn, x, use_reentrant=False,
                       context_fn=lambda: (contextlib.nullcontext(), block.recompute()))

        Reentrant checkpointing (``use_reentrant=True``) has no such hook: its regions run dense
        autograd (exact on every entry, nothing skipped), but only where one of a region's
        inputs requires a gradient. In ``"exact"`` mode a region whose inputs all come from
        layers frozen for the pass (empty masks) passes no gradient at all: its masked
        parameters get none, and the block warns on exit. Use ``use_reentrant=False``."""
        return _Recompute(self)

    def __enter__(self):
        if self._frozen:
            raise RuntimeError("sparse_ascent is already active; it cannot be entered twice at once")
        if self.mode == "exact":
            # (a non-leaf key cannot be frozen: its gradient is computed, as in a dense pass)
            empty = [p for p in self._empty if p.requires_grad and p.is_leaf]
            # all masks empty: nothing will be perturbed, and freezing everything would make
            # the caller's backward() fail; leave the pass dense
            if empty and len(empty) < sum(1 for p, _ in self._masks.values() if p.requires_grad):
                for p in empty:
                    p.requires_grad_(False)
                self._frozen = empty
                # the trainable masked parameters: each should get a gradient from this pass
                self._watched = [p for p, _ in self._masks.values() if p.requires_grad and p.is_leaf]
        reroutes = self.mode != "dense" and (
            self.mode != "exact" or any(p.requires_grad and p.is_leaf for p in self._reroutable))
        self._pushed.append(reroutes)
        return super().__enter__() if reroutes else self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._pushed.pop():
                return super().__exit__(exc_type, exc, tb)
        finally:
            frozen, watched = self._frozen, self._watched
            for p in frozen:
                p.requires_grad_(True)
            self._frozen, self._watched = [], []
            if exc_type is None and frozen:
                _warn_if_cut_off(watched)


class _Recompute(TorchFunctionMode):
    """:meth:`sparse_ascent.recompute`: the block's rerouting alone (its parameters stay as the
    block left them)."""

    def __init__(self, block: sparse_ascent):
        super().__init__()
        self._block = block

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self._block.__torch_function__(func, types, args, kwargs)
