"""BiCT's momentum input for sequential upgrades (Su et al. 2022, sec. 4.4, eq. 9)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from compatzoo.plugin import DimensionMismatchError, SpecError

Features = TypeVar("Features", torch.Tensor, np.ndarray)


def momentum_input(history: Sequence[Features], m: float = 0.5) -> Features:
    """The input of the i-th upgrade module psi_i, with ``i = len(history)``.

    ``history = [F_0, F_1, ..., F_{i-1}]``: ``F_0`` is phi_old of the items and ``F_k`` the
    output of psi_k (the gallery after the k-th upgrade). Eq. 9 gives ``F_0`` for i = 1 and
    ``(1 - m) * F_{i-1} + m * F_{i-2}`` for i >= 2, i.e. the newest copy weighted
    ``1 - m`` and the one before it ``m`` (paper: m = 0.5). Only the last two copies are
    read, the one extra gallery copy the paper says must be kept. The same rule builds
    psi_i's training inputs (on training images) and the gallery it upgrades (v1 -> v2 -> v3).
    """
    if not history:
        raise SpecError("momentum_input needs at least F_0, the old features")
    if not 0.0 <= m <= 1.0:
        raise SpecError(f"momentum m must lie in [0, 1] (eq. 9), got {m}")
    if len(history) == 1:
        return history[0]
    newest, previous = history[-1], history[-2]
    if tuple(newest.shape) != tuple(previous.shape):
        raise DimensionMismatchError(
            f"eq. 9 mixes F_(i-1) of shape {tuple(newest.shape)} with F_(i-2) of shape "
            f"{tuple(previous.shape)}; the momentum input needs generations of equal width")
    return (1.0 - m) * newest + m * previous
