"""The core's gallery components and what upgrader and scheduler plugins share.

Components: the identity upgrader, the random and oracle-distance backfill orders.
Shared helpers: the requirement check every scheduler runs before any work, the
descending order with index tie-break, the mini-batch loop that fits feature-to-feature
upgraders (BiCT's psi, FCT's h) and side-information models, and sharded, resumable
application of an upgrader to stored embedding files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from compatzoo.engine.training import make_optimizer, lr_factor
from compatzoo.errors import (DimensionMismatchError, InvalidFeaturesError, SpecError,
                              TrainingDivergedError)
from compatzoo.interfaces import (BackfillScheduler, GalleryState, GalleryUpgrader,
                                  UpgradeContext, check_features)


# --------------------------------------------------------------------------- components
class IdentityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdentityUpgrader(GalleryUpgrader):
    """Keeps old embeddings as they are (BCT's backfill-free upgrade)."""

    def __init__(self, params: IdentityParams | None = None, input_dim: int = 0, **_: int):
        super().__init__()
        self.input_dim = self.output_dim = input_dim

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return old


class RandomParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RandomScheduler(BackfillScheduler):
    """Backfill in a seeded random order: the baseline every smarter order must beat."""

    def __init__(self, params: RandomParams | None = None):
        self.params = params or RandomParams()

    def order(self, gallery: GalleryState, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).permutation(len(gallery.old_features))


class OracleDistanceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = Field(
        False, description="compare L2-normalised embeddings (the angular error cosine "
        "retrieval sees) instead of FastFill's raw distance")


class OracleDistanceScheduler(BackfillScheduler):
    """FastFill's oracle order: largest ``||phi_new(x) - stored(x)||`` first.

    ``stored`` is the upgraded embedding when the state has one, else the old embedding
    (same width only). It reads phi_new of the gallery, i.e. the result of the backfill it
    orders, so it is an upper reference and reports mark it as an oracle.
    """

    requires = frozenset({"new_features"})
    is_oracle = True

    def __init__(self, params: OracleDistanceParams | None = None):
        self.params = params or OracleDistanceParams()

    def order(self, gallery: GalleryState, seed: int = 0) -> np.ndarray:
        check_gallery_state("oracle-distance", self, gallery, optional=frozenset({"upgraded"}))
        stored = gallery.upgraded if gallery.upgraded is not None else gallery.old_features
        new = np.asarray(gallery.new_features, dtype=np.float32)
        if stored.shape[1] != new.shape[1]:
            raise DimensionMismatchError(
                f"the oracle-distance scheduler compares new embeddings (dim {new.shape[1]}) "
                f"with the stored ones (dim {stored.shape[1]}); give GalleryState.upgraded, "
                "the upgrader's output in the new space")
        stored = np.asarray(stored, np.float32)
        if self.params.normalize:
            new, stored = _unit_rows(new), _unit_rows(stored)
        return descending_order(np.linalg.norm(new - stored, axis=1))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- scheduler helpers
_STATE_FIELDS = {
    "new_head": "the new model's classifier head (GalleryState.new_head)",
    "new_features": "the new model's embeddings of the gallery (GalleryState.new_features)",
    "uncertainty": "a per-item uncertainty such as FastFill's sigma (GalleryState.uncertainty)",
    "upgraded": "the upgraded gallery embeddings (GalleryState.upgraded)",
    "side": "the side information stored with the gallery (GalleryState.side)",
}


def check_gallery_state(name: str, scheduler: BackfillScheduler, gallery: GalleryState,
                        optional: frozenset[str] = frozenset()) -> None:
    """Fail before any work when ``gallery`` lacks what ``scheduler.requires`` names, or
    when an array it will read (required, or ``optional`` and present) is malformed or
    does not have one row per gallery item."""
    missing = [field for field in sorted(scheduler.requires) if getattr(gallery, field) is None]
    if missing:
        needs = "; ".join(_STATE_FIELDS[field] for field in missing)
        raise SpecError(f"the {name} scheduler needs {needs}, but the gallery state has none; "
                        "provide it or choose another scheduler (e.g. random)")
    check_features(gallery.old_features, None, "old gallery features")
    rows = gallery.old_features.shape[0]
    read = (scheduler.requires | optional) - {"new_head"}
    for field in sorted(f for f in read if getattr(gallery, f) is not None):
        value = getattr(gallery, field)
        if field == "uncertainty":
            check_features(np.asarray(value).reshape(-1, 1), 1, f"GalleryState.{field}")
        else:
            check_features(value, None, f"GalleryState.{field}")
        if len(value) != rows:
            raise InvalidFeaturesError(f"GalleryState.{field} has {len(value)} rows but the "
                                       f"gallery has {rows} items; give one row per item")


def descending_order(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Indices by score, highest first; equal scores keep their index order."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.argsort(-scores, kind="stable")


# --------------------------------------------------------------------------- fitting
class FitRecipe(BaseModel):
    """Optimisation of a learned upgrader or side-information model.

    Plugins subclass it and override the defaults with their paper's values. The learning
    rate warms up linearly per step, then follows a cosine decay to zero.
    """

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=1, description="passes over the training items")
    batch_size: int = Field(256, ge=2, description="items per step (all items when fewer)")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="optimiser")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov when > 0)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length in epochs")
    freeze_bn_from: float | None = Field(
        None, ge=0, le=1, description="fraction of the epochs after which the model trains in "
        "eval mode, i.e. with BatchNorm statistics frozen (None: never)")


