"""Errors a user can act on.

Every error raised on bad user input derives from :class:`CompatzooError` and carries a
message that says what was wrong *and what to do about it*. The CLI prints the message and
exits with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class CompatzooError(Exception):
    """Base class for errors caused by user input, configuration or environment."""


class SpecError(CompatzooError):
    """An experiment or component spec failed validation."""


class PluginError(CompatzooError):
    """A plugin could not be found, loaded or registered."""


class DatasetError(CompatzooError):
    """A dataset path is missing or does not have the expected layout."""


class DimensionMismatchError(CompatzooError):
    """Two arrays that must share a dimension do not."""


class InvalidFeaturesError(CompatzooError):
    """Features contain NaN/inf, are empty, or have the wrong shape."""


class CheckpointError(CompatzooError):
    """A checkpoint or bundle is missing, corrupt, or does not match its config."""


class TrainingDivergedError(CompatzooError):
    """A loss became NaN or inf during training."""


class InvalidArgumentError(CompatzooError):
    """A retrieval argument (metric name, order, targets, ...) is not usable."""
