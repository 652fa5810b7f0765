"""Writing a bundle from trained modules, and :class:`UpgradeBundle`, a loaded one: the
old and new encoders, the upgrader, the side-information encoder and the preprocessing,
with the checks a platform needs before it touches a stored gallery."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from compatzoo.bundles.card import model_card
from compatzoo.bundles.format import (CARD, BundleConfig, ComponentEntry, HeadEntry, ModelEntry,
                                      SideEntry, UpgraderEntry, load_module, read_config,
                                      read_weights, state_fingerprint, stored_state,
                                      write_config, write_weights)
from compatzoo.data.datasets import LabeledImages
from compatzoo.data.preprocess import Preprocess
from compatzoo.engine.checkpoints import atomic_write
from compatzoo.engine.features import extract_features
from compatzoo.errors import CheckpointError, InvalidFeaturesError, PluginError, SpecError
from compatzoo.interfaces import GalleryUpgrader, StoredGallery, check_features
from compatzoo.registry import get_registry

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class Model:
    """A trained encoder (and optionally its head) as a bundle receives it; or, for an
    adapter fitted on paired embeddings, only an embedding space: no encoder, its width
    in ``embedding_dim``."""

    generation: str
    encoder_spec: ComponentEntry | None
    encoder: nn.Module | None
    head_spec: ComponentEntry | None = None
    head: nn.Module | None = None
    num_classes: int | None = None
    embedding_dim: int | None = None


@dataclass
class BundleContents:
    """Everything :func:`write_bundle` writes: plain records and trained modules."""

    name: str
    experiment: str
    seed: int
    spec: dict[str, Any]
    lineage: list[str]
    preprocess: Preprocess | None
    old: Model
    new: Model
    upgrader_spec: ComponentEntry | None = None
    upgrader: GalleryUpgrader | None = None
    parent: str | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)


def write_bundle(folder: str | Path, contents: BundleContents,
                 dtype: str = "float32") -> BundleConfig:
    """Write ``contents`` as a bundle folder (weights, config.json, model card)."""
    import compatzoo

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    parts: dict[str, dict[str, nn.Module]] = {
        f"{role}/model.safetensors": {"encoder": model.encoder}
        for role, model in (("old", contents.old), ("new", contents.new))
        if model.encoder is not None}
    if contents.new.head is not None:
        parts["new/head.safetensors"] = {"head": contents.new.head}
    upgrader = contents.upgrader
    side = upgrader.side_encoder() if upgrader is not None else None
    if side is not None:   # before the upgrader, which holds it too: stored once, here
        parts["side/model.safetensors"] = {"encoder": side}
    if upgrader is not None:
        parts["upgrader/model.safetensors"] = {"upgrader": upgrader}
    files, tensors, aliases = write_weights(folder, parts, torch_dtype)

    def model_entry(model: Model, file: str) -> ModelEntry:
        if model.encoder is None:
            return ModelEntry(generation=model.generation, embedding_dim=model.embedding_dim)
        head = None
        if model.head is not None:
            head = HeadEntry(name=model.head_spec.name, params=model.head_spec.params,
                             num_classes=model.num_classes, file="new/head.safetensors")
        return ModelEntry(generation=model.generation, encoder=model.encoder_spec,
                          embedding_dim=model.encoder.embedding_dim, file=file,
                          fingerprint=state_fingerprint(stored_state(model.encoder, torch_dtype)),
                          head=head)

    config = BundleConfig(
        compatzoo_version=compatzoo.__version__, torch_version=torch.__version__,
        name=contents.name, experiment=contents.experiment, seed=contents.seed,
        spec=contents.spec, parent=contents.parent, lineage=contents.lineage,
        preprocess=contents.preprocess, dtype=dtype,
        old=model_entry(contents.old, "old/model.safetensors"),
        new=model_entry(contents.new, "new/model.safetensors"),
        upgrader=None if upgrader is None else UpgraderEntry(
            name=contents.upgrader_spec.name, params=contents.upgrader_spec.params,
            input_dim=upgrader.input_dim, output_dim=upgrader.output_dim,
            side_dim=upgrader.side_dim, reads_previous=upgrader.reads_previous,
            publishes=sorted(upgrader.publishes),
            direction=upgrader.direction,
            file="upgrader/model.safetensors"),
        side=None if side is None else SideEntry(file="side/model.safetensors",
                                                 embedding_dim=upgrader.side_dim),
        evaluation=contents.evaluation, files=files, tensors=tensors, aliases=aliases)
    write_config(folder, config)
    atomic_write(folder / CARD, lambda tmp: Path(tmp).write_text(model_card(config)))
    return config


class UpgradeBundle:
    """A trained upgrade, loaded: encode images with either model, upgrade stored old
    embeddings into the new space, and know which old model a gallery must come from.

    Built by :func:`compatzoo.load`; every file was hash-checked and loaded strictly.
    """

    def __init__(self, folder: Path, config: BundleConfig, source: dict[str, Any]):
        self.folder, self.config, self.source = folder, config, source
        states = read_weights(folder, config)

        def build(kind: str, name: str, params: dict[str, Any], **runtime: Any):
            try:
                component = get_registry().get(kind, name).component
            except PluginError as exc:
                raise PluginError(f"bundle {config.name!r} needs the {kind} {name!r}, which no "
                                  f"installed plugin provides: {exc}") from None
            try:
                validated = component.Params.model_validate(params)
            except ValidationError as exc:
                raise CheckpointError(f"bundle {config.name!r}: the {kind} {name!r} of its "
                                      f"config does not validate with the installed plugin "
                                      f"({exc.errors()[0]['msg']}); install the compatzoo "
                                      "version that wrote it or re-create the bundle") from None
            return component(validated, **runtime)

        def encoder(entry: ModelEntry) -> nn.Module | None:
            if entry.encoder is None:
                return None
            module = build("encoder", entry.encoder.name, entry.encoder.params)
            load_module(module, states[entry.file], "encoder", folder / entry.file)
            stored = stored_state(module, DTYPES[config.dtype])
            if state_fingerprint(stored) != entry.fingerprint:
                raise CheckpointError(f"{folder / entry.file} does not give the model "
                                      f"{entry.generation} fingerprinted in the config; "
                                      "re-create the bundle")
            if module.embedding_dim != entry.embedding_dim:
                raise CheckpointError(f"{entry.generation}: the encoder built from the config "
                                      f"is {module.embedding_dim}-d but the config says "
                                      f"{entry.embedding_dim}; re-create the bundle")
            return module

        self.old = encoder(config.old)
        self.new = encoder(config.new)
        self.new_head = None
        head = config.new.head
        if head is not None:
            self.new_head = load_module(
                build("head", head.name, head.params, embedding_dim=config.new.embedding_dim,
                      num_classes=head.num_classes),
                states[head.file], "head", folder / head.file)
        self.upgrader: GalleryUpgrader | None = None
        if config.upgrader is not None:
            entry = config.upgrader
            upgrader = build("upgrader", entry.name, entry.params, input_dim=entry.input_dim,
                             output_dim=entry.output_dim)
            self.upgrader = load_module(upgrader, states[entry.file], "upgrader",
                                        folder / entry.file)
        self.side = None
        if config.side is not None and self.upgrader is not None:
            self.side = self.upgrader.side_encoder().eval()
        self.preprocess = None if config.preprocess is None else config.preprocess.transform()

    def __repr__(self) -> str:
        hop = f" + {self.config.upgrader.name}" if self.config.upgrader else ""
        return (f"UpgradeBundle({self.config.name!r}: {self.config.old.generation} -> "
                f"{self.config.new.generation}{hop}, source={self.source.get('uri')})")

    @property
    def fingerprint(self) -> str | None:
        """Of the old model: a stored gallery the upgrader accepts came from it (None in
        an adapter bundle, which holds no encoder to fingerprint)."""
        return self.config.old.fingerprint

    def require_gallery_upgrader(self) -> None:
        """Refuse a query adapter where a stored gallery would be upgraded: it maps
        new-model queries into the old space, so on old embeddings it gives garbage."""
        entry = self.config.upgrader
        if entry is not None and entry.direction == "query":
            raise SpecError(
                f"bundle {self.config.name!r} holds a query adapter ({entry.name}): it maps "
                "new-model queries into the old space, so that the stored gallery serves as "
                "it is, and cannot upgrade a stored gallery. Map "
                "queries with bundle.upgrader.upgrade(new_queries), or fit a gallery adapter "
                "(compatzoo fit-adapter --direction gallery)")

    # ------------------------------------------------------------------ encoding
    def encode(self, images: torch.Tensor | Sequence[Image.Image | str | Path] | LabeledImages,
               model: str = "new", batch_size: int = 256) -> np.ndarray:
        """Embeddings ``(N, d)`` (float32, not normalised: compare with cosine similarity).

        ``images``: a float tensor ``(N, C, H, W)`` already preprocessed, a uint8 tensor
        of that shape (normalised here), PIL images or image paths (preprocessed here), or
        a :class:`LabeledImages` dataset.
        """
        if model not in ("new", "old"):
            raise InvalidFeaturesError(f"model must be 'new' or 'old', got {model!r}")
        encoder = self.new if model == "new" else self.old
        if encoder is None:
            raise InvalidFeaturesError(
                f"bundle {self.config.name!r} holds no encoders: its upgrader was fitted on "
                "paired embeddings (compatzoo fit-adapter). Embed with your own models and "
                "map the embeddings with bundle.upgrade")
        dataset = images if isinstance(images, LabeledImages) else _Images(
            self._as_batch(images))
        device = next(encoder.parameters()).device
        return extract_features(encoder, dataset, batch_size, device, progress=False).numpy()

    def side_information(self, images, batch_size: int = 256) -> np.ndarray | None:
        """Side information to store beside each item's old embedding (None if the
        upgrader reads none)."""
        if self.side is None:
            return None
        dataset = images if isinstance(images, LabeledImages) else _Images(
            self._as_batch(images))
        device = next(self.side.parameters()).device
        return extract_features(self.side, dataset, batch_size, device, progress=False).numpy()

    def _as_batch(self, images) -> torch.Tensor:
        if torch.is_tensor(images):
            if images.dim() != 4:
                raise InvalidFeaturesError(f"images must be a (N, C, H, W) tensor, got shape "
                                           f"{tuple(images.shape)}")
            if images.dtype == torch.uint8:
                return self._require_preprocess().normalise(images)
            return images.float()
        transform = self._require_preprocess().transform()
        batch = []
        for image in images:
            if isinstance(image, (str, Path)):
                with Image.open(image) as opened:
                    batch.append(transform(opened))
            else:
                batch.append(transform(image))
        return torch.stack(batch)

    def _require_preprocess(self) -> Preprocess:
        if self.config.preprocess is None:
            raise InvalidFeaturesError("this bundle records no preprocessing; pass float "
                                       "tensors already prepared as its models expect")
        return self.config.preprocess

    def measure(self, data, metrics: Sequence[str] = ("map@100",),
                batch_size: int = 512) -> dict[str, dict[str, float]]:
        """o2o, n2o, n2u (with an upgrader) and n2n of this bundle on ``data`` (a
        :class:`RetrievalData`), from the bundle's own modules: what its card reports."""
        from compatzoo.retrieval import evaluate

        loo = data.gallery is None
        gallery = data.query if loo else data.gallery
        query_old = self.encode(data.query, model="old", batch_size=batch_size)
        query_new = self.encode(data.query, batch_size=batch_size)
        stored = query_old if loo else self.encode(gallery, model="old", batch_size=batch_size)
        pairs = {"o2o": (query_old, stored), "n2o": (query_new, stored)}
        if self.upgrader is not None:
            side = self.side_information(gallery, batch_size=batch_size)
            pairs["n2u"] = (query_new, self.upgrade(stored, side))
        pairs["n2n"] = (query_new, query_new if loo else self.encode(gallery,
                                                                     batch_size=batch_size))
        return {setting: evaluate(q, data.query.labels, g, gallery.labels, metrics=metrics,
                                  leave_one_out=loo) for setting, (q, g) in pairs.items()}

    # ------------------------------------------------------------------ upgrading
    def upgrade(self, features: np.ndarray | torch.Tensor, side=None, previous=None, *,
                fingerprint: str | None = None, chunk_size: int = 65536) -> np.ndarray:
        """Stored old embeddings ``(N, d_old)`` -> the new space ``(N, d_new)``.

        ``side``: the side information stored with them (when the upgrader reads it);
        ``previous``: the copy one generation older (upgraders with ``reads_previous``);
        ``fingerprint``: of the old model that embedded them, checked when given. Without
        an upgrader (BCT-style compatibility) the stored embeddings are returned as they
        are: the new model queries them directly.
        """
        return self.advance(StoredGallery(_tensor(features), _tensor(side), _tensor(previous)),
                            fingerprint=fingerprint, chunk_size=chunk_size).features.numpy()

    def advance(self, stored: StoredGallery, *, fingerprint: str | None = None,
                chunk_size: int = 65536) -> StoredGallery:
        """The whole stored gallery one generation on (embeddings, side information, the
        copy kept for the next hop), for chains of bundles."""
        self.require_gallery_upgrader()
        if None not in (fingerprint, self.fingerprint) and fingerprint != self.fingerprint:
            raise InvalidFeaturesError(
                f"these embeddings come from a model with fingerprint {fingerprint[:16]}..., "
                f"but bundle {self.config.name!r} upgrades galleries of "
                f"{self.config.old.generation} ({self.fingerprint[:16]}...); use the bundle "
                "whose old model embedded them, or re-embed them with bundle.encode(..., "
                "model='old')")
        what = (f"stored embeddings for bundle {self.config.name!r} (old model "
                f"{self.config.old.generation})")
        if self.upgrader is None:
            check_features(stored.features, self.config.old.embedding_dim, what)
            return StoredGallery(stored.features, None, stored.features)
        shape = tuple(stored.features.shape)
        if len(shape) != 2 or shape[1] != self.config.old.embedding_dim:   # the upgrader
            check_features(stored.features, self.config.old.embedding_dim, what)  # checks rows
        return self.upgrader.advance(stored, chunk_size)


class _Images(LabeledImages):
    """A prepared batch as a dataset (labels unused)."""

    def __init__(self, batch: torch.Tensor):
        self.batch = batch
        self.labels = np.zeros(len(batch), dtype=np.int64)

    def get_batch(self, indices):
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.batch[index], torch.from_numpy(self.labels[index.numpy()])


def _tensor(value) -> torch.Tensor | None:
    if value is None or torch.is_tensor(value):
        return value
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


def open_bundle(folder: str | Path, source: dict[str, Any] | None = None) -> UpgradeBundle:
    """Load the bundle in ``folder`` (hash-checked, strict)."""
    folder = Path(folder)
    config = read_config(folder)
    return UpgradeBundle(folder, config, source or {"kind": "local-dir", "uri": str(folder)})
