"""Entry point of the compatzoo-mixbct distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_mixbct.losses import MixBCTLoss


@hookimpl
def register_components(register):
    register("loss", "mixbct", MixBCTLoss)
