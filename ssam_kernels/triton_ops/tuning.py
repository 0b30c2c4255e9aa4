"""Which launch configurations the Triton host launchers choose.

On a GPU they pick tiles and precisions for speed; on CPU tensors (the interpreter) small tiles
that keep the interpreter fast. ``FOR_GPU`` forces the GPU choices on CPU tensors: the compile
tier (``ssam_bench.compile_kernels``) sets it to compile, for real GPU targets, exactly the
configurations a GPU run would launch.
"""

from __future__ import annotations

import torch

FOR_GPU = False


def for_gpu(t: torch.Tensor) -> bool:
    """Whether to choose the GPU configuration for a launch on ``t``'s device."""
    return t.is_cuda or FOR_GPU
