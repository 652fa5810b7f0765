"""The core's own components, registered through the ``compatzoo`` entry-point group
exactly as a third-party plugin registers its own."""

from compatzoo.components import IdentityUpgrader, OracleDistanceScheduler, RandomScheduler
from compatzoo.data import ALLOCATIONS, DATASETS
from compatzoo.encoders import ENCODERS
from compatzoo.heads import HEADS
from compatzoo.hookspecs import hookimpl
from compatzoo.losses import ClassificationLoss


@hookimpl
def register_components(register):
    for kind, table in (("encoder", ENCODERS), ("head", HEADS), ("dataset", DATASETS),
                        ("allocation", ALLOCATIONS)):
        for name, component in table.items():
            register(kind, name, component)
    register("loss", "classification", ClassificationLoss)
    register("upgrader", "identity", IdentityUpgrader)
    register("scheduler", "random", RandomScheduler)
    register("scheduler", "oracle-distance", OracleDistanceScheduler)
