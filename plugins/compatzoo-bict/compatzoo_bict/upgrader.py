"""BiCT's feature upgrade module psi (Su et al. 2022, sec. 3.2 and appendix A.2).

Step 2 of BiCT: with both encoders frozen, an MLP maps stored old gallery embeddings
towards the new space, trained on old features of the training set only with the cosine
regression ``mean(1 - cos(psi(phi_old(x)), phi_new(x)))``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from compatzoo.gallery import FitRecipe, check_fit_context, fit_minibatches
from compatzoo.interfaces import GalleryUpgrader, UpgradeContext


class BiCTMLPParams(FitRecipe):
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

    def __init__(self, params: BiCTMLPParams | None = None, input_dim: int = 0,
                 output_dim: int = 0, **_: int):
        super().__init__()
        self.params = params or BiCTMLPParams()
        self.input_dim, self.output_dim, self.side_dim = input_dim, output_dim, 0
        self.mlp = nn.Sequential(*mlp_layers(input_dim, self.params.hidden_dim, output_dim,
                                             self.params.hidden_layers))

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(old)

    def fit(self, context: UpgradeContext) -> list[dict[str, float]]:
        """Cosine regression towards the frozen new features (BiCT step 2)."""
        check_fit_context(context, self.input_dim, self.output_dim)
        self.to(context.device)
        old = context.old_features.to(context.device, torch.float32)
        new = context.new_features.to(context.device, torch.float32)

        def batch_loss(index: torch.Tensor, _: torch.Generator) -> torch.Tensor:
            index = index.to(context.device)
            return (1.0 - F.cosine_similarity(self(old[index]), new[index], dim=1)).mean()

        return fit_minibatches(self, len(old), batch_loss, self.params, seed=context.seed,
                               progress=context.progress, desc="bict psi")
