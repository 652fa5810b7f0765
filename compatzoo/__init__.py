"""compatzoo: compatible representation learning.

Upgrade the embedding model of a retrieval system without re-embedding the whole gallery
(BCT, RACT, MixBCT), map stored embeddings into the new space (BiCT, FCT), or backfill in
the best order (RACT uncertainty, FastFill) -- and measure every method the same way.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _create(kind: str, name: str, params: dict[str, Any], **runtime: Any):
    from compatzoo.registry import get_registry
    from compatzoo.specs import validate_params

    record = get_registry().get(kind, name)
    return record.component(validate_params(kind, name, params), **runtime)


def create_encoder(name: str, **params: Any):
    """An :class:`~compatzoo.interfaces.Encoder` by registered name, e.g. ``"resnet50"``."""
    return _create("encoder", name, params)


def create_head(name: str, embedding_dim: int, num_classes: int, **params: Any):
    """A classifier head (``linear``, ``normface``, ``cosface``, ``arcface``, ...)."""
    return _create("head", name, params, embedding_dim=embedding_dim, num_classes=num_classes)


def get_loss(name: str, **params: Any):
    """A :class:`~compatzoo.interfaces.CompatLoss` by registered name, e.g. ``"bct"``."""
    return _create("loss", name, params)


def create_upgrader(name: str, input_dim: int, output_dim: int, **params: Any):
    """A :class:`~compatzoo.interfaces.GalleryUpgrader` from ``input_dim``-wide stored
    embeddings into an ``output_dim``-wide space."""
    return _create("upgrader", name, params, input_dim=input_dim, output_dim=output_dim)


def create_scheduler(name: str, **params: Any):
    """A :class:`~compatzoo.interfaces.BackfillScheduler` (backfill order)."""
    return _create("scheduler", name, params)


def load(source, *, cache_dir=None):
    """An :class:`~compatzoo.bundles.UpgradeBundle` from a short name (see
    :func:`list_bundles`), ``hf-hub:ORG/NAME[@REVISION]``, ``local-dir:PATH`` or a folder."""
    from compatzoo.bundles import load as load_bundle

    return load_bundle(source, cache_dir=cache_dir)


def list_bundles() -> list[dict[str, Any]]:
    """Every short name :func:`load` knows: shipped cards and plugin-registered bundles,
    with where their weights come from."""
    from compatzoo.bundles import list_bundles as rows

    return rows()


def list_plugins(pattern: str = "*") -> dict[str, list[str]]:
    """``{kind: [names]}`` of every installed component, optionally filtered by a wildcard."""
    from compatzoo.registry import KINDS, get_registry

    registry = get_registry()
    return {kind: registry.names(kind, pattern) for kind in KINDS}


__all__ = ["__version__", "create_encoder", "create_head", "create_scheduler",
           "create_upgrader", "get_loss", "list_bundles", "list_plugins", "load"]
