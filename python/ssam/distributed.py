"""torch.distributed glue: every rank holds the same seed and the same masks.

Under ``DistributedDataParallel`` the gradients are all-reduced, so the perturbation and the
step are the same on every rank, but a mask is chosen from data (Fisher samples, gradient
scores) and random draws that each rank sees on its own. The optimizers therefore sum SSAM-F's
Fisher over the ranks and broadcast every new mask from rank 0: a mask is 1 bit per weight, one
collective per mask update. Nothing here runs unless ``torch.distributed`` is initialised with
more than one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` unless torch.distributed runs with several processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _collective_device(device: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only; the other backends (gloo) take tensors where they are."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def broadcast_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank."""
    if world()[1] == 1:
        return seed
    buf = torch.tensor([seed], dtype=torch.int64, device=_collective_device(torch.device("cpu")))
    dist.broadcast(buf, src=0)
    return int(buf.item())


def _flat_collective(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective`` on all of ``tensors`` (one dtype) as a single flat buffer, in place."""
    if world()[1] == 1 or not tensors:
        return
    device = _collective_device(tensors[0].device)
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    collective(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks, in place (each rank ends with the same values)."""
    _flat_collective(tensors, dist.all_reduce)


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's, in place."""
    _flat_collective(tensors, lambda flat: dist.broadcast(flat, src=0))


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else
    ``model``), for passes that are not training steps (the Fisher, the cost measurement): the
    wrapper's forward runs collectives (DDP's buffer broadcast) or scatters the batch, and ranks
    running different numbers of such forwards (uneven shares of the Fisher's samples) would
    mismatch their collectives: a hang."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model
