"""Bundles: a trained upgrade (old model, new model, upgrader) as a folder of safetensors
and JSON that loads anywhere -- from a run, a folder, a shipped card or the Hub."""

from __future__ import annotations

from pathlib import Path

from compatzoo.bundles.bundle import BundleContents, Model, UpgradeBundle, open_bundle, write_bundle
from compatzoo.bundles.format import BundleConfig
from compatzoo.bundles.sources import (BundleNotFoundError, NamedBundle, list_bundles,
                                       model_cards, resolve)


def load(source: str | Path, *, cache_dir: str | Path | None = None) -> UpgradeBundle:
    """A bundle from a short name (``compatzoo.list_bundles()``), ``hf-hub:ORG/NAME[@REV]``,
    ``local-dir:PATH`` or a folder path; hash-checked and loaded strictly, never unpickled."""
    folder, source_info = resolve(source, cache_dir=cache_dir)
    return open_bundle(folder, source_info)


__all__ = ["BundleConfig", "BundleContents", "BundleNotFoundError", "Model", "NamedBundle",
           "UpgradeBundle", "list_bundles", "load", "model_cards", "open_bundle", "resolve",
           "write_bundle"]
