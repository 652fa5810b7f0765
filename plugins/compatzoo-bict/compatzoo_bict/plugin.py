"""Entry point of the compatzoo-bict distribution (group ``compatzoo``)."""

from compatzoo.hookspecs import hookimpl

from compatzoo_bict.upgrader import BiCTMLP, BiCTMLPParams


@hookimpl
def register_components(register):
    register("upgrader", "bict-mlp", BiCTMLP, BiCTMLPParams)
