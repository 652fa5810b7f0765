"""HOC, the compatibility term of d-Simplex-HOC (Biondi et al., CVPR 2024, eqs. 3-4).

As the reference code computes it (iamcl2r, ``methods/hoc.py``, ``HocLoss``): features
are L2-normalised, ``s_ij = mu * <old_i, new_j>`` over the batch, and each *old* feature
is an anchor whose positive is the new feature of the same image:

    L_i = -s_ii + log sum_j exp(s_ij * [y_j != y_i])      (masking: zero, the reference)

Same-class entries -- the positive included -- are multiplied by zero, not removed, so
each still adds exp(0) = 1 to the log-sum-exp. ``masking: exclude`` gives the usual
masked InfoNCE instead: the positive and the other-class entries, same-class ones left out,

    L_i = -s_ii + log(exp(s_ii) + sum_{j: y_j != y_i} exp(s_ij)).

The loss is the mean over anchors. Old features enter detached: only the new model learns.

The paper trains a new model with ``lambda * CE + (1 - lambda) * HOC``, lambda = 0.1
(eq. 3; the first model with CE alone). This term is HOC alone; write the combination as
loss weights, the way every compat loss here composes with ``classification``::

    losses: [{name: classification, weight: 0.1}, {name: hoc, weight: 0.9}]

with ``head: dsimplex`` on the old and the new model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.plugin import CompatLoss, LossInputs, LossOutput, match_dim


class HOCParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(10.0, gt=0, allow_inf_nan=False,
                         description="mu, the factor on cosine similarities (reference: "
                         "mu_ = 10, i.e. temperature 0.1)")
    masking: Literal["zero", "exclude"] = Field(
        "zero", description="same-class pairs: 'zero' sets their similarity to 0 and keeps "
        "them (and the positive) in the log-sum-exp, as the reference code does; 'exclude' "
        "leaves them out, keeping the positive in the denominator (masked InfoNCE)")


class HOCLoss(CompatLoss):
    """Higher-order compatibility: pull each new feature to the old feature of the same
    image, push it from old anchors of other classes (see the module docstring).

    Old and new features of different widths meet as the new features' first ``d_old``
    elements (zero-padded when shorter), compatzoo's rule; the paper's argument for
    stationarity needs one d-Simplex, i.e. one width, for every generation.
    """

    Params = HOCParams
    requires = frozenset({"old_features"})
    min_batch_classes = 2

    def forward(self, inputs: LossInputs) -> LossOutput:
        old = F.normalize(inputs.old_features.detach().float(), dim=1)
        new = F.normalize(match_dim(inputs.new_features, old.shape[1]), dim=1)
        similarity = self.params.scale * (old @ new.T)        # rows: old anchors
        positive = similarity.diagonal()
        labels = inputs.labels
        negative = labels[:, None] != labels[None, :]
        if self.params.masking == "zero":
            denominator = torch.logsumexp(similarity * negative, dim=1)
        else:
            keep = negative | torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            denominator = torch.logsumexp(similarity.masked_fill(~keep, float("-inf")), dim=1)
        return LossOutput((denominator - positive).mean())
