"""Sequential upgrades v1 -> v2 -> v3 from one spec: the spec's chain fields, the checks
that fail before any training, and a tiny end-to-end run of a BCT, a BiCT and an FCT chain
(with a direct v1 -> v3 hop) whose matrices must agree with the lifecycle table."""

from __future__ import annotations

import copy

import pytest
import yaml

from compatzoo.errors import SpecError
from compatzoo.experiment import run_experiment
from compatzoo.report import format_table
from compatzoo.specs import load_spec

from test_end_to_end import OLD_ENCODER, TINY_DATA, TRAIN

FCT = {"side_info": "autoencoder", "side_info_dim": 4, "epochs": 2, "batch_size": 64,
       "inner_dim": 32, "side_model": {"epochs": 1, "encoder_params": {"widths": [4, 8]}}}
PSI = {"hidden_dim": 16, "epochs": 2}
WIDE = {"name": "tiny-cnn", "params": {"widths": [4, 8], "embedding_dim": 12}}


def sequential_spec(new: list[dict]) -> dict:
    return {
        "name": "tiny-seq",
        "data": {"dataset": {"name": "synthetic", "params": TINY_DATA},
                 "allocation": {"name": "sequential",
                                "params": {"fractions": [0.25, 0.5, 1.0]}}},
        "old": {"encoder": OLD_ENCODER, "head": "cosface", "train": TRAIN},
        "new_defaults": {"encoder": OLD_ENCODER, "head": "cosface", "train": TRAIN},
        "new": new,
        "evaluation": {"metrics": ["map@100", "cmc@1"], "backfill": {"points": 3}},
    }


CHAINS = [
    {"name": "v2-bct", "stage": 1, "losses": ["classification", "bct"]},
    {"name": "v3-bct", "previous": "v2-bct", "losses": ["classification", "bct"]},
    {"name": "v2-bict", "stage": 1, "losses": ["classification", "cosine"],
     "upgrader": {"name": "bict-mlp", "params": PSI}},
    {"name": "v3-bict", "previous": "v2-bict", "losses": ["classification", "cosine"],
     "upgrader": {"name": "bict-mlp", "params": PSI}},
    {"name": "v2-fct", "stage": 1,
     "upgrader": {"name": "fct-transformation", "params": {**FCT, "transform_side": True}}},
    {"name": "v3-fct", "previous": "v2-fct",
     "upgrader": {"name": "fct-transformation", "params": FCT},
     "direct_upgrades": [{"source": "old",
                          "upgrader": {"name": "fct-transformation", "params": FCT}},
                         {"source": "v2-fct", "name": "no-side", "upgrader": {
                             "name": "fct-transformation",
                             "params": {**FCT, "side_info": "none"}}}]},
]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    out = tmp_path_factory.mktemp("chains")
    return out, run_experiment(load_spec(sequential_spec(CHAINS)), out, progress=False)


def primary(evaluation: dict, key: str) -> float:
    return evaluation["table"][key]["map@100"]


def test_each_model_trains_on_its_stage_after_the_model_it_follows(chains):
    _, results = chains
    stages = results["allocation"]["stages"]
    assert [s["images"] for s in stages] == [48, 96, 192]      # 12 classes x 16, nested
    assert results["allocation"]["models"] == {
        "old": 0, "v2-bct": 1, "v3-bct": 2, "v2-bict": 1, "v3-bict": 2, "v2-fct": 1,
        "v3-fct": 2}


