"""A third-party plugin: a loss, an upgrader that publishes a per-item signal and a
scheduler that orders by it, registered through the public hook exactly as a built-in
method family is. It imports nothing from compatzoo but ``compatzoo.plugin``."""

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.plugin import (BackfillScheduler, BackfillState, CompatLoss, GalleryUpgrader,
                              HopData, LossOutput, NamedBundle, StoredGallery,
                              check_backfill_state, descending_order, hookimpl)


class ReverseScheduler(BackfillScheduler):
    """Backfills the last gallery item first."""

    def order(self, state, seed=0):
        return np.arange(len(state.old_features))[::-1].copy()


class NormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: float = Field(1.0, gt=0, description="the embedding norm to pull towards")


class FeatureNormLoss(CompatLoss):
    """Pulls embedding norms towards ``target`` (needs nothing from the old model)."""

    Params = NormParams

    def forward(self, inputs):
        norms = inputs.new_features.norm(dim=1)
        return LossOutput(((norms - self.params.target) ** 2).mean())


class LeastSquaresParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ridge: float = Field(1e-3, ge=0, description="ridge of the normal equations")


class LeastSquaresUpgrader(GalleryUpgrader):
    """A ridge-regularised linear map fitted in closed form on the training pairs. It
    publishes the per-item signal ``upgraded_norm``, the length of each item's upgraded
    embedding (a stand-in for a real per-item score)."""

    Params = LeastSquaresParams
    publishes = frozenset({"upgraded_norm"})

    def __init__(self, params=None, input_dim=0, output_dim=0):
        super().__init__()
        self.params = params or LeastSquaresParams()
        self.input_dim, self.output_dim = input_dim, output_dim
        self.linear = torch.nn.Linear(input_dim, output_dim)

    def fit(self, data: HopData):
        data.check(self.input_dim, self.output_dim)
        x = torch.cat([data.old_features, torch.ones(len(data.old_features), 1)], dim=1)
        gram = x.T @ x + self.params.ridge * torch.eye(x.shape[1])
        solution = torch.linalg.solve(gram, x.T @ data.new_features)
        with torch.no_grad():
            self.linear.weight.copy_(solution[:-1].T)
            self.linear.bias.copy_(solution[-1])
        return [{"epoch": 1}]

    def forward(self, old, side=None):
        return self.linear(old)

    def signals(self, stored: StoredGallery, chunk_size=65536):
        upgraded = torch.from_numpy(self.upgrade(stored.features, None, chunk_size))
        return {"upgraded_norm": upgraded.norm(dim=1).numpy()}


class ShortestFirstScheduler(BackfillScheduler):
    """Re-embeds the items with the smallest ``upgraded_norm`` signal first."""

    needs_signals = frozenset({"upgraded_norm"})

    def order(self, state: BackfillState, seed=0):
        check_backfill_state("shortest-first", self, state)
        return descending_order(-state.signals["upgraded_norm"])


@hookimpl
def register_components(register):
    register("scheduler", "reverse", ReverseScheduler)
    register("loss", "feature-norm", FeatureNormLoss)
    register("upgrader", "least-squares", LeastSquaresUpgrader)
    register("scheduler", "shortest-first", ShortestFirstScheduler)
    # A short name for a trained bundle: any source compatzoo.load accepts.
    register("bundle", "example-bict", NamedBundle(source="bict-synth",
                                                   description="the shipped bict-synth"))