def fit_minibatches(model: nn.Module, num_items: int,
                    batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                    recipe: FitRecipe, *, seed: int = 0, progress: bool = True,
                    desc: str = "fit") -> list[dict[str, float]]:
    """Train ``model``'s parameters on shuffled batches of item indices; per-epoch logs.

    ``batch_loss(indices, generator)`` returns the scalar loss of one batch; the model
    must already be on the device the loss runs on. The one loop behind BiCT's psi,
    FCT's h and g, FastFill and the side-information models.
    """
    if num_items < 2:
        raise SpecError(f"{desc}: needs at least 2 training items, got {num_items}")
    batch = min(recipe.batch_size, num_items)
    steps = num_items // batch
    total, warmup = steps * recipe.epochs, int(round(recipe.warmup_epochs * steps))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], recipe)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, "cosine"))
    history: list[dict[str, float]] = []
    for epoch in range(recipe.epochs):
        # The FCT reference trains the second half in eval mode: BatchNorm statistics stop
        # moving while the weights (BN's affine ones included) keep learning.
        freeze = recipe.freeze_bn_from
        model.train(freeze is None or epoch < freeze * recipe.epochs)
        order = torch.randperm(num_items, generator=generator)
        lr, running, started = schedule.get_last_lr()[0], 0.0, time.perf_counter()
        for step in tqdm(range(steps), desc=f"{desc} {epoch + 1}/{recipe.epochs}",
                         disable=not progress, leave=False):
            loss = batch_loss(order[step * batch:(step + 1) * batch], generator)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    "lower the learning rate or check the training features for NaN")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        history.append({"epoch": epoch + 1, "steps": steps, "loss": running / steps, "lr": lr,
                        "seconds": time.perf_counter() - started})
    model.eval()
    return history


def check_fit_context(context: UpgradeContext, input_dim: int, output_dim: int) -> None:
    """Fail before training when the context's feature pairs do not fit the upgrader."""
    check_features(context.old_features, input_dim, "old features of the training set")
    check_features(context.new_features, output_dim, "new features of the training set")
    if len(context.old_features) != len(context.new_features):
        raise InvalidFeaturesError(
            f"{len(context.old_features)} old but {len(context.new_features)} new training "
            "features; both must be phi(new_train) in the same order")


# --------------------------------------------------------------------------- sharded upgrade
_SHARD_FORMATS = (".npy", ".safetensors")


class _Shard:
    """Rows of one stored ``(N, d)`` array, read lazily: memory-mapped ``.npy`` or one
    tensor of a ``.safetensors`` file (read slice by slice)."""

    def __init__(self, path: str | Path, key: str | None = None):
        self.path = Path(path)
        if self.path.suffix not in _SHARD_FORMATS or not self.path.is_file():
            raise SpecError(f"shard {self.path} is not an existing .npy or .safetensors file")
        if self.path.suffix == ".npy":
            self._rows, self.key = np.load(self.path, mmap_mode="r"), None
            self.shape = tuple(self._rows.shape)
            return
        from safetensors import safe_open

        handle = safe_open(str(self.path), framework="np")
        names = list(handle.keys())
        if key is None and len(names) != 1:
            raise SpecError(f"{self.path} holds tensors {names}; pass key= to choose one")
        self.key = key or names[0]
        if self.key not in names:
            raise SpecError(f"{self.path} has no tensor '{self.key}'; it holds {names}")
        self._rows = handle.get_slice(self.key)
        self.shape = tuple(self._rows.get_shape())

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._rows[start:stop], dtype=np.float32)

    def check(self, dim: int | None, chunk_size: int, what: str) -> None:
        """Shape and finiteness, chunk by chunk so a memory-mapped shard is never loaded whole."""
        if len(self.shape) != 2:
            raise InvalidFeaturesError(f"{what} {self.path} must be 2-D (N, d); got shape "
                                       f"{self.shape}")
        if dim is not None and self.shape[1] != dim:
            raise DimensionMismatchError(f"{what} {self.path} has dimension {self.shape[1]} but "
                                         f"the upgrader expects {dim}")
        for start in range(0, self.shape[0], chunk_size):
            stop = min(self.shape[0], start + chunk_size)
            check_features(self.read(start, stop), dim,
                           f"{what} {self.path} (rows {start}-{stop - 1})")


