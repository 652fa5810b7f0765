"""Upgraders fitted on paired embeddings only (the old and the new embedding of the same
items; no images, no classes): orthogonal Procrustes, ridge / reduced-rank affine,
Drift-Adapter's residual MLP (Vejendla, EMNLP 2025) and the lambda-orthogonal affine map
(Ricci et al. 2025). Each maps stored old embeddings into the new space (``direction:
gallery``) or new queries into the old space (``direction: query``)."""

from compatzoo_adapters.base import AdapterParams, PairAdapter, TooFewPairsError
from compatzoo_adapters.closed_form import Affine, Procrustes, orthogonal_procrustes
from compatzoo_adapters.trained import LambdaOrthogonal, ResidualMLP, orthogonality_gap

__all__ = ["AdapterParams", "Affine", "LambdaOrthogonal", "PairAdapter", "Procrustes",
           "ResidualMLP", "TooFewPairsError", "orthogonal_procrustes", "orthogonality_gap"]
