"""AdvBCT's compatibility loss (Pan et al., CVPR 2023), as the public code computes it.

Reference: Ashespt/AdvBCT -- ``trainer/trainer.py`` (``COMP_LOSS.TYPE: bct_limit`` with
``ELASTIC_BOUNDARY`` and ``TRAIN.TYPE: adv_compatible``, the setting of
``configs/new_AdvBct.yml``), ``models/base_model.py`` (discriminator, gradient reversal),
``models/modules.py`` (``ReverseLayerF``, ``ElasticBoundary``) and ``extract_feat.py``
(``gen_class_meta``: class centres and radii). On top of the new model's own
classification loss it adds two terms:

* **boundary** -- every new embedding, L2-normalised, should lie inside its class's
  boundary in the old space: ``max(||n(phi_new(x)) - c_y|| - r_y, 0)``, averaged over the
  samples that lie *outside* (the reference's divisor). ``c_y`` is the mean of the
  L2-normalised old features of class ``y``; the radii are their distances to ``c_y``
  after a 1.5-IQR outlier cut. Elastic: ``r_y = r_max + (T - r_max) * sigmoid(w_y)`` with a
  learnable ``w_y`` per class and a threshold ``T``.
* **adversarial** -- a discriminator ``D`` (Linear-BN-ReLU-Linear-LogSoftmax) learns to
  tell new embeddings (label 0) from old ones (label 1):
  ``NLL(D(GRL_alpha(phi_new)), 0) + NLL(D(phi_old), 1)``. The gradient-reversal layer
  hands the encoder ``-alpha`` times the discriminator's gradient, so the one optimiser
  over encoder, head and loss plays the min-max game in every step, as in the reference
  (one SGD over ``model.parameters()``, discriminator included). The term is weighted by
  ``(E - e + 1) / E`` in epoch ``e`` (0-based) of ``E``; ``alpha = 2 / (1 + exp(-10 p)) - 1``
  at training progress ``p`` (DANN's ramp).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compatzoo.plugin import (CompatLoss, DimensionMismatchError, LossInputs, LossOutput,
                              SpecError, TrainingContext, match_dim, world_size)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pieces
class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.neg() * ctx.alpha, None


def reverse_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Identity forward, gradient times ``-alpha`` backward (the reference's
    ``ReverseLayerF``): one optimiser step then improves the discriminator and makes the
    encoder's features harder to tell apart."""
    return _ReverseGradient.apply(x, alpha)


def grl_coefficient(progress: float) -> float:
    """``2 / (1 + exp(-10 p)) - 1``: the reversal starts at 0 so the discriminator learns
    before the encoder is pushed against it, and nears 1 at the end of training."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def discriminator(dim: int, hidden: int) -> nn.Sequential:
    """The reference's domain classifier: log-probabilities of (new, old)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, 2), nn.LogSoftmax(dim=1))


@dataclass
class ClassBoundaries:
    """Per class id (rows): centre of the L2-normalised old features, the largest and
    smallest distance to it that survive the 1.5-IQR cut, and how many survive."""

    centres: torch.Tensor   # (R, d)
    largest: torch.Tensor   # (R,)  the reference's radius[-1]
    smallest: torch.Tensor  # (R,)  the reference's radius[0]
    kept: torch.Tensor      # (R,)  long

    @property
    def usable(self) -> torch.Tensor:
        """Classes the constraint applies to: the reference skips those with at most one
        kept radius (``len(radius) <= 1``)."""
        return self.kept > 1


