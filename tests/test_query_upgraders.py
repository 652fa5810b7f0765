"""Query upgraders in a run (Drift-Adapter's direction): the new model's queries mapped
into the old space, against the untouched old gallery, reported as a2o beside o2o, n2o,
n2u and n2n with their cost per query."""

from __future__ import annotations

import pytest
import torch
from test_end_to_end import tiny_spec

from compatzoo.errors import SpecError
from compatzoo.evaluation import evaluate_run
from compatzoo.experiment import RunOptions, embed, fit_upgraders, load_data, train
from compatzoo.lineage import ROOT, plan
from compatzoo.retrieval import evaluate
from compatzoo.specs import load_spec

QUERY = {"direction": "query"}


def query_spec() -> dict:
    spec = tiny_spec()                    # old 8-d, new 16-d
    spec["new"] = [
        {"name": "indep", "upgrader": {"name": "procrustes"},
         "direct_upgrades": [
             {"source": "old", "name": "q-procrustes",
              "upgrader": {"name": "procrustes", "params": QUERY}},
             {"source": "old", "name": "q-mlp",
              "upgrader": {"name": "residual-mlp", "params": {**QUERY, "epochs": 3}}},
             {"source": "old", "name": "q-bict", "upgrader": {
                 "name": "bict-mlp", "params": {**QUERY, "hidden_dim": 32, "epochs": 3}}}]},
        {"name": "qonly", "upgrader": {"name": "affine", "params": {**QUERY, "ridge": 0.1}}},
    ]
    spec["evaluation"]["backfill"] = None
    return spec


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
    lineage = plan(load_spec(query_spec()))
    data = load_data(lineage)
    options = RunOptions(progress=False, checkpoints=tmp_path_factory.mktemp("ckpt"))
    models = train(lineage, data, options)
    embeddings = embed(models, data, options)
    upgrades = fit_upgraders(lineage, data, models, embeddings, options)
    return lineage, data, embeddings, upgrades, evaluate_run(lineage, data, models,
                                                             embeddings, upgrades)


def test_query_hops_have_swapped_widths_and_never_join_a_chain():
    lineage = plan(load_spec(query_spec()))
    hop = lineage.hops["qonly"]
    assert hop.maps_queries and (hop.input_dim, hop.output_dim) == (16, 8)
    assert lineage.chain_hop("qonly") is None and not lineage.has_upgrader("qonly")
    assert lineage.chain_hop("indep").direction == "gallery"
    bict = lineage.hops["indep/q-bict"]       # BiCT's psi offers the query direction too
    assert bict.maps_queries and (bict.input_dim, bict.output_dim) == (16, 8)


def test_a2o_is_the_adapted_queries_against_the_stored_old_gallery(phases):
    lineage, data, embeddings, upgrades, evaluation = phases
    table = evaluation["table"]
    assert [k for k in table if k.startswith("a2o/")] == [
        "a2o/indep/q-procrustes", "a2o/indep/q-mlp", "a2o/indep/q-bict", "a2o/qonly"]
    assert "n2u/qonly" not in table and "n2u/indep" in table
    for label in ("indep/q-procrustes", "indep/q-mlp", "indep/q-bict", "qonly"):
        upgrader = upgrades.hops[label].upgrader
        adapted = torch.from_numpy(upgrader.upgrade(embeddings[label.split("/")[0]].query))
        assert adapted.shape[1] == 8
        direct = evaluate(adapted, data.data.query.labels, embeddings[ROOT].gallery,
                          data.gallery_images.labels, metrics=("map@100", "cmc@1"))
        assert table[f"a2o/{label}"] == direct
    # An orthogonal map is an isometry: <q, R g> = <R^T q, g>, and |R g| = |g|, so the
    # query adapter ranks the old gallery as the gallery adapter's upgraded one does.
    assert table["a2o/indep/q-procrustes"] == pytest.approx(table["n2u/indep"], abs=1e-6)
    cost = evaluation["upgrade_cost"]["qonly"]
    assert cost["adapt_macs_per_query"] == 16 * 8 and cost["embed_macs_per_query"] > 0
    assert "upgrade_macs_per_item" in evaluation["upgrade_cost"]["indep"]


def test_a_query_upgrader_from_a_newer_model_is_refused_at_plan_time():
    spec = query_spec()
    spec["new"].append({"name": "v3", "previous": "indep",
                        "upgrader": {"name": "procrustes", "params": QUERY}})
    with pytest.raises(SpecError, match="query upgraders serve the old gallery"):
        plan(load_spec(spec))
