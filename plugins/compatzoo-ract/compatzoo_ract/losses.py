"""RACT's compatibility terms (Zhang et al., ICLR 2022): contrastive eqs. 5, 6, 13 and
triplet eqs. 14, 15.

Anchors are the new features of the batch, positives the old features of the same images
in an independent second view (the paper's two augmentations; ``view: same`` uses the new
model's view, as OpenCompatible does), negatives the old (and,
for the regression-alleviating forms, new) features of batch samples of *other* classes:
pairs of the same class, the anchor itself included, are never negatives. New features
enter as their first ``d_old`` elements (zero-padded when shorter), then everything is
L2-normalised. With ``gather`` the negatives come from the batches of all processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.plugin import CompatLoss, LossInputs, LossOutput, all_gather_with_grad, match_dim

_GATHER = Field(True, description="take negatives from the batches of all processes when "
                "torch.distributed is initialised (the reference code does)")
_VIEW = Field("independent", description="the old features' view: a second, independent "
              "augmentation of the images (the paper), or the same view as the new model's "
              "(OpenCompatible)")
View = Literal["independent", "same"]


def _old_input(params) -> frozenset[str]:
    return frozenset({"old_features_view2" if params.view == "independent" else "old_features"})


@dataclass
class _Batch:
    new: torch.Tensor       # (B, d) anchors phi_new(x), normalised
    old: torch.Tensor       # (B, d) positives phi_old(x) (second view), normalised
    keys_new: torch.Tensor  # (G, d) new features of the (gathered) batch
    keys_old: torch.Tensor  # (G, d) old features of the (gathered) batch
    negative: torch.Tensor  # (B, G) True where the key is of another class


def _batch(inputs: LossInputs, gather: bool, view: View = "independent") -> _Batch:
    old = inputs.old_features_view2 if view == "independent" else inputs.old_features
    old = F.normalize(old.detach(), dim=1)
    new = F.normalize(match_dim(inputs.new_features, old.shape[1]), dim=1)
    keys, labels = torch.cat([new, old], dim=1), inputs.labels
    if gather:
        keys, labels = all_gather_with_grad(keys), all_gather_with_grad(labels)
    keys_new, keys_old = keys.split(old.shape[1], dim=1)
    negative = inputs.labels[:, None] != labels[None, :]
    return _Batch(new, old, keys_new, keys_old, negative)


class ContrastiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.05, gt=0, description="temperature tau (paper 0.05; the "
                               "reference code uses 0.01)")
    topk_negatives: int | None = Field(None, ge=1, description="keep only the k most similar "
                                       "negatives of each kind per anchor (None: all in-batch "
                                       "negatives, as in the paper; the reference code uses 10)")
    gather: bool = _GATHER
    view: View = _VIEW


class RACTParams(ContrastiveParams):
    n2n_weight: float = Field(1.0, ge=0, description="eta: 1 gives the unified loss (eq. 6); "
                              "any other value the split form (eq. 13) "
                              "L_n2o + eta * L_n2n")
    temperature_n2o: float | None = Field(None, gt=0, description="tau1 of the new-to-old "
                                          "negatives (None: temperature)")
    temperature_n2n: float | None = Field(None, gt=0, description="tau2 of the new-to-new "
                                          "negatives (None: temperature)")


def _info_nce(positive: torch.Tensor, *negatives: torch.Tensor) -> torch.Tensor:
    """Per-anchor cross-entropy with the positive logit at index 0."""
    logits = torch.cat([positive[:, None], *negatives], dim=1)
    return torch.logsumexp(logits, dim=1) - positive


class ContrastiveLoss(CompatLoss):
    """Vanilla contrastive compatibility (eq. 5): new-to-old negatives only."""

    Params = ContrastiveParams
    requires = frozenset({"old_features_view2"})

    @classmethod
    def inputs(cls, params) -> frozenset[str]:
        return _old_input(params)
    min_batch_classes = 2

    def negatives(self, similarity: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Similarities to negatives (others at -inf), cut to the top k when asked."""
        similarity = similarity.masked_fill(~negative, float("-inf"))
        k = self.params.topk_negatives
        if k is not None and k < similarity.shape[1]:
            similarity = similarity.topk(k, dim=1).values
        return similarity

    def forward(self, inputs: LossInputs) -> LossOutput:
        b, tau = _batch(inputs, self.params.gather, self.params.view), self.params.temperature
        positive = (b.new * b.old).sum(dim=1) / tau
        n2o = self.negatives(b.new @ b.keys_old.T, b.negative) / tau
        return LossOutput(_info_nce(positive, n2o).mean())