@torch.no_grad()
def class_boundaries(features: torch.Tensor, labels: torch.Tensor,
                     classes: torch.Tensor | None = None,
                     rows: int | None = None) -> ClassBoundaries:
    """Centres and radii of each class from old features (``gen_class_meta``).

    Features are L2-normalised; the centre is their mean (not re-normalised); the radii are
    the distances to it, sorted; with four or more, those outside ``[q1 - 1.5 IQR,
    q3 + 1.5 IQR]`` are dropped, ``q1 = r[int(n / 4)]`` and ``q3 = r[int(3 n / 4)]``.
    ``classes`` limits the classes (others get no boundary); ``rows`` is the table size.
    """
    f = F.normalize(features.float(), dim=1)
    labels = labels.long().to(f.device)
    if classes is not None:
        keep = torch.isin(labels, torch.as_tensor(classes, device=f.device).long())
        f, labels = f[keep], labels[keep]
    rows = rows if rows is not None else (int(labels.max()) + 1 if labels.numel() else 0)
    counts = torch.bincount(labels, minlength=rows)
    centres = torch.zeros(rows, f.shape[1], device=f.device).index_add_(0, labels, f)
    centres /= counts.clamp(min=1)[:, None]
    # float64 from here: the reference compares Python floats with its IQR fences
    distance = torch.linalg.vector_norm(f - centres[labels], dim=1).double()
    order = torch.argsort(distance, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]   # by class, then distance
    d, c = distance[order], labels[order]
    start = (torch.cumsum(counts, 0) - counts)[c]
    n = counts[c]
    q1, q3 = d[start + n // 4], d[start + (3 * n) // 4]
    iqr = q3 - q1
    # q1 always survives its own fences, so a class never loses all its radii
    kept = (n < 4) | ((d >= q1 - 1.5 * iqr) & (d <= q3 + 1.5 * iqr))
    d, c = d[kept], c[kept]
    largest = torch.zeros(rows, dtype=torch.float64, device=f.device)
    smallest = torch.zeros(rows, dtype=torch.float64, device=f.device)
    largest.scatter_reduce_(0, c, d, "amax", include_self=False)
    smallest.scatter_reduce_(0, c, d, "amin", include_self=False)
    return ClassBoundaries(centres, largest.float(), smallest.float(),
                           torch.bincount(c, minlength=rows))


# --------------------------------------------------------------------------- the loss
class AdvBCTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int | None = Field(
        None, ge=1, description="the new model's train.epochs. The reference's schedules "
        "follow training progress (the reversal coefficient ramps over all steps, the "
        "adversarial weight (E - e + 1) / E falls per epoch) and a compatzoo loss is not "
        "told where training stands; needed by schedule 'reference' with the adversarial "
        "term on")
    schedule: Literal["reference", "constant"] = Field(
        "reference", description="'reference': alpha = 2 / (1 + exp(-10 p)) - 1 and weight "
        "(E - e + 1) / E, as the code; 'constant': alpha as given and weight 1")
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False,
                         description="gradient-reversal coefficient of schedule 'constant'")
    boundary: Literal["elastic", "largest", "smallest"] = Field(
        "elastic", description="radius of a class: 'elastic' (r_max moved towards the "
        "threshold by a learned sigmoid(w_y); AdvBCT), 'largest' (r_max, fixed), "
        "'smallest' (the smallest kept distance, the code's branch without elastic "
        "boundary)")
    threshold: float = Field(1.0, ge=0, le=2, allow_inf_nan=False,
                             description="T of the elastic boundary, a distance between unit "
                             "vectors (configs/new_AdvBct.yml: 1.0; the code's default 0.5)")
    adversarial: bool = Field(True, description="add the discriminator term (off: the "
                              "code's 'compatible' training with the boundary alone)")
    hidden: int = Field(100, ge=1, description="hidden width of the discriminator (100)")

    @model_validator(mode="after")
    def _needs_horizon(self) -> AdvBCTParams:
        if self.adversarial and self.schedule == "reference" and self.epochs is None:
            raise ValueError(
                "advbct's 'reference' schedule follows training progress, so it needs "
                "`epochs`: set it to the new model's train.epochs (or choose schedule: "
                "constant)")
        return self


