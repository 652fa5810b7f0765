"""Backfill curves: accuracy and negative flips while the gallery is re-embedded.

All points of a curve come from one pass over each version of the gallery: every item
is scored once with its old and once with its new embedding, and each point combines the
prefix of new rows and the suffix of old rows that meet at its cut (see
:class:`compatzoo.retrieval.search.Plan`), so a 21-point curve costs about two
evaluations, not 21.

Shallow metrics (the top-k path) keep, per query, the running top-k keys of the new rows
scanned front to back and of the old rows scanned back to front. An item can only enter a
running top-k if it beats its current k-th key, which after the first few chunks few
items do; so each chunk's scores are compared once with that floor, and only the items
at or above it are encoded and merged (a threshold filter, about 1 ns per score, instead
of a top-k selection over every chunk, which costs several). The positives that enter
are noted; at each point, a positive in the prefix or suffix list that meet at its cut
ranks below the keys above it in both lists. This gives exactly the rank tables of
:func:`compatzoo.retrieval.ranking.positive_ranks` (ties by gallery index) for the same
scores, which come from the same chunks and kernels. The filtering and merging run in
numpy, split by query rows over torch's number of threads. Full-ranking metrics count
ranks in two passes (:func:`compatzoo.retrieval.ranking.count_ranks`); faiss, which does
not expose a chunk's scores, and CUDA, where torch's top-k is fast, use the general scan
of :func:`compatzoo.retrieval.search.topk_states`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from compatzoo.errors import DimensionMismatchError
from compatzoo.retrieval import ranking
from compatzoo.retrieval.evaluation import (
    check_without_positive, query_values, summarise,
)
from compatzoo.retrieval.metrics import UNRANKED, parse_metrics
from compatzoo.retrieval.ranking import RankTable, positive_ranks
from compatzoo.retrieval.search import (
    NEW, OLD, PAD, Plan, TorchBackend, auto_chunk_rows, chunk_scores, normalised,
    query_blocks, resolve_backend,
)
from compatzoo.retrieval.validation import (
    ArrayLike, Features, InvalidArgumentError, as_features, check_order,
    check_same_dim, check_same_shape, validate_retrieval,
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


# --- the top-k path on the CPU: running top-k lists filtered by their floor ---------------
# numpy throughout: its SIMD sort and selection are several times faster than torch's on
# the CPU, and its small operations on the few candidates cost microseconds, not the
# tens of microseconds of torch's parallel ones.

_LOW32 = 0xFFFFFFFF
_PAD = int(PAD)
#: Query rows whose chunk scores are copied at once to find their k-th best.
_ROW_BLOCK = 128
#: Fewest queries per thread when a chunk's items are let in by several threads.
_MIN_PART_ROWS = 64


def _encode(scores: np.ndarray, low: np.ndarray) -> np.ndarray:
    """:func:`compatzoo.retrieval.search.encode` in numpy, the same int64 keys, given the
    low words ``_LOW32 - index``."""
    bits = (scores + np.float32(0.0)).view(np.int32).astype(np.int64)
    return ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) << 32) | low


def _decode_scores(keys: np.ndarray) -> np.ndarray:
    ordered = keys >> 32
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).astype(np.int32).view(np.float32)


class _Pool(ThreadPoolExecutor):
    """Helpers of the calling thread: ``threads`` share the work, the caller included."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads - 1, thread_name_prefix="compatzoo-curve")
        self.threads = threads


