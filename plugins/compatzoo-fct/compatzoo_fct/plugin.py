"""Entry point of the compatzoo-fct distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_fct.transformation import FCTSideTransformation, FCTTransformation


@hookimpl
def register_components(register):
    register("upgrader", "fct-transformation", FCTTransformation)
    register("upgrader", "fct-side-transformation", FCTSideTransformation)
