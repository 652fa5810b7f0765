"""Exact cosine top-k over galleries too large to score at once, with interchangeable backends.

Scores are float32 cosine similarities computed per (query block x gallery chunk); the
full query x gallery matrix never exists. A ranking sorts by score descending and breaks
ties by gallery index ascending. Score and index are packed into one int64 *key* whose
integer order is exactly that ranking, so chunk results merge with a plain ``topk`` and
every backend, chunk size and merge order gives the same ranking.

A :class:`Plan` describes one or more gallery *states*: state t holds the ``new`` rows at
the first ``cuts[t]`` positions of ``order`` and the ``old`` rows elsewhere (a backfill in
progress). Chunks never straddle a cut, so every state sees a chunk entirely old or new.
The top-k of every state then comes from two scans: the new rows front to back, keeping
the running top-k of each prefix, and the old rows back to front for each suffix; state t
merges the prefix and suffix that meet at its cut. Each gallery row is scored once per
version however many states there are, and a scan only asks a chunk for the few items
that can still enter its running top-k (``chunk_topk``), which keeps the selection cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from compatzoo.retrieval.validation import Features, InvalidArgumentError

#: Working memory (bytes) one query block x gallery chunk step may use.
MEMORY_BUDGET_BYTES = 512 * 2**20
#: Most queries scored together; more are processed in blocks of equal size.
MAX_QUERY_BLOCK = 1024
#: faiss GPU's k-selection limit; deeper searches fall back to torch.
FAISS_GPU_MAX_K = 2048

OLD, NEW = 0, 1
_LOW32 = 0xFFFFFFFF
#: Key of "no item" (below every real key: scores are never NaN).
PAD = torch.iinfo(torch.int64).min


# --- keys: (score, index) -> one int64 ordered like the ranking --------------------------

def encode(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pack float32 scores and gallery indices (< 2**32) into int64 keys, larger = better."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed integer order
    return (ordered << 32) | (_LOW32 - index)


def decode_index(keys: torch.Tensor) -> torch.Tensor:
    return _LOW32 - (keys & _LOW32)


def decode_scores(keys: torch.Tensor) -> torch.Tensor:
    ordered = keys >> 32
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(torch.int32).view(torch.float32)


def merge_topk(a: torch.Tensor | None, b: torch.Tensor | None, k: int) -> torch.Tensor:
    """Best ``k`` keys per row of two key tables (one may be None), best first."""
    both = torch.cat([t for t in (a, b) if t is not None], dim=1)
    return torch.topk(both, min(k, both.shape[1]), dim=1).values


# --- similarities ----------------------------------------------------------------------

def normalised(features: Features, rows: slice | torch.Tensor,
               device: torch.device) -> torch.Tensor:
    """float32 unit rows of ``features`` (a chunk at a time: no full normalised copy)."""
    if isinstance(rows, torch.Tensor):  # a gathered copy: normalise it in place
        rows = rows.to(features.data.device)
        data = features.data.index_select(0, rows).to(device=device, dtype=torch.float32)
        return data.div_(features.norms.index_select(0, rows).to(device)[:, None])
    data = features.data[rows].to(device=device, dtype=torch.float32)
    return data / features.norms[rows].to(device)[:, None]


def similarity(query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``query @ rows.T``; a single row is doubled because BLAS scores one column with a
    different kernel whose rounding differs, and scores must not depend on the chunking."""
    if rows.shape[0] == 1:
        return (query @ torch.cat([rows, rows]).T)[:, :1]
    return query @ rows.T


