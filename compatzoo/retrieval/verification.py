"""Face-style verification (TAR@FAR, 1:1) and open-set identification (TPIR@FPIR, 1:N).

Thresholds are set on the negatives so the achieved false rate never exceeds the
target: with n negatives and target f, at most m = floor(f * n) of them may be accepted,
so the threshold is the (m+1)-th highest negative score and a score is accepted when it
is strictly above it (equivalently ">= a threshold just above it"). Ties never push the
false rate over the target. Both functions return {target: rate}.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from compatzoo.retrieval.search import TorchBackend, normalised, search, similarity
from compatzoo.retrieval.validation import (
    ArrayLike, Features, InvalidArgumentError, as_features, as_labels, check_chunk_size,
    check_same_shape, validate_retrieval,
)

_PAIR_ROWS = 4096  # rows (or pairs) scored at a time


def _check_targets(targets: Sequence[float], name: str) -> list[float]:
    values = [float(t) for t in ([targets] if np.isscalar(targets) else targets)]
    if not values or any(not 0.0 < t <= 1.0 for t in values):
        raise InvalidArgumentError(
            f"{name} must be rates in (0, 1], e.g. (1e-4, 1e-3); got {targets!r}"
        )
    return values


def _accept_rates(positives: torch.Tensor, top_negatives: torch.Tensor, n_negatives: int,
                  targets: list[float]) -> dict[float, float]:
    """Share of ``positives`` above the threshold for each false-accept target.

    ``top_negatives``: the highest negative scores, descending (at least
    floor(max(targets) * n_negatives) + 1 of them, or all).
    """
    rates = {}
    for target in targets:
        allowed = int(np.floor(target * n_negatives + 1e-9))
        threshold = top_negatives[allowed] if allowed < n_negatives else -torch.inf
        rates[target] = float((positives > threshold).double().mean())
    return rates


def _pair_scores(a: Features, b: Features, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    cpu = torch.device("cpu")
    return torch.cat([
        (normalised(a, i[s:s + _PAIR_ROWS], cpu) * normalised(b, j[s:s + _PAIR_ROWS], cpu)).sum(1)
        for s in range(0, len(i), _PAIR_ROWS)
    ]) if len(i) else torch.empty(0)


def _all_pair_scores(a: Features, b: Features, labels: torch.Tensor, keep: int,
                     cross: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Genuine scores, the ``keep`` best impostor scores (descending) and the impostor count
    over all pairs: i < j of one model, or i != j across two models (a_i vs b_j)."""
    device = TorchBackend().device
    labels = labels.to(device)
    genuine, top = [], torch.empty(0, device=device)
    n_impostors = 0
    for start in range(0, a.n, _PAIR_ROWS):
        rows = torch.arange(start, min(start + _PAIR_ROWS, a.n), device=device)
        query = normalised(a, slice(start, start + len(rows)), device)
        for col in range(0 if cross else start, b.n, _PAIR_ROWS):
            cols = torch.arange(col, min(col + _PAIR_ROWS, b.n), device=device)
            scores = similarity(query, normalised(b, slice(col, col + len(cols)), device))
            valid = cols[None, :] != rows[:, None] if cross else cols[None, :] > rows[:, None]
            same = labels[rows][:, None] == labels[cols][None, :]
            genuine.append(scores[valid & same])
            impostors = scores[valid & ~same]
            n_impostors += len(impostors)
            top = torch.cat([top, impostors])
            top = torch.topk(top, min(keep, len(top))).values
    return torch.cat(genuine).cpu(), top.cpu(), n_impostors


