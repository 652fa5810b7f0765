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


class PluginLoadError(PluginError):
    """The installed plugins could not be loaded into a registry: one failed to import or
    register while plugins load strictly (``COMPATZOO_STRICT_PLUGINS=1``), or two register
    the same name. One error for the whole registry, never one per component or spec field."""


class StorageError(CompatzooError):
    """The machine refused a read or write: a full disk, a folder that cannot be written,
    a file where a folder belongs."""

    @classmethod
    def from_os_error(cls, exc: OSError) -> StorageError:
        """What was refused, where, and what to do."""
        import errno

        where = exc.filename or "a file"
        if getattr(exc, "filename2", None):
            where = f"{where} -> {exc.filename2}"
        advice = {
            errno.ENOSPC: "no space left on the device: free space or write elsewhere (-o / "
                          "--output); a run continues from its last saved state with --resume",
            errno.EDQUOT: "disk quota exceeded: free space or write elsewhere",
            errno.EACCES: "permission denied: choose a folder you can write, or fix its "
                          "permissions",
            errno.EPERM: "operation not permitted: choose a folder you can write",
            errno.EROFS: "the file system is read-only: choose a writable folder",
            errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
            errno.EISDIR: "a folder stands where a file is needed: choose another path",
            errno.EEXIST: "it already exists: choose another path",
            errno.ENOENT: "no such file or folder: check the path",
        }.get(exc.errno, exc.strerror or str(exc))
        return cls(f"{where}: {advice}")