# --- gallery plans -----------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Positions [start, start + width) of a plan with the unit rows of the versions
    that some state sees there."""

    number: int
    start: int
    index: torch.Tensor            # gallery index per position (int64, compute device)
    rows: dict[int, torch.Tensor]  # version -> float32 unit rows

    @property
    def width(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class Plan:
    """Gallery states to search (see module docstring); a plain search is ``Plan(gallery)``."""

    old: Features
    new: Features | None = None
    order: torch.Tensor | None = None  # position -> gallery index; None = identity
    cuts: tuple[int, ...] = (0,)

    @property
    def size(self) -> int:
        return self.old.n

    def bounds(self, chunk_rows: int) -> list[tuple[int, int]]:
        """Chunks of at most ``chunk_rows`` positions and about equal width, cut at every
        state's cut."""
        edges = sorted(set(self.cuts) | {0, self.size})
        bounds = []
        for start, end in zip(edges[:-1], edges[1:]):
            width = -(-(end - start) // -(-(end - start) // chunk_rows))
            bounds += [(s, min(s + width, end)) for s in range(start, end, width)]
        return bounds

    @cached_property
    def _inverse_order(self) -> torch.Tensor:
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(len(self.order))
        return inverse

    def positions(self, index: torch.Tensor) -> torch.Tensor:
        """Where gallery items (by index) sit in the plan's order."""
        if self.order is None:
            return index
        return self._inverse_order.to(index.device)[index]

    def states_seeing(self, start: int, end: int, version: int) -> list[int]:
        """States that see positions [start, end) in ``version``."""
        return [t for t, cut in enumerate(self.cuts)
                if (cut >= end if version == NEW else cut <= start)]

    def chunks(self, chunk_rows: int, device: torch.device, versions: tuple[int, ...] = (OLD, NEW),
               reverse: bool = False) -> Iterator[Chunk]:
        """Chunks in position order (or reversed) with the unit rows of those of
        ``versions`` some state sees there; chunks no state sees in them are skipped."""
        features = {OLD: self.old, NEW: self.new}
        bounds = list(enumerate(self.bounds(chunk_rows)))
        for number, (start, end) in reversed(bounds) if reverse else bounds:
            seen = [v for v in versions if self.states_seeing(start, end, v)]
            if not seen:
                continue
            if self.order is None:
                rows, index = slice(start, end), torch.arange(start, end, device=device)
            else:
                rows = index = self.order[start:end].to(device)
            yield Chunk(number, start, index,
                        {v: normalised(features[v], rows, device) for v in seen})


def chunk_scores(query: torch.Tensor, chunk: Chunk, version: int,
                 self_position: torch.Tensor | None, rows: torch.Tensor | slice = slice(None),
                 ) -> torch.Tensor:
    """Scores of (some) queries against a chunk. Leave-one-out gives each query's own
    gallery item -inf; ``self_position`` is where that item sits in the plan's order
    (the query is matched by identity, never by score)."""
    scores = similarity(query[rows], chunk.rows[version])
    if self_position is None:
        return scores
    column = self_position[rows] - chunk.start
    inside = torch.nonzero((column >= 0) & (column < chunk.width)).flatten()
    scores[inside, column[inside]] = -torch.inf
    return scores


@dataclass
class ChunkView:
    """A block of unit queries against one version of one chunk."""

    query: torch.Tensor
    chunk: Chunk
    version: int
    self_position: torch.Tensor | None

    @cached_property
    def scores(self) -> torch.Tensor:
        return chunk_scores(self.query, self.chunk, self.version, self.self_position)


# --- backends --------------------------------------------------------------------------

class TorchBackend:
    """Matmul + topk with torch, on CUDA when visible."""

    name = "torch"

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def candidates(self, view: ChunkView, n: int, rows=slice(None)):
        """The ``n`` best (scores, chunk columns) per query, in no particular order."""
        return torch.topk(view.scores[rows], n, dim=1, sorted=False)

    def row_scores(self, view: ChunkView, rows: torch.Tensor) -> torch.Tensor:
        return view.scores[rows]


class FaissBackend:
    """faiss exact inner-product search (``faiss.knn``/``knn_gpu``, i.e. IndexFlatIP)."""

    def __init__(self, faiss, gpu: bool) -> None:
        self.faiss, self.gpu = faiss, gpu
        self.name = "faiss-gpu" if gpu else "faiss"
        self.device = torch.device("cpu")
        self.resources = faiss.StandardGpuResources() if gpu else None

    def candidates(self, view: ChunkView, n: int, rows=slice(None)):
        excluded = view.self_position is not None
        found = min(n + excluded, view.chunk.width)
        metric = self.faiss.METRIC_INNER_PRODUCT
        q, g = view.query[rows].numpy(), view.chunk.rows[view.version].numpy()
        if self.gpu:
            values, local = self.faiss.knn_gpu(self.resources, q, g, found, metric=metric)
        else:
            values, local = self.faiss.knn(q, g, found, metric=metric)
        values, local = torch.from_numpy(values), torch.from_numpy(local).to(torch.int64)
        if excluded:  # drop the query itself, which faiss cannot be told to skip
            itself = view.chunk.start + local == view.self_position[rows, None]
            values, at = torch.sort(values.masked_fill(itself, -torch.inf), dim=1, descending=True)
            local = local.gather(1, at)
        return values[:, :n], local[:, :n]

    def row_scores(self, view: ChunkView, rows: torch.Tensor) -> torch.Tensor:
        return chunk_scores(view.query, view.chunk, view.version, view.self_position, rows)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_gpu_ok(faiss) -> bool:
    return (faiss is not None and hasattr(faiss, "StandardGpuResources")
            and hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0)


BACKENDS = ("auto", "faiss", "torch")


def check_backend(backend: str) -> None:
    """Reject a backend name that cannot be served, before any work starts."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "faiss" and _faiss() is None:
        raise InvalidArgumentError(
            "backend='faiss' needs faiss; install faiss-cpu (or faiss-gpu) or use backend='torch'"
        )


def resolve_backend(backend: str, k: int, query_rows: int = 0, gallery_rows: int = 0,
                    dim: int = 0, chunk_rows: int | None = None) -> TorchBackend | FaissBackend:
    """Pick the search backend for a top-``k`` search of ``query_rows`` queries (a block)
    against ``gallery_rows`` items of width ``dim``.

    ``auto``: faiss GPU when faiss has GPU support and a GPU is visible (and k < 2047);
    torch on a visible CUDA device otherwise; on the CPU, whichever of torch and
    faiss-cpu measured faster for these shapes on this machine
    (:mod:`compatzoo.retrieval.calibration`). ``faiss``: faiss GPU or CPU. ``torch``:
    torch. Every backend gives the same ranking.
    """
    check_backend(backend)
    if backend == "torch":
        return TorchBackend()
    faiss = _faiss()
    if _faiss_gpu_ok(faiss) and k + 2 <= FAISS_GPU_MAX_K:  # asks for k + 1 (+1 for itself)
        return FaissBackend(faiss, gpu=True)
    if backend == "faiss":
        return FaissBackend(faiss, gpu=False)
    if faiss is None or torch.cuda.is_available() or not (query_rows and gallery_rows and dim):
        return TorchBackend()
    from compatzoo.retrieval.calibration import fastest_cpu_backend

    rows = chunk_rows or auto_chunk_rows(query_rows, dim)
    choice = fastest_cpu_backend(query_rows, gallery_rows, rows, dim, k + 1)
    return FaissBackend(faiss, gpu=False) if choice == "faiss" else TorchBackend()


# --- top-k -------------------------------------------------------------------------------

def query_blocks(n: int) -> list[slice]:
    """Equal-sized blocks of at most MAX_QUERY_BLOCK queries (no tiny remainder block)."""
    count = -(-n // MAX_QUERY_BLOCK)
    size = -(-n // count)
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def auto_chunk_rows(query_rows: int, dim: int) -> int:
    """Gallery rows per chunk so its unit rows and a score block with a sorted copy or
    top-k temporaries fit in MEMORY_BUDGET_BYTES."""
    return max(256, MEMORY_BUDGET_BYTES // (4 * (2 * dim + 3 * query_rows)))


def _best(backend, view: ChunkView, n: int, rows: torch.Tensor | slice = slice(None),
          ) -> torch.Tensor:
    """Exact best-``n`` keys of a chunk for (some) queries, best first.

    The backend proposes the n + 1 best candidates by score; when the n-th and (n+1)-th
    scores tie, tied items of lower index may have been left out, so that query is redone
    from all its scores.
    """
    index = view.chunk.index
    values, local = backend.candidates(view, min(n + 1, len(index)), rows)
    keys = torch.sort(encode(values, index[local]), dim=1, descending=True).values
    if n < len(index):
        tied = torch.nonzero(keys[:, n - 1] >> 32 == keys[:, n] >> 32).flatten()  # same score
        if len(tied):
            scores = backend.row_scores(view, tied if isinstance(rows, slice) else rows[tied])
            keys[tied, :n] = torch.topk(encode(scores, index.expand(len(tied), -1)), n).values
    return keys[:, :n]


def chunk_topk(backend, view: ChunkView, k: int, floor: torch.Tensor, guess: int,
               ) -> tuple[torch.Tensor, int]:
    """The chunk's best keys that can still enter a running top-``k`` whose k-th key per
    query is ``floor`` (best first, PAD-filled), and a guess for the next chunk.

    Only a few items of a chunk can beat a running top-k that has seen many chunks, so
    ``guess`` candidates are asked for (cheap); a query whose guess-th candidate still
    beats its floor is asked again for k.
    """
    full = min(k, view.chunk.width)
    take = min(guess, full)
    keys = _best(backend, view, take)
    short = torch.nonzero(keys[:, -1] > floor).flatten() if take < full else floor[:0]
    if len(short):
        keys = torch.nn.functional.pad(keys, (0, full - take), value=PAD)
        keys[short] = _best(backend, view, full, short)
    entered = (keys > floor[:, None]).sum(1)
    typical = torch.kthvalue(entered, -(-99 * len(entered) // 100)).values  # outliers ask again
    return keys, int(typical) + 8


def _scan(plan: Plan, query: torch.Tensor, k: int, backend, chunk_rows: int,
          self_position: torch.Tensor | None, version: int) -> dict[int, torch.Tensor]:
    """Running top-``k`` over ``version``'s chunks, keyed by the cut where it stops:
    prefixes of the new rows (scanned forward), suffixes of the old rows (backward)."""
    forward = version == NEW
    running, guess, found = None, k, {}
    floor = torch.full((len(query),), PAD, device=query.device)
    for chunk in plan.chunks(chunk_rows, query.device, (version,), reverse=not forward):
        view = ChunkView(query, chunk, version, self_position)
        keys, guess = chunk_topk(backend, view, k, floor, guess)
        running = merge_topk(running, keys, k)
        if running.shape[1] == k:
            floor = running[:, -1]
        edge = chunk.start + chunk.width if forward else chunk.start
        if edge in plan.cuts:
            found[edge] = running
    return found


def topk_states(plan: Plan, query: torch.Tensor, k: int, backend, chunk_rows: int,
                self_position: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Best-``k`` keys of every state of ``plan`` for one block of unit queries."""
    prefixes = {} if plan.new is None else _scan(plan, query, k, backend, chunk_rows,
                                                 self_position, NEW)
    suffixes = _scan(plan, query, k, backend, chunk_rows, self_position, OLD)
    return [merge_topk(prefixes.get(cut), suffixes.get(cut), k) for cut in plan.cuts]


def search(query: Features, gallery: Features, k: int, backend: str = "auto",
           chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (scores, gallery indices) per query, ties broken by gallery index."""
    k = min(k, gallery.n)
    blocks = query_blocks(query.n)
    first = blocks[0].stop - blocks[0].start
    engine = resolve_backend(backend, k, first, gallery.n, gallery.dim, chunk_size)
    plan = Plan(gallery)
    keys = []
    for block in blocks:
        rows = chunk_size or auto_chunk_rows(block.stop - block.start, gallery.dim)
        q = normalised(query, block, engine.device)
        keys.append(topk_states(plan, q, k, engine, rows)[0].cpu())
    keys = torch.cat(keys)
    return decode_scores(keys), decode_index(keys)
