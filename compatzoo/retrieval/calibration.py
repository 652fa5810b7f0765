"""Which exact search backend is fastest here, decided by measuring it.

Whether torch's matmul + top-k or faiss's flat search is faster depends on the BLAS each
was built with and on the CPU: on this project's machine faiss measured 1.9x faster than
torch with one faiss build and 3.4x slower with another. So ``backend="auto"`` on a CPU
times both on the search's own shapes (one query block against one gallery chunk of at
most 16,384 rows, best of 2 interleaved runs) and keeps the answer, per machine and shape
class, in ``<cache>/compatzoo/search-backends.json`` (the cache is
``$COMPATZOO_CACHE_DIR``, else ``$XDG_CACHE_HOME``, else ``~/.cache``). Searches too small
for the choice to matter skip the measurement and use torch. ``COMPATZOO_SEARCH_BACKEND``
(``torch`` or ``faiss``) overrides the choice.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Searches below this many multiply-adds (query x gallery x dim) use torch unmeasured.
CALIBRATE_ABOVE = 2e10
#: Timed runs per backend, interleaved; the best counts.
REPEATS = 2
#: At most this many gallery rows are timed: enough to rank the two, cheap to measure.
MEASURED_ROWS = 16384
CACHE_FILE = "search-backends.json"
OVERRIDE = "COMPATZOO_SEARCH_BACKEND"

_chosen: dict[str, str] = {}


def cache_path() -> Path:
    base = (os.environ.get("COMPATZOO_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
            or str(Path.home() / ".cache"))
    return Path(base) / "compatzoo" / CACHE_FILE


def machine() -> str:
    """What the measurement depends on besides the shapes."""
    return f"{_host()}|threads {torch.get_num_threads()}"


@functools.cache
def _host() -> str:
    """The host, its CPU and the libraries' versions: fixed for the process, read once."""
    import faiss

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.node()}|{cpu}|torch {torch.__version__}|faiss {faiss.__version__}"


def shape_class(query_rows: int, chunk_rows: int, dim: int, k: int) -> str:
    """Shapes within a factor of 2 of each other share a measurement."""
    def bucket(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()
    return f"q{bucket(query_rows)}-g{bucket(chunk_rows)}-d{dim}-k{bucket(k)}"


def fastest_cpu_backend(query_rows: int, gallery_rows: int, chunk_rows: int, dim: int,
                        k: int) -> str:
    """``"torch"`` or ``"faiss"``: the one measured faster for these shapes here."""
    forced = os.environ.get(OVERRIDE, "").strip().lower()
    if forced in ("torch", "faiss"):
        return forced
    if forced:
        logger.warning("%s=%r is neither torch nor faiss; ignored", OVERRIDE, forced)
    if query_rows * gallery_rows * dim < CALIBRATE_ABOVE:
        return "torch"
    chunk_rows = min(chunk_rows, gallery_rows, MEASURED_ROWS)
    key = f"{machine()}|{shape_class(query_rows, chunk_rows, dim, k)}"
    if key not in _chosen:
        stored = _read_cache()
        if key not in stored:
            stored[key] = _measure(query_rows, chunk_rows, dim, k)
            _write_cache(stored)
        _chosen[key] = stored[key]
    return _chosen[key]


def _measure(query_rows: int, chunk_rows: int, dim: int, k: int) -> str:
    """Time both backends' candidate search on random unit rows of the search's shapes."""
    import faiss

    generator = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(
        torch.randn(query_rows, dim, generator=generator), dim=1)
    rows = torch.nn.functional.normalize(torch.randn(chunk_rows, dim, generator=generator), dim=1)
    n = min(k + 1, chunk_rows)
    runs = {
        "torch": lambda: torch.topk(query @ rows.T, n, dim=1, sorted=False),
        "faiss": lambda: faiss.knn(query.numpy(), rows.numpy(), n,
                                   metric=faiss.METRIC_INNER_PRODUCT),
    }
    best = {name: float("inf") for name in runs}
    for _ in range(REPEATS):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    choice = min(best, key=best.get)
    logger.info("search backend for %d queries x %d rows (d=%d, k=%d): torch %.3f s, faiss "
                "%.3f s: %s", query_rows, chunk_rows, dim, k, best["torch"], best["faiss"],
                choice)
    return choice


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if v in ("torch", "faiss")} if isinstance(
        data, dict) else {}


def _write_cache(data: dict[str, str]) -> None:
    """Best effort: a cache that cannot be written only means measuring again."""
    from compatzoo.engine.checkpoints import atomic_write

    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
    except OSError as exc:
        logger.info("could not write the search backend cache %s: %s", path, exc)
