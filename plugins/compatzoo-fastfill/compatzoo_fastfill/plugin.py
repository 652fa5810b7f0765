"""Entry point of the compatzoo-fastfill distribution (group ``compatzoo``)."""

from compatzoo.plugin import hookimpl

from compatzoo_fastfill.scheduler import SigmaScheduler
from compatzoo_fastfill.upgrader import FastFillUpgrader


@hookimpl
def register_components(register):
    register("upgrader", "fastfill", FastFillUpgrader)
    register("scheduler", "fastfill-sigma", SigmaScheduler)
