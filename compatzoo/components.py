"""The core's own gallery components: the identity upgrader (BCT's backfill-free
upgrade) and the random and oracle-distance backfill orders."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.errors import DimensionMismatchError
from compatzoo.interfaces import BackfillScheduler, BackfillState, GalleryUpgrader
from compatzoo.scheduling import check_backfill_state, descending_order


class IdentityUpgrader(GalleryUpgrader):
    """Keeps stored embeddings as they are (BCT's backfill-free upgrade)."""

    def __init__(self, params: BaseModel | None = None, input_dim: int = 0, **_: int):
        super().__init__()
        self.input_dim = self.output_dim = input_dim

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return old


class RandomScheduler(BackfillScheduler):
    """Backfill in a seeded random order: the baseline every smarter order must beat."""

    def order(self, state: BackfillState, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).permutation(len(state.old_features))


class OracleDistanceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = Field(
        False, description="compare L2-normalised embeddings (the angular error cosine "
        "retrieval sees) instead of FastFill's raw distance")


class OracleDistanceScheduler(BackfillScheduler):
    """FastFill's oracle order: largest ``||phi_new(x) - stored(x)||`` first.

    ``stored`` is the upgraded embedding when the state has one, else the old embedding
    (same width only). It reads phi_new of the gallery, i.e. the result of the backfill it
    orders, so it is an upper reference and reports mark it as an oracle.
    """

    Params = OracleDistanceParams
    requires = frozenset({"new_features"})
    is_oracle = True

    def order(self, state: BackfillState, seed: int = 0) -> np.ndarray:
        check_backfill_state("oracle-distance", self, state, optional=frozenset({"upgraded"}))
        stored = state.upgraded if state.upgraded is not None else state.old_features
        new = np.asarray(state.new_features, dtype=np.float32)
        if stored.shape[1] != new.shape[1]:
            raise DimensionMismatchError(
                f"the oracle-distance scheduler compares new embeddings (dim {new.shape[1]}) "
                f"with the stored ones (dim {stored.shape[1]}); give BackfillState.upgraded, "
                "the upgrader's output in the new space")
        return descending_order(true_error(stored, new, self.params.normalize))


def true_error(stored: np.ndarray, new: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Per item, ``||new - stored||``: how far the stored embedding (the upgraded one, or
    the old one when there is no upgrader) is from what re-embedding the item gives; raw
    features (FastFill's oracle), or L2-normalised rows with ``normalize`` --
    ``sqrt(2 - 2 cos)``, monotone in the cosine distance that retrieval sees."""
    stored = np.asarray(stored, dtype=np.float32)
    new = np.asarray(new, dtype=np.float32)
    if stored.shape != new.shape:
        raise ValueError(f"stored {stored.shape} and new {new.shape} embeddings must have one "
                         "row per gallery item in one space")
    if normalize:
        new, stored = _unit_rows(new), _unit_rows(stored)
    return np.linalg.norm(new - stored, axis=1)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
