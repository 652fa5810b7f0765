"""RACT (regression-alleviating compatible training, Zhang et al. ICLR 2022) as compatzoo
losses: contrastive (eqs. 5, 6, 13) and triplet (eqs. 14, 15) compatibility terms."""

from compatzoo_ract.losses import (ContrastiveLoss, ContrastiveParams, RACTLoss, RACTParams,
                                   RACTTripletLoss, TripletLoss, TripletParams)

__all__ = ["ContrastiveLoss", "ContrastiveParams", "RACTLoss", "RACTParams", "RACTTripletLoss",
           "TripletLoss", "TripletParams"]
