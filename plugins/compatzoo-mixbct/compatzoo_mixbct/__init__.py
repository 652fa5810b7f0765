"""MixBCT (Liang et al. 2023) as a compatzoo loss."""

from compatzoo_mixbct.losses import MixBCTLoss, MixBCTParams, credible_mask

__all__ = ["MixBCTLoss", "MixBCTParams", "credible_mask"]
