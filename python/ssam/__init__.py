"""ssam: Sharpness-Aware Minimization with sparse perturbation (Sparse SAM, NeurIPS 2022).

Optimizers ``SAM``, ``SSAMF`` (Fisher mask) and ``SSAMD`` (dynamic mask) wrap any
``torch.optim`` base optimizer and call the ``ssam_kernels`` backend for the norm, the masked
perturbation, the exact restore and mask selection.
"""

from .batchnorm import frozen_batchnorm_stats
from .fisher import empirical_fisher
from .sam import SAM
from .ssamd import SSAMD, cosine_death_rate
from .ssamf import SSAMF
from .structure import Structure, parse_structure

__version__ = "0.1.0"

__all__ = [
    "SAM", "SSAMD", "SSAMF", "Structure", "cosine_death_rate", "empirical_fisher", "frozen_batchnorm_stats",
    "parse_structure",
]
