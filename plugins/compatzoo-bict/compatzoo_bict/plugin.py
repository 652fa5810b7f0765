"""Entry point of the compatzoo-bict distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_bict.upgrader import BiCTMLP


@hookimpl
def register_components(register):
    register("upgrader", "bict-mlp", BiCTMLP)
