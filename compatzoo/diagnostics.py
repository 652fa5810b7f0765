"""Diagnostics of learned backfill orders and of side information, on plain arrays.

They answer why an ordering does or does not beat random: does the scheduler's priority
follow the error it should find (:func:`true_error`), does it put the items that cause
negative flips first (:func:`flip_involvement`), how much of the oracle's gain over random
does it reach (:func:`oracle_gain_captured`), and does the side information stored beside
the gallery carry label information at all (:func:`side_knn_accuracy`).

Every correlation is Spearman's rho on average ranks (:func:`spearman`); a scheduler's
priority for an item is minus its position in the order (:func:`priority`), so rho > 0
means "backfills the items with the larger value first". Undefined values are NaN here;
:func:`backfill_diagnostics` and :func:`side_information_report` turn them into None (JSON
null) with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from compatzoo.components import true_error  # noqa: F401  (the oracle's distance)

#: |AUC_oracle - AUC_random| below this leaves the captured fraction undefined.
GAIN_EPS = 1e-6


# --------------------------------------------------------------------------- Spearman
def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (ascending); tied values share the mean of their ranks."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # runs of equal values: [start, stop) in sorted position
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    stops = np.r_[starts[1:], len(x)]
    mean_rank = (starts + stops + 1) / 2.0            # mean of start+1 .. stop
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, stops - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks of ``a`` and ``b``
    (ties handled as in ``scipy.stats.spearmanr``). NaN when fewer than two items or when
    either input is constant (no ranking to correlate)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if len(a) != len(b):
        raise ValueError(f"spearman needs two arrays of one length; got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    da, db = ra - ra.mean(), rb - rb.mean()
    saa, sbb = float(da @ da), float(db @ db)
    if saa == 0.0 or sbb == 0.0:
        return math.nan
    # sqrt(s * s) == s exactly in IEEE arithmetic, so identical rankings give exactly 1.0
    return float(np.clip((da @ db) / math.sqrt(saa * sbb), -1.0, 1.0))


def priority(order: np.ndarray) -> np.ndarray:
    """Per item, minus its position in ``order`` (a permutation; first = highest priority)."""
    order = np.asarray(order).reshape(-1)
    out = np.empty(len(order), dtype=np.float64)
    out[order] = -np.arange(len(order), dtype=np.float64)
    return out


# --------------------------------------------------------------------------- targets
def nearest(query: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor,
            leave_one_out: bool = False) -> np.ndarray:
    """Index of each query's cosine-nearest gallery item (ties: lowest index). With
    ``leave_one_out`` the query set is the gallery and item i is not its own neighbour."""
    from compatzoo.retrieval import top_k

    k = 2 if leave_one_out else 1
    _, index = top_k(query, gallery, k=min(k, len(gallery)))
    if not leave_one_out:
        return index[:, 0]
    own = index[:, 0] == np.arange(len(index))
    return np.where(own, index[:, -1], index[:, 0])


def flip_involvement(query_new, stored, query_old, gallery_old, query_labels, gallery_labels,
                     leave_one_out: bool = False) -> np.ndarray:
    """Per gallery item, the negative flips at 0 % backfilled in which it is the wrong
    top-1 neighbour.

    ``count[j] = #{q : label(nn_old(q)) == label(q), nn_stored(q) == j, label(j) != label(q)}``
    where ``nn_old`` is the old query's nearest neighbour in the old gallery (o2o) and
    ``nn_stored`` the new query's nearest neighbour in the stored gallery (upgraded, or old
    when there is no upgrader); cosine similarity, ties to the lower index. The counts sum to
    the NFR@1 numerator of the backfill curve's first point; re-embedding item j is what
    can move it out of those queries' top 1 (only the impostor is counted, not the
    displaced true match).
    """
    ql, gl = np.asarray(query_labels).reshape(-1), np.asarray(gallery_labels).reshape(-1)
    before = nearest(query_old, gallery_old, leave_one_out)
    now = nearest(query_new, stored, leave_one_out)
    flipped = (gl[before] == ql) & (gl[now] != ql)
    return np.bincount(now[flipped], minlength=len(gl))


# --------------------------------------------------------------------------- AUC gain
def oracle_gain_captured(auc_scheduler: float | None, auc_random: float | None,
                         auc_oracle: float | None,
                         eps: float = GAIN_EPS) -> tuple[float | None, str | None]:
    """``(AUC_scheduler - AUC_random) / (AUC_oracle - AUC_random)`` and None, or None and
    why it is undefined: a missing AUC, or an oracle that gains no more than ``eps`` over
    random (then the fraction is noise or meaningless). 1 = as good as the oracle, 0 = no
    better than random, < 0 = worse than random."""
    if auc_scheduler is None or auc_random is None or auc_oracle is None or any(
            math.isnan(v) for v in (auc_scheduler, auc_random, auc_oracle)):
        return None, "an AUC is undefined"
    gain = auc_oracle - auc_random
    if gain <= eps:
        return None, (f"the oracle's AUC gain over random is {gain:.2e} (not above {eps:g}): "
                      "there is no gain to capture")
    return (auc_scheduler - auc_random) / gain, None


# --------------------------------------------------------------------------- side info
def side_knn_accuracy(features: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    """Leave-one-out 1-NN label accuracy (cosine) of ``features`` with ``labels``: cmc@1 of
    each item against all the others. Items whose label no other item has are left out
    (they cannot be classified by a neighbour); NaN when none remain."""
    from compatzoo.retrieval import evaluate

    return float(evaluate(features, labels, features, labels, metrics=("cmc@1",),
                          leave_one_out=True, queries_without_positive="skip")["cmc@1"])


def chance_knn_accuracy(labels: np.ndarray) -> float:
    """Expected :func:`side_knn_accuracy` of a neighbour drawn at random: the mean over the
    same items of ``(n_label - 1) / (N - 1)``."""
    labels = np.asarray(labels).reshape(-1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    same = counts[inverse] - 1
    kept = same > 0
    return float(np.mean(same[kept] / (len(labels) - 1))) if kept.any() else math.nan


# --------------------------------------------------------------------------- reports
def _json(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def backfill_diagnostics(orders: Mapping[str, np.ndarray], aucs: Mapping[str, float | None],
                         errors: Mapping[str, np.ndarray], flips: np.ndarray | None,
                         random: str | None, oracle: str | None,
                         flips_reason: str | None = None) -> dict[str, dict[str, Any]]:
    """The ``diagnostics`` of each curve of one model but the ``random`` one.

    ``orders`` and ``aucs`` (primary metric) by curve label; ``errors`` names per-item
    true errors (``spearman_<name>`` each); ``flips`` from :func:`flip_involvement`, None
    when the protocol has no labels (``flips_reason`` says so); ``random`` / ``oracle``
    the labels of the reference curves, None when absent. Every null field has a reason
    under ``reasons``.
    """
    out: dict[str, dict[str, Any]] = {}
    for label, order in orders.items():
        if label == random:
            continue
        prio = priority(order)
        entry: dict[str, Any] = {}
        reasons: dict[str, str] = {}
        for name, error in errors.items():
            entry[f"spearman_{name}"] = _json(spearman(prio, error))
            if entry[f"spearman_{name}"] is None:
                reasons[f"spearman_{name}"] = "the error is the same for every item"
        if flips is None:
            entry["spearman_flips"], entry["flips_at_start"] = None, None
            reasons["spearman_flips"] = flips_reason or "no labels to count flips with"
        else:
            entry["flips_at_start"] = int(flips.sum())
            entry["spearman_flips"] = _json(spearman(prio, flips))
            if entry["spearman_flips"] is None:
                reasons["spearman_flips"] = "no negative flip at 0% backfilled"
        entry["oracle"], entry["random"] = oracle, random
        if random is None or oracle is None:
            entry["oracle_gain_captured"] = None
            reasons["oracle_gain_captured"] = ("needs a random and an oracle-distance curve "
                                               "of this model")
        else:
            value, why = oracle_gain_captured(aucs.get(label), aucs.get(random),
                                              aucs.get(oracle))
            entry["oracle_gain_captured"] = value
            if why is not None:
                reasons["oracle_gain_captured"] = why
        entry["reasons"] = reasons
        out[label] = entry
    return out


def side_information_report(side, stored, new, labels) -> dict[str, Any]:
    """Whether stored side information says anything about labels on its own: leave-one-out
    1-NN accuracy of the side features, beside the same for the stored embeddings it sits
    with, the new model's embeddings and a random neighbour (chance)."""
    labels = np.asarray(labels).reshape(-1)
    return {"k": 1, "items": len(labels), "side_dim": int(side.shape[1]),
            "side_knn_accuracy": _json(side_knn_accuracy(side, labels)),
            "stored_knn_accuracy": _json(side_knn_accuracy(stored, labels)),
            "new_knn_accuracy": _json(side_knn_accuracy(new, labels)),
            "chance": _json(chance_knn_accuracy(labels))}
