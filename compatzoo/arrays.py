"""Reading saved feature and label arrays (.npy or .safetensors) without unpickling."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compatzoo.errors import CheckpointError, DatasetError


def load_array(spec: str | Path) -> np.ndarray:
    """``path.npy``, ``path.safetensors`` (its only tensor) or ``path.safetensors:key``."""
    text = str(spec)
    key = None
    if ".safetensors:" in text:
        text, key = text.rsplit(":", 1)
    path = Path(text)
    if not path.is_file():
        raise DatasetError(f"feature file {path} does not exist")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "mmap length is greater than file size" in str(exc):
                raise DatasetError(f"{path} is truncated: its header describes more data than "
                                   "the file holds; copy or write it again") from None
            raise DatasetError(f"{path} is not a plain numeric .npy array ({exc}); save it "
                               "with numpy.save on a numeric array") from None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path} ({exc}); the file is corrupt") from None
        if key is None:
            if len(tensors) != 1:
                raise DatasetError(f"{path} holds {sorted(tensors)}; name one as {path}:KEY")
            key = next(iter(tensors))
        if key not in tensors:
            raise DatasetError(f"{path} has no tensor '{key}'; it holds {sorted(tensors)}")
        return tensors[key]
    raise DatasetError(f"{path}: unsupported feature file type '{path.suffix}'; use .npy or "
                       ".safetensors")
