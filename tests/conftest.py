"""Test-wide settings: offline Hub, strict plugin loading, threads matched to cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COMPATZOO_STRICT_PLUGINS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see compatzoo/cli.py

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Nothing a test measures or caches (the search backend choice) reaches the user's
    cache, or another test."""
    monkeypatch.setenv("COMPATZOO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("COMPATZOO_SEARCH_BACKEND", raising=False)
    from compatzoo.retrieval import calibration

    monkeypatch.setattr(calibration, "_chosen", {})


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees the installed plugins, not registrations made by another test."""
    from compatzoo.registry import reset_registry

    reset_registry()
    yield
    reset_registry()


# --------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="session")
def tiny_lineage(tmp_path_factory):
    """A tiny run as phases (so tests hold the in-run tensors) with a bundle per model:
    a BiCT chain old -> v2 -> v3, FCT with side information (f2), RACT with its head (r2).
    Returns (lineage, run data, embeddings, upgrades, evaluation, bundles folder)."""
    from test_sequential import FCT, PSI, sequential_spec

    from compatzoo.evaluation import evaluate_run
    from compatzoo.experiment import (RunOptions, embed, fit_upgraders, load_data, train,
                                      write_bundles)
    from compatzoo.lineage import plan
    from compatzoo.specs import load_spec

    models = [
        {"name": "v2", "stage": 1, "losses": ["classification", "cosine"],
         "upgrader": {"name": "bict-mlp", "params": PSI}},
        {"name": "v3", "previous": "v2", "losses": ["classification", "cosine"],
         "upgrader": {"name": "bict-mlp", "params": PSI}},
        {"name": "f2", "stage": 1, "upgrader": {"name": "fct-transformation", "params": FCT}},
        {"name": "r2", "stage": 1, "losses": ["classification", "ract"]},
    ]
    spec = sequential_spec(models)
    spec["evaluation"]["backfill"]["schedulers"] = ["random", "uncertainty"]
    lineage = plan(load_spec(spec))
    data = load_data(lineage)
    options = RunOptions(progress=False, checkpoints=tmp_path_factory.mktemp("ckpt"))
    models = train(lineage, data, options)
    embeddings = embed(models, data, options)
    upgrades = fit_upgraders(lineage, data, models, embeddings, options)
    evaluation = evaluate_run(lineage, data, models, embeddings, upgrades)
    folder = tmp_path_factory.mktemp("bundles")
    write_bundles(lineage, data, models, upgrades, evaluation, folder)
    return lineage, data, embeddings, upgrades, evaluation, folder


