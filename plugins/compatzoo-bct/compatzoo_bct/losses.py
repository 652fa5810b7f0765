"""BCT's influence loss (Shen et al., CVPR 2020, eq. 8) and its regression baselines."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compatzoo.plugin import (CompatLoss, LossInputs, LossOutput, SpecError, TrainingContext,
                              match_dim)

from compatzoo_bct.common import OldHeadLoss, expect_dim, frozen_logits, soft_kl


class BCTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    new_classes: Literal["ignore", "synthesized", "distill"] = Field(
        "ignore",
        description="samples of classes the old head lacks: 'ignore' (influence loss on "
        "T_old only), 'synthesized' (old-feature class means appended as old-classifier "
        "rows), 'distill' (KL between old-head outputs of old and new features at T = the "
        "head's scale); BCT sec. 2.5")
    synthesize: Literal["missing", "all"] = Field(
        "missing", description="with new_classes 'synthesized': which old-classifier rows "
        "become old-feature class means -- those of classes the old head lacks (the paper), "
        "or every class of the new training set, as openBCT does")
    old_head: Literal["own_form", "linear"] = Field(
        "own_form", description="how the frozen old classifier scores new features: in its "
        "own form (margin and scale of a CosFace/ArcFace head; the paper), or as a plain "
        "linear layer W x + b of its class weights, as OpenCompatible and AdvBCT apply it")


class BCTLoss(OldHeadLoss):
    """Influence loss ``CE(w_old(phi_new(x)), y)`` through the frozen old head (eq. 8).

    The old head keeps its own form (margin and scale). The new features are fed as their
    first ``d_old`` elements (zero-padded when shorter), the paper's rule for new models of
    another width. ``new_classes`` chooses what happens to samples of classes the old head
    was not trained on (sec. 2.5); the loss is the mean over the samples that get a term.
    """

    Params = BCTParams
    requires = frozenset({"old_head"})
    _MODE_INPUTS = {"ignore": frozenset(), "synthesized": frozenset({"old_feature_cache"}),
                    "distill": frozenset({"old_features"})}

    def __init__(self, params: BCTParams | None = None):
        super().__init__(params)
        self.register_buffer("synth_weight", None, persistent=False)
        self.register_buffer("synth_bias", None, persistent=False)
        self._row_names: tuple[str, str | None] | None = None  # set by _synthesize

    @classmethod
    def inputs(cls, params: BCTParams) -> frozenset[str]:
        return cls.requires | cls._MODE_INPUTS[params.new_classes]

    def prepare(self, context: TrainingContext) -> None:
        super().prepare(context)
        if self.params.old_head == "linear":
            self._row_names = _class_row_parameters(context.old_head, "old_head='linear'")
        if self.params.new_classes == "synthesized":
            self._synthesize(context)

    def _logits(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor | None,
                rows: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The frozen old head's logits of ``features`` (``rows`` replace class rows)."""
        if self.params.old_head == "own_form":
            return frozen_logits(head, features, labels, rows)
        weight_name, bias_name = self._row_names
        params = {name: p.detach() for name, p in head.named_parameters()} | (rows or {})
        return F.linear(features, params[weight_name],
                        None if bias_name is None else params[bias_name])

    def _synthesize(self, context: TrainingContext) -> None:
        """Old classifier rows for the classes it lacks: their mean ``phi_old`` feature.

        Rows of classes the old head knows are its own (with ``synthesize: all``, every
        class of the training set gets its mean instead, and a zero bias). The extended
        rows go through the head's own forward, so a normalised head normalises them like
        its weights.
        """
        head, cache = context.old_head, context.old_feature_cache
        if cache is None:
            raise SpecError("bct with new_classes='synthesized' needs the old-feature cache "
                            "(phi_old of the new training set)")
        expect_dim(cache.features, head.embedding_dim, "the old-feature cache")
        weight_name, bias_name = _class_row_parameters(head, "new_classes='synthesized'")
        params = dict(head.named_parameters())
        rows = self.known.numel()
        labels = cache.labels.long().cpu()
        sums = torch.zeros(rows, head.embedding_dim).index_add_(0, labels,
                                                                cache.features.float().cpu())
        counts = torch.bincount(labels, minlength=rows)
        synthesized = counts > 0
        if self.params.synthesize == "missing":
            synthesized &= ~self.known
        weight = torch.zeros(rows, head.embedding_dim)
        weight[:head.num_classes] = params[weight_name].detach().float().cpu()
        weight[synthesized] = sums[synthesized] / counts[synthesized, None]
        self.synth_weight = weight
        if bias_name is not None:
            bias = torch.zeros(rows)
            bias[:head.num_classes] = params[bias_name].detach().float().cpu()
            bias[synthesized] = 0.0
            self.synth_bias = bias
        self._row_names = (weight_name, bias_name)

    def forward(self, inputs: LossInputs) -> LossOutput:
        head, labels = inputs.old_head, inputs.labels
        known = self.known_mask(labels)
        features = match_dim(inputs.new_features, head.embedding_dim)
        parts = {"old_known_share": known.float().mean()}
        if self.params.new_classes == "synthesized":
            weight_name, bias_name = self._row_names
            rows = {weight_name: self.synth_weight}
            if bias_name is not None:
                rows[bias_name] = self.synth_bias
            logits = self._logits(head, features, labels, rows)
            return LossOutput(F.cross_entropy(logits, labels), parts)
        per_sample = [F.cross_entropy(self._logits(head, features[known], labels[known]),
                                      labels[known], reduction="none")]
        if self.params.new_classes == "distill":
            new_class = ~known
            old = inputs.old_features[new_class]
            expect_dim(old, head.embedding_dim, "old_features")
            per_sample.append(soft_kl(self._logits(head, old, None),
                                      self._logits(head, features[new_class], None),
                                      head.temperature))
        losses = torch.cat(per_sample)
        total = losses.mean() if losses.numel() else features.sum() * 0.0
        return LossOutput(total, parts)