class RACTLoss(ContrastiveLoss):
    """Regression-alleviating compatibility (eq. 6): new-to-new negatives join the
    new-to-old ones, so the positive new-to-old pair must beat both kinds.

    The positive logit always uses ``temperature``; the two kinds of negatives use
    ``temperature_n2o`` / ``temperature_n2n`` (table 7). ``n2n_weight != 1`` switches to the
    split form of eq. 13, two InfoNCE terms that share the positive.
    """

    Params = RACTParams

    def forward(self, inputs: LossInputs) -> LossOutput:
        p = self.params
        b, tau = _batch(inputs, p.gather, p.view), p.temperature
        positive = (b.new * b.old).sum(dim=1) / tau
        n2o = self.negatives(b.new @ b.keys_old.T, b.negative) / (p.temperature_n2o or tau)
        n2n = self.negatives(b.new @ b.keys_new.T, b.negative) / (p.temperature_n2n or tau)
        if p.n2n_weight == 1.0:
            return LossOutput(_info_nce(positive, n2o, n2n).mean())
        l_n2o, l_n2n = _info_nce(positive, n2o).mean(), _info_nce(positive, n2n).mean()
        return LossOutput(l_n2o + p.n2n_weight * l_n2n, {"n2o": l_n2o, "n2n": l_n2n})


class TripletParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    margin: float = Field(0.8, ge=0, description="margin m (paper appendix: 0.8)")
    mining: Literal["hardest", "all", "topk"] = Field(
        "hardest", description="'hardest': the closest negative of each kind per anchor; "
        "'all': the average over all negatives, as eqs. 14-15 are written; 'topk': the "
        "average hinge over the topk_negatives closest (OpenCompatible: k = 10, dividing "
        "by k even when an anchor has fewer negatives)")
    topk_negatives: int = Field(10, ge=1, description="k of mining 'topk'")
    gather: bool = _GATHER
    view: View = _VIEW


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of unit vectors from their inner product ``a @ b.T``."""
    return (2.0 - 2.0 * (a @ b.T)).clamp_min(1e-12).sqrt()


class TripletLoss(CompatLoss):
    """Vanilla triplet compatibility (eq. 14): ``max(d(n_x, o_x) - d(n_x, o_k) + m, 0)``.

    Distances are Euclidean between normalised features. The loss averages over anchors
    that have at least one negative in the (gathered) batch.
    """

    Params = TripletParams
    requires = frozenset({"old_features_view2"})

    @classmethod
    def inputs(cls, params) -> frozenset[str]:
        return _old_input(params)
    min_batch_classes = 2
    new_to_new = False

    def hinge(self, positive: torch.Tensor, distance: torch.Tensor,
              negative: torch.Tensor) -> torch.Tensor:
        margin = self.params.margin
        if self.params.mining == "hardest":
            closest = distance.masked_fill(~negative, float("inf")).min(dim=1).values
            return F.relu(positive - closest + margin)
        if self.params.mining == "topk":
            k = self.params.topk_negatives
            closest = distance.masked_fill(~negative, float("inf"))
            closest = closest.topk(min(k, closest.shape[1]), dim=1, largest=False).values
            return F.relu(positive[:, None] - closest + margin).sum(dim=1) / k
        hinges = F.relu(positive[:, None] - distance + margin) * negative
        return hinges.sum(dim=1) / negative.sum(dim=1).clamp_min(1)

    def forward(self, inputs: LossInputs) -> LossOutput:
        b = _batch(inputs, self.params.gather, self.params.view)
        positive = ((b.new - b.old) ** 2).sum(dim=1).clamp_min(1e-12).sqrt()
        per_anchor = self.hinge(positive, _distance(b.new, b.keys_old), b.negative)
        if self.new_to_new:
            per_anchor = per_anchor + self.hinge(positive, _distance(b.new, b.keys_new),
                                                 b.negative)
        anchors = b.negative.any(dim=1).sum().clamp_min(1)
        return LossOutput(per_anchor.sum() / anchors)


class RACTTripletLoss(TripletLoss):
    """Regression-alleviating triplet form (eq. 15): new-to-new negatives add a hinge."""

    new_to_new = True
