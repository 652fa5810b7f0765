"""MixBCT (Liang et al. 2023): classify a batch in which some new embeddings are replaced
by the stored old embeddings of the same images (eqs. 9-12)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.plugin import (CompatLoss, DimensionMismatchError, LossInputs, LossOutput,
                              SpecError, TrainingContext)


def credible_mask(features: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """MixBCT's denoising (before eq. 12): which old features lie close to their class.

    Rows are L2-normalised, then every dimension is L2-normalised over the whole set (the
    paper's "L2 normalization along each dimension to standardize its scale", as in the
    authors' ``tools/denoising/denoise_credible.py``); within each class the
    ``ceil(fraction * n)`` features closest (Euclidean) to the class mean are credible.
    """
    x = F.normalize(features.float(), dim=1)
    x.div_(x.norm(dim=0).clamp_min(1e-12))
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    means = x.new_zeros(len(classes), x.shape[1]).index_add_(0, inverse, x)
    distance = (x - (means / counts[:, None])[inverse]).norm(dim=1)
    by_distance = torch.argsort(distance, stable=True)
    order = by_distance[torch.argsort(inverse[by_distance], stable=True)]  # class, then distance
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(order), device=x.device) - starts[inverse[order]]
    keep = torch.ceil(counts.double() * fraction - 1e-9).long()  # tolerate 0.7 * 10 = 7.000001
    credible = torch.zeros(len(order), dtype=torch.bool, device=x.device)
    credible[order] = rank_in_class < keep[inverse[order]]
    return credible


class MixBCTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.3, ge=0, le=1, description="share of the batch whose new embeddings "
                         "are replaced by old ones (paper: 0.3)")
    credible_fraction: float = Field(0.9, gt=0, le=1, description="share of each class's old "
                                     "features kept as credible by the denoising (paper: 0.9)")
    seed: int = Field(0, description="seed of the generator that picks the replaced samples")


class MixBCTLoss(CompatLoss):
    """``CE(w_new(Mix{alpha phi_old(x), (1 - alpha) phi_new(x)}), y)`` (eqs. 9-12).

    Each step, ``round(alpha * B)`` (half up) samples of the batch, drawn among those whose
    cached old feature is credible, get their new embedding replaced by that old embedding;
    when fewer samples are credible, all credible ones are replaced. The new head classifies
    the mixed batch in its own form (margin included); this loss replaces the new model's
    plain classification loss. Old embeddings are used as stored (not normalised); the
    paper's ArcFace head normalises them anyway.
    """

    Params = MixBCTParams
    requires = frozenset({"old_feature_cache", "new_head"})

    def __init__(self, params: MixBCTParams | None = None):
        super().__init__(params)
        self.old_features: torch.Tensor | None = None  # stays on the CPU, like the cache
        self.register_buffer("credible", None, persistent=False)
        self.generator = torch.Generator().manual_seed(self.params.seed)

    def prepare(self, context: TrainingContext) -> None:
        cache = context.old_feature_cache
        if cache is None:
            raise SpecError("mixbct needs the old-feature cache (phi_old of the new training "
                            "set); give the experiment an old model")
        d_old, d_new = cache.features.shape[1], context.new_embedding_dim
        if d_old != d_new:
            raise DimensionMismatchError(
                f"mixbct feeds old embeddings (dimension {d_old}) to the new classifier, which "
                f"takes dimension {d_new}; give the new encoder embedding_dim {d_old}, or use a "
                "loss with BCT's dimension rule (bct, ract, l2)")
        if cache.labels.shape[0] != cache.features.shape[0]:
            raise DimensionMismatchError(
                f"the old-feature cache has {cache.features.shape[0]} features but "
                f"{cache.labels.shape[0]} labels; they must describe the same items")
        self.old_features = cache.features
        self.credible = credible_mask(cache.features, cache.labels, self.params.credible_fraction)

    def forward(self, inputs: LossInputs) -> LossOutput:
        if self.credible is None:
            raise RuntimeError("MixBCTLoss.prepare(context) must run before training")
        new = inputs.new_features
        self.to(new.device)  # the credible mask is made on the CPU in prepare()
        wanted = math.floor(self.params.alpha * new.shape[0] + 0.5)
        candidates = torch.nonzero(self.credible[inputs.indices]).flatten()
        pick = torch.randperm(len(candidates), generator=self.generator)[:wanted]
        chosen = candidates[pick.to(new.device)]
        old = self.old_features[inputs.indices[chosen].cpu()].to(new.device, new.dtype)
        mixed = new.index_copy(0, chosen, old)
        loss = F.cross_entropy(inputs.new_head(mixed, inputs.labels), inputs.labels)
        return LossOutput(loss, {"mixed_share": torch.tensor(len(chosen) / new.shape[0])})
