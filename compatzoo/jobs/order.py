"""``compatzoo order``: the order in which to re-embed a stored gallery (the backfill), by
any registered scheduler, from the stored embeddings and what the bundle knows (its
upgrade, its per-item signals, its new head). The embeddings (and the upgraded ones) go
to memory-mapped scratch files and are computed and scored in chunks; what the job holds
in memory grows with the number of items (scores, the order), not with their width."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compatzoo.errors import DimensionMismatchError, SpecError
from compatzoo.interfaces import BackfillState, StoredGallery
from compatzoo.jobs.manifest import InputRecord, JobStateError
from compatzoo.jobs.stores import expand_inputs, open_stored, returned_memory, write_json

ORDER_SUFFIXES = (".npy", ".parquet")


@returned_memory()
def order_gallery(bundle, gallery: Sequence[str | Path], output: str | Path, *,
                  scheduler: str = "random", scheduler_params: dict[str, Any] | None = None,
                  side: Sequence[str | Path] | None = None, column: str = "embedding",
                  side_column: str | None = None, key: str | None = None, seed: int = 0,
                  chunk_rows: int = 65536) -> dict[str, Any]:
    """Write the backfill order of the stored gallery (its files concatenated in the order
    given) to ``output``: ``.npy`` (gallery row indices, first re-embedded first) or
    ``.parquet`` (position, file, row within the file, and score-free); a sidecar
    ``<output>.json`` records the job, so a rerun of the same job is a no-op and another
    never replaces the file."""
    import compatzoo
    from compatzoo.registry import get_registry

    started = time.perf_counter()
    output = Path(output)
    if output.suffix not in ORDER_SUFFIXES:
        raise SpecError(f"--output {output}: write the order as .npy or .parquet")
    component = get_registry().get("scheduler", scheduler).component
    order_by = compatzoo.create_scheduler(scheduler, **(scheduler_params or {}))
    if "new_features" in component.requires:
        raise SpecError(f"scheduler {scheduler!r} reads the re-embedded gallery itself (an "
                        "oracle): it measures a backfill, it cannot plan one; choose another")
    files = [open_stored(p, column=column, key=key) for p in expand_inputs(list(gallery))]
    dim = bundle.config.old.embedding_dim
    for stored in files:
        if stored.dim != dim:
            raise DimensionMismatchError(f"{stored.path} holds {stored.dim}-d embeddings; "
                                         f"bundle {bundle.config.name!r} reads {dim}-d ones")
    side_files = (None if side is None else
                  [open_stored(p, column=side_column or column, key=key)
                   for p in expand_inputs(list(side))])
    identity = {"job": "order", "bundle": bundle.config.name,
                "fingerprint": bundle.fingerprint, "scheduler": scheduler,
                "params": order_by.params.model_dump(mode="json"), "seed": seed,
                "inputs": [vars(InputRecord.of(f.path, f.rows)) for f in files]}
    sidecar = output.with_name(output.name + ".json")
    if output.exists():
        if sidecar.is_file() and _same_job(sidecar, identity):
            return {"output": str(output), "rows": sum(f.rows for f in files),
                    "seconds": 0.0, "up_to_date": True}
        raise JobStateError(f"{output} already exists and is not this job's order; nothing "
                            "was written. Choose another --output or delete it")

    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        state = _state(bundle, files, side_files, component, Path(tmp), chunk_rows)
        order = np.asarray(order_by.order(state, seed=seed), dtype=np.int64)
    rows = sum(f.rows for f in files)
    if len(order) != rows or not np.array_equal(np.sort(order), np.arange(rows)):
        raise SpecError(f"scheduler {scheduler!r} did not return a permutation of the {rows} "
                        "gallery items")
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_order(order, files, output)
    summary = {"output": str(output), "rows": rows,
               "seconds": round(time.perf_counter() - started, 3)}
    write_json(sidecar, {**identity, "summary": summary})
    return summary


def _same_job(sidecar: Path, identity: dict[str, Any]) -> bool:
    import json

    try:
        recorded = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return False
    return {k: recorded.get(k) for k in identity} == json.loads(json.dumps(identity))


def _state(bundle, files, side_files, component, tmp: Path, chunk_rows: int) -> BackfillState:
    """The backfill state over the concatenated files, arrays memory-mapped from ``tmp``."""
    rows = sum(f.rows for f in files)
    stored = np.lib.format.open_memmap(tmp / "stored.npy", mode="w+", dtype=np.float32,
                                       shape=(rows, files[0].dim if files else 0))
    side = None
    if side_files is not None:
        side = np.lib.format.open_memmap(tmp / "side.npy", mode="w+", dtype=np.float32,
                                         shape=(rows, side_files[0].dim))
    position = 0
    for i, file in enumerate(files):
        readers = [file.reader()] + ([side_files[i].reader()] if side is not None else [])
        for start in range(0, file.rows, chunk_rows):
            n = min(chunk_rows, file.rows - start)
            stored[position:position + n] = readers[0].take(n)[0]
            if side is not None:
                side[position:position + n] = readers[1].take(n)[0]
            position += n
        for reader in readers:
            reader.close()
    upgraded, signals = None, {}
    wants_upgraded = "upgraded" in component.requires
    if (wants_upgraded or component.needs_signals) and bundle.upgrader is None:
        raise SpecError(f"this scheduler reads what an upgrader gives, and bundle "
                        f"{bundle.config.name!r} has none; choose a scheduler that reads "
                        "the stored embeddings or the new head")
    if wants_upgraded:
        upgraded = np.lib.format.open_memmap(tmp / "upgraded.npy", mode="w+", dtype=np.float32,
                                             shape=(rows, bundle.upgrader.output_dim))
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            upgraded[start:stop] = bundle.upgrade(
                stored[start:stop], None if side is None else side[start:stop],
                chunk_size=chunk_rows)
    if component.needs_signals:
        missing = sorted(component.needs_signals - bundle.upgrader.publishes)
        if missing:
            raise SpecError(f"the scheduler orders by {missing}, which the upgrader of bundle "
                            f"{bundle.config.name!r} does not publish")
        parts = [bundle.upgrader.signals(StoredGallery(
            torch.from_numpy(np.array(stored[start:start + chunk_rows])),
            None if side is None else torch.from_numpy(np.array(side[start:start + chunk_rows]))),
            chunk_rows) for start in range(0, rows, chunk_rows)]
        signals = {name: np.concatenate([p[name] for p in parts]) for name in
                   component.needs_signals}
    return BackfillState(old_features=stored, side=side, upgraded=upgraded,
                         new_head=bundle.new_head, signals=signals)


def _write_order(order: np.ndarray, files, output: Path) -> None:
    partial = output.with_name(f".{output.name}.partial")
    if output.suffix == ".npy":
        with open(partial, "wb") as handle:
            np.save(handle, order)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        starts = np.cumsum([0] + [f.rows for f in files])
        which = np.searchsorted(starts, order, side="right") - 1
        names = np.array([f.path.name for f in files])
        pq.write_table(pa.table({"position": np.arange(len(order)), "gallery_row": order,
                                 "file": names[which], "row": order - starts[which]}),
                       partial)
    partial.replace(output)
