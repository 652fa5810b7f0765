"""Bundles from paired embeddings (``compatzoo fit-adapter``): an upgrader fitted on the old
and the new embedding of the same items, read from files, measured on held-out pairs and
written as an adapter bundle -- no encoders, the upgrader and its card."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compatzoo.bundles.bundle import BundleContents, Model, write_bundle
from compatzoo.bundles.format import BundleConfig, ComponentEntry
from compatzoo.errors import DatasetError, InvalidFeaturesError, SpecError
from compatzoo.interfaces import HopData, check_features

#: What the held-out report shows, as the names compatzoo.retrieval computes them by: with
#: one positive per query, cmc@k is recall@k and mAP the mean reciprocal rank.
METRICS = {"recall@1": "cmc@1", "recall@5": "cmc@5", "recall@10": "cmc@10", "map": "map"}
PROTOCOL = ("Measured on held-out pairs: each item's own pair is its one positive; queries "
            "are the items' new embeddings (adapted into the old space for a2o), the gallery "
            "is the held-out items' stored embeddings (upgraded for n2u).")


def read_embeddings(source: str | Path, *, column: str = "embedding", key: str | None = None,
                    id_column: str = "id") -> tuple[np.ndarray, np.ndarray | None]:
    """All rows of one embedding file, as the gallery jobs read them (``.npy``,
    ``.safetensors`` -- its one tensor, ``key``, or ``FILE.safetensors:KEY`` --, Parquet,
    faiss flat index), and the items' ids where the file has them: a Parquet
    ``id_column`` or a faiss ``IndexIDMap``."""
    from compatzoo.jobs.stores import open_stored

    text = str(source)
    if ".safetensors:" in text:
        text, key = text.rsplit(":", 1)
    path = Path(text)
    if not path.is_file():
        raise DatasetError(f"embedding file {path} does not exist")
    stored = open_stored(path, column=column, key=key)
    if stored.rows == 0:
        raise InvalidFeaturesError(f"{path} holds no embeddings")
    with stored.reader() as reader:
        values, carried = reader.take(stored.rows)
    if carried is None or isinstance(carried, np.ndarray):      # arrays; faiss ids
        return values, carried
    if id_column not in carried.schema.names:
        return values, None
    return values, carried.column(id_column).to_numpy(zero_copy_only=False)


def read_pairs(old: str | Path, new: str | Path, **options) -> tuple[np.ndarray, np.ndarray]:
    """The paired embeddings of two files, refused when they cannot describe the same
    items in the same order: other row counts, other ids (when both carry ids), rows with
    NaN or inf (named by row)."""
    (old_values, old_ids), (new_values, new_ids) = (read_embeddings(p, **options)
                                                    for p in (old, new))
    if len(old_values) != len(new_values):
        raise InvalidFeaturesError(
            f"{old} holds {len(old_values)} embeddings but {new} holds {len(new_values)}; "
            "paired files hold the same items in the same order, one row each")
    if old_ids is not None and new_ids is not None:
        old_ids, new_ids = (np.asarray(ids, dtype=object) for ids in (old_ids, new_ids))
        differ = np.flatnonzero(old_ids != new_ids)
        if len(differ):
            row = int(differ[0])
            raise InvalidFeaturesError(
                f"{old} and {new} pair different items: {len(differ)} of {len(old_ids)} rows "
                f"have other ids (first: row {row}, {old_ids[row]!r} vs {new_ids[row]!r}); "
                "write both files in the same item order")
    for path, values in ((old, old_values), (new, new_values)):
        check_features(values, None, str(path))
    return old_values, new_values


def split_pairs(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` row indices: a seeded random ``val_fraction`` held out."""
    if not 0 <= val_fraction < 1:
        raise SpecError(f"the validation fraction must lie in [0, 1), got {val_fraction}")
    held = round(val_fraction * n)
    if val_fraction > 0 and held < 2:
        raise SpecError(f"a validation fraction of {val_fraction} holds out {held} of {n} "
                        "pairs; retrieval on them needs at least 2: raise it, or give 0 to "
                        "fit on every pair without a report")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def held_out_report(upgrader, old: np.ndarray, new: np.ndarray,
                    direction: str) -> dict[str, dict[str, float]]:
    """Retrieval on held-out pairs, each item's own pair its one positive: n2o (the
    unadapted baseline, where the widths agree), n2u for a gallery adapter (new queries,
    upgraded gallery) or a2o for a query adapter (adapted queries, old gallery), and n2n,
    the full re-embedding's reference."""
    from compatzoo.retrieval import evaluate

    settings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if old.shape[1] == new.shape[1]:
        settings["n2o"] = (new, old)
    if direction == "gallery":
        settings["n2u"] = (new, upgrader.upgrade(old))
    else:
        settings["a2o"] = (upgrader.upgrade(new), old)
    settings["n2n"] = (new, new)
    items = np.arange(len(old))
    report = {}
    for setting, (queries, gallery) in settings.items():
        values = evaluate(queries, items, gallery, items, metrics=list(METRICS.values()))
        report[setting] = {name: values[metric] for name, metric in METRICS.items()}
    return report