def _class_row_parameters(head: nn.Module, why: str) -> tuple[str, str | None]:
    """Names of the head's class-weight matrix ``(C, d)`` and class bias ``(C,)`` if any."""
    shape, rows = (head.num_classes, head.embedding_dim), (head.num_classes,)
    weights = [n for n, p in head.named_parameters() if tuple(p.shape) == shape]
    biases = [n for n, p in head.named_parameters() if tuple(p.shape) == rows]
    if len(weights) != 1 or len(biases) > 1:
        raise SpecError(
            f"bct with {why} needs an old head whose class weights are one parameter of "
            f"shape {shape} (and at most one bias of shape {rows}); "
            f"{type(head).__name__} has {[n for n, _ in head.named_parameters()]}. "
            "Use the paper's settings (new_classes 'distill' or 'ignore', old_head "
            "'own_form') with this head")
    return weights[0], biases[0] if biases else None


class L2Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reduction: Literal["sum", "mean"] = Field(
        "sum", description="over the feature dimensions: 'sum' is the squared distance of "
        "the paper; 'mean' divides it by d_old, as openBCT's and OpenCompatible's "
        "nn.MSELoss do")
    normalize: bool = Field(
        False, description="L2-normalise both features first (OpenCompatible's 'l2'); the "
        "paper regresses the raw features")


class L2Loss(CompatLoss):
    """``||phi_new(x)[:d_old] - phi_old(x)||^2``, BCT's L2 regression baseline (sec. 3),
    averaged over the batch."""

    Params = L2Params
    requires = frozenset({"old_features"})

    def forward(self, inputs: LossInputs) -> LossOutput:
        old = inputs.old_features.detach()
        new = match_dim(inputs.new_features, old.shape[1])
        if self.params.normalize:
            new, old = F.normalize(new, dim=1), F.normalize(old, dim=1)
        squared = ((new - old) ** 2).sum(dim=1)
        if self.params.reduction == "mean":
            squared = squared / old.shape[1]
        return LossOutput(squared.mean())


class CosineLoss(CompatLoss):
    """``mean(1 - cos(phi_new(x)[:d_old], phi_old(x)))``, BiCT's regression term (eq. 6)."""

    requires = frozenset({"old_features"})

    def forward(self, inputs: LossInputs) -> LossOutput:
        old = inputs.old_features.detach()
        new = match_dim(inputs.new_features, old.shape[1])
        return LossOutput((1.0 - F.cosine_similarity(new, old, dim=1)).mean())