def upgrade_shards(upgrader: GalleryUpgrader, input_paths: Sequence[str | Path],
                   output_dir: str | Path, side_paths: Sequence[str | Path] | None = None,
                   chunk_size: int = 65536, key: str | None = None,
                   progress: bool = True) -> list[Path]:
    """Upgrade stored embedding shards into ``output_dir``, one output per input, same
    file name and format; returns the output paths.

    Every pending input (and its side shard) is checked first -- readable, width, finite
    rows, matching row counts -- so bad input fails before any output is written. Each
    output is written to a hidden ``.partial`` file and renamed only once complete, so an
    interrupted run never leaves a partial shard under an output name; outputs that
    already exist with the right shape are skipped, which makes the job resumable.
    """
    if chunk_size < 1:
        raise SpecError(f"chunk_size must be at least 1, got {chunk_size}")
    inputs = [Path(p) for p in input_paths]
    sides: list[Path | None] = ([Path(p) for p in side_paths] if side_paths is not None
                                else [None] * len(inputs))
    if len(sides) != len(inputs):
        raise SpecError(f"{len(inputs)} embedding shards but {len(sides)} side-information shards")
    if len({p.name for p in inputs}) != len(inputs):
        raise SpecError("input shards must have distinct file names (outputs reuse them)")
    if upgrader.side_dim and side_paths is None:
        raise InvalidFeaturesError(f"this upgrader needs side information of dimension "
                                   f"{upgrader.side_dim}; pass side_paths, one per shard")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[_Shard, _Shard | None, Path]] = []
    for path, side_path in zip(inputs, sides):
        old = _Shard(path, key)
        target = out_dir / path.name
        if _is_complete(target, (old.shape[0], upgrader.output_dim), key):
            continue
        old.check(upgrader.input_dim, chunk_size, "embedding shard")
        side = None if side_path is None else _Shard(side_path, key)
        if side is not None:
            side.check(upgrader.side_dim, chunk_size, "side-information shard")
            if side.shape[0] != old.shape[0]:
                raise InvalidFeaturesError(f"side shard {side.path} has {side.shape[0]} rows but "
                                           f"{old.path} has {old.shape[0]}")
        pending.append((old, side, target))
    bar = tqdm(total=sum(old.shape[0] for old, _, _ in pending), unit="rows",
               desc="upgrade shards", disable=not progress)
    with bar:
        for old, side, target in pending:
            _write_shard(upgrader, old, side, target, chunk_size, bar)
    return [out_dir / path.name for path in inputs]


def _is_complete(target: Path, shape: tuple[int, int], key: str | None) -> bool:
    """An existing output is complete by construction (renamed when finished); one of
    another shape comes from a different upgrade and is never overwritten silently."""
    if not target.exists():
        return False
    found = _Shard(target, key).shape
    if found != shape:
        raise DimensionMismatchError(f"{target} already exists with shape {found}, but this "
                                     f"upgrade writes {shape}; delete it or use another output_dir")
    return True


def _write_shard(upgrader: GalleryUpgrader, old: _Shard, side: _Shard | None, target: Path,
                 chunk_size: int, bar: tqdm) -> None:
    partial = target.with_name(f".{target.name}.partial")
    rows, dim = old.shape[0], upgrader.output_dim
    try:
        out = (np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(rows, dim))
               if target.suffix == ".npy" else np.empty((rows, dim), dtype=np.float32))
        for start in range(0, rows, chunk_size):
            stop = min(rows, start + chunk_size)
            out[start:stop] = upgrader.upgrade(
                old.read(start, stop), None if side is None else side.read(start, stop),
                chunk_size=chunk_size)
            bar.update(stop - start)
        if target.suffix == ".npy":
            out.flush()
            del out
        else:
            from safetensors.numpy import save_file

            save_file({old.key: out}, str(partial))
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
