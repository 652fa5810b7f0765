"""A run on a dataset with per-query ground truth (Revisited Oxford/Paris) is scored by the
revisitop protocol: the table, the backfill curve, and metric names checked before
training."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_image_folder import write_images
from test_data_revisited import GND, write_revisited
from test_end_to_end import OLD_ENCODER, TRAIN, tiny_spec

from compatzoo.errors import SpecError
from compatzoo.experiment import run_experiment
from compatzoo.retrieval import evaluate_revisited
from compatzoo.retrieval.revisited import revisited_backfill_curve, revisited_metrics
from compatzoo.specs import load_spec


def test_the_curve_is_the_protocol_on_each_mixed_gallery():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(2, 6)).astype(np.float32)
    old, new = (rng.normal(size=(5, 6)).astype(np.float32) for _ in range(2))
    order = np.array([3, 0, 4, 1, 2])
    curve = revisited_backfill_curve(query, old, new, GND, order, points=6,
                                     metrics=("rmap-medium", "rmap-hard"))
    assert curve.fractions == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    for i, fraction in enumerate(curve.fractions):
        mixed = old.copy()
        mixed[order[:round(fraction * 5)]] = new[order[:round(fraction * 5)]]
        direct = evaluate_revisited(query, mixed, GND)
        assert curve.metrics["rmap-medium"][i] == direct["medium"]
        assert curve.metrics["rmap-hard"][i] == direct["hard"]
    assert curve.auc["rmap-medium"] == pytest.approx(np.mean(curve.metrics["rmap-medium"]))
    assert revisited_metrics(query, new, GND, ["rmap-easy"]) == {
        "rmap-easy": evaluate_revisited(query, new, GND)["easy"]}


def revisited_spec(tmp_path, metrics):
    for name, colour in (("a", (200, 10, 10)), ("b", (10, 200, 10)), ("c", (10, 10, 200))):
        write_images(tmp_path / "train" / name, 12, colour, size=(16, 16))
    write_revisited(tmp_path / "revisitop")
    spec = tiny_spec(OLD_ENCODER)
    spec["data"] = {"dataset": {"name": "revisited", "params": {
        "root": str(tmp_path / "revisitop"), "name": "roxford5k",
        "train": str(tmp_path / "train"), "image_size": 16}},
        "allocation": {"name": "extended-data", "params": {"fraction": 0.5}}}
    spec["old"]["train"] = {**TRAIN, "batch_size": 8, "epochs": 1}
    spec["new_defaults"]["train"] = {**TRAIN, "batch_size": 8, "epochs": 1}
    spec["new"] = [{"name": "bct", "losses": ["classification", "bct"]}]
    spec["evaluation"] = {"metrics": metrics, "primary": metrics[0],
                          "backfill": {"points": 3, "nfr_k": [1]}}
    return load_spec(spec)


def test_a_run_on_revisited_reports_revisitop_map(tmp_path):
    spec = revisited_spec(tmp_path, ["rmap-medium", "rmap-hard"])
    evaluation = run_experiment(spec, tmp_path / "run", progress=False)["evaluation"]
    assert set(evaluation["table"]) == {"o2o", "n2o/bct", "n2n/bct"}
    for row in evaluation["table"].values():
        assert set(row) == {"rmap-medium", "rmap-hard"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    curve = evaluation["backfill"]["bct"]["random"]
    assert curve["metrics"]["rmap-medium"][0] == evaluation["table"]["n2o/bct"]["rmap-medium"]
    assert curve["metrics"]["rmap-medium"][-1] == evaluation["table"]["n2n/bct"]["rmap-medium"]


@pytest.mark.parametrize("metrics, message", [
    (["map@100"], "scored by its per-query ground truth"),
])
def test_label_metrics_on_revisited_fail_before_training(tmp_path, metrics, message,
                                                          monkeypatch):
    import compatzoo.experiment as experiment

    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SpecError, match=message):
        run_experiment(revisited_spec(tmp_path, metrics), tmp_path / "run", progress=False)


def test_revisitop_metrics_on_labelled_data_fail_before_training(tmp_path, monkeypatch):
    import compatzoo.experiment as experiment

    spec = tiny_spec()
    spec["evaluation"] = {"metrics": ["rmap-medium"], "primary": "rmap-medium"}
    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SpecError, match="need a dataset with per-query ground truth"):
        run_experiment(load_spec(spec), tmp_path / "run", progress=False)
