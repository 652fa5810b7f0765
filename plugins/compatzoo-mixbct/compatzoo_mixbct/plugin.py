"""Entry point of the compatzoo-mixbct distribution (group ``compatzoo``)."""

from compatzoo.hookspecs import hookimpl

from compatzoo_mixbct.losses import MixBCTLoss, MixBCTParams


@hookimpl
def register_components(register):
    register("loss", "mixbct", MixBCTLoss, MixBCTParams)
