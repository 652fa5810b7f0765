"""Entry point of the compatzoo-adapters distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_adapters.closed_form import Affine, Procrustes
from compatzoo_adapters.trained import LambdaOrthogonal, ResidualMLP


@hookimpl
def register_components(register):
    for adapter in (Procrustes, Affine, ResidualMLP, LambdaOrthogonal):
        register("upgrader", adapter.name, adapter)