def test_matrices_agree_with_the_lifecycle_table(chains):
    _, results = chains
    evaluation = results["evaluation"]
    sequential = evaluation["sequential"]
    assert set(sequential) == {"v3-bct", "v3-bict", "v3-fct"}     # the ends of the chains
    o2o = primary(evaluation, "o2o")

    bct = sequential["v3-bct"]
    assert bct["models"] == ["old", "v2-bct", "v3-bct"]
    assert "upgraded" not in bct                                   # no upgrader: M only
    m = bct["backfilled"]["values"]
    assert m[0][0] == pytest.approx(o2o)
    assert m[2][0] == pytest.approx(primary(evaluation, "n2o/v3-bct"))
    assert m[2][2] == pytest.approx(primary(evaluation, "n2n/v3-bct"))
    assert all(v is not None for row in m for v in row)            # the full square
    pairs = [(i, j) for i in range(3) for j in range(i)]
    assert bct["backfilled"]["average_compatibility"] == pytest.approx(
        sum(m[i][j] > m[j][j] for i, j in pairs) / 3)
    assert bct["backfilled"]["average_multi_model_accuracy"] == pytest.approx(
        sum(m[i][j] for i in range(3) for j in range(i + 1)) / 6)

    for leaf, v2 in (("v3-bict", "v2-bict"), ("v3-fct", "v2-fct")):
        chain = sequential[leaf]
        up, carried = chain["upgraded"]["values"], chain["carried"]["values"]
        assert [up[0][1], up[0][2], up[1][2]] == [None] * 3       # query older than gallery
        assert up[0][0] == pytest.approx(o2o)
        assert up[1][0] == pytest.approx(primary(evaluation, f"n2o/{v2}"))
        assert up[1][1] == pytest.approx(primary(evaluation, f"n2u/{v2}"))
        assert up[2][2] == pytest.approx(primary(evaluation, f"n2u/{leaf}"))
        # a gallery embedded at v1 and carried to v3 is the fully chained one
        assert carried[2][0] == pytest.approx(up[2][2])
        assert carried[2][1] == pytest.approx(primary(evaluation, f"n2u/{leaf}/from-{v2}"))
        assert carried[2][2] == pytest.approx(primary(evaluation, f"n2n/{leaf}"))
        path = chain["upgrade_path"]
        values = [s["value"] for s in path["steps"]]
        assert values == pytest.approx([up[0][0], up[1][0], up[1][1], up[2][1], up[2][2]])
        assert path["increasing"] == all(b > a for a, b in zip(values, values[1:]))

    assert "n2u/v3-fct/direct-from-old" in evaluation["table"]
    assert "n2u/v3-fct/no-side" in evaluation["table"]      # an alternative on the same model
    assert "n2u/v3-bct" not in evaluation["table"]


def test_costs_include_the_carried_side_information_and_the_momentum_copy(chains):
    _, results = chains
    cost = results["evaluation"]["upgrade_cost"]
    assert set(cost) == {"v2-bict", "v3-bict", "v2-fct", "v3-fct", "v3-fct/direct-from-old",
                         "v3-fct/no-side"}
    assert cost["v3-fct/no-side"]["side_bytes_per_item"] == 0
    assert cost["v2-bict"]["previous_copy_bytes_per_item"] == 0
    assert cost["v3-bict"]["previous_copy_bytes_per_item"] == 4 * 8      # eq. 9 keeps F_(i-2)
    assert cost["v3-fct"]["side_bytes_per_item"] == 4 * 4               # g carried psi_2
    # h and g both run on the hop that carries side information on
    assert cost["v2-fct"]["upgrade_macs_per_item"] > cost["v3-fct"]["upgrade_macs_per_item"]


def test_outputs_reach_the_user(chains):
    out, results = chains
    for leaf in ("v3-bct", "v3-bict", "v3-fct"):
        assert (out / f"chain_{leaf}.png").stat().st_size > 0
    assert (out / "checkpoints" / "v3-fct" / "upgrader-direct-from-old" / "model.safetensors").is_file()
    assert "v3-fct/direct-from-old/upgrader" in results["training"]
    text = format_table(results["evaluation"])
    assert "chain old -> v2-fct -> v3-fct" in text and "average multi-model accuracy" in text
    assert "upgrade path without re-embedding" in text


