"""The four plugin interfaces -- Encoder, CompatLoss, GalleryUpgrader, BackfillScheduler --
and the plain records that flow between them and the core.

Every component declares its parameters on the class (``Params``, a pydantic model with
``extra="forbid"``) and is built as ``cls(params, **runtime)``; the registry validates a
spec's params with that model before anything is built. Plugin authors import all of this
from :mod:`compatzoo.plugin`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError, PluginError


class NoParams(BaseModel):
    """The params model of a component without parameters."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- encoders
class Encoder(nn.Module):
    """Images ``(B, C, H, W)`` -> embeddings ``(B, embedding_dim)`` (not normalised)."""

    Params: ClassVar[type[BaseModel]] = NoParams
    embedding_dim: int

    @classmethod
    def embedding_dim_of(cls, params: BaseModel) -> int:
        """The width these params give, known without building the encoder (plans check
        every generation's width before anything is built). Encoders whose width is not
        ``params.embedding_dim`` override this."""
        dim = getattr(params, "embedding_dim", None)
        if not isinstance(dim, int):
            raise PluginError(f"encoder {cls.__name__} must override embedding_dim_of(params): "
                              "its params have no integer embedding_dim")
        return dim


class ClassifierHead(nn.Module):
    """Training-only classifier on embeddings; margin heads use ``labels`` when given.

    Built as ``cls(params, embedding_dim=..., num_classes=...)``. ``forward(features,
    labels=None)`` returns logits ``(B, num_classes)``; with labels, the margin
    (CosFace/ArcFace) is applied to the target logit, so ``cross_entropy(logits, labels)``
    is the head's training loss. ``temperature`` is the softmax temperature the logits
    already include (the scale ``s`` of normalised heads, 1 for a linear head).
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    embedding_dim: int
    num_classes: int
    temperature: float = 1.0


# --------------------------------------------------------------------------- losses
def match_dim(features: torch.Tensor, dim: int) -> torch.Tensor:
    """BCT's rule for models of different widths: keep the first ``dim`` elements,
    zero-pad when the features are shorter."""
    have = features.shape[1]
    if have >= dim:
        return features[:, :dim]
    return F.pad(features, (0, dim - have))


#: Inputs a CompatLoss may declare in ``requires``; the engine computes only these.
LOSS_INPUTS = frozenset({
    "new_head",            # the new model's classifier head (trainable)
    "old_features",        # phi_old of the same augmented view as new_features (no grad)
    "old_features_view2",  # phi_old of an independent second augmented view (RACT)
    "old_head",            # the frozen old classifier head
    "old_feature_cache",   # phi_old over the whole training set, computed once (MixBCT)
})
#: The loss inputs that come from the model a generation follows.
OLD_MODEL_INPUTS = LOSS_INPUTS - {"new_head"}


@dataclass
class LossInputs:
    """One training step's tensors; fields not declared by any active loss are ``None``."""

    new_features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    new_head: nn.Module | None = None
    old_features: torch.Tensor | None = None
    old_features_view2: torch.Tensor | None = None
    old_head: nn.Module | None = None


@dataclass
class FeatureCache:
    """phi_old features of every training item, indexed by dataset index."""

    features: torch.Tensor  # (N, d_old), float32, no grad
    labels: torch.Tensor    # (N,)


@dataclass
class TrainingContext:
    """What a loss may inspect once before training (``CompatLoss.prepare``)."""

    num_classes: int
    new_embedding_dim: int
    old_embedding_dim: int | None = None
    old_head: nn.Module | None = None
    old_classes: torch.Tensor | None = None   # class ids the old model was trained on
    old_feature_cache: FeatureCache | None = None


