"""ssam_kernels: the backend of Sparse SAM: gradient norm, masked perturbation with a compact
backup and exact restore, N:M and global top-k mask selection, 2:4 compression, MVUE 2:4
sparsification, and cheaper ascent backwards (``sparse_ascent``: exact masked weight gradients,
implicit and MVUE 2:4 gradients on sparse tensor cores).

Every op is one dispatcher op (``torch.ops.ssam_kernels.<op>``) with a plain-PyTorch reference
(``backend="torch"``) and faster kernels beside it, per device; ``backend="auto"`` (the default)
picks one, preferring ``SSAM_BACKEND`` where set. ``backend_info()`` says which backend runs
each op. Importing this package never fails because Triton or the compiled
extension is missing.
"""

from ._backend import BACKENDS, BackendUnavailableError
from ._library import auto_backend, backend_info
from .ops.ascent_conv import ascent_conv
from .ops.ascent_linear import ascent_linear
from .ops.bitmask import BitMask, pack_mask, packed_nbytes, unpack_mask
from .ops.compress_24 import compress_24, compress_24_cusparselt, decompress_24
from .ops.grad_norm import grad_norm
from .ops.masked_weight_grad import masked_weight_grad
from .ops.mvue24 import mvue24
from .ops.nm_mask import nm_mask
from .ops.perturb import PerturbBackup, perturb_, restore_
from .ops.sam_step import PlanMismatch, SAMStepPlan, SGDGroup
from .ops.sgd_step import restore_sgd_step_
from .ops.topk_mask import keep_count, topk_mask
from .sparse_ascent import ASCENT_MODES, sparse_ascent
from .sparse_gemm import sparse_mm_24

__version__ = "0.1.0"

__all__ = [
    "ASCENT_MODES",
    "BACKENDS",
    "BackendUnavailableError",
    "BitMask",
    "PerturbBackup",
    "PlanMismatch",
    "SAMStepPlan",
    "SGDGroup",
    "ascent_conv",
    "ascent_linear",
    "auto_backend",
    "backend_info",
    "compress_24",
    "compress_24_cusparselt",
    "decompress_24",
    "grad_norm",
    "keep_count",
    "masked_weight_grad",
    "mvue24",
    "nm_mask",
    "pack_mask",
    "packed_nbytes",
    "perturb_",
    "restore_",
    "restore_sgd_step_",
    "sparse_ascent",
    "sparse_mm_24",
    "topk_mask",
    "unpack_mask",
]
