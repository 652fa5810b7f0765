"""Entry point of the compatzoo-stationary distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_stationary.dsimplex import DSimplexHead
from compatzoo_stationary.hoc import HOCLoss


@hookimpl
def register_components(register):
    register("head", "dsimplex", DSimplexHead)
    register("loss", "hoc", HOCLoss)