def test_chain_fields_are_validated_with_their_path():
    def broken(change) -> str:
        new = copy.deepcopy(CHAINS[:2])
        change(new)
        with pytest.raises(SpecError) as info:
            load_spec(sequential_spec(new))
        return str(info.value)

    assert "previous 'v9' must be 'old' or a new model listed before it" in broken(
        lambda n: n[1].update(previous="v9"))
    assert "listed before it" in broken(lambda n: n.reverse())
    assert "labels ['direct-from-old', 'direct-from-old'] repeat" in broken(
        lambda n: n[1].update(direct_upgrades=[{"source": "old", "upgrader": "identity"}] * 2))
    assert "stage" in broken(lambda n: n[0].update(stage=0))


def _no_training(monkeypatch):
    import compatzoo.experiment as experiment

    trained = []
    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: trained.append(1))
    return trained


def test_a_stage_the_allocation_lacks_fails_before_any_training(tmp_path, monkeypatch):
    trained = _no_training(monkeypatch)
    spec = sequential_spec([{"name": "v4", "stage": 3}])
    with pytest.raises(SpecError, match="stage 3.*gives 3 training sets"):
        run_experiment(load_spec(spec), tmp_path, progress=False)
    assert trained == []


def test_side_information_the_chain_drops_fails_before_any_training(tmp_path, monkeypatch):
    trained = _no_training(monkeypatch)
    fct = {"name": "fct-transformation", "params": FCT}            # no transform_side on v2
    spec = sequential_spec([{"name": "v2", "stage": 1, "upgrader": fct},
                            {"name": "v3", "previous": "v2", "upgrader": fct}])
    with pytest.raises(SpecError, match=r"old -> v2 -> v3 cannot carry.*side information"):
        run_experiment(load_spec(spec), tmp_path, progress=False)
    assert trained == []


def test_momentum_over_generations_of_different_widths_fails_before_any_training(
        tmp_path, monkeypatch):
    from compatzoo.lineage import plan

    trained = _no_training(monkeypatch)
    psi = {"name": "bict-mlp", "params": PSI}
    spec = sequential_spec([{"name": "v2", "stage": 1, "encoder": WIDE, "upgrader": psi},
                            {"name": "v3", "previous": "v2", "encoder": WIDE, "upgrader": psi}])
    with pytest.raises(SpecError, match="old -> v2 -> v3 cannot carry.*equal width"):
        run_experiment(load_spec(spec), tmp_path, progress=False)
    assert trained == []
    # vanilla sequential BiCT (m = 0) reads F_(i-1) only, so the widths may differ
    spec["new"][1]["upgrader"] = {"name": "bict-mlp", "params": {**PSI, "input_momentum": 0}}
    assert [g.embedding_dim for g in plan(load_spec(spec)).generations.values()] == [8, 12, 12]


def test_a_hop_that_would_adopt_another_kind_of_side_model_fails_before_any_training(
        tmp_path, monkeypatch):
    trained = _no_training(monkeypatch)
    spec = sequential_spec([
        {"name": "v2", "stage": 1, "upgrader": {"name": "fct-transformation",
                                                "params": {**FCT, "transform_side": True}}},
        {"name": "v3", "previous": "v2", "upgrader": {"name": "fct-transformation",
                                                      "params": {**FCT, "side_info": "alt-old"}}}])
    with pytest.raises(SpecError, match="'v3': its upgrader cannot follow the one of 'v2'.*"
                                        "cannot adopt a AutoencoderSide"):
        run_experiment(load_spec(spec), tmp_path, progress=False)
    assert trained == []


def test_chains_branch_and_end_at_models_no_other_follows(tmp_path, capsys):
    from compatzoo.cli import main
    from compatzoo.lineage import plan

    branches = sequential_spec([{"name": "a", "stage": 1}, {"name": "b", "previous": "a"},
                                {"name": "c", "previous": "a"}, {"name": "d"}])
    assert plan(load_spec(branches)).chains() == [["old", "a", "b"], ["old", "a", "c"]]
    spec = tmp_path / "chain.yaml"
    spec.write_text(yaml.safe_dump(sequential_spec(CHAINS[:2])))
    assert main(["validate", str(spec)]) == 0
    assert "chain: old -> v2-bct -> v3-bct" in capsys.readouterr().out
