"""Stationary representations (Biondi, Pernici, Ricci, Del Bimbo; CVPR 2024 / TPAMI 2026):
a fixed d-Simplex classifier shared by every model generation, and the HOC loss that
aligns new features with the old ones of the same images."""

from compatzoo_stationary.dsimplex import DSimplexHead, dsimplex_vertices
from compatzoo_stationary.hoc import HOCLoss, HOCParams

__all__ = ["DSimplexHead", "HOCLoss", "HOCParams", "dsimplex_vertices"]
