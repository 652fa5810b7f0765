"""Checks that find a dataset's problems before training rather than hours into it.

:func:`check_retrieval_labels` is cheap (labels only) and can run on every experiment;
:func:`scan_images` (``--check-data``) decodes every image once, so a corrupt file is
reported with all the others at the start instead of stopping a run when a batch first
reaches it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from compatzoo.data.datasets import (
    LabeledImages,
    RetrievalData,
    SubsetImages,
    TensorImages,
)
from compatzoo.data.image_folder import FileImages
from compatzoo.errors import DatasetError

logger = logging.getLogger(__name__)

#: unreadable files listed in full in the scan's error; the rest are counted
MAX_LISTED = 50
_EXAMPLES = 5


# --------------------------------------------------------------------------- labels

def _resolve(dataset: LabeledImages) -> tuple[LabeledImages, np.ndarray]:
    """The dataset that holds the items (under any subset views) and the items' indices
    in it, so a subset of train is recognised as train's files."""
    index: np.ndarray | None = None
    while isinstance(dataset, SubsetImages):
        index = dataset.indices if index is None else dataset.indices[index]
        dataset = dataset.parent
    if index is None:
        index = np.arange(len(dataset), dtype=np.int64)
    return dataset, np.asarray(index, dtype=np.int64)


