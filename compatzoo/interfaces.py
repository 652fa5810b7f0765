"""The four plugin interfaces: Encoder, CompatLoss, GalleryUpgrader, BackfillScheduler.

Plugins subclass these; the engine only talks to these methods and attributes, so a
third-party method needs nothing from the core beyond this module and the registry hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError


# --------------------------------------------------------------------------- encoders
class Encoder(nn.Module):
    """Images ``(B, C, H, W)`` -> embeddings ``(B, embedding_dim)`` (not normalised)."""

    embedding_dim: int


class ClassifierHead(nn.Module):
    """Training-only classifier on embeddings; margin heads use ``labels`` when given.

    ``forward(features, labels=None)`` returns logits ``(B, num_classes)``; with labels, the
    margin (CosFace/ArcFace) is applied to the target logit, so ``cross_entropy(logits,
    labels)`` is the head's training loss. ``temperature`` is the softmax temperature the
    logits already include (the scale ``s`` of normalised heads, 1 for a linear head); BCT's
    distillation variant uses it.
    """

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
    """A training objective term. Subclasses set ``requires`` and implement ``forward``.

    ``requires`` names entries of :data:`LOSS_INPUTS`; spec validation checks them against
    the experiment before training starts, and the engine runs the old model only when
    some active loss asks for old features. ``uses_augmented_old_features`` tells the engine
    whether cached (un-augmented) old features are an acceptable stand-in for
    ``old_features`` of the augmented view.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    min_batch_classes: ClassVar[int] = 1

    @property
    def required_inputs(self) -> frozenset[str]:
        """Inputs this instance needs; override when they depend on the params."""
        return type(self).requires

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
    """What a gallery holds for its items at one model generation, without the images.

    ``features`` live in the current generation's space; ``side`` is the side information
    stored beside them (FCT), if any; ``previous`` is the copy one generation older, kept
    for upgraders that read two generations (BiCT's momentum input, eq. 9).
    """

    features: torch.Tensor
    side: torch.Tensor | None = None
    previous: torch.Tensor | None = None


@dataclass
class UpgradeContext:
    """What an upgrader may learn from, once both encoders are trained and frozen.

    ``old_train`` holds only the images the old model was trained on: side-information
    models (FCT) must train there, since at old-model time nothing else existed.
    ``old_features`` / ``new_features`` are phi_old / phi_new of ``new_train`` (same order).

    In a chain v1 -> v2 -> v3 the hop v2 -> v3 also gets ``previous_upgrader`` (the fitted
    v1 -> v2 upgrader, e.g. to adopt the side model its g was trained for) and
    ``stored_training_items()``: ``new_train`` as the stored gallery would hold it after
    the earlier hops, for upgraders trained on chained inputs (BiCT, eq. 9).
    """

    old_train: Any                    # LabeledImages
    new_train: Any                    # LabeledImages
    old_encoder: Encoder
    new_encoder: Encoder
    old_features: torch.Tensor
    new_features: torch.Tensor
    labels: torch.Tensor
    new_head: nn.Module | None = None
    augment: Callable[..., torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: bool = True
    previous_upgrader: GalleryUpgrader | None = None
    replay_chain: Callable[[], StoredGallery] | None = None
    _replayed: StoredGallery | None = field(default=None, init=False, repr=False)

    def stored_training_items(self) -> StoredGallery:
        """``new_train`` as stored at the previous generation (computed once, on demand);
        on a first hop that is just ``old_features``."""
        if self.replay_chain is None:
            return StoredGallery(self.old_features)
        if self._replayed is None:
            self._replayed = self.replay_chain()
        return self._replayed


class GalleryUpgrader(nn.Module):
    """Maps stored old embeddings (and optional side information) into the new space.

    Lifecycle: ``fit(context)`` learns the mapping (and any side-information model);
    ``side_information(images)`` gives what must be stored with each old gallery item
    (None when the method needs none); ``upgrade(old, side)`` maps stored embeddings.
    """

    input_dim: int
    output_dim: int
    side_dim: int = 0
    #: whether ``advance`` reads ``StoredGallery.previous``, a copy that must stay stored
    reads_previous: bool = False

    def fit(self, context: UpgradeContext) -> list[dict[str, float]]:
        """Learn the mapping; returns per-epoch logs. Nothing to learn by default."""
        return []

    def advance(self, stored: StoredGallery, chunk_size: int = 65536) -> StoredGallery:
        """Move a stored gallery one generation on, for chains v1 -> v2 -> v3.

        By default the features are upgraded and the side information is dropped; upgraders
        that carry side information on (FCT's g) or read older copies (BiCT's momentum
        input) override this.
        """
        features = torch.from_numpy(self.upgrade(stored.features, stored.side, chunk_size))
        return StoredGallery(features, None, stored.features)

    def follows(self, previous: GalleryUpgrader) -> None:
        """Raise before any training when this upgrader cannot take the hop after
        ``previous`` in a chain (e.g. it would adopt a side model of another kind)."""

    def side_information(self, images: Any, batch_size: int = 512,
                         progress: bool = True) -> torch.Tensor | None:
        """Side features of ``images`` (a LabeledImages) to store with the old gallery."""
        return None

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    @torch.no_grad()
    def upgrade(self, old: np.ndarray | torch.Tensor, side: np.ndarray | torch.Tensor | None = None,
                chunk_size: int = 65536) -> np.ndarray:
        """Apply in chunks so arrays larger than memory (e.g. np.memmap) can be upgraded."""
        check_features(old, self.input_dim, "stored old embeddings")
        if self.side_dim and side is None:
            raise InvalidFeaturesError(
                f"this upgrader needs side information of dimension {self.side_dim}; pass "
                "the side features stored with the old gallery"
            )
        if side is not None:
            check_features(side, self.side_dim, "side information")
        was_training = self.training
        self.eval()
        out = np.empty((old.shape[0], self.output_dim), dtype=np.float32)
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        for start, stop in _chunks(old.shape[0], chunk_size):
            x = _rows(old, start, stop, device)
            s = None if side is None else _rows(side, start, stop, device)
            out[start:stop] = self(x, s).float().cpu().numpy()
        self.train(was_training)
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
class GalleryState:
    """What a scheduler may look at when choosing the backfill order."""

    old_features: np.ndarray
    side: np.ndarray | None = None
    upgraded: np.ndarray | None = None
    new_features: np.ndarray | None = None      # only oracle schedulers may use these
    new_head: nn.Module | None = None
    uncertainty: np.ndarray | None = None       # e.g. FastFill's sigma per item


class BackfillScheduler:
    """Returns the order in which to re-embed gallery items (first = backfilled first)."""

    requires: ClassVar[frozenset[str]] = frozenset()
    is_oracle: ClassVar[bool] = False

    def order(self, gallery: GalleryState, seed: int = 0) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError
