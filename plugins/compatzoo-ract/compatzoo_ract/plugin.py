"""Entry point of the compatzoo-ract distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_ract.losses import ContrastiveLoss, RACTLoss, RACTTripletLoss, TripletLoss
from compatzoo_ract.schedulers import UncertaintyScheduler


@hookimpl
def register_components(register):
    register("loss", "ract", RACTLoss)
    register("loss", "contrastive", ContrastiveLoss)
    register("loss", "ract-triplet", RACTTripletLoss)
    register("loss", "triplet", TripletLoss)
    register("scheduler", "uncertainty", UncertaintyScheduler)
