"""A run's evaluation, from plain records: the lifecycle table (o2o, n2o, n2u, n2n), BCT's
criterion, backfill curves per scheduler, each upgrade's cost per gallery item, and the
compatibility matrices of chains of three or more generations.

Galleries are named by where their features come from -- a generation's own gallery,
the gallery one generation embedded and the chain carried to another, or a hop outside
the chain -- so each (query generation, gallery) pair is evaluated once however many
rows and matrices read it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compatzoo import diagnostics
from compatzoo.components import OracleDistanceScheduler, RandomScheduler
from compatzoo.costs import count_macs
from compatzoo.interfaces import BackfillState, GalleryUpgrader, StoredGallery, match_dim
from compatzoo.lineage import ROOT, Lineage
from compatzoo.retrieval import backfill_curve, empirical_compatibility, evaluate, update_gain
from compatzoo.retrieval.compatibility import CompatibilityMatrix
from compatzoo.retrieval.distances import for_distance
from compatzoo.retrieval.revisited import revisited_backfill_curve, revisited_metrics

if TYPE_CHECKING:
    from compatzoo.engine import TrainedModel
    from compatzoo.experiment import Embeddings, FittedHop, RunData, Upgrades

log = logging.getLogger(__name__)

GalleryKey = tuple[str, ...]   # ("own", g) | ("carried", j, i) | ("direct", label)


class _Scores:
    """Metrics of (query generation, gallery) pairs, each computed once."""

    def __init__(self, lineage: Lineage, run: RunData, embeddings: dict[str, Embeddings],
                 upgrades: Upgrades):
        self.lineage, self.embeddings, self.upgrades = lineage, embeddings, upgrades
        self.metrics = tuple(lineage.spec.evaluation.metrics)
        self.without_positive = lineage.spec.evaluation.queries_without_positive
        self.distance = lineage.spec.evaluation.distance
        self.loo = run.leave_one_out
        self.query_labels = np.asarray(run.data.query.labels)
        self.gallery_labels = np.asarray(run.gallery_images.labels)
        self.relevance = run.data.relevance
        self._done: dict[tuple[str, GalleryKey], dict[str, float]] = {}

    @staticmethod
    def own(name: str) -> GalleryKey:
        return ("own", name)

    def carried(self, start: str, target: str) -> GalleryKey:
        """The gallery ``start`` embedded, carried to ``target``; a generation without a
        chain hop leaves it as it is, so the name resolves to where it last changed."""
        while target != start and self.lineage.chain_hop(target) is None:
            target = self.lineage.generations[target].previous
        return self.own(start) if target == start else ("carried", start, target)

    def features(self, key: GalleryKey) -> torch.Tensor:
        if key[0] == "own":
            return self.embeddings[key[1]].gallery
        if key[0] == "carried":
            return self.upgrades.carried[(key[1], key[2])].features
        return self.upgrades.direct[key[1]].features

    def __call__(self, query: str, key: GalleryKey) -> dict[str, float]:
        if (query, key) not in self._done:
            gallery = self.features(key)
            # Queries against a gallery of another width: BCT's first-d rule.
            self._done[(query, key)] = self._evaluate(
                match_dim(self.embeddings[query].query, gallery.shape[1]), gallery)
        return self._done[(query, key)]

    def adapted(self, label: str) -> dict[str, float]:
        """A query hop's row: its mapped queries against the untouched old gallery."""
        return self._evaluate(self.upgrades.queries[label], self.features(self.own(ROOT)))

    def _evaluate(self, queries: torch.Tensor, gallery: torch.Tensor) -> dict[str, float]:
        (queries,), (gallery,) = for_distance(self.distance, [queries], [gallery])
        if self.relevance is not None:
            return revisited_metrics(queries, gallery, list(self.relevance.gnd), self.metrics)
        return evaluate(queries, self.query_labels, gallery, self.gallery_labels,
                        metrics=self.metrics, leave_one_out=self.loo,
                        queries_without_positive=self.without_positive)


def evaluate_run(lineage: Lineage, run: RunData, models: dict[str, TrainedModel],
                 embeddings: dict[str, Embeddings], upgrades: Upgrades) -> dict[str, Any]:
    """The evaluation section of a run's results.

    n2u is new queries against the old gallery carried into the model's space by its
    chain's upgraders (BiCT's M_FCT, FCT's new/h(old, s)); with an upgrader, the
    not-yet-backfilled part of the gallery is that carried gallery. a2o is new queries
    mapped into the old space by a query upgrader, against the untouched old gallery.
    """
    spec = lineage.spec.evaluation
    metrics, primary = list(spec.metrics), spec.primary
    score = _Scores(lineage, run, embeddings, upgrades)
    table: dict[str, dict[str, float]] = {"o2o": score(ROOT, score.own(ROOT))}
    for name in lineage.new:
        table[f"n2o/{name}"] = score(name, score.own(ROOT))
        if lineage.has_upgrader(name):
            table[f"n2u/{name}"] = score(name, score.carried(ROOT, name))
        previous = lineage.generations[name].previous
        if previous != ROOT and lineage.chain_hop(name) is not None:
            table[f"n2u/{name}/from-{previous}"] = score(name, score.carried(previous, name))
        for hop in lineage.hops_into(name):
            if hop.maps_queries:
                table[f"a2o/{hop.label}"] = score.adapted(hop.label)
            elif not hop.in_chain:
                table[f"n2u/{hop.label}"] = score(name, ("direct", hop.label))
        table[f"n2n/{name}"] = score(name, score.own(name))

    o2o = table["o2o"][primary]
    criterion = {}
    for name in lineage.new:
        n2o = table[f"n2o/{name}"][primary]
        entry = {"compatible": empirical_compatibility(n2o, o2o)}
        if lineage.paragon is not None:
            entry["update_gain"] = update_gain(n2o, o2o, table[f"n2n/{lineage.paragon}"][primary])
        criterion[name] = entry

    result: dict[str, Any] = {"metrics": metrics, "primary": primary, "distance": spec.distance,
                              "leave_one_out": run.leave_one_out, "paragon": lineage.paragon,
                              "table": table, "criterion": criterion}
    if spec.backfill is not None:
        result["backfill"] = backfill_curves(lineage, run, models, embeddings, upgrades)
    side = side_information(lineage, run, embeddings, upgrades)
    if side:
        result["side_information"] = side
    if upgrades.hops:
        gallery = run.gallery_images
        result["upgrade_cost"] = {
            label: upgrade_cost(upgrades.hops[label], models[hop.target].encoder, gallery)
            for label, hop in lineage.hops.items()}
    sequential = {chain[-1]: chain_report(lineage, score, chain[-1], primary)
                  for chain in lineage.chains()}
    if sequential:
        result["sequential"] = sequential
    return result


def backfill_curves(lineage: Lineage, run: RunData, models: dict[str, TrainedModel],
                    embeddings: dict[str, Embeddings],
                    upgrades: Upgrades) -> dict[str, dict[str, Any]]:
    """One curve per (model, scheduler): from the stored gallery as the model's chain leaves
    it (the old one, or the carried one) to the fully backfilled one; NFR vs o2o."""
    spec = lineage.spec
    backfill = spec.evaluation.backfill
    metrics = tuple(spec.evaluation.metrics)
    without_positive = spec.evaluation.queries_without_positive
    query_labels = np.asarray(run.data.query.labels)
    gallery_labels = np.asarray(run.gallery_images.labels)
    old = embeddings[ROOT]
    schedulers = [(backfill.label(s), s.build()) for s in backfill.schedulers]
    curves: dict[str, dict[str, Any]] = {}
    for name in backfill.models or lineage.new:
        emb = embeddings[name]
        upgraded = lineage.has_upgrader(name)
        before = upgrades.carried[(ROOT, name)].features if upgraded else old.gallery
        if emb.query.shape[1] != before.shape[1]:
            log.warning("skipping the backfill curve of %s: its dim %d differs from the "
                        "stored gallery's %d (give it an upgrader)", name,
                        emb.query.shape[1], before.shape[1])
            continue
        hop = lineage.chain_hop(name)
        fitted = None if hop is None else upgrades.hops[hop.label]
        entering = (fitted.entering if fitted is not None else
                    upgrades.carried[(ROOT, lineage.generations[name].previous)]
                    if upgraded else None)
        wanted = frozenset().union(*(s.needs_signals for _, s in schedulers))
        state = BackfillState(
            old_features=old.gallery.numpy(), new_features=emb.gallery.numpy(),
            new_head=models[name].head, upgraded=before.numpy() if upgraded else None,
            side=None if entering is None or entering.side is None else entering.side.numpy(),
            signals=fitted.upgrader.signals(entering) if fitted is not None and wanted else {})
        curves[name] = {}
        orders: dict[str, np.ndarray] = {}
        # One ranking mixes the stored and the new gallery: lifted together (one radius).
        (query, query_old), (stored, new_gallery, old_gallery) = for_distance(
            spec.evaluation.distance, [emb.query, old.query], [before, emb.gallery, old.gallery])
        for label, scheduler in schedulers:
            order = orders[label] = scheduler.order(state, seed=spec.seed)
            if run.data.relevance is not None:
                curve = revisited_backfill_curve(query, stored, new_gallery,
                                                 list(run.data.relevance.gnd), order,
                                                 backfill.points, metrics)
                curves[name][label] = {**curve.to_dict(), "oracle": type(scheduler).is_oracle}
                continue
            curve = backfill_curve(query, stored, new_gallery, query_labels, gallery_labels,
                                   order, points=backfill.points, metrics=metrics,
                                   query_old=query_old, nfr_k=tuple(backfill.nfr_k),
                                   leave_one_out=run.leave_one_out,
                                   reference_gallery=old_gallery,
                                   queries_without_positive=without_positive)
            curves[name][label] = {**curve.to_dict(), "oracle": type(scheduler).is_oracle}
        order_diagnostics(curves[name], orders, schedulers, state, (query, stored),
                          (query_old, old_gallery), run, spec.evaluation.primary)
    return curves


def order_diagnostics(curves: dict[str, Any], orders: dict[str, np.ndarray],
                      schedulers: list, state: BackfillState,
                      searched: tuple[torch.Tensor, torch.Tensor],
                      reference: tuple[torch.Tensor, torch.Tensor], run: RunData,
                      primary: str) -> None:
    """Adds ``diagnostics`` to each of one model's curves but the random one (see
    :func:`compatzoo.diagnostics.backfill_diagnostics`): Spearman of the order's priority
    with the true error (``true_error``: raw distance, the default oracle-distance's;
    ``true_error_cosine``: between unit rows) and with flip involvement, and the share of
    the first oracle-distance curve's AUC gain over random that the order captures.
    ``searched`` (new queries, stored gallery) and ``reference`` (old queries, old gallery)
    are the features the curve searched, so flips are counted under the same distance."""
    if all(isinstance(s, RandomScheduler) for _, s in schedulers):
        return
    stored = state.upgraded if state.upgraded is not None else state.old_features
    errors = {"true_error": diagnostics.true_error(stored, state.new_features),
              "true_error_cosine": diagnostics.true_error(stored, state.new_features,
                                                          normalize=True)}
    flips, why = None, None
    if run.data.relevance is not None:
        why = "the revisited protocol has no labels to count flips with"
    else:
        flips = diagnostics.flip_involvement(
            *searched, *reference, np.asarray(run.data.query.labels),
            np.asarray(run.gallery_images.labels), leave_one_out=run.leave_one_out)
    random = next((label for label, s in schedulers if isinstance(s, RandomScheduler)), None)
    oracle = next((label for label, s in schedulers
                   if isinstance(s, OracleDistanceScheduler)), None)
    aucs = {label: curve["auc"].get(primary) for label, curve in curves.items()}
    found = diagnostics.backfill_diagnostics(orders, aucs, errors, flips, random, oracle,
                                             flips_reason=why)
    for label, entry in found.items():
        curves[label]["diagnostics"] = entry


def side_information(lineage: Lineage, run: RunData, embeddings: dict[str, Embeddings],
                     upgrades: Upgrades) -> dict[str, dict[str, Any]]:
    """Per hop whose stored gallery carries side information: leave-one-out 1-NN label
    accuracy of that side information on its own, beside the stored embeddings', the
    target model's and chance (:func:`compatzoo.diagnostics.side_information_report`)."""
    labels = np.asarray(run.gallery_images.labels)
    out: dict[str, dict[str, Any]] = {}
    for label, fitted in upgrades.hops.items():
        side = fitted.entering.side
        if side is None or fitted.hop.maps_queries:
            continue
        if run.data.relevance is not None:
            out[label] = {"side_knn_accuracy": None,
                          "reason": "the revisited protocol's gallery labels are bookkeeping"}
            continue
        out[label] = diagnostics.side_information_report(
            side, fitted.entering.features, embeddings[fitted.hop.target].gallery, labels)
    return out


# --------------------------------------------------------------------------- costs
def upgrade_cost(fitted: FittedHop, encoder: nn.Module, gallery_images) -> dict[str, float]:
    """Per gallery item: MACs of the hop vs re-embedding the image, and bytes stored. A
    query hop costs per query instead: its MACs on top of embedding the query image."""
    device = next(encoder.parameters()).device
    images, _ = gallery_images.get_batch([0, 1])
    if fitted.hop.maps_queries:
        return {"adapt_macs_per_query": advance_macs(fitted.upgrader, fitted.entering),
                "embed_macs_per_query": count_macs(encoder, images.to(device))}
    return {"upgrade_macs_per_item": advance_macs(fitted.upgrader, fitted.entering),
            "reembed_macs_per_item": count_macs(encoder, images.to(device)),
            **stored_bytes(fitted.upgrader, fitted.entering),
            "new_bytes_per_item": 4 * encoder.embedding_dim}


def advance_macs(upgrader: GalleryUpgrader, stored: StoredGallery) -> int:
    """Multiply-accumulates of carrying one stored item one generation on (everything
    ``advance`` runs, e.g. FCT's h and g)."""

    class _Advance(nn.Module):
        def __init__(self):
            super().__init__()
            self.upgrader = upgrader

        def forward(self, features, side, previous):
            return self.upgrader.advance(StoredGallery(features, side, previous))

    def head(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:2]

    return count_macs(_Advance(), head(stored.features), head(stored.side),
                      head(stored.previous))


def stored_bytes(upgrader: GalleryUpgrader, stored: StoredGallery) -> dict[str, int]:
    """Bytes per item that must stay stored for this hop (float32)."""
    side = 0 if stored.side is None else stored.side.shape[1]
    extra = (stored.previous.shape[1]
             if stored.previous is not None and upgrader.reads_previous
             else 0)
    return {"stored_bytes_per_item": 4 * (stored.features.shape[1] + side + extra),
            "side_bytes_per_item": 4 * side, "previous_copy_bytes_per_item": 4 * extra}


# --------------------------------------------------------------------------- chains
def chain_report(lineage: Lineage, score: _Scores, leaf: str, metric: str) -> dict[str, Any]:
    """The compatibility matrices of one chain ``old -> ... -> leaf``.

    ``backfilled[i][j]``: model i's queries against model j's own gallery (BCT, RACT;
    average compatibility and multi-model accuracy as in METHODS.md). With upgraders also
    ``upgraded[i][k]`` (k <= i): model i's queries against the old gallery carried to
    generation k, never re-embedded (BiCT eq. 2 reads along it), and ``carried[i][j]``
    (j <= i): against the gallery embedded by model j and carried to i (FCT table 5).
    """
    names = lineage.path(leaf)
    backfilled = lower_triangle(
        names, lambda i, j: score(names[i], score.own(names[j]))[metric], metric, full=True)
    report: dict[str, Any] = {"models": names, "backfilled": backfilled.to_dict()}
    if lineage.has_upgrader(leaf):
        upgraded = lower_triangle(
            names, lambda i, k: score(names[i], score.carried(ROOT, names[k]))[metric], metric)
        carried = lower_triangle(
            names, lambda i, j: score(names[i], score.carried(names[j], names[i]))[metric],
            metric)
        report.update(upgraded=upgraded.to_dict(), carried=carried.to_dict(),
                      upgrade_path=upgrade_path(upgraded))
    return report


def lower_triangle(names: list[str], value: Callable[[int, int], float],
                   metric: str, full: bool = False) -> CompatibilityMatrix:
    """``M[i][j] = value(i, j)`` for j <= i (all j when ``full``); NaN elsewhere."""
    n = len(names)
    values = [[value(i, j) if full or j <= i else math.nan for j in range(n)]
              for i in range(n)]
    return CompatibilityMatrix(list(names), values, metric)


def upgrade_path(matrix: CompatibilityMatrix) -> dict[str, Any]:
    """BiCT eq. 2 along a chain whose gallery is never re-embedded:
    ``M[0][0] < M[1][0] < M[1][1] < M[2][1] < M[2][2] ...`` (query upgrade, then gallery
    upgrade, generation by generation)."""
    names, m = matrix.names, matrix.values
    steps = [(0, 0)]
    for i in range(1, len(names)):
        steps += [(i, i - 1), (i, i)]
    values = [m[i][k] for i, k in steps]
    return {"steps": [{"query": names[i], "gallery": names[k], "value": v}
                      for (i, k), v in zip(steps, values)],
            "increasing": bool(all(b > a for a, b in zip(values, values[1:])))}
