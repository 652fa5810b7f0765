"""Distillation baselines: LwF (BCT's baseline) and focal distillation (PC training)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.plugin import (DimensionMismatchError, LossInputs, LossOutput, TrainingContext,
                              match_dim)

from compatzoo_bct.common import OldHeadLoss, expect_dim, frozen_logits, soft_kl


class LwFParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the soft "
                               "labels (Li & Hoiem 2017 use 2; openBCT 1, OpenCompatible "
                               "0.01); divides the head's logits, which already include its "
                               "scale")
    samples: Literal["old_classes", "all"] = Field(
        "old_classes", description="which samples are distilled: those of classes the old "
        "head knows (BCT's baseline), or every sample (openBCT and OpenCompatible)")


class LwFLoss(OldHeadLoss):
    """Learning without Forgetting as BCT's baseline: soft labels of the old model.

    ``KL(softmax(w_old(phi_old(x)) / T) || softmax(w_old(phi_new(x)[:d_old]) / T))`` on
    samples of classes the old head knows (or all samples), without margin, averaged over
    those samples.
    """

    Params = LwFParams
    requires = frozenset({"old_head", "old_features"})

    def forward(self, inputs: LossInputs) -> LossOutput:
        head = inputs.old_head
        expect_dim(inputs.old_features, head.embedding_dim, "old_features")
        known = (torch.ones_like(inputs.labels, dtype=torch.bool)
                 if self.params.samples == "all" else self.known_mask(inputs.labels))
        if not bool(known.any()):
            return LossOutput(inputs.new_features.sum() * 0.0)
        old = inputs.old_features[known]
        new = match_dim(inputs.new_features[known], head.embedding_dim)
        kl = soft_kl(frozen_logits(head, old), frozen_logits(head, new), self.params.temperature)
        return LossOutput(kl.mean())


class FocalDistillationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, ge=0, description="weight of every sample (Yan et al. 2021: 1)")
    beta: float = Field(5.0, ge=0, description="extra weight of samples the old model "
                        "classifies correctly (Yan et al. 2021: 5)")
    divergence: Literal["kl", "l2"] = Field(
        "kl", description="'kl': T^2 * KL of the temperature-softened outputs (FD-KL); 'l2': "
        "1/2 * squared Euclidean distance of the logits (FD-LM)")
    temperature: float = Field(100.0, gt=0, description="T of the 'kl' divergence (100, the "
                               "default of public focal-distillation code)")


class FocalDistillationLoss(OldHeadLoss):
    """Focal distillation of positive-congruent training (Yan et al., CVPR 2021).

    ``mean_x [alpha + beta * 1(argmax w_old(phi_old(x)) = y)] * D(z_new(x), z_old(x))``
    over samples of old classes, where ``z_old = w_old(phi_old(x))`` and ``z_new =
    w_new(phi_new(x))`` are both restricted to the old classes (no margin), and ``D`` is
    ``T^2 * KL(softmax(z_old / T) || softmax(z_new / T))`` or ``1/2 ||z_new - z_old||^2``.
    Gradients reach the new features and the new head.
    """

    Params = FocalDistillationParams
    requires = frozenset({"old_head", "old_features", "new_head"})

    def __init__(self, params: FocalDistillationParams | None = None):
        super().__init__(params)
        self.register_buffer("old_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self._last_old_id = 0

    def prepare(self, context: TrainingContext) -> None:
        super().prepare(context)
        self.old_ids = torch.nonzero(self.known).flatten()
        self._last_old_id = int(self.old_ids.max())

    def forward(self, inputs: LossInputs) -> LossOutput:
        known = self.known_mask(inputs.labels)
        old_head, new_head = inputs.old_head, inputs.new_head
        if self._last_old_id >= new_head.num_classes:
            raise DimensionMismatchError(
                f"the new head has {new_head.num_classes} classes but the old model knows class "
                f"{self._last_old_id}; focal distillation compares logits of the old classes, "
                "so the new head must cover them (same class ids)")
        expect_dim(inputs.old_features, old_head.embedding_dim, "old_features")
        if not bool(known.any()):
            return LossOutput(inputs.new_features.sum() * 0.0)
        teacher = frozen_logits(old_head, inputs.old_features[known])[:, self.old_ids]
        student = new_head(inputs.new_features[known])[:, self.old_ids]
        old_correct = self.old_ids[teacher.argmax(dim=1)] == inputs.labels[known]
        weight = self.params.alpha + self.params.beta * old_correct.float()
        if self.params.divergence == "kl":
            t = self.params.temperature
            distance = soft_kl(teacher, student, t) * t ** 2
        else:
            distance = 0.5 * ((student - teacher) ** 2).sum(dim=1)
        return LossOutput((weight * distance).mean(),
                          {"old_correct_share": old_correct.float().mean()})
