"""FastFill's transformation (Jaeckle et al., ICLR 2023): FCT's h with one more output,
sigma, a per-item log-variance learned by the uncertainty-weighted loss below; sigma then
orders the backfill (``fastfill-sigma``)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from compatzoo.plugin import (DimensionMismatchError, HopData, InvalidFeaturesError, SpecError,
                              StoredGallery, apply_in_chunks)
from compatzoo_fct import FCTParams, FCTTransformation
from compatzoo_fct.transformation import FCTNet, MappingLoss


class FastFillParams(FCTParams):
    """FCT's transformation params plus the weights of FastFill's loss."""

    mu: float = Field(0.5, ge=0, description="weight of the sigma penalty (FastFill: 0.5)")
    mu_disc: float = Field(1.0, ge=0, description="weight of the discriminative term (FastFill: 1)")
    label_smoothing: float = Field(0.1, ge=0, lt=1,
                                   description="of the cross-entropy (FastFill: 0.1)")
    sigma_head: Literal["unit", "linear"] = Field(
        "unit", description="where sigma comes from: one more output unit of h's last layer, "
        "or a separate Linear(d_new, 1) on h's output, as ml-fct's FastFill code does")


def fastfill_loss(features: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor,
                  logits: torch.Tensor, labels: torch.Tensor, mu: float = 0.5,
                  mu_disc: float = 1.0, label_smoothing: float = 0.1) -> torch.Tensor:
    """``mean(0.5 exp(-sigma_i) l_i + mu sigma_i)`` with
    ``l_i = MSE_i + mu_disc * LabelSmoothingCE(logits_i, y_i)``; MSE_i is the mean squared
    error over the dimensions of item i (FCT's MSE, per item)."""
    mse = ((features - target) ** 2).mean(dim=1)
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    return (0.5 * torch.exp(-sigma) * (mse + mu_disc * ce) + mu * sigma).mean()


class FastFillUpgrader(FCTTransformation):
    """h(phi_old, psi) -> (phi_new estimate, sigma); ``upgrade`` returns the estimate and
    the per-item signal ``sigma`` (a log-variance: larger is less certain) orders the
    backfill."""

    Params = FastFillParams
    extra_outputs = 1
    publishes = frozenset({"sigma"})

    def __init__(self, params: FastFillParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        super().__init__(params, input_dim, output_dim)
        if self.params.sigma_head == "linear":
            self.net = _LinearSigma(FCTNet(input_dim, self.side_model.input_dim, output_dim,
                                           self.params.inner_dim), output_dim)

    def predict(self, old: torch.Tensor,
                side: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(old, self.side_model.branch_input(old, side))
        return out[:, :-1], out[:, -1]

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict(old, side)[0]

    def signals(self, stored: StoredGallery, chunk_size: int = 65536) -> dict[str, np.ndarray]:
        return {"sigma": self.sigma(stored.features, stored.side, chunk_size)}

    @torch.no_grad()
    def sigma(self, old: np.ndarray | torch.Tensor, side: np.ndarray | torch.Tensor | None = None,
              chunk_size: int = 65536) -> np.ndarray:
        """sigma per stored item, with ``upgrade``'s checks and chunking."""
        return apply_in_chunks(_Sigma(self).train(self.training), old, side, self.input_dim,
                               self.side_dim, 1, chunk_size)[:, 0]

    def mapping_loss(self, data: HopData) -> MappingLoss:
        """FastFill's loss through the frozen new head, used without margin labels."""
        head = data.new_head
        if head is None:
            raise SpecError("the fastfill upgrader needs the new model's classifier head "
                            "(HopData.new_head) for its discriminative term; train the "
                            "new model with a head or use fct-transformation")
        if getattr(head, "embedding_dim", self.output_dim) != self.output_dim:
            raise DimensionMismatchError(f"the new head takes {head.embedding_dim}-d features but "
                                         f"the upgrader outputs {self.output_dim}")
        classes = getattr(head, "num_classes", None)
        if classes is not None and int(data.labels.max()) >= classes:
            raise InvalidFeaturesError(f"training labels reach {int(data.labels.max())} but the "
                                       f"new head has {classes} classes")
        head.to(data.device)
        frozen = {name: p.detach() for name, p in head.named_parameters()}
        p = self.params

        def loss(output: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            features, sigma = output[:, :-1], output[:, -1]
            logits = functional_call(head, frozen, (features,))
            return fastfill_loss(features, sigma, target, logits, labels, p.mu, p.mu_disc,
                                 p.label_smoothing)

        return loss


class _LinearSigma(nn.Module):
    """h followed by a separate ``Linear(d_new, 1)`` on its output for sigma; outputs
    ``[h, sigma]`` like h with an extra unit, so training and prediction are shared."""

    def __init__(self, transformation: nn.Module, new_dim: int):
        super().__init__()
        self.transformation = transformation
        self.sigma = nn.Linear(new_dim, 1)

    def forward(self, old: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        features = self.transformation(old, branch)
        return torch.cat([features, self.sigma(features)], dim=1)


class _Sigma(nn.Module):
    """sigma as a one-column output of the wrapped FastFill upgrader."""

    def __init__(self, upgrader: FastFillUpgrader):
        super().__init__()
        self.upgrader = upgrader

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.upgrader.predict(old, side)[1][:, None]
