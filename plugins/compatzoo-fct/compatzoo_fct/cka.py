"""Linear centered kernel alignment (Kornblith et al. 2019), FCT's complementarity
measure between old features and side information (FCT sec. 5.3, table 6)."""

from __future__ import annotations

import numpy as np
import torch

from compatzoo.plugin import InvalidFeaturesError


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred ``x`` (N, d1), ``y`` (N, d2).

    Kornblith et al.'s eq. for the linear kernel, in its feature-space form (d x d Gram
    matrices, so large N is cheap). 1 for identical inputs, invariant to orthogonal maps
    and isotropic scaling of either side. A constant input (e.g. FCT's zero side
    information) has no variance to align: its CKA is reported as 0, as in FCT table 6.
    """
    x64 = torch.as_tensor(x, dtype=torch.float64)
    y64 = torch.as_tensor(y, dtype=torch.float64)
    if x64.ndim != 2 or y64.ndim != 2 or len(x64) != len(y64):
        raise InvalidFeaturesError(f"linear_cka needs two (N, d) arrays with the same N; got "
                                   f"shapes {tuple(x64.shape)} and {tuple(y64.shape)}")
    x64, y64 = x64 - x64.mean(dim=0), y64 - y64.mean(dim=0)
    norms = torch.linalg.matrix_norm(x64.T @ x64) * torch.linalg.matrix_norm(y64.T @ y64)
    if norms == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(y64.T @ x64) ** 2 / norms)
