"""Entry point of the compatzoo-fct distribution (group ``compatzoo``)."""

from compatzoo.hookspecs import hookimpl

from compatzoo_fct.transformation import FCTParams, FCTSideTransformation, FCTTransformation


@hookimpl
def register_components(register):
    register("upgrader", "fct-transformation", FCTTransformation, FCTParams)
    register("upgrader", "fct-side-transformation", FCTSideTransformation, FCTParams)