class _Running:
    """The running top-``k`` keys of some query rows during one scan, the lists at each
    cut, and the positives that entered them.

    Only an item whose key beats its row's running k-th key (the floor) can enter; such
    items are found by comparing the chunk's scores with the floor's score (ties
    included, then checked by key), and a partition of the list and them keeps the best
    k, k-th first. While a row holds fewer than k keys, its bound is the chunk's own k-th
    best score (when it has k items).
    """

    def __init__(self, k: int, rows: slice, query_labels: np.ndarray) -> None:
        self.k, self.start, self.query_labels = k, rows.start, query_labels[rows]
        self.keys = np.full((rows.stop - rows.start, k), _PAD, dtype=np.int64)
        self.lists: dict[int, np.ndarray] = {}  # cut -> (rows, k), the k-th key first
        self.entered: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, scores: np.ndarray, low: np.ndarray, labels: np.ndarray, edge: int,
            cut: bool) -> None:
        """Let a chunk's items in: ``scores`` (rows x chunk), ``low`` and ``labels`` per
        column (``_LOW32 - index`` and the gallery label); keep the lists if ``edge``
        (where the chunk ends, scanning forward, or starts) is a ``cut``."""
        k, n, width = self.k, len(scores), scores.shape[1]
        floor = self.keys[:, 0]
        filling = floor == _PAD
        bound = _decode_scores(floor)
        if filling.any():
            bound[filling] = -np.inf
            if width >= k:
                for rows in np.array_split(np.flatnonzero(filling), -(-n // _ROW_BLOCK)):
                    bound[rows] = np.partition(scores[rows], width - k, axis=1)[:, width - k]
        flat = np.flatnonzero(scores >= bound[:, None])
        rows = flat // width
        cols = flat - rows * width
        keys = _encode(scores.reshape(-1)[flat], low[cols])
        enters = keys > floor[rows]
        if not enters.all():
            rows, cols, keys = rows[enters], cols[enters], keys[enters]
        if len(rows):
            positive = np.flatnonzero(labels[cols] == self.query_labels[rows])
            self.entered.append((rows[positive], keys[positive], np.full(len(positive), edge)))
            per_row = np.bincount(rows, minlength=n)
            most = int(per_row.max())
            slot = np.arange(len(rows)) - (np.cumsum(per_row) - per_row)[rows]
            merged = np.empty((n, k + most), dtype=np.int64)
            merged[:, :k] = self.keys
            merged[:, k:] = _PAD
            merged.reshape(-1)[rows * (k + most) + k + slot] = keys
            merged.partition(most, axis=1)  # numpy's SIMD selection: ~5x torch.topk here
            self.keys = merged[:, most:]  # the k best, the k-th first
            if 8 * most > k:  # a kept list holds at most k / 8 spare keys per row
                self.keys = self.keys.copy()
        if cut:
            self.lists[edge] = self.keys

    @cached_property
    def positives(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, keys and edges of the positives that entered (read once the scan is
        done)."""
        if not self.entered:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, int)
        return tuple(np.concatenate(part) for part in zip(*self.entered))


def _scan(plan: Plan, query: torch.Tensor, query_labels: np.ndarray,
          gallery_labels: np.ndarray, k: int, version: int, chunk_rows: int,
          self_position: torch.Tensor | None, pool: _Pool | None = None,
          ) -> list[_Running]:
    """Running top-``k`` keys of ``version``'s rows at every cut: prefixes of the new rows
    (scanned forward), suffixes of the old rows (backward), for parts of the queries.
    Each chunk is scored for all queries at once; its items are let into the parts'
    lists in ``pool``'s threads (numpy releases the GIL), as torch spreads its own work."""
    forward = version == NEW
    n = len(query)
    threads = 1 if pool is None else pool.threads
    parts = [slice(p[0], p[-1] + 1) for p in np.array_split(np.arange(n), threads) if len(p)]
    running = [_Running(k, part, query_labels) for part in parts]
    cuts = set(plan.cuts)
    for chunk in plan.chunks(chunk_rows, query.device, (version,), reverse=not forward):
        scores = chunk_scores(query, chunk, version, self_position).numpy()
        edge = chunk.start + scores.shape[1] if forward else chunk.start
        index = chunk.index.numpy()
        low, labels = _LOW32 - index, gallery_labels[index]
        tasks = [(scores[part], low, labels, edge, edge in cuts) for part in parts]
        others = [pool.submit(run.add, *task) for run, task in zip(running[1:], tasks[1:])]
        running[0].add(*tasks[0])  # this thread takes the first part
        for other in others:
            other.result()
        del scores, chunk, tasks  # before the next chunk is scored
    return running


def _state_ranks(prefixes: _Running, suffixes: _Running, cut: int, depth: int,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Rows (of the part) and ranks of the positives in the top ``depth`` of the state at
    ``cut``.

    The state's top ``depth`` lies in its prefix and suffix lists; a positive there ranks
    below the keys above it in both (counted by binary search in the sorted lists of the
    queries concerned), a count that reaches ``depth`` exactly when its rank in the state
    does.
    """
    found, lists = [], []
    for scan, forward in ((prefixes, True), (suffixes, False)):
        listed = scan.lists.get(cut)
        if listed is None:
            continue
        rows, keys, edges = scan.positives
        inside = (edges <= cut) if forward else (edges >= cut)
        inside &= keys >= listed[rows, 0]  # still in the list (PAD: not yet full)
        found.append((rows[inside], keys[inside]))
        lists.append(listed)
    rows, keys = (np.concatenate(part) for part in zip(*found))
    if not len(rows):
        return rows, rows
    order = np.argsort(rows, kind="stable")
    rows, keys = rows[order], keys[order]
    queries, first, count = np.unique(rows, return_index=True, return_counts=True)
    which = np.repeat(np.arange(len(queries)), count)
    slot = np.arange(len(rows)) - np.repeat(first, count)
    table = np.full((len(queries), int(count.max())), _PAD, dtype=np.int64)
    table[which, slot] = keys
    ranks = np.zeros(len(rows), dtype=np.int64)
    for listed in lists:
        ascending = torch.from_numpy(np.sort(listed[queries], axis=1))
        at_most = torch.searchsorted(ascending, torch.from_numpy(table), right=True).numpy()
        ranks += listed.shape[1] - at_most[which, slot]
    kept = ranks < depth
    return rows[kept], ranks[kept]


def _rank_tables(entries: list[tuple[np.ndarray, np.ndarray]], n: int, depth: int,
                 ) -> np.ndarray:
    """(states, n, m) ascending ranks per state and query row, UNRANKED-padded to the
    most any query has in any state (the tables of
    :func:`compatzoo.retrieval.ranking.positive_ranks`)."""
    state = np.concatenate([np.full(len(rows), t) for t, (rows, _) in enumerate(entries)])
    rows, ranks = (np.concatenate(part) for part in zip(*entries))
    group_rank = np.sort((state * n + rows) * depth + ranks)
    group, ranks = np.divmod(group_rank, depth)
    per_group = np.bincount(group, minlength=len(entries) * n)
    table = np.full((len(entries) * n, int(per_group.max()) if len(group) else 0), UNRANKED,
                    dtype=np.int64)
    table[group, np.arange(len(group)) - (np.cumsum(per_group) - per_group)[group]] = ranks
    return table.reshape(len(entries), n, -1)


def _curve_ranks(query: Features, query_labels: np.ndarray, plan: Plan,
                 gallery_labels: np.ndarray, n_pos: torch.Tensor, depth: int,
                 chunk_size: int | None, leave_one_out: bool,
                 ) -> Iterator[tuple[slice, list[RankTable]]]:
    """:func:`compatzoo.retrieval.ranking.positive_ranks` (top-k path, torch on the CPU)
    for the states of a backfill plan, by running top-k lists: the same rank tables, one
    query block at a time."""
    threads = min(torch.get_num_threads(), query.n // _MIN_PART_ROWS)
    with _Pool(threads) if threads > 1 else nullcontext() as pool:
        yield from _block_ranks(query, query_labels, plan, gallery_labels, n_pos, depth,
                                chunk_size, leave_one_out, pool)


def _block_ranks(query: Features, query_labels: np.ndarray, plan: Plan,
                 gallery_labels: np.ndarray, n_pos: torch.Tensor, depth: int,
                 chunk_size: int | None, leave_one_out: bool, pool: _Pool | None,
                 ) -> Iterator[tuple[slice, list[RankTable]]]:
    """:func:`_curve_ranks` with its threads."""
    device = torch.device("cpu")
    for block in query_blocks(query.n):
        q = normalised(query, block, device)
        itself = torch.arange(block.start, block.stop) if leave_one_out else None
        position = None if itself is None else plan.positions(itself)
        rows = chunk_size or auto_chunk_rows(len(q), query.dim)
        news, olds = (_scan(plan, q, query_labels[block], gallery_labels, depth, version,
                            rows, position, pool) for version in (NEW, OLD))
        entries = []
        for cut in plan.cuts:
            rows, ranks = zip(*(_state_ranks(new, old, cut, depth)
                                for new, old in zip(news, olds)))
            entries.append((np.concatenate([new.start + r for new, r in zip(news, rows)]),
                            np.concatenate(ranks)))
        tables = _rank_tables(entries, len(q), depth)
        yield block, [RankTable(torch.from_numpy(table), n_pos[block]) for table in tables]


def _curve_ranker(query: Features, query_labels: np.ndarray, plan: Plan,
                  gallery_labels: np.ndarray, n_pos: torch.Tensor, depth: int, backend: str,
                  chunk_size: int | None, leave_one_out: bool,
                  ) -> Iterator[tuple[slice, list[RankTable]]]:
    """The rank tables of every state of a backfill plan: through :func:`_curve_ranks`
    where the search is a top-k one with torch on the CPU, elsewhere (full ranking by
    counting, faiss, CUDA, where torch's top-k is fast) through
    :func:`compatzoo.retrieval.ranking.positive_ranks`."""
    blocks = query_blocks(query.n)
    engine = None if depth > ranking.MAX_TOPK_DEPTH else resolve_backend(
        backend, depth, blocks[0].stop - blocks[0].start, plan.size, query.dim, chunk_size)
    if isinstance(engine, TorchBackend) and engine.device.type == "cpu":
        return _curve_ranks(query, query_labels, plan, gallery_labels, n_pos, depth,
                            chunk_size, leave_one_out)
    return positive_ranks(query, query_labels, plan, gallery_labels, n_pos, depth, backend,
                          chunk_size, leave_one_out)


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
                          extra_k=ks if reference is not None else (), ranker=_curve_ranker)
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