def tar_at_far(features: ArrayLike, labels: ArrayLike | None,
               far_targets: Sequence[float] = (1e-4, 1e-3),
               pairs: ArrayLike | None = None,
               features_b: ArrayLike | None = None) -> dict[float, float]:
    """True accept rate at each false accept rate (1:1 verification, cosine scores).

    Without ``pairs``: all pairs i < j, genuine when labels match. With ``features_b``
    (cross test, e.g. new-model probes vs old-model templates) pair (i, j) scores
    features[i] against features_b[j], over all i != j. ``pairs``: rows (i, j, same)
    to score instead (labels are then not needed).
    """
    targets = _check_targets(far_targets, "far_targets")
    a = as_features(features, "features")
    b = a if features_b is None else as_features(features_b, "features_b")
    check_same_shape(a, b)
    if pairs is None:
        if labels is None:
            raise InvalidArgumentError(
                "labels are needed to form pairs; or pass pairs=(i, j, same)"
            )
        y = torch.from_numpy(as_labels(labels, a.n, "labels", "features"))
        keep = int(np.floor(max(targets) * a.n * b.n)) + 1
        genuine, top, n_impostors = _all_pair_scores(a, b, y, keep, features_b is not None)
    else:
        table = np.asarray(pairs)
        if table.ndim != 2 or table.shape[1] != 3 or table.dtype.kind not in "iub":
            raise InvalidArgumentError(
                f"pairs must be an integer array of rows (i, j, same), got shape {table.shape}"
            )
        table = table.astype(np.int64)
        if table.size and (table[:, :2].min() < 0 or table[:, :2].max() >= a.n):
            raise InvalidArgumentError(f"pairs index items outside [0, {a.n})")
        i, j, same = torch.from_numpy(table).T
        scores = _pair_scores(a, b, i, j)
        genuine, impostors = scores[same != 0], scores[same == 0]
        n_impostors = len(impostors)
        top = torch.sort(impostors, descending=True).values
    if not len(genuine) or not n_impostors:
        raise InvalidArgumentError(
            f"TAR@FAR needs genuine and impostor pairs, got {len(genuine)} genuine and "
            f"{n_impostors} impostor pairs; check the labels or pairs"
        )
    return _accept_rates(genuine, top, n_impostors, targets)


def tpir_at_fpir(probe: ArrayLike, probe_labels: ArrayLike, gallery: ArrayLike,
                 gallery_labels: ArrayLike, fpir_targets: Sequence[float] = (1e-2, 1e-1),
                 rank: int = 1, backend: str = "auto",
                 chunk_size: int | None = None) -> dict[float, float]:
    """True positive identification rate at each false positive identification rate.

    Probes whose identity is absent from the gallery are non-mated; FPIR is the share of
    them whose top score passes the threshold. A mated probe counts for TPIR when its
    identity is among the ``rank`` best gallery identities (an identity scores its best
    item) and that score passes the threshold.
    """
    targets = _check_targets(fpir_targets, "fpir_targets")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidArgumentError(f"rank must be a positive integer, got {rank!r}")
    check_chunk_size(chunk_size)
    p, pl, g, gl = validate_retrieval(probe, probe_labels, gallery, gallery_labels,
                                      names=("probe", "gallery"))
    mated = torch.from_numpy(np.isin(pl, gl))
    if mated.all() or not mated.any():
        raise InvalidArgumentError(
            f"TPIR@FPIR needs mated and non-mated probes, got {int(mated.sum())} mated of "
            f"{len(mated)}; non-mated probes are those whose label is absent from the gallery"
        )
    depth = min(g.n, rank * int(np.unique(gl, return_counts=True)[1].max()))
    scores, index = search(p, g, depth, backend, chunk_size)
    found = torch.from_numpy(gl)[index]
    order = torch.sort(found, dim=1, stable=True)
    new_identity = torch.ones_like(found, dtype=torch.bool)
    new_identity[:, 1:] = order.values[:, 1:] != order.values[:, :-1]
    first_of_identity = torch.zeros_like(new_identity).scatter(1, order.indices, new_identity)
    identity_rank = torch.cumsum(first_of_identity, dim=1)  # 1-based rank of each item's identity
    is_true = found == torch.from_numpy(pl)[:, None]
    at = torch.argmax(is_true.int(), dim=1)  # first item of the true identity
    rows = torch.arange(len(at))
    hit = is_true[rows, at] & (identity_rank[rows, at] <= rank)
    true_scores = torch.where(hit, scores[rows, at], -torch.inf)
    negatives = torch.sort(scores[~mated, 0], descending=True).values
    return _accept_rates(true_scores[mated], negatives, len(negatives), targets)
