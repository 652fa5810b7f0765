"""Entry point of the compatzoo-advbct distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_advbct.loss import AdvBCTLoss


@hookimpl
def register_components(register):
    register("loss", "advbct", AdvBCTLoss)
