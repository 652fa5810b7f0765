"""Entry point of the compatzoo-bct distribution (group ``compatzoo``)."""

from compatzoo.hookspecs import hookimpl

from compatzoo_bct.distillation import (FocalDistillationLoss, FocalDistillationParams, LwFLoss,
                                        LwFParams)
from compatzoo_bct.losses import BCTLoss, BCTParams, CosineLoss, CosineParams, L2Loss, L2Params
from compatzoo_bct.supcon import SupConLoss, SupConParams


@hookimpl
def register_components(register):
    register("loss", "bct", BCTLoss, BCTParams)
    register("loss", "l2", L2Loss, L2Params)
    register("loss", "cosine", CosineLoss, CosineParams)
    register("loss", "lwf", LwFLoss, LwFParams)
    register("loss", "focal-distillation", FocalDistillationLoss, FocalDistillationParams)
    register("loss", "supcon", SupConLoss, SupConParams)
