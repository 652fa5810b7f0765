"""``compatzoo upgrade``: a stored gallery moved into a new model's space, file by file, in
the format it is stored in, resumable after a kill, never leaving a partial output.

Every check runs before anything is written: widths and fingerprints along the chain of
bundles, every input's format, rows and width, the side information and older copy an
upgrader reads, rows with NaN or inf (``on_bad_rows``), and whether the output folder
belongs to this job. Outputs are a function of the inputs, the models and ``chunk_rows``
alone, so a resumed job writes the bytes an uninterrupted one would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError, SpecError
from compatzoo.interfaces import GalleryUpgrader, StoredGallery
from compatzoo.jobs.manifest import InputRecord, JobStateError, Manifest
from compatzoo.jobs.stores import (StoredFile, expand_inputs, open_stored, release_free_memory,
                                   returned_memory)

BadRows = Literal["fail", "skip", "zero"]


@dataclass(frozen=True)
class Step:
    """One hop of an upgrade job: what it reads and writes, how it moves a stored gallery
    on, and who it is (recorded in the manifest, so another model never resumes a job)."""

    name: str
    input_dim: int
    output_dim: int
    side_dim: int
    reads_previous: bool
    advance: Callable[[StoredGallery, int], StoredGallery]
    identity: dict[str, Any]
    old_fingerprint: str | None = None
    new_fingerprint: str | None = None
    source: str | None = None      # a bundle source another process can load it from


def bundle_step(bundle) -> Step:
    """The hop of a loaded :class:`~compatzoo.bundles.UpgradeBundle`; a query adapter is
    refused here, before any output exists."""
    import hashlib

    bundle.require_gallery_upgrader()
    config = bundle.config
    upgrader = bundle.upgrader
    weights = hashlib.sha256("".join(sorted(config.files.values())).encode()).hexdigest()
    return Step(
        name=f"bundle {config.name!r}", input_dim=config.old.embedding_dim,
        output_dim=config.new.embedding_dim if upgrader is None else upgrader.output_dim,
        side_dim=0 if upgrader is None else upgrader.side_dim,
        reads_previous=bool(upgrader is not None and upgrader.reads_previous),
        advance=lambda stored, chunk: bundle.advance(stored, chunk_size=chunk),
        identity={"bundle": config.name, "weights_sha256": weights,
                  "old": config.old.fingerprint, "new": config.new.fingerprint},
        old_fingerprint=config.old.fingerprint, new_fingerprint=config.new.fingerprint,
        source=(bundle.source["uri"] if bundle.source.get("kind") == "hf-hub"
                else str(bundle.folder)))


def upgrader_step(upgrader: GalleryUpgrader) -> Step:
    """A bare upgrader as a hop; its weights identify it."""
    from compatzoo.bundles.format import state_fingerprint

    upgrader.eval()
    return Step(name=f"upgrader {type(upgrader).__name__}", input_dim=upgrader.input_dim,
                output_dim=upgrader.output_dim, side_dim=upgrader.side_dim,
                reads_previous=upgrader.reads_previous,
                advance=lambda stored, chunk: upgrader.advance(stored, chunk),
                identity={"upgrader": type(upgrader).__name__,
                          "weights": state_fingerprint(upgrader.state_dict())})


@dataclass
class _Unit:
    """One input file and what runs beside it."""

    main: StoredFile
    side: StoredFile | None = None
    previous: StoredFile | None = None
    bad: int = 0
    name: str = field(init=False)

    def __post_init__(self):
        self.name = self.main.path.name


@returned_memory()
def upgrade_gallery(steps: Sequence[Step], inputs: Sequence[str | Path], output: str | Path, *,
                    side: Sequence[str | Path] | None = None,
                    previous: Sequence[str | Path] | None = None, column: str = "embedding",
                    side_column: str | None = None, previous_column: str | None = None,
                    key: str | None = None, chunk_rows: int = 65536,
                    on_bad_rows: BadRows = "fail", fingerprint: str | None = None,
                    engine: Literal["local", "ray"] = "local", workers: int = 2,
                    progress: bool = True) -> dict[str, Any]:
    """Apply ``steps`` (a chain of hops, applied one after the other in one pass) to every
    stored file of ``inputs``; write ``output/<same name>`` in the same format. Returns
    the job's summary (also in ``output/compatzoo-job.json``).

    ``engine="ray"`` runs the files on ``workers`` Ray actors (a Ray Data pipeline of files;
    connect to a cluster with ``RAY_ADDRESS``, else a local Ray starts); the outputs are the
    local engine's, byte for byte."""
    started = time.perf_counter()
    if not steps:
        raise SpecError("an upgrade job needs at least one bundle")
    if chunk_rows < 1:
        raise SpecError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if on_bad_rows not in ("fail", "skip", "zero"):
        raise SpecError(f"on_bad_rows must be fail, skip or zero, got {on_bad_rows!r}")
    if engine not in ("local", "ray"):
        raise SpecError(f"engine must be local or ray, got {engine!r}")
    if engine == "ray" and any(step.source is None for step in steps):
        raise SpecError("the ray engine loads each bundle on its actors: give bundles (a "
                        "bare upgrader runs with the local engine)")
    _check_chain(steps)
    output = Path(output)
    units = _open_units(steps[0], inputs, side, previous, column, side_column,
                        previous_column, key, fingerprint)
    inside = [u.main.path for u in units if output.resolve() in u.main.path.resolve().parents]
    if inside:
        raise JobStateError(f"input {inside[0]} lies in the output folder {output}; write the "
                            "upgraded gallery to another folder (inputs are never overwritten)")
    parameters = {"column": column, "side_column": side_column,
                  "previous_column": previous_column, "key": key, "chunk_rows": chunk_rows,
                  "on_bad_rows": on_bad_rows,
                  "side": None if side is None else [u.side.path.name for u in units],
                  "previous": None if previous is None else [u.previous.path.name for u in units]}
    records = [InputRecord.of(u.main.path, u.main.rows) for u in units]
    manifest = Manifest.open(output, "upgrade", parameters, [s.identity for s in steps], records)
    mine = set(manifest.mine([u.name for u in units]))
    pending = [u for u in units if u.name in mine and not manifest.is_done(u.name)]
    _scan_bad_rows(pending, chunk_rows, on_bad_rows)
    manifest.start()

    total = sum(u.main.rows for u in pending)
    bytes_read = sum(u.main.path.stat().st_size for u in pending)
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc="upgrade", disable=not progress)
    with bar:
        if engine == "ray":
            from compatzoo.jobs.ray_engine import upgrade_on_ray

            done = upgrade_on_ray(pending, steps, output, chunk_rows, on_bad_rows, workers,
                                  {"column": column, "side_column": side_column,
                                   "previous_column": previous_column, "key": key})
        else:
            done = (_upgrade_unit(unit, steps, output, chunk_rows, on_bad_rows,
                                  steps[-1].new_fingerprint, bar.update) for unit in pending)
        for written in done:
            for name, rows, extra in written:
                manifest.record(name, rows, **extra)
            if engine == "ray":
                bar.update(written[-1][1])
    seconds = time.perf_counter() - started
    summary = {"files": len(units), "files_written": len(pending), "rows": total,
               "rows_skipped": sum(u.bad for u in pending) if on_bad_rows == "skip" else 0,
               "rows_zeroed": sum(u.bad for u in pending) if on_bad_rows == "zero" else 0,
               "seconds": round(seconds, 3), "rows_per_s": round(total / max(seconds, 1e-9), 1),
               "bytes_read": bytes_read,
               "bytes_written": sum(r["bytes"] for n, r in manifest.outputs().items()
                                    if n in {u.name for u in pending})}
    if manifest.world > 1:
        summary["rank"], summary["world_size"] = manifest.rank, manifest.world
    manifest.finish(summary, [u.name for u in units])
    return summary


