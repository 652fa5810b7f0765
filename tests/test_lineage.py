"""The lineage a plan builds from a spec (widths from params, every check before any data
or training) and the run's phases as plain functions of their inputs."""

from __future__ import annotations

import copy

import pytest
import torch

import compatzoo
from compatzoo.encoders import ENCODERS, TinyCNN
from compatzoo.engine import extract_features
from compatzoo.errors import SpecError
from compatzoo.experiment import RunOptions, embed, fit_upgraders, load_data, train
from compatzoo.lineage import ROOT, plan
from compatzoo.plugin import StoredGallery
from compatzoo.evaluation import evaluate_run
from compatzoo.specs import load_spec

from test_end_to_end import OLD_ENCODER, TRAIN, tiny_spec
from test_sequential import PSI, WIDE, sequential_spec


def test_widths_come_from_params_without_building_any_encoder(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("plan built an encoder")

    monkeypatch.setattr(TinyCNN, "__init__", no_build)
    psi = {"name": "bict-mlp", "params": {**PSI, "input_momentum": 0}}
    spec = sequential_spec([{"name": "v2", "stage": 1, "encoder": WIDE, "upgrader": psi},
                            {"name": "v3", "previous": "v2", "upgrader": psi}])
    lineage = plan(load_spec(spec))
    assert {n: g.embedding_dim for n, g in lineage.generations.items()} == {
        "old": 8, "v2": 12, "v3": 8}
    hop = lineage.hops["v3"]
    assert (hop.source, hop.input_dim, hop.output_dim) == ("v2", 12, 8)


ENCODER_PARAMS = [("tiny-cnn", {"widths": [4, 8]}),
                  ("tiny-cnn", {"widths": [4, 8], "embedding_dim": None}),
                  *[(arch, {"embedding_dim": None}) for arch in sorted(ENCODERS)
                    if arch not in ("tiny-cnn", "open-clip")],
                  ("resnet18", {"embedding_dim": 64}),
                  ("open-clip", {"model_name": "RN50"}),
                  ("open-clip", {"model_name": "ViT-B-32", "embedding_dim": 16})]


@pytest.mark.parametrize("name,params", ENCODER_PARAMS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(ENCODER_PARAMS)])
def test_declared_widths_are_the_built_encoders_widths(name, params):
    if name == "open-clip":
        pytest.importorskip("open_clip")
    component = ENCODERS[name]
    declared = component.embedding_dim_of(component.Params(**params))
    assert compatzoo.create_encoder(name, **params).embedding_dim == declared


def test_the_paragon_is_the_first_model_whose_losses_read_no_old_model():
    spec = tiny_spec()
    spec["new"] = [{"name": "bct", "losses": ["classification", "bct"]},
                   {"name": "normed", "losses": ["classification", "feature-norm"]},
                   {"name": "independent"}]
    lineage = plan(load_spec(spec))
    assert lineage.paragon == "normed"
    assert [g.reads_previous_model for g in lineage.generations.values()] == [
        False, True, False, False]
    spec["evaluation"]["paragon"] = "independent"
    assert plan(load_spec(spec)).paragon == "independent"


def test_a_batch_too_small_for_a_loss_fails_at_plan_time_with_one_message():
    spec = tiny_spec()
    spec["new"] = [{"name": "ract", "losses": ["classification", "ract"],
                    "train": {**TRAIN, "batch_size": 1}}]
    with pytest.raises(SpecError, match="new model 'ract': its losses need samples of 2 classes "
                                        "in every batch .* batch_size is 1"):
        plan(load_spec(spec))


def test_a_scheduler_whose_signal_no_upgrader_publishes_fails_at_plan_time():
    spec = tiny_spec(OLD_ENCODER)
    spec["new"] = [{"name": "bct", "losses": ["classification", "bct"]}]
    spec["evaluation"]["backfill"]["schedulers"] = ["random", "fastfill-sigma"]
    with pytest.raises(SpecError, match=r"'fastfill-sigma' orders by the per-item signal\(s\) "
                                        r"\['sigma'\], but the upgrader of model 'bct' publishes "
                                        "none"):
        plan(load_spec(spec))
    spec["new"][0]["upgrader"] = {"name": "bict-mlp", "params": PSI}
    with pytest.raises(SpecError, match="publishes none"):
        plan(load_spec(spec))
    spec["evaluation"]["backfill"]["schedulers"] = ["oracle-distance"]
    plan(load_spec(spec))                                       # state it reads is there


