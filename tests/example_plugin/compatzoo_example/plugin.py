"""A third-party plugin: a scheduler and a loss, registered through the public hook."""

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.hookspecs import hookimpl
from compatzoo.interfaces import BackfillScheduler, CompatLoss, LossOutput


class ReverseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReverseScheduler(BackfillScheduler):
    """Backfills the last gallery item first."""

    def __init__(self, params: ReverseParams):
        self.params = params

    def order(self, gallery, seed=0):
        return np.arange(len(gallery.old_features))[::-1].copy()


class NormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: float = Field(1.0, gt=0)


class FeatureNormLoss(CompatLoss):
    """Pulls embedding norms towards ``target`` (needs nothing from the old model)."""

    def __init__(self, params: NormParams):
        super().__init__()
        self.target = params.target

    def forward(self, inputs):
        norms = inputs.new_features.norm(dim=1)
        return LossOutput(((norms - self.target) ** 2).mean())


@hookimpl
def register_components(register):
    register("scheduler", "reverse", ReverseScheduler, ReverseParams)
    register("loss", "feature-norm", FeatureNormLoss, NormParams)
