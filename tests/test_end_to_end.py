import json

import pytest

from compatzoo.experiment import run_experiment
from compatzoo.report import format_table
from compatzoo.specs import load_spec

TINY_DATA = {"num_train_classes": 12, "num_test_classes": 6, "train_images_per_class": 16,
             "query_per_class": 2, "gallery_per_class": 4, "image_size": 16}
OLD_ENCODER = {"name": "tiny-cnn", "params": {"widths": [4, 8], "embedding_dim": 8}}
NEW_ENCODER = {"name": "tiny-cnn", "params": {"widths": [8, 16], "embedding_dim": 16}}
TRAIN = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01}


def tiny_spec(new_encoder=NEW_ENCODER):
    return {
        "name": "tiny",
        "data": {"dataset": {"name": "synthetic", "params": TINY_DATA},
                 "allocation": {"name": "extended-data", "params": {"fraction": 0.5}}},
        "old": {"encoder": OLD_ENCODER, "head": "cosface", "train": TRAIN},
        "new_defaults": {"encoder": new_encoder, "head": "cosface", "train": TRAIN},
        "new": [{"name": "independent"},
                {"name": "bct", "losses": ["classification", "bct"]}],
        "evaluation": {"metrics": ["map@100", "cmc@1"],
                       "backfill": {"points": 3, "nfr_k": [1]}},
    }


@pytest.mark.parametrize("new_encoder", [OLD_ENCODER, NEW_ENCODER], ids=["same-dim", "wider"])
def test_tiny_upgrade_runs_end_to_end(tmp_path, new_encoder):
    spec = load_spec(tiny_spec(new_encoder))
    results = run_experiment(spec, tmp_path, progress=False)
    table = results["evaluation"]["table"]
    assert set(table) == {"o2o", "n2o/independent", "n2n/independent", "n2o/bct", "n2n/bct"}
    for row in table.values():
        assert set(row) == {"map@100", "cmc@1"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert results["evaluation"]["paragon"] == "independent"
    assert set(results["evaluation"]["criterion"]) == {"independent", "bct"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["evaluation"]["table"] == table and saved["seed"] == 0
    assert (tmp_path / "compatibility.png").stat().st_size > 0
    assert (tmp_path / "checkpoints" / "bct" / "model.safetensors").is_file()
    text = format_table(results["evaluation"])
    assert "n2o/bct" in text and "BCT criterion" in text
    curves = results["evaluation"].get("backfill", {})
    if new_encoder is OLD_ENCODER:  # a mixed gallery needs one embedding dim
        curve = curves["bct"]["random"]
        assert curve["fractions"] == [0.0, 0.5, 1.0]
        assert curve["metrics"]["map@100"][0] == pytest.approx(table["n2o/bct"]["map@100"])
        assert curve["metrics"]["map@100"][-1] == pytest.approx(table["n2n/bct"]["map@100"])
        assert (tmp_path / "backfill_bct.png").is_file()
    else:
        assert curves == {}


def test_a_loss_the_data_cannot_serve_fails_before_any_training(tmp_path, monkeypatch):
    import compatzoo.experiment as experiment
    from compatzoo.errors import SpecError

    spec = tiny_spec()
    spec["data"]["dataset"]["params"] = {**TINY_DATA, "num_train_classes": 2}
    spec["data"]["allocation"] = {"name": "open-class", "params": {"fraction": 0.5}}
    spec["old"]["train"] = {**TRAIN, "batch_size": 8}       # the old model sees 16 images
    spec["new"] = [{"name": "ract", "losses": ["classification", "ract"]}]
    trained = []
    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: trained.append(1))
    with pytest.raises(SpecError, match="'ract'.*2 classes.*has 1 class"):
        run_experiment(load_spec(spec), tmp_path, progress=False)
    assert trained == []


def test_upgrader_lifecycle_reports_n2u_costs_and_a_curve_per_scheduler(tmp_path):
    spec = tiny_spec(OLD_ENCODER)
    spec["new"] = [{"name": "ff", "upgrader": {"name": "fastfill", "params": {
        "side_info": "none", "epochs": 2, "batch_size": 64, "inner_dim": 32}}}]
    spec["evaluation"]["backfill"]["schedulers"] = ["random", "fastfill-sigma",
                                                    "oracle-distance"]
    evaluation = run_experiment(load_spec(spec), tmp_path, progress=False)["evaluation"]
    table = evaluation["table"]
    assert set(table) == {"o2o", "n2o/ff", "n2u/ff", "n2n/ff"}
    curves = evaluation["backfill"]["ff"]
    assert set(curves) == {"random", "fastfill-sigma", "oracle-distance"}
    assert [c["oracle"] for c in curves.values()] == [False, False, True]
    for curve in curves.values():  # the not-yet-backfilled gallery is the upgraded one
        assert curve["metrics"]["map@100"][0] == pytest.approx(table["n2u/ff"]["map@100"])
        assert curve["metrics"]["map@100"][-1] == pytest.approx(table["n2n/ff"]["map@100"])
    cost = evaluation["upgrade_cost"]["ff"]
    assert cost["stored_bytes_per_item"] == 4 * 8 and cost["side_bytes_per_item"] == 0
    assert cost["upgrade_macs_per_item"] > 0 and cost["reembed_macs_per_item"] > 0
    assert (tmp_path / "checkpoints" / "ff" / "upgrader" / "model.safetensors").is_file()
    assert "upgrade per gallery item" in format_table(evaluation)