def test_a_third_party_upgrader_and_scheduler_take_part_through_their_signal(tmp_path):
    """The example plugin's upgrader publishes ``upgraded_norm`` and its scheduler orders by
    it: routed by name, with nothing in the core about either."""
    spec = tiny_spec(OLD_ENCODER)
    spec["new"] = [{"name": "ls", "upgrader": "least-squares"}]
    spec["evaluation"]["backfill"]["schedulers"] = ["random", "shortest-first"]
    results = compatzoo.experiment.run_experiment(load_spec(spec), tmp_path, progress=False)
    evaluation = results["evaluation"]
    assert "n2u/ls" in evaluation["table"]
    assert set(evaluation["backfill"]["ls"]) == {"random", "shortest-first"}
    assert results["training"]["ls/upgrader"] == [{"epoch": 1}]


# --------------------------------------------------------------------------- phases
CHAIN = [{"name": "v2", "stage": 1, "losses": ["classification", "cosine"],
          "upgrader": {"name": "bict-mlp", "params": PSI}},
         {"name": "v3", "previous": "v2", "losses": ["classification", "cosine"],
          "upgrader": {"name": "bict-mlp", "params": PSI},
          "direct_upgrades": [{"source": "old", "upgrader": {"name": "bict-mlp",
                                                            "params": PSI}}]}]


@pytest.fixture(scope="module")
def phases():
    lineage = plan(load_spec(sequential_spec(copy.deepcopy(CHAIN))))
    run = load_data(lineage)
    options = RunOptions(progress=False)
    models = train(lineage, run, options)
    embeddings = embed(models, run, options)
    return lineage, run, options, models, embeddings


def test_fitting_is_a_function_of_its_inputs(phases, monkeypatch):
    """Each hop is built and fitted under its target's seed, so fitting twice from the
    same trained models gives the same upgraders and galleries, bit for bit."""
    import compatzoo_bict.upgrader as bict

    lineage, run, options, models, embeddings = phases
    seen = []
    real_fit = bict.BiCTMLP.fit
    monkeypatch.setattr(bict.BiCTMLP, "fit", lambda self, data: seen.append(data) or
                        real_fit(self, data))
    first = fit_upgraders(lineage, run, models, embeddings, options)
    torch.manual_seed(123)                                      # whatever ran before
    again = fit_upgraders(lineage, run, models, embeddings, options)
    assert list(first.hops) == ["v2", "v3", "v3/direct-from-old"]
    for key, stored in first.carried.items():
        assert torch.equal(stored.features, again.carried[key].features)
    assert torch.equal(first.direct["v3/direct-from-old"].features,
                       again.direct["v3/direct-from-old"].features)

    # The chained hop received, as data, v3's training items as the chain stores them:
    # embedded by the old model and carried through v2's psi (eq. 9 reads both copies).
    chained = seen[1]
    items = run.train_sets["v3"]
    phi_old = extract_features(models[ROOT].encoder, items, progress=False)
    assert torch.equal(chained.stored.previous, phi_old)
    assert torch.equal(chained.stored.features,
                       first.hops["v2"].upgrader.advance(StoredGallery(phi_old)).features)
    assert chained.previous_upgrader is not None and seen[2].stored is None   # from old

    # The galleries a fitted hop yields: each is one advance of the one before it.
    v2, v3 = first.hops["v2"].upgrader, first.hops["v3"].upgrader
    old_gallery = embeddings[ROOT].gallery
    assert torch.equal(first.carried[("old", "v2")].features,
                       v2.advance(StoredGallery(old_gallery)).features)
    assert torch.equal(first.carried[("old", "v3")].features,
                       v3.advance(first.carried[("old", "v2")]).features)
    assert torch.equal(first.hops["v3"].entering.features, first.carried[("old", "v2")].features)

    evaluation = evaluate_run(lineage, run, models, embeddings, first)
    assert {"n2u/v3", "n2u/v3/from-v2", "n2u/v3/direct-from-old"} <= set(evaluation["table"])
    assert evaluation["sequential"]["v3"]["models"] == ["old", "v2", "v3"]