def _classes(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"


def _label_examples(dataset: LabeledImages, labels: np.ndarray) -> str:
    """A few of ``labels`` as the user knows them: class folder names for files on disk
    (the ids are assigned by the loader, the folder names are what the user wrote)."""
    shown = labels[:_EXAMPLES]
    base, index = _resolve(dataset)
    if isinstance(base, FileImages):
        classes, first = np.unique(np.asarray(dataset.labels), return_index=True)
        at = first[np.searchsorted(classes, shown)]  # each label's first item
        names = [repr(base.paths[int(index[i])].parent.name) for i in at]
    else:
        names = [str(int(label)) for label in shown]
    more = ", ..." if len(labels) > len(shown) else ""
    return ", ".join(names) + more


def check_retrieval_labels(data: RetrievalData) -> dict[str, int]:
    """Fail before training when the evaluation could score no query at all.

    A query is scored only if it has a positive: a gallery item with its label (for
    leave-one-out data, ``gallery is None``, another query item with its label). Some
    queries without a positive are a known convention (they are left out of every
    metric), so only the case where *none* has one is an error.

    Returns a summary for logging: ``queries``, ``with_positive`` (queries that can be
    scored), ``query_classes``, ``gallery_classes`` and ``shared_classes`` (for
    leave-one-out the gallery is the query, so the last two equal ``query_classes``).
    """
    query_labels = np.asarray(data.query.labels, dtype=np.int64)
    if len(query_labels) == 0:
        raise DatasetError(f"dataset {data.name!r} has an empty query split, so there is "
                           "nothing to evaluate; add query images")
    if data.relevance is not None:     # the labels are bookkeeping; the ground truth decides
        scored = sum(1 for entry in data.relevance.gnd if len(entry["easy"]) + len(entry["hard"]))
        if scored == 0:
            raise DatasetError(f"dataset {data.name!r}: no query of its ground truth lists an "
                               "easy or hard gallery image, so nothing can be scored; check "
                               "the gnd file")
        return {"queries": len(query_labels), "with_positive": scored}
    query_classes, query_counts = np.unique(query_labels, return_counts=True)

    if data.gallery is None:
        # leave-one-out: a query's positives are the other items of its class
        positives = query_counts[np.searchsorted(query_classes, query_labels)] - 1
        with_positive = int((positives > 0).sum())
        if with_positive == 0:
            raise DatasetError(
                f"dataset {data.name!r} is evaluated leave-one-out (each query is ranked "
                "against the other query images), but each of its "
                f"{len(query_classes)} classes has a single image, so no query has a "
                f"positive (classes: {_label_examples(data.query, query_classes)}). Put at "
                "least 2 images in the class folders of val/, or use query/ + gallery/ "
                "folders")
        n = len(query_classes)
        return {"queries": len(query_labels), "with_positive": with_positive,
                "query_classes": n, "gallery_classes": n, "shared_classes": n}

    gallery_labels = np.asarray(data.gallery.labels, dtype=np.int64)
    if len(gallery_labels) == 0:
        raise DatasetError(f"dataset {data.name!r} has an empty gallery split, so no query "
                           "can be ranked; add gallery images")
    gallery_classes = np.unique(gallery_labels)
    shared = np.intersect1d(query_classes, gallery_classes, assume_unique=True)
    if shared.size == 0:
        raise DatasetError(
            f"in dataset {data.name!r} the query and the gallery share no label, so no "
            "query has a positive in the gallery and no retrieval metric is defined. "
            f"Query: {_classes(len(query_classes))} "
            f"({_label_examples(data.query, query_classes)}); gallery: "
            f"{_classes(len(gallery_classes))} "
            f"({_label_examples(data.gallery, gallery_classes)}). Point query and gallery at "
            "folders with the same class names (an image folder gives class folders of the "
            "same name the same label; other datasets must use the same label ids in both)")
    with_positive = int(np.isin(query_labels, shared).sum())
    return {"queries": len(query_labels), "with_positive": with_positive,
            "query_classes": len(query_classes), "gallery_classes": len(gallery_classes),
            "shared_classes": len(shared)}


# --------------------------------------------------------------------------- image scan

def _in_memory(dataset: LabeledImages) -> bool:
    """Nothing to decode: the pixels are already tensors. Dataset classes outside the
    core can say the same with a class attribute ``in_memory = True``."""
    return isinstance(dataset, TensorImages) or bool(getattr(dataset, "in_memory", False))


class _Decode(Dataset):
    """Item ``k`` of the work list, decoded in a loader worker; its error text is
    returned, not raised, so one bad file does not stop the scan."""

    def __init__(self, sources: list[LabeledImages], source: np.ndarray, index: np.ndarray):
        self.sources, self.source, self.index = sources, source, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[int, str | None]:
        try:
            self.sources[int(self.source[k])][int(self.index[k])]
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a finding
            # FileImages wraps the decoder's error in its own advice; report the cause
            cause = exc.__cause__ if isinstance(exc, DatasetError) and exc.__cause__ else exc
            return k, f"{type(cause).__name__}: {cause}"
        return k, None


def _failures(batch: list[tuple[int, str | None]]) -> tuple[int, list[tuple[int, str]]]:
    """Collate in the worker: only failures travel back (no pixels, nothing stacked)."""
    return len(batch), [(k, error) for k, error in batch if error is not None]


@dataclass
class _Split:
    name: str
    base: LabeledImages
    index: np.ndarray  # the split's items, as indices into base


def scan_images(datasets: dict[str, LabeledImages | None], workers: int = 2,
                progress: bool = True) -> None:
    """Decode every image of every dataset once and raise one :class:`DatasetError` that
    lists every unreadable file, so they can all be fixed in one go.

    ``datasets`` maps a split name (shown in the error) to a dataset; ``None`` values are
    ignored. Subsets share their parent's items and a file is decoded once however many
    splits hold it. In-memory datasets (the synthetic benchmark, CIFAR-100) are skipped.
    ``workers=0`` decodes in this process.
    """
    splits, sources, source_of = [], [], {}
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        base, index = _resolve(dataset)
        if _in_memory(base):
            logger.debug("check-data: %s is in memory, nothing to decode", name)
            continue
        splits.append(_Split(name, base, index))
        if id(base) not in source_of:
            source_of[id(base)] = len(sources)
            sources.append(base)

    # the work list: each source's items that some split uses, each path once
    file_sources = sum(isinstance(s, FileImages) for s in sources)
    seen_paths: set[str] = set()
    work_source, work_index = [], []
    for s, base in enumerate(sources):
        used = np.unique(np.concatenate([sp.index for sp in splits if sp.base is base]))
        if isinstance(base, FileImages) and file_sources > 1:  # splits built apart may share files
            fresh = []
            for i in used:
                path = str(base.paths[int(i)])
                if path not in seen_paths:
                    seen_paths.add(path)
                    fresh.append(i)
            used = np.asarray(fresh, dtype=np.int64)
        work_source.append(np.full(len(used), s, dtype=np.int32))
        work_index.append(used)
    if not work_index or not sum(len(w) for w in work_index):
        return
    source = np.concatenate(work_source)
    index = np.concatenate(work_index)

    total = len(index)
    workers = max(0, int(workers))
    batch_size = int(np.clip(math.ceil(total / (max(workers, 1) * 8)), 1, 64))
    workers = min(workers, math.ceil(total / batch_size))
    loader = DataLoader(_Decode(sources, source, index), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_failures)
    failed: dict[int, str] = {}
    with tqdm(total=total, unit="img", desc="check data", disable=not progress) as bar:
        for done, failures in loader:
            failed.update(failures)
            bar.update(done)
            if failures:
                bar.set_postfix(unreadable=len(failed))
    if failed:
        raise DatasetError(_scan_report(failed, total, splits, sources, source, index))


def _scan_report(failed: dict[int, str], total: int, splits: list[_Split],
                 sources: list[LabeledImages], source: np.ndarray, index: np.ndarray) -> str:
    """One line per unreadable file: the splits that hold it, its path (or, for datasets
    without paths, its index in each split) and the decoder's error."""
    order = sorted(failed)
    by_path: dict[str, str] = {}  # file -> error
    by_item: dict[tuple[int, int], str] = {}  # (source, index in source) -> error
    for k in order:
        base = sources[int(source[k])]
        if isinstance(base, FileImages):
            by_path[str(base.paths[int(index[k])])] = failed[k]
        else:
            by_item[(int(source[k]), int(index[k]))] = failed[k]

    holders: dict[Any, list[str]] = {}
    for sp in splits:
        if isinstance(sp.base, FileImages):
            if by_path:
                for i in sp.index:
                    path = str(sp.base.paths[int(i)])
                    if path in by_path:
                        holders.setdefault(path, [])
                        if sp.name not in holders[path]:
                            holders[path].append(sp.name)
            continue
        s = next(t for t, base in enumerate(sources) if base is sp.base)
        bad = np.asarray([i for (t, i) in by_item if t == s], dtype=np.int64)
        if bad.size:
            for local in np.flatnonzero(np.isin(sp.index, bad)):
                holders.setdefault((s, int(sp.index[local])), []).append(f"{sp.name} item {local}")

    lines = []
    for k in order:
        base = sources[int(source[k])]
        if isinstance(base, FileImages):
            path = str(base.paths[int(index[k])])
            lines.append(f"  {', '.join(holders.get(path, ['?']))}: {path} ({failed[k]})")
        else:
            key = (int(source[k]), int(index[k]))
            lines.append(f"  {', '.join(holders.get(key, ['?']))}: {failed[k]}")
    shown = lines[:MAX_LISTED]
    if len(lines) > MAX_LISTED:
        shown.append(f"  and {len(lines) - MAX_LISTED} more")
    return (f"{len(failed)} of {total} images cannot be decoded:\n" + "\n".join(shown) +
            "\nRemove or replace these files (re-save them from their source, or delete "
            "them from their class folders), then run the check again")
