"""Adapters trained by gradient descent through the project's one loop (``fit_epochs``):
Drift-Adapter's residual MLP and the lambda-orthogonal affine map. Both start from the
closed-form Procrustes solution, so training only has to learn what a rotation misses.

Defaults: neither paper's recipe could be read here beyond its abstract, so the numbers
below are this plugin's choices, stated as such: a 256-wide hidden layer (what a public
re-implementation of Drift-Adapter uses), Adam at 1e-3 for 50 epochs of 256 pairs, and
lambda = 0.1 on the penalty ``||W^T W - I||_F^2`` (METHODS.md's form: a weighted penalty,
not a hard bound).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from compatzoo.plugin import HopData, LossOutput, Recipe, fit_minibatches

from compatzoo_adapters.base import AdapterParams, PairAdapter, set_affine
from compatzoo_adapters.closed_form import procrustes_map, procrustes_pairs


class TrainedParams(Recipe, AdapterParams):
    """The recipe both trained adapters share (Adam, no weight decay, cosine schedule)."""

    epochs: int = Field(50, ge=1, description="passes over the pairs")
    batch_size: int = Field(256, ge=2, description="pairs per step")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="optimiser")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="weight decay")
    loss: Literal["mse", "cosine"] = Field(
        "mse", description="mse: mean over pairs of ||f(x) - y||^2; cosine: mean of "
        "1 - cos(f(x), y), blind to norms as cosine retrieval is")


def pair_loss(predicted: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The fit term: mean squared distance per pair, or mean cosine distance."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(predicted, target, dim=1)).mean()
    return (predicted - target).square().sum(dim=1).mean()


def train_on_pairs(adapter: PairAdapter, x: torch.Tensor, y: torch.Tensor, data: HopData,
                   penalty=None) -> list[dict[str, float]]:
    """``adapter`` trained on ``(x, y)`` with its params' recipe and loss, plus
    ``penalty()`` (a scalar, logged as ``penalty``) when given."""
    params = adapter.params
    adapter.to(x.device)

    def batch_loss(index: torch.Tensor, _: torch.Generator):
        index = index.to(x.device)
        fit = pair_loss(adapter(x[index]), y[index], params.loss)
        if penalty is None:
            return fit
        extra = penalty()
        return LossOutput(fit + extra, {"fit": fit.detach(), "penalty": extra.detach()})

    return fit_minibatches(adapter, len(x), batch_loss, params, seed=data.seed,
                           progress=data.progress, desc=adapter.name)


def procrustes_start_pairs(adapter: PairAdapter) -> tuple[int, str]:
    """A trained adapter starting from the centred Procrustes map needs it determined."""
    needed, why = procrustes_pairs(adapter.input_dim, adapter.output_dim, center=True)
    return needed, f"it starts from the centred Procrustes map: {why}"


class ResidualMLPParams(TrainedParams):
    """Drift-Adapter's compact residual MLP: one small hidden layer beside a linear map."""

    hidden_dim: int = Field(256, ge=1, description="width of the one hidden layer")
    skip_init: Literal["procrustes", "identity"] = Field(
        "procrustes", description="where the linear part A starts: the closed-form "
        "Procrustes map of the pairs (centred), or the identity (BCT's rule when widths "
        "differ: truncate or zero-pad)")


class ResidualMLP(PairAdapter):
    """``y = A x + b + W2 relu(W1 x + b1) + b2``; ``W2`` starts at zero, so training starts
    from the linear map and the MLP learns the residual the linear map leaves."""

    Params = ResidualMLPParams
    name = "residual-mlp"

    def __init__(self, params: ResidualMLPParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        super().__init__(params, input_dim, output_dim)
        self.skip = nn.Linear(input_dim, output_dim)
        self.mlp = nn.Sequential(nn.Linear(input_dim, self.params.hidden_dim), nn.ReLU(),
                                 nn.Linear(self.params.hidden_dim, output_dim))

    def min_pairs(self) -> tuple[int, str]:
        if self.params.skip_init == "identity":
            return super().min_pairs()
        return procrustes_start_pairs(self)

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.skip(old) + self.mlp(old)

    def fit(self, data: HopData) -> list[dict[str, float]]:
        x, y = self.pairs(data)
        if self.params.skip_init == "procrustes":
            weight, bias = procrustes_map(x, y, center=True, scale=False)
        else:
            weight = torch.eye(self.input_dim, self.output_dim, dtype=torch.float64)
            bias = torch.zeros(self.output_dim, dtype=torch.float64)
        set_affine(self.skip, weight, bias)
        with torch.no_grad():
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()
        return train_on_pairs(self, x, y, data)


def orthogonality_gap(weight: torch.Tensor) -> torch.Tensor:
    """``||W^T W - I||_F^2`` for a map ``W`` of shape ``(d_out, d_in)`` (as ``nn.Linear``
    stores it) with ``d_out >= d_in``, else ``||W W^T - I||_F^2``: the Gram matrix of the
    narrower side, zero exactly for the (semi-)orthogonal maps Procrustes returns."""
    gram = weight.T @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.T
    return (gram - torch.eye(len(gram), dtype=gram.dtype, device=gram.device)).square().sum()


class LambdaOrthogonalParams(TrainedParams):
    """An affine map pulled towards orthogonality (Ricci et al. 2025)."""

    lam: float = Field(0.1, ge=0, allow_inf_nan=False, description="lambda, the weight of "
                       "the penalty ||W^T W - I||_F^2: 0 is a plain affine fit, large values "
                       "keep the map orthogonal (the new space's geometry preserved)")


class LambdaOrthogonal(PairAdapter):
    """``y = W x + b`` trained on ``fit + lam * ||W^T W - I||_F^2``, starting from the
    (centred) Procrustes solution, where the penalty is zero: lambda trades adaptation to
    the pairs against keeping the geometry an orthogonal map keeps."""

    Params = LambdaOrthogonalParams
    name = "lambda-orthogonal"

    def __init__(self, params: LambdaOrthogonalParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        super().__init__(params, input_dim, output_dim)
        self.linear = nn.Linear(input_dim, output_dim)

    def min_pairs(self) -> tuple[int, str]:
        return procrustes_start_pairs(self)

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(old)

    def fit(self, data: HopData) -> list[dict[str, float]]:
        x, y = self.pairs(data)
        set_affine(self.linear, *procrustes_map(x, y, center=True, scale=False))
        return train_on_pairs(self, x, y, data,
                              lambda: self.params.lam * orthogonality_gap(self.linear.weight))
