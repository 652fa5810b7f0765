"""Stored embeddings on disk: shards of ``(N, d)`` arrays (memory-mapped ``.npy`` or a
tensor of a ``.safetensors`` file) read in row ranges, and an upgrader applied to them
shard by shard, resumably, never leaving a partial output file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError, SpecError
from compatzoo.interfaces import GalleryUpgrader, check_features

_SHARD_FORMATS = (".npy", ".safetensors")


class Shard:
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
    pending: list[tuple[Shard, Shard | None, Path]] = []
    for path, side_path in zip(inputs, sides):
        old = Shard(path, key)
        target = out_dir / path.name
        if _is_complete(target, (old.shape[0], upgrader.output_dim), key):
            continue
        old.check(upgrader.input_dim, chunk_size, "embedding shard")
        side = None if side_path is None else Shard(side_path, key)
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
    found = Shard(target, key).shape
    if found != shape:
        raise DimensionMismatchError(f"{target} already exists with shape {found}, but this "
                                     f"upgrade writes {shape}; delete it or use another output_dir")
    return True


def _write_shard(upgrader: GalleryUpgrader, old: Shard, side: Shard | None, target: Path,
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
