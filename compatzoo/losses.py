"""The core's one loss: the new (or old) model's own classification through its head."""

from __future__ import annotations

import torch.nn.functional as F

from compatzoo.interfaces import CompatLoss, LossInputs, LossOutput


class ClassificationLoss(CompatLoss):
    """Cross-entropy of the model's own head (margin applied by the head)."""

    requires = frozenset({"new_head"})

    def forward(self, inputs: LossInputs) -> LossOutput:
        logits = inputs.new_head(inputs.new_features, inputs.labels)
        return LossOutput(F.cross_entropy(logits, inputs.labels))
