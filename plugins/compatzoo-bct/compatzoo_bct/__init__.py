"""BCT (Shen et al. 2020), its regression and distillation baselines, and BiCT's
supervised-contrastive compatibility term, as compatzoo losses."""

from compatzoo_bct.distillation import (FocalDistillationLoss, FocalDistillationParams, LwFLoss,
                                        LwFParams)
from compatzoo_bct.losses import BCTLoss, BCTParams, CosineLoss, L2Loss, L2Params
from compatzoo_bct.supcon import SupConLoss, SupConParams

__all__ = ["BCTLoss", "BCTParams", "CosineLoss", "FocalDistillationLoss",
           "FocalDistillationParams", "L2Loss", "L2Params", "LwFLoss", "LwFParams",
           "SupConLoss", "SupConParams"]
