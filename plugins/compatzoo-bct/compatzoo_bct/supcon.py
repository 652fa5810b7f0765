"""Supervised-contrastive compatibility term (BiCT, Su et al. 2022, appendix B, eq. 10)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.plugin import CompatLoss, LossInputs, LossOutput, match_dim


class SupConParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.1, gt=0, description="temperature tau (BiCT appendix B: 0.1)")


class SupConLoss(CompatLoss):
    """``mean_i 1/|P(i)| sum_{p in P(i)} -log softmax_j(<n_i, o_j> / tau)[p]`` (eq. 10).

    Anchors are the new features ``n_i`` (first ``d_old`` elements), keys the old features
    ``o_j`` of the same views for every sample in the batch, all L2-normalised. ``P(i)``
    is the samples of i's class, i itself included (its own old feature is the natural
    positive of a cross-model term); the softmax runs over all keys ``P(i) ∪ N(i)``.
    """

    Params = SupConParams
    requires = frozenset({"old_features"})
    min_batch_classes = 2

    def forward(self, inputs: LossInputs) -> LossOutput:
        old = F.normalize(inputs.old_features.detach(), dim=1)
        new = F.normalize(match_dim(inputs.new_features, old.shape[1]), dim=1)
        log_prob = F.log_softmax(new @ old.T / self.params.temperature, dim=1)
        positive = (inputs.labels[:, None] == inputs.labels[None, :]).float()
        per_anchor = -(log_prob * positive).sum(dim=1) / positive.sum(dim=1)
        return LossOutput(per_anchor.mean())