def _check_chain(steps: Sequence[Step]) -> None:
    for before, after in zip(steps, steps[1:]):
        if after.input_dim != before.output_dim:
            raise DimensionMismatchError(
                f"{after.name} upgrades {after.input_dim}-d embeddings, but "
                f"{before.name} before it writes {before.output_dim}-d ones; give the chain's "
                "bundles oldest first, each the next generation's")
        if None not in (before.new_fingerprint, after.old_fingerprint) and \
                before.new_fingerprint != after.old_fingerprint:
            raise InvalidFeaturesError(
                f"{after.name} upgrades galleries of another model than the one "
                f"{before.name} upgrades into (fingerprints {after.old_fingerprint[:12]}... vs "
                f"{before.new_fingerprint[:12]}...); chain the bundles of one lineage")


def _open_units(first: Step, inputs, side, previous, column, side_column, previous_column,
                key, fingerprint) -> list[_Unit]:
    files = expand_inputs(list(inputs))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise SpecError("input files must have distinct names (outputs reuse them)")

    def parallel(paths, what: str, name_column: str | None) -> list[StoredFile] | None:
        if paths is None:
            return None
        found = expand_inputs(list(paths))
        if len(found) != len(files):
            raise SpecError(f"{len(files)} embedding files but {len(found)} {what} files; give "
                            "one per embedding file, in the same order")
        return [open_stored(p, column=name_column or column, key=key) for p in found]

    sides = parallel(side, "side-information", side_column)
    previous_files = parallel(previous, "previous-copy", previous_column)
    if first.side_dim and sides is None:
        raise InvalidFeaturesError(
            f"{first.name} reads {first.side_dim} values of side information stored "
            "beside each embedding; give them with --side (side= in Python: one file per "
            "embedding file, or the same Parquet files with --side-column)")
    if sides is not None and not first.side_dim:
        raise SpecError(f"{first.name} reads no side information; drop --side")
    if previous_files is not None and not first.reads_previous:
        raise SpecError(f"{first.name} reads no older copy of the gallery; drop --previous")
    units = []
    for i, path in enumerate(files):
        main = open_stored(path, column=column, key=key)
        if main.dim != first.input_dim:
            raise DimensionMismatchError(
                f"{path} holds {main.dim}-d embeddings, but {first.name} upgrades "
                f"{first.input_dim}-d ones of its old model; give the gallery that model wrote")
        recorded = fingerprint or main.fingerprint
        if None not in (recorded, first.old_fingerprint) and recorded != first.old_fingerprint:
            raise InvalidFeaturesError(
                f"{path} was written by a model with fingerprint {recorded[:16]}..., but "
                f"{first.name} upgrades galleries of {first.old_fingerprint[:16]}...; use the "
                "bundle of the model that wrote the gallery")
        unit = _Unit(main)
        for what, extra, dim in (("side information", sides, first.side_dim),
                                 ("older copy", previous_files, first.input_dim)):
            if extra is None:
                continue
            other = extra[i]
            if other.rows != main.rows or other.dim != dim:
                raise InvalidFeaturesError(
                    f"{what} {other.path} holds {other.rows} rows of width {other.dim}, but "
                    f"{path} needs {main.rows} rows of width {dim}")
            if what == "side information":
                unit.side = other
            else:
                unit.previous = other
        units.append(unit)
    return units


