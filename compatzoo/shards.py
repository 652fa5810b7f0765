"""Stored embeddings on disk: shards of ``(N, d)`` arrays (memory-mapped ``.npy`` or a
tensor of a ``.safetensors`` file) read in row ranges, and a bare upgrader applied to them
(:func:`upgrade_shards`, the upgrade job of :mod:`compatzoo.jobs`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
    """Upgrade stored embedding files into ``output_dir`` with a bare upgrader, one output
    per input, same name and format; returns the output paths.

    The upgrade job of :func:`compatzoo.jobs.upgrade_gallery` with the upgrader's weights
    as its identity: checks before anything is written, a manifest that resumes the same
    job after a kill and refuses another upgrader's, never a partial output file.
    """
    from compatzoo.jobs import upgrade_gallery, upgrader_step

    upgrade_gallery([upgrader_step(upgrader)], input_paths, output_dir, side=side_paths,
                    key=key, chunk_rows=chunk_size, progress=progress)
    return [Path(output_dir) / Path(p).name for p in input_paths]
