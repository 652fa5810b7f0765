"""Entry point of the compatzoo-fastfill distribution (group ``compatzoo``)."""

from compatzoo.hookspecs import hookimpl

from compatzoo_fastfill.scheduler import SigmaParams, SigmaScheduler
from compatzoo_fastfill.upgrader import FastFillParams, FastFillUpgrader


@hookimpl
def register_components(register):
    register("upgrader", "fastfill", FastFillUpgrader, FastFillParams)
    register("scheduler", "fastfill-sigma", SigmaScheduler, SigmaParams)
