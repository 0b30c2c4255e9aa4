"""What SSAM-F and SSAM-D share: a mask per parameter, stored bit-packed in the optimizer
state, applied to the perturbation, and the official code's ``step(closure, model=..., ...)``."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

import ssam_kernels
from ssam_kernels import BitMask, keep_count, pack_mask, packed_nbytes
from ssam_kernels.sparse_ascent import ASCENT_MODES, sparse_ascent
from ssam_kernels.sparse_gemm import GEMMS

from .budget import AscentCosts, ascent_budget, budget_select, no_fit_error
from .distributed import broadcast_, broadcast_seed
from .sam import SAM, _together
from .structure import Structure, parse_structure, resolve_sparsity

_log = logging.getLogger("ssam")

NORMS = ("full", "masked")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def resolve_seed(seed) -> int:
    """``seed`` checked, or (None) one drawn from torch's global RNG (rank 0's under
    torch.distributed, so that every rank draws the same masks and samples)."""
    if seed is None:
        return broadcast_seed(int(torch.randint(0, 2**62, (1,)).item()))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    return seed


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def check_logger(logger):
    """``logger`` checked (``TypeError``): None, a ``logging.Logger`` or ``logging.LoggerAdapter``,
    an object with a ``.log(msg)`` method (the official code's logger), or a callable."""
    if not (logger is None or isinstance(logger, (logging.Logger, logging.LoggerAdapter))
            or callable(getattr(logger, "log", None)) or callable(logger)):
        raise TypeError("logger must be a logging.Logger or LoggerAdapter, have a .log(msg) method, or be callable; "
                        f"got {type(logger).__name__}")
    return logger


def log_message(logger, message: str) -> None:
    """Send ``message`` to a ``logging.Logger`` or ``logging.LoggerAdapter`` (``.info``), an
    object with ``.log(msg)`` (the official code's logger), a callable, or (None) the ``ssam``
    logger."""
    check_logger(logger)
    if logger is None:
        _log.info(message)
    elif isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
        logger.info(message)
    elif callable(getattr(logger, "log", None)):
        logger.log(message)
    else:
        logger(message)


def _check_dtypes(ascent_backward: str, groups: list[dict], first: int = 0) -> None:
    """The approximate and exact ascent modes take fp32/fp16/bf16 layers only."""
    if ascent_backward == "dense":
        return
    for g, group in enumerate(groups, first):
        for i, p in enumerate(group["params"]):
            if p.dtype == torch.float64:
                raise TypeError(
                    f"ascent_backward={ascent_backward!r} takes float32, float16 and bfloat16 layers: "
                    f"param_groups[{g}]['params'][{i}] (shape {tuple(p.shape)}) is float64; use "
                    "ascent_backward='dense' for float64 models")


def _24_along_out(structure: Structure) -> bool:
    """Whether every mask of ``structure`` is 2:4 along the output dim (at most two set entries
    in every four consecutive rows of a column): N:M along it with M dividing 4, N <= M / 2."""
    return structure.kind == "nm" and structure.along == "out" and structure.m in (2, 4) and 2 * structure.n <= structure.m


@contextlib.contextmanager
def _current(opt, block):
    """``block`` entered, and known to ``opt.recompute_context()`` while it is."""
    with block:
        opt._ascent_block = block
        try:
            yield
        finally:
            opt._ascent_block = None


class SparseSAM(SAM):
    """SAM whose perturbation is ``e * m`` for a binary mask ``m`` per parameter.

    Masks are kept as packed bits (uint8, 1 bit per element; see :class:`ssam_kernels.BitMask`),
    outside ``self.state`` because ``torch.optim.Optimizer.load_state_dict`` casts state tensors
    to the parameter's float dtype. ``norm="masked"`` normalises by ``||g * m||`` instead of
    ``||g||``. ``ascent_backward`` picks how the ascent pass's backward runs inside
    :meth:`ascent` (see :func:`ssam_kernels.sparse_ascent`); ``"exact"`` needs
    ``norm="masked"``, the only norm it can compute without the unmasked gradient.
    """

    _ascent_block: sparse_ascent | None = None  # the ascent pass's block, while it runs
    # (masks dict, (parameter count, gemm, mode), the sparse_ascent block made for them)
    _ascent_cache: tuple | None = None

    def __init__(self, params, base_optimizer, rho, sparsity, structure, norm, adaptive, fuse_sgd, seed, base_kwargs,
                 ascent_backward="dense"):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if ascent_backward not in ASCENT_MODES:
            raise ValueError(f"ascent_backward must be one of {ASCENT_MODES}, got {ascent_backward!r}")
        if ascent_backward == "exact" and norm != "masked":
            raise ValueError(
                "ascent_backward='exact' computes only the masked gradient, so it needs norm='masked' "
                "(norm='full' needs every gradient)"
            )
        self.structure: Structure = parse_structure(structure)
        self.sparsity: float = resolve_sparsity(sparsity, self.structure)
        if ascent_backward == "implicit" and not _24_along_out(self.structure):
            warnings.warn(
                f"ascent_backward='implicit' with structure={str(self.structure)!r}: its masks are not 2:4 along "
                "the output dim, so the input gradient dY(W*M) runs as a dense GEMM (no sparse tensor cores: "
                "no time saved), and it is approximate (a layer whose mask is empty passes no gradient to the "
                "layers below it); the mode is meant for structure='2:4:out'", stacklevel=3)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, fuse_sgd=fuse_sgd, **base_kwargs)
        if not self.params:  # (torch's optimizers take empty groups)
            raise ValueError(f"params: every param group is empty; {type(self).__name__} needs its parameters at "
                             "construction (its masks and random generator are made for them)")
        _check_dtypes(ascent_backward, self.param_groups)
        self.norm = norm
        self.mask_updates = 0
        # persistent BitMask objects: kernels cache per-mask facts (set-bit counts) on them
        self._masks: dict[torch.Tensor, BitMask] = {}
        seed = resolve_seed(seed)
        self.generator = make_generator(seed, self._generator_device())
        self.ascent_backward = ascent_backward
        # seeds of the MVUE draws: a CPU generator (drawing a seed is no device sync) with its
        # own stream, so the mode does not change the masks' random draws
        self.ascent_generator = make_generator((seed + 1) % 2**63)
        self._update_owed = False  # a due mask update that a failed (or, SSAM-D, skipped) step did not make
        self._warned_frozen = False
        self._warned_idle = False  # SSAM-D: parameters that got no gradient, said once
        self._costs: AscentCosts | None = None  # structure "budget": the model's ascent FLOPs
        self.budget_choice = None  # structure "budget": the last BudgetChoice

    def _generator_device(self) -> torch.device:
        """Where this optimizer's random numbers are drawn."""
        return self.params[0].device

    # --- masks -------------------------------------------------------------------------------

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _keep(self) -> int:
        """How many entries an unstructured or tensor mask keeps: ``int((1 - s) * total)`` over
        the parameters that can be perturbed."""
        return keep_count(sum(p.numel() for p in self.params if p.requires_grad), 1.0 - self.sparsity)

    def _perturbable(self) -> list[bool]:
        """Which parameters can be perturbed: those that require a gradient. The others get no
        mask entry, and the density is taken over the rest (said once, as a warning)."""
        flags = [p.requires_grad for p in self.params]
        if not all(flags) and not self._warned_frozen:
            frozen = [tuple(p.shape) for p, f in zip(self.params, flags) if not f]
            warnings.warn(f"{type(self).__name__}: {len(frozen)} parameter(s) do not require grad (shapes "
                          f"{frozen[:4]}{' ...' if len(frozen) > 4 else ''}): they get no mask entries, and the "
                          f"density {1 - self.sparsity:g} is taken over the other parameters", stacklevel=3)
            self._warned_frozen = True
        return flags

    def _perturbable_rows(self, scores: list[torch.Tensor], allowed=None) -> list[torch.Tensor]:
        """``allowed`` (default: everything) with nothing of a parameter that cannot be perturbed:
        such a row costs no FLOPs, so a budget selection would take it first, spending entries
        (SSAM-F) or, at a -inf growth score, every depth's mass (SSAM-D: the mask froze)."""
        flags = self._perturbable()
        if allowed is None:
            allowed = [torch.ones_like(s, dtype=torch.bool) for s in scores]
        return [a if f else torch.zeros_like(a, dtype=torch.bool) for a, f in zip(allowed, flags)]

    @staticmethod
    def _restricted(scores: list[torch.Tensor], flags: list[bool]) -> list[torch.Tensor]:
        """Scores with -inf on the parameters that cannot be perturbed (a top-k takes them last)."""
        return [s if f else torch.full_like(s, float("-inf"), dtype=torch.float32) for s, f in zip(scores, flags)]

    @staticmethod
    def _select_perturbable(select, scores: list[torch.Tensor], flags: list[bool]) -> list[torch.Tensor]:
        """``select(scores)`` over the perturbable parameters only, empty masks for the others.
        (Given -inf scores instead, a frozen entry would tie with a NaN score, ranked as -inf,
        and could take its slot.)"""
        if not any(flags):
            return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
        chosen = iter(select([s for s, f in zip(scores, flags) if f]))
        return [next(chosen) if f else torch.zeros_like(s, dtype=torch.bool) for s, f in zip(scores, flags)]

    @staticmethod
    def _excluded(masks: list[torch.Tensor], flags: list[bool]) -> list[torch.Tensor]:
        """Masks emptied on the parameters that cannot be perturbed."""
        return [m if f else torch.zeros_like(m) for m, f in zip(masks, flags)]

    def _mask(self, p: torch.Tensor) -> BitMask:
        return self._masks[p]

    def _norm_masked(self) -> bool:
        return self.norm == "masked"

    def _unperturbed_backup(self, p: torch.Tensor):
        mask = self._masks.get(p)
        if mask is None or mask.count_int():
            return None
        return p.new_empty(0), mask

    def ascent(self, *, gemm: str = "auto", no_sync=None):
        """Context manager for the ascent forward/backward, in the ``ascent_backward`` mode::

            with opt.ascent():
                loss_fn(model(x), y).backward()
            opt.step(closure)

        ``step(closure)`` after ``zero_grad()`` runs the ascent pass inside it by itself.
        ``gemm`` picks the 2:4 GEMM path (``"auto"``, ``"dense"``, ``"cusparselt"``).
        ``no_sync``: a ``DistributedDataParallel`` model, as in :meth:`ssam.SAM.ascent`."""
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        if self.ascent_backward == "dense":  # plain autograd: no layer to reroute, no mode to run in
            return super().ascent(no_sync=no_sync)
        # both built (and their arguments checked) now, entered by the caller's ``with``; the
        # block is made once per mask set (its masks are checked as it is made)
        cache, key = self._ascent_cache, (len(self.params), gemm, self.ascent_backward)
        if cache is None or cache[0] is not self._masks or cache[1] != key:
            masks = {p: self._masks[p] for p in self.params}
            block = sparse_ascent(masks, self.ascent_backward, generator=self.ascent_generator, gemm=gemm)
            self._ascent_cache = cache = (self._masks, key, block)
        return _together(super().ascent(no_sync=no_sync), _current(self, cache[2]))

    def recompute_context(self):
        """What ``torch.utils.checkpoint`` recomputes a checkpointed region of the ascent pass in
        (nothing to do outside it, or in the dense mode)::

            checkpoint(block, h, use_reentrant=False,
                       context_fn=lambda: (contextlib.nullcontext(), opt.recompute_context()))

        The sparse ascent modes reroute layers as the forward calls them, and a checkpoint
        recomputes its forward during the backward, where no such rerouting is active:
        without this, a checkpointed masked layer raises ``CheckpointError`` (reentrant
        checkpointing runs it densely instead). See :meth:`ssam_kernels.sparse_ascent.recompute`."""
        return self._ascent_block.recompute() if self._ascent_block is not None else contextlib.nullcontext()

    def ascent_costs(self) -> AscentCosts | None:
        """Structure ``"budget"``: the :class:`ssam.budget.AscentCosts` of the model (SSAM-F
        measures them at the first ``update_mask``, SSAM-D takes them as ``ascent_costs=``);
        None before that, and for other structures."""
        return self._costs

    def _ascent_budget(self) -> float:
        return ascent_budget(self._costs, self.sparsity, self.ascent_fraction)

    def _budget_masks(self, scores, required=None, allowed=None) -> list[torch.Tensor]:
        """Structure ``"budget"``: :func:`ssam.budget.budget_select` under this optimizer's
        budget, over the rows of parameters that can be perturbed; a ``ValueError`` (nothing
        changed) when no row fits."""
        choice = budget_select(scores, self._costs, self._keep(), self._ascent_budget(), required=required,
                               allowed=self._perturbable_rows(scores, allowed))
        if not any(bool(m.any()) for m in choice.masks):
            raise no_fit_error(self._costs, self.sparsity, self.ascent_fraction)
        self.budget_choice = choice
        return choice.masks

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_ascent_cache"] = None  # its block finds the parameters by identity: made anew for a copy's
        return state

    def _set_masks(self, masks: list[torch.Tensor]) -> None:
        """Replace every mask (new tensors: a pending backup keeps referring to the old ones)."""
        for p, m in zip(self.params, masks):
            if m.shape != p.shape or m.dtype != torch.bool:
                raise ValueError(f"mask of shape {tuple(m.shape)} / {m.dtype} for a parameter of shape {tuple(p.shape)}")
        packed = {p: pack_mask(m.to(p.device)) for p, m in zip(self.params, masks)}
        broadcast_([m.bits for m in packed.values()])  # under torch.distributed: rank 0's masks
        self._masks = packed
        self._invalidate_plan()  # the next step plans with these masks (a pending one keeps its own)

    def _checked_new_group(self, param_group) -> dict:
        group = super()._checked_new_group(param_group)
        _check_dtypes(self.ascent_backward, [group], first=len(self.param_groups))
        return group

    def add_param_group(self, param_group: dict) -> None:
        """New parameters start unperturbed (empty mask) until the next ``update_mask``."""
        super().add_param_group(param_group)
        if hasattr(self, "_masks"):
            for p in self.param_groups[-1]["params"]:
                self._masks[p] = pack_mask(torch.zeros(p.shape, dtype=torch.bool, device=p.device))
            self._invalidate_plan()

    def get_mask(self, p: torch.Tensor) -> torch.Tensor:
        """The mask of parameter ``p`` as a bool tensor shaped like ``p``."""
        if not any(p is q for q in self.params):
            raise ValueError("p is not a parameter of this optimizer")
        return ssam_kernels.unpack_mask(self._mask(p))

    def masks(self) -> list[torch.Tensor]:
        """Every parameter's mask, as bool tensors, in ``param_groups`` order."""
        return [ssam_kernels.unpack_mask(self._mask(p)) for p in self.params]

    def mask_density(self) -> float:
        """Fraction of all parameter entries that are perturbed (over every parameter the
        optimizer holds, frozen ones included, as the official log line counts; the sparsity
        is applied over the trainable ones)."""
        total = sum(p.numel() for p in self.params)
        kept = sum(self._mask(p).count_int() for p in self.params)
        return kept / total if total else 0.0

    # --- official calling convention ---------------------------------------------------------

    def _due(self, epoch, batch_idx) -> bool:
        for name, v in (("epoch", epoch), ("batch_idx", batch_idx)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        return epoch % self.update_freq == 0 and batch_idx == 0

    def _log_update(self, logger) -> None:
        log_message(logger, f"Update Mask! Mask Lived Weight: {self.mask_density():.4f}")

    def _update_snapshot(self) -> tuple:
        """What a mask update changes, to go back to should it or its step fail."""
        return self._masks, self.mask_updates, self.generator.get_state(), self.budget_choice, self._costs

    def _back_to(self, snapshot: tuple) -> None:
        self._masks, self.mask_updates, rng, self.budget_choice, self._costs = snapshot
        self.generator.set_state(rng)
        self._invalidate_plan()

    @contextlib.contextmanager
    def _undone_on_failure(self):
        """Around an ``update_mask``: should it raise, what it changes (:meth:`_update_snapshot`)
        is as it was, its draws from the generator undone (the next update draws the same)."""
        snapshot = self._update_snapshot()
        try:
            yield
        except BaseException:
            self._back_to(snapshot)
            raise

    def _owe_update(self, snapshot: tuple | None) -> None:
        """A due mask update failed or was not made: back to ``snapshot`` (None: nothing was
        changed), and the update is made at the next step with the official arguments."""
        if snapshot is not None:
            self._back_to(snapshot)
        self._update_owed = True

    def _extra_state(self) -> dict:
        return {
            **super()._extra_state(),
            "masks": [self._masks[p].bits for p in self.params],
            "mask_updates": self.mask_updates,
            "generator": self.generator.get_state(),
            "ascent_generator": self.ascent_generator.get_state(),
            "update_owed": self._update_owed,
        }

    def _check_extra_state(self, state: dict) -> None:
        super()._check_extra_state(state)
        masks = state.get("masks")
        params = self.params
        if not isinstance(masks, list) or len(masks) != len(params):
            raise ValueError(f"state_dict holds no masks for this optimizer's {len(params)} parameters")
        for i, (p, bits) in enumerate(zip(params, masks)):
            if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != packed_nbytes(p.numel()):
                raise ValueError(f"state_dict mask {i} does not fit a parameter of shape {tuple(p.shape)}")
        for key in ("mask_updates", "generator"):
            if key not in state:
                raise ValueError(f"state_dict's extra state has no {key!r}")
        updates = state["mask_updates"]
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"state_dict['extra']['mask_updates'] must be an int >= 0, got {updates!r}")
        owed = state.get("update_owed", False)  # (absent from state_dicts saved before it was kept)
        if not isinstance(owed, bool):
            raise ValueError(f"state_dict['extra']['update_owed'] must be a bool, got {owed!r}")
        for key, gen in (("generator", self.generator), ("ascent_generator", self.ascent_generator)):
            if key in state:
                _check_generator_state(f"state_dict['extra'][{key!r}]", state[key], gen)

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        params = self.params
        masks = state["masks"]
        self._masks = {p: BitMask(bits.to(p.device).contiguous(), p.shape) for p, bits in zip(params, masks)}
        self._invalidate_plan()
        self.mask_updates = int(state["mask_updates"])
        self._update_owed = state.get("update_owed", False)
        self.generator.set_state(state["generator"].cpu())
        if "ascent_generator" in state:
            self.ascent_generator.set_state(state["ascent_generator"].cpu())


def _check_generator_state(name: str, value, generator: torch.Generator) -> None:
    """``ValueError`` unless ``value`` is a state that ``generator`` takes (tried on a scratch
    generator of its device, so nothing is changed). A CPU generator's state (Mersenne Twister,
    5056 bytes) and a CUDA one's (seed and offset, 16 bytes) do not convert into each other."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise ValueError(f"{name} must be a uint8 tensor (a torch.Generator state), got {_describe_state(value)}")
    size = generator.get_state().numel()
    device = generator.device.type
    if value.numel() != size:
        raise ValueError(
            f"{name} holds {value.numel()} bytes, but this optimizer's generator is on {device}, whose state "
            f"takes {size} bytes: a checkpoint saved with the generator on another device type (SSAM-D draws on "
            "its parameters' device) cannot be loaded here; load it with the parameters on that device type")
    try:
        torch.Generator(device=generator.device).set_state(value.cpu())
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} is not a state of a {device} torch.Generator: {exc}") from None


def _describe_state(value) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
