"""Entry point of the compatzoo-bct distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_bct.distillation import FocalDistillationLoss, LwFLoss
from compatzoo_bct.losses import BCTLoss, CosineLoss, L2Loss
from compatzoo_bct.supcon import SupConLoss


@hookimpl
def register_components(register):
    register("loss", "bct", BCTLoss)
    register("loss", "l2", L2Loss)
    register("loss", "cosine", CosineLoss)
    register("loss", "lwf", LwFLoss)
    register("loss", "focal-distillation", FocalDistillationLoss)
    register("loss", "supcon", SupConLoss)