def _scan_bad_rows(units: list[_Unit], chunk_rows: int, policy: BadRows) -> None:
    """Count rows with NaN or inf in every pending file (all its inputs) before anything
    is written; with ``fail`` any such row stops the job here."""
    problems = []
    for unit in units:
        readers = [f.reader() for f in (unit.main, unit.side, unit.previous) if f is not None]
        bad_rows: list[int] = []
        for start in range(0, unit.main.rows, chunk_rows):
            n = min(chunk_rows, unit.main.rows - start)
            finite = np.ones(n, dtype=bool)
            for reader in readers:
                finite &= np.isfinite(reader.take(n)[0]).all(axis=1)
            bad_rows += (np.flatnonzero(~finite) + start).tolist()
        for reader in readers:
            reader.close()
        release_free_memory()
        unit.bad = len(bad_rows)
        if bad_rows:
            problems.append(f"{unit.main.path}: {len(bad_rows)} rows (first: {bad_rows[:5]})")
    if problems and policy == "fail":
        raise InvalidFeaturesError(
            "rows with NaN or inf in the stored gallery (nothing was written):\n  "
            + "\n  ".join(problems) + "\nFix them, or choose --on-bad-rows skip (drop those "
            "rows) or zero (upgrade a zero vector in their place)")


def _upgrade_unit(unit: _Unit, steps: Sequence[Step], output: Path, chunk_rows: int,
                  policy: BadRows, fingerprint: str | None,
                  on_rows: Callable[[int], None] = lambda n: None) -> list[tuple[str, int, dict]]:
    """Read, upgrade and write one file; returns what it wrote, to record (side
    information first, the file itself last: the unit counts as done once that is
    recorded).

    Reading the next chunk and writing the previous one run in a helper thread while
    this one computes (file I/O, hashing and the upgrader's kernels release the GIL);
    chunks are read, computed and written in order, so the bytes are those of a serial
    loop."""
    from concurrent.futures import ThreadPoolExecutor

    rows = unit.main.rows - (unit.bad if policy == "skip" else 0)
    writer = unit.main.writer(output / unit.name, steps[-1].output_dim, rows, fingerprint)
    writers = {"main": writer}
    readers = {what: f.reader() for what, f in (("main", unit.main), ("side", unit.side),
                                                 ("previous", unit.previous)) if f is not None}

    def read(start: int):
        n = min(chunk_rows, unit.main.rows - start)
        chunk = {what: reader.take(n) for what, reader in readers.items()}
        return n, {what: values for what, (values, _) in chunk.items()}, chunk["main"][1]

    def write(stored: StoredGallery, carried) -> None:
        writer.write(stored.features.numpy(), carried)
        if stored.side is not None:
            if "side" not in writers:
                from compatzoo.jobs.stores import _NpyWriter

                (output / "side").mkdir(exist_ok=True)
                writers["side"] = _NpyWriter(output / "side" / f"{Path(unit.name).stem}.npy",
                                             stored.side.shape[1], rows)
            writers["side"].write(stored.side.numpy(), None)

    starts = list(range(0, unit.main.rows, chunk_rows))
    try:
        with ThreadPoolExecutor(max_workers=1) as helper:
            reading = helper.submit(read, starts[0]) if starts else None
            writing = None
            for k in range(len(starts)):
                n, arrays, carried = reading.result()
                if k + 1 < len(starts):
                    reading = helper.submit(read, starts[k + 1])
                if unit.bad:                   # the pre-scan found rows to drop or zero
                    arrays, carried = _apply_policy(arrays, carried, policy)
                stored = StoredGallery(*(None if arrays.get(what) is None else
                                         torch.from_numpy(np.ascontiguousarray(arrays[what]))
                                         for what in ("main", "side", "previous")))
                for step in steps:
                    stored = step.advance(stored, chunk_rows)
                if writing is not None:
                    writing.result()
                writing = helper.submit(write, stored, carried)
                on_rows(n)
            if writing is not None:
                writing.result()
        if "side" in writers:
            writers["side"].commit()
        writer.commit()
    except BaseException:
        for open_writer in writers.values():
            open_writer.abort()
        raise
    finally:
        for reader in readers.values():
            reader.close()
        release_free_memory()
    written = [] if "side" not in writers else [
        (f"side/{writers['side'].target.name}", rows, {"sha256": writers["side"].sha256})]
    return written + [(unit.name, rows, {"sha256": writer.sha256,
                                         "skipped": unit.bad if policy == "skip" else 0,
                                         "zeroed": unit.bad if policy == "zero" else 0})]


def _apply_policy(arrays: dict[str, np.ndarray], carried, policy: BadRows):
    """Rows with NaN or inf in any input: dropped (``skip``) or zeroed (``zero``)."""
    n = len(arrays["main"])
    finite = np.ones(n, dtype=bool)
    for values in arrays.values():
        finite &= np.isfinite(values).all(axis=1)
    if finite.all():
        return arrays, carried
    if policy == "skip":
        return {what: values[finite] for what, values in arrays.items()}, _filter(carried, finite)
    return {what: np.where(finite[:, None], values, 0.0).astype(np.float32)
            for what, values in arrays.items()}, carried


def _filter(carried, keep: np.ndarray):
    """What travels with the rows (a Parquet table, faiss ids), without the dropped ones."""
    if carried is None:
        return None
    if isinstance(carried, np.ndarray):
        return carried[keep]
    import pyarrow as pa

    return carried.filter(pa.array(keep))