def fit_adapter_bundle(old: str | Path, new: str | Path, out: str | Path, *,
                       method: str, direction: str = "gallery",
                       params: Mapping[str, Any] | None = None, val_fraction: float = 0.1,
                       seed: int = 0, name: str | None = None, progress: bool = True,
                       **read_options) -> BundleConfig:
    """Fit upgrader ``method`` on the pairs of files ``old`` and ``new``, report retrieval
    on a held-out split and write the adapter bundle ``out``.

    ``direction="query"`` fits new -> old (the adapter maps new queries into the old
    space); only upgraders with a ``direction`` param serve it. Every check on the files
    and the params runs before fitting; ``read_options`` go to :func:`read_embeddings`.
    """
    from compatzoo.registry import get_registry
    from compatzoo.specs import validate_params

    if direction not in ("gallery", "query"):
        raise SpecError(f"direction must be gallery or query, got {direction!r}")
    params = dict(params or {})
    if params.setdefault("direction", direction) != direction:
        raise SpecError(f"direction {direction!r} but the params say {params['direction']!r}; "
                        "give the direction once")
    registry = get_registry()
    component = registry.get("upgrader", method).component
    if "direction" not in component.Params.model_fields:
        if direction == "query":
            adapters = sorted(r.name for r in registry.records() if r.kind == "upgrader"
                              and "direction" in r.params_model.model_fields)
            raise SpecError(f"upgrader {method!r} only maps stored galleries; a query adapter "
                            f"is one of {adapters}")
        del params["direction"]
    validated = validate_params("upgrader", method, params)
    old_values, new_values = read_pairs(old, new, **read_options)
    d_old, d_new = old_values.shape[1], new_values.shape[1]
    widths = (d_old, d_new) if direction == "gallery" else (d_new, d_old)
    torch.manual_seed(seed)
    upgrader = component(validated, input_dim=widths[0], output_dim=widths[1])
    train, held = split_pairs(len(old_values), val_fraction, seed)
    hop = HopData(old_features=torch.from_numpy(old_values[train]),
                  new_features=torch.from_numpy(new_values[train]),
                  labels=torch.zeros(len(train), dtype=torch.long), seed=seed,
                  progress=progress)
    try:
        upgrader.fit(hop)
    except InvalidFeaturesError as exc:
        raise type(exc)(f"{exc} (fitting on {len(train)} of {len(old_values)} pairs, "
                        f"{len(held)} held out for validation)") from None
    upgrader.eval()
    evaluation: dict[str, Any] = {"pairs": {"train": len(train), "held_out": len(held)}}
    if len(held):
        evaluation.update(primary="recall@10", metrics=list(METRICS), leave_one_out=False,
                          protocol=PROTOCOL, settings=held_out_report(
                              upgrader, old_values[held], new_values[held], direction))
    validated = validated.model_dump(mode="json")
    spec = {"fit_adapter": {"old": str(old), "new": str(new), "method": method,
                            "direction": direction, "params": validated,
                            "val_fraction": val_fraction, "seed": seed}}
    return write_bundle(out, BundleContents(
        name=name or Path(out).name, experiment="fit-adapter", seed=seed, spec=spec,
        lineage=["old", "new"], preprocess=None,
        old=Model("old", None, None, embedding_dim=d_old),
        new=Model("new", None, None, embedding_dim=d_new),
        upgrader_spec=ComponentEntry(name=method, params=validated), upgrader=upgrader,
        evaluation=evaluation))
