"""``backend="auto"`` on a CPU: the faster of torch and faiss, measured on the search's
shapes, remembered per machine and shape class, overridable; the ranking never depends
on the choice."""

import json

import numpy as np
import pytest
from fixtures_retrieval import assert_no_near_ties, clustered

from compatzoo.retrieval import calibration, evaluate
from compatzoo.retrieval.search import FaissBackend, TorchBackend, resolve_backend


def test_small_searches_use_torch_without_measuring(monkeypatch):
    monkeypatch.setattr(calibration, "_measure", lambda *a: pytest.fail("measured"))
    assert isinstance(resolve_backend("auto", 10, 100, 1000, 64), TorchBackend)
    assert not calibration.cache_path().exists()


def test_the_choice_is_measured_once_then_read_from_the_cache(monkeypatch):
    monkeypatch.setattr(calibration, "CALIBRATE_ABOVE", 0)
    calls = []
    original = calibration._measure

    def measure(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(calibration, "_measure", measure)
    engine = resolve_backend("auto", 10, 64, 3000, 32)
    assert len(calls) == 1 and calls[0] == (64, 3000, 32, 11)
    stored = json.loads(calibration.cache_path().read_text())
    (key, choice), = stored.items()
    assert key.endswith("q64-g4096-d32-k16") and choice in ("torch", "faiss")
    assert isinstance(engine, FaissBackend if choice == "faiss" else TorchBackend)
    # a later process (empty memory) reads the file; a near shape shares the measurement
    monkeypatch.setattr(calibration, "_chosen", {})
    assert type(resolve_backend("auto", 12, 60, 2500, 32)) is type(engine)
    assert len(calls) == 1
    # another shape class is measured on its own
    resolve_backend("auto", 10, 64, 3000, 48)
    assert len(calls) == 2 and len(json.loads(calibration.cache_path().read_text())) == 2


@pytest.mark.parametrize("forced, kind", [("faiss", FaissBackend), ("torch", TorchBackend)])
def test_the_environment_overrides_the_measurement(monkeypatch, forced, kind):
    monkeypatch.setattr(calibration, "CALIBRATE_ABOVE", 0)
    monkeypatch.setattr(calibration, "_measure", lambda *a: pytest.fail("measured"))
    monkeypatch.setenv(calibration.OVERRIDE, forced)
    assert isinstance(resolve_backend("auto", 10, 64, 3000, 32), kind)


def test_an_unwritable_cache_only_means_measuring_again(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COMPATZOO_CACHE_DIR", str(blocker))     # a file, not a folder
    monkeypatch.setattr(calibration, "CALIBRATE_ABOVE", 0)
    assert isinstance(resolve_backend("auto", 5, 32, 500, 16), (TorchBackend, FaissBackend))


def test_evaluate_gives_the_same_metrics_whichever_backend_auto_picks(monkeypatch):
    query, query_labels, gallery, labels = clustered(np.random.default_rng(2), 40, 300, 10, 24)
    assert_no_near_ties(query, gallery, np.equal.outer(query_labels, labels))
    monkeypatch.setattr(calibration, "CALIBRATE_ABOVE", 0)
    results = {}
    for forced in ("torch", "faiss"):
        monkeypatch.setenv(calibration.OVERRIDE, forced)
        results[forced] = evaluate(query, query_labels, gallery, labels,
                                   ["map@100", "cmc@1", "map"], chunk_size=64)
    assert results["torch"] == results["faiss"]      # no near-ties: the same ranking
