"""The fixed d-Simplex classifier of stationary representations (Biondi et al., CVPR 2024),
from Pernici et al.'s Regular Polytope Networks.

Its class prototypes are vertices of a regular simplex centred at the origin and never
train. Every model generation that uses the same classifier learns features around the
same prototypes, so features stay where the previous model put them ("stationary") and
are compatible without an old head at training time.

Construction as the reference code (iamcl2r, ``models/__init__.py``, ``dsimplex``): in
R^d take the d unit vectors e_1..e_d and the point ((1 - sqrt(d + 1)) / d) * (1, ..., 1),
subtract their centroid and scale each row to unit norm. That gives K = d + 1 unit
vertices with pairwise cosine -1/d, the most separated K directions R^d can hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compatzoo.plugin import ClassifierHead, NoParams, SpecError


def dsimplex_vertices(dim: int) -> torch.Tensor:
    """The ``(dim + 1, dim)`` unit vertices of a regular simplex centred at the origin.

    Computed in float64 (cosines exact to ~1e-15), returned as float32.
    """
    if dim < 1:
        raise SpecError(f"a d-Simplex needs a dimension of at least 1, got {dim}")
    t = torch.zeros(dim + 1, dim, dtype=torch.float64)
    t[:dim] = torch.eye(dim, dtype=torch.float64)
    t[dim] = (1.0 - math.sqrt(dim + 1.0)) / dim
    t -= t.mean(dim=0)
    return (t / t.norm(dim=1, keepdim=True)).float()


class DSimplexHead(ClassifierHead):
    """Fixed, non-trainable d-Simplex classifier: ``logits = features @ W.T``.

    ``W`` holds the first ``num_classes`` of the ``embedding_dim + 1`` simplex vertices,
    kept as a buffer (saved with the model, never optimised). Features are *not*
    normalised and there is no scale, as in the reference code: the encoder learns the
    feature norm, and the softmax temperature is 1.

    Class c takes vertex c. The reference writes classes from the last vertex (y -> K-1-y);
    every pair of vertices has the same angle, so the choice only matters for encoders
    whose features are non-negative (no projection after a ReLU): the last vertex has only
    negative coordinates, and taking the first ones leaves it unused unless every vertex
    is needed.
    """

    Params = NoParams

    def __init__(self, params: NoParams, embedding_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise SpecError(f"dsimplex head: needs at least one class, got {num_classes}")
        if embedding_dim < max(1, num_classes - 1):
            raise SpecError(
                f"dsimplex head: a d-Simplex in R^d has d + 1 vertices, one per class, but "
                f"embedding_dim is {embedding_dim} and there are {num_classes} classes; raise "
                f"the encoder's embedding_dim to at least {max(1, num_classes - 1)} "
                "(num_classes - 1), or choose another head")
        self.embedding_dim, self.num_classes, self.temperature = embedding_dim, num_classes, 1.0
        self.register_buffer("weight", dsimplex_vertices(embedding_dim)[:num_classes].clone())

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(features, self.weight.to(features.dtype))
