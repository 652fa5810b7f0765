"""Everything a plugin author needs, in one module: ``from compatzoo.plugin import ...``.

A plugin is a distribution with an entry point in group ``compatzoo`` pointing at a
module whose ``@hookimpl register_components(register)`` calls ``register(kind, name,
Component)`` once per component. Each component declares its params as ``Params`` (a
pydantic model, ``extra="forbid"``); the core validates a spec's params with it and builds
the component as ``Component(params, **runtime)``. Built-in plugins import nothing else
from compatzoo, and the core never refers to a plugin's names, so a third-party method
lives exactly where the built-in ones do.
"""

from compatzoo.data.datasets import LabeledImages, RetrievalData, TensorImages
from compatzoo.distributed import all_gather_with_grad, is_distributed, rank, world_size
from compatzoo.engine.features import extract_features
from compatzoo.engine.fitting import Recipe, fit_epochs, fit_minibatches
from compatzoo.errors import (CompatzooError, DimensionMismatchError, InvalidFeaturesError,
                              PluginError, SpecError, TrainingDivergedError)
from compatzoo.hookspecs import hookimpl
from compatzoo.interfaces import (BACKFILL_FIELDS, LOSS_INPUTS, BackfillScheduler,
                                  BackfillState, ClassifierHead, CompatLoss, Encoder,
                                  FeatureCache, GalleryUpgrader, HopData, LossInputs,
                                  LossOutput, NoParams, StoredGallery, TrainingContext,
                                  apply_in_chunks, check_features, match_dim)
from compatzoo.bundles.sources import NamedBundle
from compatzoo.registry import with_params
from compatzoo.scheduling import check_backfill_state, descending_order
from compatzoo.shards import Shard


def create_encoder(name: str, **params):
    """A registered encoder by name (e.g. a side-information model's backbone)."""
    import compatzoo

    return compatzoo.create_encoder(name, **params)


__all__ = [
    # registration
    "hookimpl", "with_params", "NoParams", "NamedBundle",
    # the four interfaces and their records
    "Encoder", "ClassifierHead",
    "CompatLoss", "LossInputs", "LossOutput", "TrainingContext", "FeatureCache", "LOSS_INPUTS",
    "GalleryUpgrader", "StoredGallery", "HopData",
    "BackfillScheduler", "BackfillState", "BACKFILL_FIELDS",
    # helpers
    "match_dim", "check_features", "apply_in_chunks", "check_backfill_state",
    "descending_order", "Recipe", "fit_epochs", "fit_minibatches", "extract_features",
    "create_encoder", "Shard", "LabeledImages", "TensorImages", "RetrievalData",
    "all_gather_with_grad", "is_distributed", "rank", "world_size",
    # errors
    "CompatzooError", "SpecError", "PluginError", "DimensionMismatchError",
    "InvalidFeaturesError", "TrainingDivergedError",
]
