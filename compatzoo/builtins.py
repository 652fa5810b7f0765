"""The core's own components, registered through the ``compatzoo`` entry-point group
exactly as a third-party plugin registers its own."""

from compatzoo.data import ALLOCATIONS, DATASETS
from compatzoo.encoders import ENCODERS
from compatzoo.gallery import (IdentityParams, IdentityUpgrader, OracleDistanceParams,
                               OracleDistanceScheduler, RandomParams, RandomScheduler)
from compatzoo.heads import HEADS
from compatzoo.hookspecs import hookimpl
from compatzoo.losses import ClassificationLoss, ClassificationParams


@hookimpl
def register_components(register):
    for kind, table in (("encoder", ENCODERS), ("head", HEADS), ("dataset", DATASETS),
                        ("allocation", ALLOCATIONS)):
        for name, (factory, params_model) in table.items():
            register(kind, name, factory, params_model)
    register("loss", "classification", ClassificationLoss, ClassificationParams)
    register("upgrader", "identity", IdentityUpgrader, IdentityParams)
    register("scheduler", "random", RandomScheduler, RandomParams)
    register("scheduler", "oracle-distance", OracleDistanceScheduler, OracleDistanceParams)
