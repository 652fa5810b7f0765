"""``compatzoo embed``: re-embed gallery images with a bundle's new model (the backfill),
in a backfill order, as Parquet shards a retrieval system can swap in one at a time.

Each shard holds, for ``shard_rows`` images in order: ``row`` (the image's gallery row),
``path``, ``embedding`` and, for bundles with a side-information encoder, ``side`` (what
the next upgrade reads). Images decode in DataLoader workers. The job keeps a manifest:
a rerun after a kill continues at the first unfinished shard, and a shard's bytes do not
depend on where the job was stopped (the batches are the same).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from compatzoo.data.image_folder import IMAGE_EXTENSIONS, FileImages
from compatzoo.errors import DatasetError, SpecError
from compatzoo.jobs.manifest import InputRecord, Manifest
from compatzoo.jobs.stores import FINGERPRINT_KEY, returned_memory


def image_list(images: str | Path) -> list[Path]:
    """A folder's image files (recursively, sorted by relative path) or the paths listed
    one per line in a text file: the gallery's rows, in order."""
    images = Path(images)
    if images.is_dir():
        found = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and p.is_file())
        if not found:
            raise DatasetError(f"{images} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return found
    if images.is_file():
        base = images.parent
        paths = [Path(line.strip()) for line in images.read_text().splitlines() if line.strip()]
        paths = [p if p.is_absolute() else base / p for p in paths]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{images} lists {len(missing)} images that do not exist "
                               f"(first: {missing[:3]})")
        return paths
    raise DatasetError(f"--images {images} is neither a folder of images nor a list file")


@returned_memory()
def embed_images(bundle, images: str | Path, output: str | Path, *,
                 order: str | Path | None = None, shard_rows: int = 65536,
                 batch_size: int = 256, workers: int = 2, model: str = "new",
                 next_bundle=None, progress: bool = True) -> dict[str, Any]:
    """Embed the gallery images (in ``order`` when given: a ``.npy`` of gallery rows from
    ``compatzoo order``) into Parquet shards in ``output``; returns the job's summary.

    ``model="old"`` embeds with the old model (items joining the old gallery before the
    switch), with the side information this bundle's upgrader reads. With ``model="new"``,
    ``next_bundle`` (the next upgrade, from this new model on) gives the side information
    its upgrader will read."""
    started = time.perf_counter()
    if bundle.config.preprocess is None:
        raise SpecError(f"bundle {bundle.config.name!r} records no preprocessing, so it cannot "
                        "embed image files")
    if shard_rows < 1 or batch_size < 1 or workers < 0:
        raise SpecError("shard_rows and batch_size must be at least 1, workers at least 0")
    paths = image_list(images)
    rows = np.arange(len(paths))
    sources: list[InputRecord] = []
    if order is not None:
        order_path = Path(order)
        rows = np.load(order_path, allow_pickle=False).astype(np.int64)
        if not np.array_equal(np.sort(rows), np.arange(len(paths))):
            raise SpecError(f"--order {order_path} is not a permutation of the {len(paths)} "
                            "gallery images (give the order computed for this gallery)")
        sources.append(InputRecord.of(order_path, len(rows)))
    listing = _listing_record(paths)
    if model not in ("new", "old"):
        raise SpecError(f"model must be 'new' or 'old', got {model!r}")
    encoder = bundle.new if model == "new" else bundle.old
    fingerprint = (bundle.config.new if model == "new" else bundle.config.old).fingerprint
    side = bundle.side if model == "old" else None
    if next_bundle is not None:
        if model != "new" or next_bundle.fingerprint != fingerprint:
            raise SpecError(f"--next {next_bundle.config.name!r} upgrades galleries of another "
                            f"model than the new model of {bundle.config.name!r}; give the "
                            "bundle of the following upgrade")
        side = next_bundle.side
    parameters = {"shard_rows": shard_rows, "batch_size": batch_size, "model": model,
                  "images": listing}
    models = [{"bundle": bundle.config.name, "fingerprint": fingerprint}]
    if next_bundle is not None:
        models.append({"next": next_bundle.config.name, "side": side is not None})
    manifest = Manifest.open(Path(output), "embed", parameters, models, sources)
    shards = [(f"part-{i:05d}.parquet", rows[start:start + shard_rows])
              for i, start in enumerate(range(0, len(rows), shard_rows))]
    mine = set(manifest.mine([name for name, _ in shards]))
    pending = [(name, part) for name, part in shards
               if name in mine and not manifest.is_done(name)]
    manifest.start()
    preprocess = bundle.config.preprocess
    total = sum(len(part) for _, part in pending)
    bar = tqdm(total=total, unit="img", unit_scale=True, desc="embed", disable=not progress)
    with bar:
        for name, part in pending:
            _embed_shard(encoder, side, [paths[i] for i in part], part, preprocess,
                         Path(output) / name, fingerprint, batch_size, workers, bar)
            manifest.record(name, len(part))
    seconds = time.perf_counter() - started
    summary = {"images": int(len(rows)), "shards": len(shards), "shards_written": len(pending),
               "rows": total, "seconds": round(seconds, 3),
               "rows_per_s": round(total / max(seconds, 1e-9), 1)}
    if manifest.world > 1:
        summary["rank"], summary["world_size"] = manifest.rank, manifest.world
    manifest.finish(summary, [name for name, _ in shards])
    return summary


def _listing_record(paths: list[Path]) -> dict[str, Any]:
    """Which images, by path (their bytes are read when embedded)."""
    import hashlib

    digest = hashlib.sha256("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()
    return {"count": len(paths), "paths_sha256": digest}


@torch.no_grad()
def _embed_shard(encoder, side, paths: list[Path], rows: np.ndarray, preprocess,
                 target: Path, fingerprint: str, batch_size: int, workers: int, bar) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = FileImages(paths, np.zeros(len(paths), dtype=np.int64), preprocess)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False,
                                         num_workers=workers)
    device = next(encoder.parameters()).device
    encoder.eval()
    embeddings, sides = [], []
    for batch, _, _ in loader:
        batch = batch.to(device)
        embeddings.append(encoder(batch).float().cpu().numpy())
        if side is not None:
            sides.append(side(batch).float().cpu().numpy())
        bar.update(len(batch))

    def column(parts: list[np.ndarray]) -> pa.Array:
        values = np.concatenate(parts)
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])

    table = pa.table({"row": rows, "path": [str(p) for p in paths],
                      "embedding": column(embeddings),
                      **({"side": column(sides)} if side is not None else {})})
    table = table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint})
    partial = target.with_name(f".{target.name}.partial")
    try:
        pq.write_table(table, partial)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise

