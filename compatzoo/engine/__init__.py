"""Training loops, feature extraction and checkpoints."""

from compatzoo.engine.checkpoints import load_state, save_state
from compatzoo.engine.features import extract_features
from compatzoo.engine.training import TrainedModel, resolve_device, train_model

__all__ = ["TrainedModel", "extract_features", "load_state", "resolve_device", "save_state",
           "train_model"]
