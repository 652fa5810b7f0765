"""BiCT's feature upgrade module psi (Su et al. 2022, sec. 3.2 and appendix A.2).

Step 2 of BiCT: with both encoders frozen, an MLP maps stored old gallery embeddings
towards the new space, trained on old features of the training set only with the cosine
regression ``mean(1 - cos(psi(phi_old(x)), phi_new(x)))``. In a chain of upgrades psi_i
reads the momentum input of eq. 9, on the training items and on the gallery alike.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from compatzoo.plugin import (GalleryUpgrader, HopData, Recipe, StoredGallery, check_features,
                              fit_minibatches)

from compatzoo_bict.sequential import momentum_input


class BiCTMLPParams(Recipe):
    """psi's width and its training recipe; defaults are BiCT's tables 7-8."""

    hidden_dim: int = Field(4096, ge=1, description="d_h (BiCT sec. 4.2: 4096 by default; "
                            "512-16384 ablated in table 4)")
    hidden_layers: int = Field(3, ge=0, description="[fc-bn-relu] blocks before the output fc "
                               "(table 8: 4 fc layers in all)")
    epochs: int = Field(30, ge=1, description="table 7: 30 epochs")
    batch_size: int = Field(512, ge=2, description="table 8: 512")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="table 7: SGD")
    lr: float = Field(1.0, gt=0, description="table 8: base learning rate 1")
    momentum: float = Field(0.9, ge=0, lt=1, description="table 7: 0.9")
    weight_decay: float = Field(1e-4, ge=0, description="table 7: 1e-4")
    warmup_epochs: float = Field(1.0, ge=0, description="table 7: 1 warm-up epoch, then cosine")
    input_momentum: float = Field(
        0.5, ge=0, le=1, description="m of eq. 9: from the second upgrade of a chain on, psi "
        "reads (1 - m) F_(i-1) + m F_(i-2) (sec. 4.4: 0.5; 0 is vanilla sequential BiCT). "
        "No effect on a first upgrade")
    direction: Literal["gallery", "query"] = Field(
        "gallery", description="gallery: psi maps stored old embeddings into the new space "
        "(BiCT). query: the same MLP and regression fitted new -> old, mapping new queries "
        "into the old space (Drift-Adapter's direction; not in the BiCT paper, offered so "
        "psi can be compared with the adapters both ways)")


def mlp_layers(input_dim: int, hidden_dim: int, output_dim: int,
               hidden_layers: int) -> list[nn.Module]:
    """``[fc-bn-relu] x hidden_layers`` then ``fc``: d_old -> d_h -> ... -> d_new."""
    layers: list[nn.Module] = []
    width = input_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        width = hidden_dim
    return layers + [nn.Linear(width, output_dim)]


class BiCTMLP(GalleryUpgrader):
    """psi: ``d_old -> d_h -> d_h -> d_h -> d_new`` (appendix A.2), no side information."""

    Params = BiCTMLPParams
    # In a chain, psi trains on the items as the chain stores them (eq. 9).
    fits_on_stored = True

    def __init__(self, params: BiCTMLPParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        super().__init__()
        self.params = params or BiCTMLPParams()
        self.input_dim, self.output_dim, self.side_dim = input_dim, output_dim, 0
        self.mlp = nn.Sequential(*mlp_layers(input_dim, self.params.hidden_dim, output_dim,
                                             self.params.hidden_layers))

    @property
    def reads_previous(self) -> bool:
        """Eq. 9 keeps one more stored gallery copy when m > 0."""
        return self.params.input_momentum > 0 and self.direction == "gallery"

    @property
    def direction(self) -> str:
        return self.params.direction

    @classmethod
    def direction_of(cls, params: BiCTMLPParams) -> str:
        return params.direction

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(old)

    def momentum_input(self, stored: StoredGallery) -> torch.Tensor:
        """F_0 on a first upgrade, else ``(1 - m) F_(i-1) + m F_(i-2)`` (eq. 9)."""
        history = [stored.features] if stored.previous is None or not self.reads_previous \
            else [stored.previous, stored.features]
        return momentum_input(history, self.params.input_momentum)

    def advance(self, stored: StoredGallery, chunk_size: int = 65536) -> StoredGallery:
        features = self.upgrade(self.momentum_input(stored), None, chunk_size)
        return StoredGallery(torch.from_numpy(features), None, stored.features)

    def fit(self, data: HopData) -> list[dict[str, float]]:
        """Cosine regression towards the frozen new features (BiCT step 2). In a chain the
        inputs are the training items as the chain stores them (F_(i-1), and F_(i-2) for
        the momentum input), not phi_(i-1) of the images: that is what psi_i will meet."""
        if self.direction == "query":        # new queries -> old space, on the same items
            data.check(self.output_dim, self.input_dim)
            inputs, targets = data.new_features, data.old_features
        else:
            data.check(self.input_dim, self.output_dim)
            inputs, targets = self.momentum_input(data.stored_items()), data.new_features
            check_features(inputs, self.input_dim,
                           "psi's training inputs (as the chain stores them)")
        inputs = inputs.to(data.device, torch.float32)
        targets = targets.to(data.device, torch.float32)
        self.to(data.device)

        def batch_loss(index: torch.Tensor, _: torch.Generator) -> torch.Tensor:
            index = index.to(data.device)
            return (1.0 - F.cosine_similarity(self(inputs[index]), targets[index],
                                              dim=1)).mean()

        return fit_minibatches(self, len(inputs), batch_loss, self.params, seed=data.seed,
                               progress=data.progress, desc="bict psi")
