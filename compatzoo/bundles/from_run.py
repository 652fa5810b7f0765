"""Bundles from a run: one per new model, from the models in memory at the end of
``compatzoo run``, or re-created later from a run folder's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compatzoo.bundles.bundle import BundleContents, Model, write_bundle
from compatzoo.bundles.format import BundleConfig, ComponentEntry
from compatzoo.data.preprocess import Preprocess
from compatzoo.engine.checkpoints import load_state, read_manifest
from compatzoo.errors import CheckpointError, SpecError
from compatzoo.interfaces import GalleryUpgrader
from compatzoo.lineage import ROOT, Lineage, plan
from compatzoo.specs import load_spec

BUNDLES = "bundles"


def bundle_evaluation(evaluation: dict[str, Any], name: str, previous: str) -> dict[str, Any]:
    """The run's figures for the bundle ``previous -> name``, seen from its own old model:
    o2o (``previous`` on its own gallery), n2o, n2u (that gallery upgraded by the hop)
    and n2n, with ``name``'s criterion. For a hop after the first, the run measured n2o
    only inside the chain's compatibility matrix (one metric, the primary)."""
    table = evaluation["table"]
    if previous == ROOT:
        settings = {"o2o": table["o2o"], "n2o": table[f"n2o/{name}"]}
        upgraded = f"n2u/{name}"
    else:
        primary = evaluation["primary"]
        settings = {"o2o": table[f"n2n/{previous}"],
                    "n2o": {primary: _chain_value(evaluation, name, previous)}}
        upgraded = f"n2u/{name}/from-{previous}"
    if upgraded in table:
        settings["n2u"] = table[upgraded]
    settings["n2n"] = table[f"n2n/{name}"]
    out = {"primary": evaluation["primary"], "metrics": evaluation["metrics"],
           "leave_one_out": evaluation["leave_one_out"], "settings": settings,
           "criterion": evaluation["criterion"].get(name, {})}
    curves = evaluation.get("backfill", {}).get(name)
    if curves:
        out["backfill_auc"] = {label: c["auc"] for label, c in curves.items()}
    return out


def _chain_value(evaluation: dict[str, Any], query: str, gallery: str) -> float:
    """``M(query, gallery)`` from the backfilled matrix of a chain holding both."""
    for chain in evaluation.get("sequential", {}).values():
        matrix = chain["backfilled"]
        if query in matrix["names"] and gallery in matrix["names"]:
            return matrix["values"][matrix["names"].index(query)][matrix["names"].index(gallery)]
    raise CheckpointError(f"the run's results hold no matrix with {query} and {gallery}")


def _entry(spec) -> ComponentEntry:
    return ComponentEntry(name=spec.name, params=spec.params)


def reads_new_head(lineage: Lineage, name: str) -> bool:
    """Whether a backfill scheduler of the spec orders ``name``'s gallery with its head."""
    backfill = lineage.spec.evaluation.backfill
    return (backfill is not None and name in (backfill.models or lineage.new)
            and any("new_head" in s.component.requires for s in backfill.schedulers))


def run_bundle(lineage: Lineage, name: str, encoders: dict[str, Any], heads: dict[str, Any],
               upgrader: GalleryUpgrader | None, num_classes: int,
               preprocess: Preprocess | None, evaluation: dict[str, Any]) -> BundleContents:
    """The contents of the bundle of new model ``name``: the model it follows, itself and
    its chain hop."""
    generation = lineage.generations[name]
    previous = lineage.generations[generation.previous]
    head = heads[name] if reads_new_head(lineage, name) else None
    hop = lineage.chain_hop(name)
    return BundleContents(
        name=name, experiment=lineage.spec.name, seed=lineage.spec.seed,
        spec=lineage.spec.model_dump(mode="json"), lineage=lineage.path(name),
        preprocess=preprocess,
        old=Model(previous.name, _entry(previous.model.encoder), encoders[previous.name]),
        new=Model(name, _entry(generation.model.encoder), encoders[name],
                  _entry(generation.model.head) if head is not None else None, head,
                  num_classes),
        upgrader_spec=None if hop is None else _entry(hop.upgrader), upgrader=upgrader,
        parent=None if previous.name == ROOT else previous.name,
        evaluation=bundle_evaluation(evaluation, name, previous.name))


def bundle_from_run_dir(run_dir: str | Path, name: str, out: str | Path,
                        dtype: str = "float32") -> BundleConfig:
    """Re-create the bundle of new model ``name`` from a run folder (results.json and
    checkpoints/)."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise CheckpointError(f"{run_dir} has no results.json: give the folder a finished "
                              "`compatzoo run` wrote")
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{results_path} is not valid JSON ({exc})") from None
    if not isinstance(results, dict) or "spec" not in results:
        raise CheckpointError(f"{results_path} holds no run results (no 'spec')")
    lineage = plan(load_spec(results["spec"]))
    if name not in lineage.new:
        raise SpecError(f"run {run_dir} has no new model {name!r}; its new models are "
                        f"{lineage.new}")
    checkpoints = run_dir / "checkpoints"
    encoders, heads = {}, {}
    num_classes = None
    for generation in (lineage.generations[lineage.generations[name].previous],
                       lineage.generations[name]):
        folder = checkpoints / generation.name
        num_classes = read_manifest(folder).get("num_classes")
        if num_classes is None:
            raise CheckpointError(f"{folder}/config.json names no num_classes; re-run")
        encoder, head = generation.build(num_classes)
        load_state(folder, {"encoder": encoder, "head": head})
        encoders[generation.name], heads[generation.name] = encoder.eval(), head.eval()
    hop = lineage.chain_hop(name)
    upgrader = None
    if hop is not None:
        upgrader = hop.build()
        load_state(checkpoints / name / hop.folder, {"upgrader": upgrader})
        upgrader.eval()
    preprocess = results.get("dataset", {}).get("preprocess")
    contents = run_bundle(lineage, name, encoders, heads, upgrader, num_classes,
                          None if preprocess is None else Preprocess.model_validate(preprocess),
                          results["evaluation"])
    return write_bundle(out, contents, dtype)
