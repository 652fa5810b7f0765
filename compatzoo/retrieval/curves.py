"""Backfill curves: accuracy and negative flips while the gallery is re-embedded.

All points of a curve come from one pass over each version of the gallery: every item
is scored once with its old and once with its new embedding, and each point combines the
prefix of new rows and the suffix of old rows that meet at its cut (see
:class:`compatzoo.retrieval.search.Plan`), so a 21-point curve costs about two
evaluations, not 21. Full-ranking metrics count ranks in two such passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compatzoo.errors import DimensionMismatchError
from compatzoo.retrieval.evaluation import check_without_positive, query_values, summarise
from compatzoo.retrieval.metrics import parse_metrics
from compatzoo.retrieval.search import Plan
from compatzoo.retrieval.validation import (
    ArrayLike, InvalidArgumentError, as_features, check_order, check_same_dim, check_same_shape,
    validate_retrieval,
)


def json_safe(value: float) -> float | None:
    """NaN (undefined, e.g. no query was right before the upgrade) becomes JSON null."""
    return None if math.isnan(value) else value


@dataclass
class BackfillCurve:
    """Metrics (and NFR@k when old queries were given) per backfilled fraction.

    ``auc`` is the mean of each metric over the points, FastFill's area under the
    backfill curve (points are evenly spaced).
    """

    fractions: list[float]
    metrics: dict[str, list[float]]
    nfr: dict[int, list[float]] = field(default_factory=dict)
    auc: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes null, NFR keys become strings; no "nfr" without it."""
        data = {
            "fractions": list(self.fractions),
            "metrics": {n: [json_safe(v) for v in vs] for n, vs in self.metrics.items()},
            "auc": {n: json_safe(v) for n, v in self.auc.items()},
        }
        if self.nfr:
            data["nfr"] = {str(k): [json_safe(v) for v in vs] for k, vs in self.nfr.items()}
        return data

    def plot(self, path: str | Path, reference: dict[str, float] | None = None) -> Path:
        """Draw metrics (and NFR) against the backfilled fraction into a PNG at ``path``.

        ``reference`` draws labelled horizontal lines, e.g. {"o2o": 0.31, "n2n": 0.62}.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

        panels = 2 if self.nfr else 1
        figure = Figure(figsize=(6 * panels, 4.5))
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, panels, squeeze=False)[0]
        for name, values in self.metrics.items():
            axes[0].plot(self.fractions, values, marker="o", ms=3,
                         label=f"{name} (AUC {self.auc[name]:.3f})")
        for (name, value), style in zip((reference or {}).items(), ("--", ":", "-.") * 10):
            axes[0].axhline(value, color="grey", linestyle=style, label=f"{name} {value:.3f}")
        axes[0].set(xlabel="backfilled fraction of the gallery", ylabel="metric",
                    title="Backfill curve")
        for k, values in self.nfr.items():
            axes[-1].plot(self.fractions, values, marker="o", ms=3, label=f"NFR@{k}")
        if self.nfr:
            axes[-1].set(xlabel="backfilled fraction of the gallery", ylabel="negative flip rate",
                         title="Negative flips vs old model", ylim=(0, None))
        for axis in axes:
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=120)
        return path


def _check_curve_args(points: int, nfr_k: Sequence[int]) -> list[int]:
    if not isinstance(points, int) or points < 2:
        raise InvalidArgumentError(f"points must be an integer >= 2 (0% and 100%), got {points!r}")
    ks = [nfr_k] if isinstance(nfr_k, int) else list(nfr_k)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise InvalidArgumentError(f"nfr_k must be positive integers, e.g. (1, 5), got {nfr_k!r}")
    return sorted(set(ks))


def backfill_curve(query_new: ArrayLike, gallery_old: ArrayLike, gallery_new: ArrayLike,
                   query_labels: ArrayLike, gallery_labels: ArrayLike, order: ArrayLike,
                   points: int = 21, metrics: Sequence[str] = ("map@100", "cmc@1"),
                   query_old: ArrayLike | None = None, nfr_k: Sequence[int] = (1,),
                   backend: str = "auto", leave_one_out: bool = False,
                   chunk_size: int | None = None,
                   reference_gallery: ArrayLike | None = None,
                   queries_without_positive: str = "skip") -> BackfillCurve:
    """Metrics of new queries against a gallery being backfilled in ``order``.

    At fraction f (``points`` evenly spaced in [0, 1]) the first round(f * G) gallery
    items of ``order`` (Python rounding, half to even) use ``gallery_new``, the others
    ``gallery_old``. With ``query_old``, NFR@k per point is the share of queries right in
    the top k before the upgrade (query_old vs gallery_old) that are wrong at that point.
    ``leave_one_out``: the queries are the gallery items themselves (FCT protocol); each
    is left out of its own ranking, old and new reference alike.
    ``reference_gallery``: the gallery of the NFR reference state when it is not
    ``gallery_old`` -- e.g. the raw old embeddings when ``gallery_old`` holds their
    upgraded versions psi(old), so flips are still counted against o2o.
    ``queries_without_positive``: ``skip`` or ``miss``, see :func:`evaluate`.
    """
    parsed = parse_metrics(metrics)
    check_without_positive(queries_without_positive)
    ks = _check_curve_args(points, nfr_k)
    q, ql, old, gl = validate_retrieval(query_new, query_labels, gallery_old, gallery_labels,
                                        leave_one_out, names=("query_new", "gallery_old"))
    new = as_features(gallery_new, "gallery_new")
    check_same_shape(old, new)
    permutation = torch.from_numpy(check_order(order, old.n))
    reference = None
    reference_plan = Plan(old)
    if reference_gallery is not None:
        stored = as_features(reference_gallery, "reference_gallery")
        if stored.n != old.n:
            raise DimensionMismatchError(
                f"reference_gallery has {stored.n} rows but the gallery has {old.n}; give the "
                "stored embeddings of the same gallery items, row for row")
        reference_plan = Plan(stored)
    if query_old is not None:
        reference = as_features(query_old, "query_old")
        check_same_dim(reference, reference_plan.old)
        if reference.n != q.n:
            raise DimensionMismatchError(
                f"query_old has {reference.n} rows but query_new has {q.n}; both must embed "
                "the same queries, row for row"
            )

    fractions = np.linspace(0.0, 1.0, points).tolist()
    cuts = tuple(round(f * old.n) for f in fractions)
    plan = Plan(old, new, permutation, cuts)
    states = query_values(q, ql, plan, gl, parsed, leave_one_out, backend, chunk_size,
                          extra_k=ks if reference is not None else ())
    per_point = [summarise(parsed, values, queries_without_positive) for values in states]
    values = {m.name: [point[m.name] for point in per_point] for m in parsed}
    curve = BackfillCurve(fractions, values, auc={n: float(np.mean(v)) for n, v in values.items()})
    if reference is not None:
        before = query_values(reference, ql, reference_plan, gl, [], leave_one_out, backend,
                              chunk_size, extra_k=ks)[0]
        for k in ks:
            right = before[f"correct@{k}"]
            curve.nfr[k] = [float((right & ~values[f"correct@{k}"]).sum() / right.sum())
                            if right.any() else math.nan for values in states]
    return curve
