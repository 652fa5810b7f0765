"""Euclidean retrieval on raw features through the cosine search.

ml-fct evaluates FCT with the L2 distance between unnormalised features, while every search
here ranks by cosine similarity. Rather than a second search path, Euclidean ranking is
turned into cosine ranking by lifting the vectors (the "MIPS to nearest neighbour"
reduction, Bachrach et al. 2014, run backwards):

    query q   -> [q, 1, 0]
    gallery g -> [g, -|g|^2 / 2, sqrt(M^2 - |g|^2 - |g|^4 / 4)]

Every lifted gallery row has norm M, and ``[q, 1, 0] . g' = q.g - |g|^2 / 2
= (|q|^2 - |q - g|^2) / 2``, so for each query the cosine order of the lifted gallery is the
ascending order of ``|q - g|``; ties keep the search's tie-break (lower gallery index). The
galleries that one ranking mixes (a backfill in progress) must be lifted together, with
one M, which is why :func:`euclidean_as_cosine` takes them all at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _lifted_head(gallery: torch.Tensor) -> torch.Tensor:
    """``[g, -|g|^2 / 2]`` in float64 (|g|^4 / 4 loses digits in float32)."""
    g = gallery.double()
    return torch.cat([g, -0.5 * (g * g).sum(dim=1, keepdim=True)], dim=1)


def euclidean_as_cosine(queries: Sequence[torch.Tensor], galleries: Sequence[torch.Tensor],
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """float32 lifted copies of ``queries`` and ``galleries`` whose cosine ranking is the
    Euclidean ranking of the originals (see the module docstring)."""
    heads = [_lifted_head(g) for g in galleries]
    radius = max(float(h.norm(dim=1).max()) for h in heads) if heads else 0.0
    radius = radius * (1 + 1e-6) + 1e-12    # every pad strictly positive: no zero rows
    lifted = [torch.cat([h, (radius**2 - (h * h).sum(dim=1, keepdim=True)).clamp_min(0).sqrt()],
                        dim=1).float() for h in heads]
    lifted_queries = [torch.cat([q.float(), q.new_ones(len(q), 1, dtype=torch.float32),
                                 q.new_zeros(len(q), 1, dtype=torch.float32)], dim=1)
                      for q in queries]
    return lifted_queries, lifted


def for_distance(distance: str, queries: Sequence[torch.Tensor],
                 galleries: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The features to search so that the cosine search ranks by ``distance``."""
    if distance == "cosine":
        return list(queries), list(galleries)
    if distance == "euclidean":
        return euclidean_as_cosine(queries, galleries)
    raise ValueError(f"distance must be 'cosine' or 'euclidean', not {distance!r}")
