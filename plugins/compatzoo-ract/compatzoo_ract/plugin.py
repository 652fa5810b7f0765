"""Entry point of the compatzoo-ract distribution (group ``compatzoo``)."""

from compatzoo.hookspecs import hookimpl

from compatzoo_ract.losses import (ContrastiveLoss, ContrastiveParams, RACTLoss, RACTParams,
                                   RACTTripletLoss, TripletLoss, TripletParams)
from compatzoo_ract.schedulers import UncertaintyParams, UncertaintyScheduler


@hookimpl
def register_components(register):
    register("loss", "ract", RACTLoss, RACTParams)
    register("loss", "contrastive", ContrastiveLoss, ContrastiveParams)
    register("loss", "ract-triplet", RACTTripletLoss, TripletParams)
    register("loss", "triplet", TripletLoss, TripletParams)
    register("scheduler", "uncertainty", UncertaintyScheduler, UncertaintyParams)
