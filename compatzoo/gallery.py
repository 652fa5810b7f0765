"""The core's gallery components: the identity upgrader and the random backfill order."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from compatzoo.interfaces import BackfillScheduler, GalleryState, GalleryUpgrader


class IdentityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdentityUpgrader(GalleryUpgrader):
    """Keeps old embeddings as they are (BCT's backfill-free upgrade)."""

    def __init__(self, params: IdentityParams | None = None, input_dim: int = 0, **_: int):
        super().__init__()
        self.input_dim = self.output_dim = input_dim

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return old


class RandomParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RandomScheduler(BackfillScheduler):
    """Backfill in a seeded random order: the baseline every smarter order must beat."""

    def __init__(self, params: RandomParams | None = None):
        self.params = params or RandomParams()

    def order(self, gallery: GalleryState, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).permutation(len(gallery.old_features))
