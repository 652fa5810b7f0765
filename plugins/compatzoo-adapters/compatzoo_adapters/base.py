"""What every adapter shares: the direction it maps, the pairs it fits on and how many of
them its parameters need.

An adapter is a :class:`GalleryUpgrader` fitted on paired embeddings only -- the old and
the new embedding of the same items; labels, images and heads are ignored -- so it serves
users who switch between two pretrained embedding models and hold a sample of pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.plugin import GalleryUpgrader, HopData, InvalidFeaturesError

Direction = Literal["gallery", "query"]


class TooFewPairsError(InvalidFeaturesError):
    """Fewer pairs than an adapter's parameters need to be determined."""


class AdapterParams(BaseModel):
    """The one param every adapter has."""

    model_config = ConfigDict(extra="forbid")
    direction: Direction = Field(
        "gallery", description="gallery: map stored old embeddings into the new space (fit "
        "old -> new). query: map new-model queries into the old space, so the old index keeps "
        "serving until a backfill (Drift-Adapter's use): fit new -> old, and upgrade() then "
        "maps new-space rows to old-space rows")


class PairAdapter(GalleryUpgrader):
    """Built as ``cls(params, input_dim=..., output_dim=...)`` with the widths of what it
    maps: ``(d_old, d_new)`` for ``direction: gallery``, ``(d_new, d_old)`` for ``query``."""

    Params = AdapterParams
    name = "adapter"        # the registered name, for messages

    def __init__(self, params: AdapterParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        super().__init__()
        self.params = params or type(self).Params()
        self.input_dim, self.output_dim, self.side_dim = input_dim, output_dim, 0

    @property
    def direction(self) -> str:
        """Read by runs and bundles: a query adapter never runs on a stored gallery."""
        return self.params.direction

    @classmethod
    def direction_of(cls, params: AdapterParams) -> str:
        return params.direction

    def min_pairs(self) -> tuple[int, str]:
        """How many pairs the fit needs, and why."""
        return 2, "a fit needs at least two pairs"

    def pairs(self, data: HopData) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` as float32 on ``data.device``: (old, new) features for a
        gallery adapter, (new, old) for a query adapter; checked before any fitting
        (widths, NaN/inf rows, row counts, enough pairs)."""
        gallery = self.direction == "gallery"
        old_dim, new_dim = ((self.input_dim, self.output_dim) if gallery
                            else (self.output_dim, self.input_dim))
        data.check(old_dim, new_dim)
        needed, why = self.min_pairs()
        if len(data.old_features) < needed:
            raise TooFewPairsError(
                f"{self.name} ({self.input_dim} -> {self.output_dim}) needs at least {needed} "
                f"pairs ({why}); got {len(data.old_features)}. Give more pairs")
        inputs, targets = ((data.old_features, data.new_features) if gallery
                           else (data.new_features, data.old_features))
        return (inputs.to(data.device, torch.float32), targets.to(data.device, torch.float32))


def set_affine(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Load ``y = x @ weight + bias`` (row vectors; ``weight`` is ``(d_in, d_out)``) into
    ``linear``, which stores the transpose."""
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        linear.bias.copy_(bias)
