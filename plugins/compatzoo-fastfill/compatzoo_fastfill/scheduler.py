"""FastFill's backfill order: items whose transformed embedding h predicts least
confidently (largest sigma) are re-embedded first."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from compatzoo.gallery import check_gallery_state, descending_order
from compatzoo.interfaces import BackfillScheduler, GalleryState


class SigmaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SigmaScheduler(BackfillScheduler):
    """Order by ``GalleryState.uncertainty`` (FastFillUpgrader.uncertainty) descending."""

    requires = frozenset({"uncertainty"})

    def __init__(self, params: SigmaParams | None = None):
        self.params = params or SigmaParams()

    def order(self, gallery: GalleryState, seed: int = 0) -> np.ndarray:
        check_gallery_state("fastfill-sigma", self, gallery)
        return descending_order(gallery.uncertainty)