class AdvBCTLoss(CompatLoss):
    """``boundary + w_e * adversarial`` (see the module docstring for both terms).

    New embeddings are read in the old space by BCT's width rule (first ``d_old``
    elements, zero-padded); the reference requires equal widths, where this is the
    identity. Boundaries come from the old-feature cache, for the classes the old model was
    trained on. The step count behind the schedule is a buffer, so a resumed run continues
    it.
    """

    Params = AdvBCTParams
    requires = frozenset({"old_features", "old_feature_cache"})

    @classmethod
    def inputs(cls, params: AdvBCTParams) -> frozenset[str]:
        return cls.requires if params.adversarial else frozenset({"old_feature_cache"})

    def __init__(self, params: AdvBCTParams | None = None):
        super().__init__(params)
        # registered now so the engine's loss.to(device) tells prepare() where to build
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("centres", None, persistent=False)
        self.register_buffer("base_radius", None, persistent=False)
        self.register_buffer("usable", None, persistent=False)
        self.register_parameter("elastic", None)
        self.register_module("discriminator", None)
        self.old_dim: int | None = None
        self.num_items = 0
        self.steps_per_epoch: int | None = None
        self._warned = False

    def prepare(self, context: TrainingContext) -> None:
        cache = context.old_feature_cache
        if cache is None:
            raise SpecError("advbct builds its class boundaries from the old-feature cache "
                            "(phi_old over the training set); train it with an old model")
        dim = context.old_embedding_dim or cache.features.shape[1]
        if cache.features.dim() != 2 or cache.features.shape[1] != dim:
            raise DimensionMismatchError(
                f"the old-feature cache must have shape (items, {dim}) but has shape "
                f"{tuple(cache.features.shape)}; compute it with the old model")
        device = self.step.device
        labels = cache.labels.long()
        rows = max(context.num_classes, int(labels.max()) + 1 if labels.numel() else 0)
        bounds = class_boundaries(cache.features.to(device), labels.to(device),
                                  context.old_classes, rows)
        if not bool(bounds.usable.any()):
            raise SpecError(
                "advbct: no class the old model was trained on has two or more training "
                "items to draw a boundary from; use an allocation whose new training set "
                "holds old classes, or another loss")
        self.centres = bounds.centres
        self.base_radius = bounds.smallest if self.params.boundary == "smallest" \
            else bounds.largest
        self.usable = bounds.usable
        if self.params.boundary == "elastic":     # the reference's ElasticBoundary init
            self.elastic = nn.Parameter(torch.empty(rows, device=device).uniform_(-1, 1))
        if self.params.adversarial:
            self.discriminator = discriminator(dim, self.params.hidden).to(device)
        self.old_dim, self.num_items, self.steps_per_epoch = dim, len(labels), None

    def radii(self) -> torch.Tensor:
        """Radius of every class; elastic: ``r ± |r - T| * sigmoid(w)`` (+ when r < T), so
        the boundary moves from r towards T by the learned share."""
        r = self.base_radius
        if self.elastic is None:
            return r
        shift = (r - self.params.threshold).abs() * torch.sigmoid(self.elastic)
        return torch.where(r < self.params.threshold, r + shift, r - shift)

    def schedule(self, batch: int) -> tuple[float, float]:
        """(reversal coefficient, adversarial weight) at the current step.

        Steps per epoch are the engine's: the training items over the global batch (last
        incomplete batch dropped). A run longer than ``epochs`` keeps the last epoch's
        values.
        """
        if self.params.schedule == "constant":
            return self.params.alpha, 1.0
        epochs = self.params.epochs
        if self.steps_per_epoch is None:
            self.steps_per_epoch = max(1, self.num_items // (batch * world_size()))
        total = epochs * self.steps_per_epoch
        step = int(self.step)
        if step >= total and not self._warned:
            log.warning("advbct: training runs past the %d epochs its `epochs` names; the "
                        "schedule stays at its end (set epochs to the new train.epochs)",
                        epochs)
            self._warned = True
        epoch = min(step // self.steps_per_epoch, epochs - 1)
        alpha = grl_coefficient(min(step, total) / total)
        return alpha, (epochs - epoch + 1) / epochs

    def forward(self, inputs: LossInputs) -> LossOutput:
        if self.old_dim is None:
            raise RuntimeError("AdvBCTLoss.prepare(context) must run before training")
        new = match_dim(inputs.new_features, self.old_dim)
        labels = inputs.labels
        usable = self.usable[labels]
        distance = torch.linalg.vector_norm(F.normalize(new, dim=1) - self.centres[labels],
                                            dim=1)
        excess = F.relu(distance - self.radii()[labels]) * usable
        outside = excess > 0
        boundary = excess.sum() / outside.sum().clamp(min=1)
        parts = {"boundary": boundary,
                 "outside_share": outside.sum() / usable.sum().clamp(min=1)}
        total = boundary
        if self.discriminator is not None:
            old = inputs.old_features
            if old is None or old.dim() != 2 or old.shape != (new.shape[0], self.old_dim):
                raise DimensionMismatchError(
                    f"old_features must have shape ({new.shape[0]}, {self.old_dim}) but have "
                    f"{None if old is None else tuple(old.shape)}; use the old model whose "
                    "cache built the boundaries")
            alpha, weight = self.schedule(new.shape[0])
            new_log = self.discriminator(reverse_gradient(new, alpha))
            old_log = self.discriminator(old.detach().to(new.dtype))
            is_new = torch.zeros_like(labels)
            adversarial = F.nll_loss(new_log, is_new) + F.nll_loss(old_log, is_new + 1)
            total = total + weight * adversarial
            right = (new_log.argmax(1) == 0).sum() + (old_log.argmax(1) == 1).sum()
            parts.update(adversarial=adversarial, adversarial_weight=new.new_tensor(weight),
                         grl_alpha=new.new_tensor(alpha),
                         discriminator_accuracy=right / (2.0 * len(labels)))
        if torch.is_grad_enabled():
            self.step.add_(1)
        return LossOutput(total, {k: v.detach() for k, v in parts.items()})
