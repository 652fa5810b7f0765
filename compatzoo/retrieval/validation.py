"""Input checks shared by every retrieval entry point.

Everything is checked before any search runs, so a bad call fails in milliseconds with a
message that names the argument, says what is wrong and what to do, instead of failing
(or silently returning nonsense) after minutes of scoring.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from compatzoo.errors import (DimensionMismatchError, InvalidArgumentError,
                              InvalidFeaturesError)

ArrayLike = np.ndarray | torch.Tensor

#: Rows scanned at a time when checking features, so the check needs no full-size temporary.
_CHECK_ROWS = 65536
_SHOW = 5


@dataclass(frozen=True)
class Features:
    """Checked features: the caller's data, never copied or written, plus float32 row norms.

    Norms are computed once here (the finiteness check needs them anyway) so that the
    search can normalise one chunk at a time without a normalised copy of the gallery.
    """

    data: torch.Tensor
    norms: torch.Tensor
    name: str

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def dim(self) -> int:
        return self.data.shape[1]


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise InvalidFeaturesError(
                f"{name} has dtype {x.dtype}; features must be floating point "
                f"(use {name}.float())"
            )
        return x.detach()
    array = np.asarray(x)
    if array.dtype.kind != "f":
        raise InvalidFeaturesError(
            f"{name} has dtype {array.dtype}; features must be a float array "
            f"(use {name}.astype(np.float32))"
        )
    try:
        with warnings.catch_warnings():  # read-only arrays are fine: nothing writes to them
            warnings.simplefilter("ignore", UserWarning)
            return torch.as_tensor(array)
    except (TypeError, ValueError):  # negative strides or foreign byte order
        return torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32))


def _first(indices: torch.Tensor) -> str:
    shown = ", ".join(str(i) for i in indices[:_SHOW].tolist())
    return shown + (", ..." if len(indices) > _SHOW else "")


def as_features(x: ArrayLike, name: str) -> Features:
    """Check that ``x`` is a non-empty (N, d) float array with finite, non-zero rows."""
    data = _as_tensor(x, name)
    if data.ndim != 2:
        raise InvalidFeaturesError(
            f"{name} has shape {tuple(data.shape)}; expected (N, d), one row per item "
            "(reshape a single vector with x[None, :])"
        )
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise InvalidFeaturesError(
            f"{name} is empty (shape {tuple(data.shape)}); pass at least one item with d >= 1"
        )
    norms = torch.cat([
        torch.linalg.vector_norm(data[s:s + _CHECK_ROWS].float(), dim=1)
        for s in range(0, data.shape[0], _CHECK_ROWS)
    ])
    bad = torch.nonzero(~torch.isfinite(norms)).flatten().cpu()
    if len(bad):
        raise InvalidFeaturesError(
            f"{name} has {len(bad)} rows with NaN or inf values (or too large for float32), "
            f"rows {_first(bad)}; fix or drop those items before evaluating"
        )
    zero = torch.nonzero(norms == 0).flatten().cpu()
    if len(zero):
        raise InvalidFeaturesError(
            f"{name} has {len(zero)} all-zero rows, rows {_first(zero)}; cosine similarity is "
            "undefined for them, drop those items or check the encoder"
        )
    return Features(data, norms, name)


def as_labels(y: ArrayLike, n: int, name: str, items: str) -> np.ndarray:
    """Check that ``y`` holds one integer label per item of ``items`` (which has ``n`` rows)."""
    labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"{name} must be a 1-D integer array, got dtype {labels.dtype} and shape "
            f"{labels.shape} (map class names to integers first)"
        )
    if len(labels) != n:
        raise DimensionMismatchError(
            f"{name} has {len(labels)} labels but {items} has {n} rows; pass one label per row"
        )
    return np.ascontiguousarray(labels, dtype=np.int64)


def check_same_dim(a: Features, b: Features) -> None:
    if a.dim != b.dim:
        raise DimensionMismatchError(
            f"{a.name} has dimension {a.dim} but {b.name} has dimension {b.dim}; both must come "
            "from compatible models (same embedding size), e.g. project or upgrade one side"
        )


def check_same_shape(a: Features, b: Features) -> None:
    if a.data.shape != b.data.shape:
        raise DimensionMismatchError(
            f"{a.name} has shape {tuple(a.data.shape)} but {b.name} has shape "
            f"{tuple(b.data.shape)}; both must embed the same items with the same dimension"
        )


def check_order(order: ArrayLike, n: int) -> np.ndarray:
    """Check that ``order`` is a permutation of range(n) and return it as int64."""
    values = order.detach().cpu().numpy() if isinstance(order, torch.Tensor) else np.asarray(order)
    if values.ndim != 1 or values.dtype.kind not in "iu" or len(values) != n:
        raise InvalidArgumentError(
            f"order must be a 1-D integer permutation of the {n} gallery indices, got dtype "
            f"{values.dtype} and shape {values.shape}"
        )
    values = np.ascontiguousarray(values, dtype=np.int64)
    outside = np.flatnonzero((values < 0) | (values >= n))
    if len(outside):
        raise InvalidArgumentError(
            f"order has {len(outside)} entries outside [0, {n}), at positions "
            f"{_first(torch.from_numpy(outside))}; it must index the gallery rows"
        )
    missing = np.flatnonzero(np.bincount(values, minlength=n) == 0)
    if len(missing):
        raise InvalidArgumentError(
            f"order is not a permutation: {len(missing)} gallery indices never appear (e.g. "
            f"{_first(torch.from_numpy(missing))}) and others repeat; list every index once"
        )
    return values


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InvalidArgumentError(
            f"chunk_size must be a positive number of gallery rows or None (automatic from "
            f"the memory budget), got {chunk_size!r}"
        )


def check_leave_one_out(query: Features, query_labels: np.ndarray,
                        gallery: Features, gallery_labels: np.ndarray) -> None:
    if query.n != gallery.n or not np.array_equal(query_labels, gallery_labels):
        raise InvalidArgumentError(
            "leave_one_out=True needs the query set to be the gallery set (same items, same "
            f"labels, row i = item i), got {query.n} queries and {gallery.n} gallery items"
            + ("" if query.n != gallery.n else " with different labels")
        )


def validate_retrieval(query: ArrayLike, query_labels: ArrayLike, gallery: ArrayLike,
                       gallery_labels: ArrayLike, leave_one_out: bool = False,
                       names: tuple[str, str] = ("query", "gallery"),
                       ) -> tuple[Features, np.ndarray, Features, np.ndarray]:
    """The checks every labelled query/gallery entry point needs, in one place."""
    q = as_features(query, names[0])
    g = as_features(gallery, names[1])
    check_same_dim(q, g)
    ql = as_labels(query_labels, q.n, "query_labels", names[0])
    gl = as_labels(gallery_labels, g.n, "gallery_labels", names[1])
    if leave_one_out:
        check_leave_one_out(q, ql, g, gl)
        if g.n < 2:
            raise InvalidFeaturesError(
                "leave_one_out=True needs at least 2 items; with one item nothing is left to rank"
            )
    return q, ql, g, gl