@dataclass
class LossOutput:
    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class CompatLoss(nn.Module):
    """A training objective term, built as ``cls(params)``.

    ``requires`` names entries of :data:`LOSS_INPUTS`; the engine runs the old model only
    when some active loss asks for old features, and a plan checks them before training.
    Override :meth:`inputs` when they depend on the params. ``min_batch_classes`` is how
    many classes every batch must hold (contrastive negatives).
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    requires: ClassVar[frozenset[str]] = frozenset()
    min_batch_classes: ClassVar[int] = 1

    def __init__(self, params: BaseModel | None = None):
        super().__init__()
        self.params = params if params is not None else type(self).Params()

    @classmethod
    def inputs(cls, params: BaseModel) -> frozenset[str]:
        """The inputs a loss with these params needs (known before it is built)."""
        return cls.requires

    @property
    def required_inputs(self) -> frozenset[str]:
        return type(self).inputs(self.params)

    def prepare(self, context: TrainingContext) -> None:
        """Precompute anything that depends on the old model or the dataset (optional)."""

    def forward(self, inputs: LossInputs) -> LossOutput:  # pragma: no cover - interface
        raise NotImplementedError


class WeightedLoss(CompatLoss):
    """A list of weighted terms is itself a loss; parts are prefixed by the term name."""

    def __init__(self, terms: list[tuple[str, float, CompatLoss]]):
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.weights = [float(weight) for _, weight, _ in terms]
        self.terms = nn.ModuleList([term for _, _, term in terms])

    @property
    def required_inputs(self) -> frozenset[str]:
        return frozenset().union(*(term.required_inputs for term in self.terms))

    @property
    def min_classes_per_batch(self) -> int:
        return max(type(term).min_batch_classes for term in self.terms)

    def prepare(self, context: TrainingContext) -> None:
        for term in self.terms:
            term.prepare(context)

    def forward(self, inputs: LossInputs) -> LossOutput:
        total = inputs.new_features.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            out = term(inputs)
            total = total + weight * out.total
            parts[name] = out.total.detach()
            for part, value in out.parts.items():
                parts[f"{name}/{part}"] = value.detach()
        return LossOutput(total=total, parts=parts)


# --------------------------------------------------------------------------- upgraders
def check_features(array: np.ndarray | torch.Tensor, dim: int | None, what: str) -> None:
    """Raise a clear error for a wrong shape or non-finite rows before any work starts."""
    shape = tuple(array.shape)
    if len(shape) != 2:
        raise InvalidFeaturesError(f"{what} must be a 2-D array (N, d); got shape {shape}")
    if dim is not None and shape[1] != dim:
        raise DimensionMismatchError(
            f"{what} has dimension {shape[1]} but {dim} was expected; pass features produced "
            "by the model this component was built for"
        )
    bad: list[int] = []
    count = 0
    for begin, stop in _chunks(shape[0], 65536):  # chunked: memmaps larger than memory
        block = array[begin:stop]
        finite = (torch.isfinite(block).all(dim=1).cpu().numpy() if torch.is_tensor(block)
                  else np.isfinite(np.asarray(block)).all(axis=1))
        rows = np.flatnonzero(~finite)
        count += len(rows)
        bad += (rows[:5 - len(bad)] + begin).tolist() if len(bad) < 5 else []
    if count:
        raise InvalidFeaturesError(
            f"{what} contains NaN or inf in {count} rows (first: {bad}); "
            "re-extract those features or drop the rows"
        )


@dataclass
class StoredGallery:
    """What a gallery holds for its items at one generation, without the images.

    ``features`` live in that generation's space; ``side`` is the side information stored
    beside them (FCT), if any; ``previous`` is the copy one generation older, kept for
    upgraders that read two generations (BiCT's momentum input, eq. 9).
    """

    features: torch.Tensor
    side: torch.Tensor | None = None
    previous: torch.Tensor | None = None


@dataclass
class HopData:
    """What an upgrader learns its hop from: the target generation's training items.

    ``old_features`` / ``new_features`` are phi_source / phi_target of those items (same
    order as ``new_train`` and ``labels``). ``stored`` is the same items as the chain
    stores them at the source generation -- given only to upgraders whose
    ``fits_on_stored`` is true (BiCT, eq. 9); on a first hop it is ``old_features``.
    ``old_train`` holds only the images the source model was trained on: side-information
    models (FCT) must train there, since at that time nothing else existed.
    ``source_encoder`` / ``target_encoder`` are the frozen models behind ``old_features`` /
    ``new_features``, for upgraders that recompute both from augmented views of
    ``new_train`` at every step (FCT's reference recipe). Images, encoders, heads and the
    previous upgrader are optional, so a unit test can fit an upgrader from plain tensors.
    """

    old_features: torch.Tensor
    new_features: torch.Tensor
    labels: torch.Tensor
    stored: StoredGallery | None = None
    new_head: nn.Module | None = None
    old_train: Any = None                       # LabeledImages
    new_train: Any = None                       # LabeledImages, the items themselves
    previous_upgrader: GalleryUpgrader | None = None
    augment: Callable[..., torch.Tensor] | None = None
    source_encoder: nn.Module | None = None
    target_encoder: nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: bool = True

    def stored_items(self) -> StoredGallery:
        """The items as the chain stores them (``old_features`` on a first hop)."""
        return self.stored if self.stored is not None else StoredGallery(self.old_features)

    def check(self, input_dim: int, output_dim: int) -> None:
        """Fail before training when the feature pairs do not fit the upgrader."""
        check_features(self.old_features, input_dim, "old features of the training set")
        check_features(self.new_features, output_dim, "new features of the training set")
        if len(self.old_features) != len(self.new_features):
            raise InvalidFeaturesError(
                f"{len(self.old_features)} old but {len(self.new_features)} new training "
                "features; both must describe the same items in the same order")


class GalleryUpgrader(nn.Module):
    """Maps a stored gallery (embeddings and optional side information) into the next
    generation's space, without the images; built as ``cls(params, input_dim=...,
    output_dim=...)``.

    Lifecycle: ``fit(data)`` learns the mapping (and any side-information model);
    ``side_information(images)`` gives what must be stored with each gallery item
    entering the hop (None when the method needs none); ``upgrade(features, side)`` maps
    stored embeddings; ``advance(stored)`` moves a whole stored gallery one generation on.
    An upgrader may publish named per-item ``signals`` on a stored gallery (e.g. a
    predicted uncertainty) that backfill schedulers ask for by name.
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    input_dim: int
    output_dim: int
    side_dim: int = 0
    #: whether ``advance`` reads ``StoredGallery.previous``, a copy that must stay stored
    reads_previous: bool = False
    #: whether ``fit`` reads ``HopData.stored``, the training items as the chain stores them
    fits_on_stored: bool = False
    #: names of the per-item signals :meth:`signals` returns
    publishes: frozenset[str] = frozenset()
    #: ``gallery``: maps a stored gallery into the next space. ``query``: maps the new
    #: model's queries into the old space instead, so the old index keeps serving untouched
    #: until a backfill (Drift-Adapter's direction); it never carries a gallery
    direction: str = "gallery"

    @classmethod
    def direction_of(cls, params: BaseModel) -> str:
        """The direction an upgrader with these params maps (known before it is built: a
        query upgrader is built with the widths (d_new, d_old) and fits new -> old)."""
        return cls.direction

    def fit(self, data: HopData) -> list[dict[str, float]]:
        """Learn the mapping; returns per-epoch logs. Nothing to learn by default."""
        return []

    def advance(self, stored: StoredGallery, chunk_size: int = 65536) -> StoredGallery:
        """Move a stored gallery one generation on, for chains v1 -> v2 -> v3.

        By default the features are upgraded and the side information is dropped;
        upgraders that carry side information on or read older copies override this.
        """
        features = torch.from_numpy(self.upgrade(stored.features, stored.side, chunk_size))
        return StoredGallery(features, None, stored.features)

    def follows(self, previous: GalleryUpgrader) -> None:
        """Raise before any training when this upgrader cannot take the hop after
        ``previous`` in a chain (e.g. it would adopt a side model of another kind)."""

    def carried_side_model(self) -> nn.Module | None:
        """The model whose output the side information left by :meth:`advance` stands
        for (FCT's psi_(i+1), learned with g); None when ``advance`` drops side
        information. The next hop of a chain may adopt it."""
        return None

    def side_information(self, images: Any, batch_size: int = 512,
                         progress: bool = True) -> torch.Tensor | None:
        """Side features of ``images`` (a LabeledImages) to store with the gallery."""
        return None

    def side_encoder(self) -> nn.Module | None:
        """The image encoder behind :meth:`side_information` (images -> side features),
        which a deployment runs where it embeds gallery items; None without one. Bundles
        store it beside the upgrader."""
        return None

    def signals(self, stored: StoredGallery, chunk_size: int = 65536) -> dict[str, np.ndarray]:
        """Per-item signals on a stored gallery entering this hop: ``{name: (N,) array}``
        for every name in ``publishes``."""
        return {}

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    @torch.no_grad()
    def upgrade(self, old: np.ndarray | torch.Tensor, side: np.ndarray | torch.Tensor | None = None,
                chunk_size: int = 65536) -> np.ndarray:
        """Apply in chunks so arrays larger than memory (e.g. np.memmap) can be upgraded."""
        return apply_in_chunks(self, old, side, self.input_dim, self.side_dim, self.output_dim,
                               chunk_size)


@torch.no_grad()
def apply_in_chunks(module: nn.Module, rows: np.ndarray | torch.Tensor,
                    side: np.ndarray | torch.Tensor | None, input_dim: int, side_dim: int,
                    output_dim: int, chunk_size: int = 65536) -> np.ndarray:
    """``module(rows, side)`` in eval mode, chunk by chunk, as float32 numpy ``(N,
    output_dim)``; inputs are checked (width, finite rows) before any work."""
    check_features(rows, input_dim, "stored embeddings")
    if side_dim and side is None:
        raise InvalidFeaturesError(
            f"this upgrader needs side information of dimension {side_dim}; pass the side "
            "features stored with the gallery")
    if side is not None:
        check_features(side, side_dim, "side information")
    was_training = module.training
    module.eval()
    out = np.empty((rows.shape[0], output_dim), dtype=np.float32)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    for start, stop in _chunks(rows.shape[0], chunk_size):
        x = _rows(rows, start, stop, device)
        s = None if side is None else _rows(side, start, stop, device)
        out[start:stop] = module(x, s).float().cpu().numpy().reshape(stop - start, output_dim)
    module.train(was_training)
    return out


def _rows(array: np.ndarray | torch.Tensor, start: int, stop: int,
          device: torch.device) -> torch.Tensor:
    """A float32 chunk on ``device``; numpy rows are copied (memmaps may be read-only)."""
    block = array[start:stop]
    if not torch.is_tensor(block):
        block = torch.from_numpy(np.array(block, dtype=np.float32))
    return block.to(device=device, dtype=torch.float32)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


# --------------------------------------------------------------------------- schedulers
@dataclass
class BackfillState:
    """What a scheduler may read when choosing the order in which to re-embed a gallery.

    ``old_features`` is the gallery as the old model embedded it; ``upgraded`` the
    gallery as the upgrade left it in the new model's space (None without an upgrader);
    ``side`` the side information stored beside the gallery entering the last hop;
    ``signals`` the per-item signals that hop's upgrader publishes, by name;
    ``new_features`` is the re-embedded gallery itself, so only oracle schedulers read it.
    """

    old_features: np.ndarray
    side: np.ndarray | None = None
    upgraded: np.ndarray | None = None
    new_head: nn.Module | None = None
    new_features: np.ndarray | None = None
    signals: dict[str, np.ndarray] = field(default_factory=dict)


#: BackfillState fields a scheduler may list in ``requires``.
BACKFILL_FIELDS = frozenset({"side", "upgraded", "new_head", "new_features"})


class BackfillScheduler:
    """Returns the order in which to re-embed gallery items (first = backfilled first);
    built as ``cls(params)``.

    ``requires`` names :data:`BACKFILL_FIELDS` the order reads, ``needs_signals`` the
    per-item signals (published by the upgrader of the model being backfilled); a plan
    checks both before any training. ``is_oracle`` marks orders that read the backfill's
    own result (upper references in reports).
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_signals: ClassVar[frozenset[str]] = frozenset()
    is_oracle: ClassVar[bool] = False

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else type(self).Params()

    def order(self, state: BackfillState, seed: int = 0) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError
