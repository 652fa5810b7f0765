"""Revisited Oxford/Paris evaluation (Radenovic et al. 2018), as revisitop's ``compute_map``.

Per query the ground truth lists easy, hard and junk gallery indices. Protocols:
easy (positives easy; junk: junk + hard), medium (positives easy + hard; junk: junk),
hard (positives hard; junk: junk + easy). Junk items are removed from the ranking, then AP
uses revisitop's trapezoidal precision. Queries without positives are left out of the
mean, as in revisitop. Values are fractions (revisitop prints them x100).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from compatzoo.errors import DatasetError
from compatzoo.retrieval.ranking import count_ranks
from compatzoo.retrieval.search import Plan, TorchBackend, auto_chunk_rows, normalised, query_blocks
from compatzoo.retrieval.validation import (
    ArrayLike, InvalidArgumentError, as_features, check_chunk_size, check_same_dim,
)
from compatzoo.safe_pickle import load_data_pickle

PROTOCOLS = {  # name -> (positive lists, junk lists)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
#: metric names of a run on a dataset with per-query ground truth: revisitop mAP per protocol
REVISITED_METRICS = tuple(f"rmap-{protocol}" for protocol in PROTOCOLS)


def _check_gnd(gnd: list, gallery_size: int | None, source: str) -> list[dict[str, np.ndarray]]:
    entries = []
    for i, entry in enumerate(gnd):
        if not isinstance(entry, dict) or not {"easy", "hard", "junk"} <= set(entry):
            raise DatasetError(
                f"{source}: gnd[{i}] must be a dict with 'easy', 'hard' and 'junk' index lists"
            )
        lists = {key: np.asarray(entry[key], dtype=np.int64).reshape(-1)
                 for key in ("easy", "hard", "junk")}
        for key, values in lists.items():
            if gallery_size is not None and len(values) and (
                    values.min() < 0 or values.max() >= gallery_size):
                raise DatasetError(
                    f"{source}: gnd[{i}]['{key}'] has indices outside the {gallery_size} "
                    "gallery images; the ground truth does not match this gallery"
                )
        entries.append(lists)
    return entries


def load_revisited_gnd(path: str | Path) -> dict:
    """Read ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (never running pickled code)."""
    data = load_data_pickle(path)
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise DatasetError(
            f"{path} is not a revisitop ground-truth file: expected a dict with 'imlist', "
            "'qimlist' and 'gnd'; download gnd_roxford5k.pkl / gnd_rparis6k.pkl again"
        )
    if len(data["gnd"]) != len(data["qimlist"]):
        raise DatasetError(
            f"{path}: {len(data['gnd'])} ground-truth entries for {len(data['qimlist'])} queries"
        )
    _check_gnd(data["gnd"], len(data["imlist"]), str(path))
    return data


def revisitop_ap(positions: np.ndarray, n_positives: int) -> float:
    """revisitop's ``compute_ap``: trapezoid between the precisions before and at each hit.

    ``positions``: ascending 0-based ranks of the positives after junk removal.
    """
    hits_before = np.arange(len(positions), dtype=np.float64)
    before = np.where(positions == 0, 1.0, hits_before / np.maximum(positions, 1))
    at = (hits_before + 1) / (positions + 1)
    return float(((before + at) / 2).sum() / n_positives)


def evaluate_revisited(query: ArrayLike, gallery: ArrayLike, gnd: dict | list,
                       chunk_size: int | None = None) -> dict[str, float]:
    """mAP for the easy, medium and hard protocols of revisited Oxford/Paris.

    ``gnd`` is what :func:`load_revisited_gnd` returns (or its 'gnd' list); ``query``
    rows follow its 'qimlist', ``gallery`` rows its 'imlist'.
    """
    check_chunk_size(chunk_size)
    q = as_features(query, "query")
    g = as_features(gallery, "gallery")
    check_same_dim(q, g)
    if isinstance(gnd, dict):
        if "imlist" in gnd and len(gnd["imlist"]) != g.n:
            raise DatasetError(
                f"the ground truth lists {len(gnd['imlist'])} gallery images but gallery has "
                f"{g.n} rows; embed exactly its 'imlist', in order"
            )
        gnd = gnd.get("gnd", [])
    entries = _check_gnd(gnd, g.n, "gnd")
    if len(entries) != q.n:
        raise InvalidArgumentError(
            f"the ground truth has {len(entries)} queries but query has {q.n} rows; embed "
            "exactly its 'qimlist', in order"
        )
    backend = TorchBackend()
    listed = torch.zeros((q.n, g.n), dtype=torch.bool)  # easy, hard or junk, per query
    for i, lists in enumerate(entries):
        listed[i, torch.from_numpy(np.concatenate(list(lists.values())))] = True
    listed = listed.to(backend.device)
    rank_of: list[dict[int, int]] = [{} for _ in entries]
    for block in query_blocks(q.n):
        unit = normalised(q, block, backend.device)
        rows = chunk_size or auto_chunk_rows(len(unit), q.dim)
        block_listed = listed[block]
        pair_rows, gidx, ranks = count_ranks(
            Plan(g), unit, lambda index: block_listed[:, index], rows)
        for r, j, rank in zip(pair_rows.tolist(), gidx.tolist(), ranks[0].tolist()):
            rank_of[block.start + r][j] = rank

    result = {}
    for protocol, (positive_keys, junk_keys) in PROTOCOLS.items():
        aps = []
        for lists, ranks in zip(entries, rank_of):
            positives = np.concatenate([lists[key] for key in positive_keys])
            if not len(positives):
                continue
            junk = np.sort([ranks[j] for j in np.concatenate([lists[k] for k in junk_keys])])
            found = np.sort([ranks[j] for j in positives])
            aps.append(revisitop_ap(found - np.searchsorted(junk, found), len(positives)))
        result[protocol] = float(np.mean(aps)) if aps else float("nan")
    return result


def revisited_metrics(query: ArrayLike, gallery: ArrayLike, gnd: dict | list,
                      metrics: Sequence[str] = REVISITED_METRICS) -> dict[str, float]:
    """:func:`evaluate_revisited` under the run's metric names (``rmap-medium``, ...)."""
    result = evaluate_revisited(query, gallery, gnd)
    return {name: result[name.removeprefix("rmap-")] for name in metrics}


def revisited_backfill_curve(query: ArrayLike, gallery_old: ArrayLike, gallery_new: ArrayLike,
                             gnd: dict | list, order: np.ndarray, points: int = 21,
                             metrics: Sequence[str] = REVISITED_METRICS):
    """The backfill curve under the revisitop protocol: at fraction f the first
    round(f * G) items of ``order`` hold new features, as in
    :func:`compatzoo.retrieval.backfill_curve` (no NFR: the protocol has no labels that
    say which old answers were right). Each point is one evaluation of its gallery; the
    galleries of revisited Oxford/Paris are small."""
    from compatzoo.retrieval.curves import BackfillCurve

    old = torch.as_tensor(np.asarray(gallery_old), dtype=torch.float32)
    new = torch.as_tensor(np.asarray(gallery_new), dtype=torch.float32)
    order = torch.as_tensor(np.asarray(order), dtype=torch.long)
    fractions = np.linspace(0.0, 1.0, points).tolist()
    values: dict[str, list[float]] = {name: [] for name in metrics}
    for fraction in fractions:
        mixed = old.clone()
        backfilled = order[:round(fraction * len(order))]
        mixed[backfilled] = new[backfilled]
        for name, value in revisited_metrics(query, mixed, gnd, metrics).items():
            values[name].append(value)
    return BackfillCurve(fractions, values, {},
                         {name: float(np.mean(v)) for name, v in values.items()})
