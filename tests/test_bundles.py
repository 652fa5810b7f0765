"""Bundles: written by a run, re-created from its folder, loaded back bit for bit, their
model cards, shipped short names, and every kind of bad input failing with a message."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from compatzoo.bundles import BundleNotFoundError, load, open_bundle
from compatzoo.bundles.format import file_sha256
from compatzoo.bundles.from_run import bundle_from_run_dir
from compatzoo.errors import CheckpointError, DimensionMismatchError, InvalidFeaturesError
from compatzoo.specs import load_spec

from test_sequential import PSI

@pytest.fixture(scope="module")
def run(tiny_lineage):
    return tiny_lineage


@pytest.mark.parametrize("name", ["v2", "v3", "f2", "r2"])
def test_a_bundle_gives_the_runs_features_and_upgrades_bit_for_bit(run, name):
    lineage, data, embeddings, upgrades, _, folder = run
    bundle = load(folder / name)
    previous = lineage.generations[name].previous
    assert (bundle.config.old.generation, bundle.config.new.generation) == (previous, name)
    query = bundle.encode(data.data.query, batch_size=512)          # the run's batch size
    assert np.array_equal(query, embeddings[name].query.numpy())
    stored = bundle.encode(data.data.gallery, model="old", batch_size=512)
    assert np.array_equal(stored, embeddings[previous].gallery.numpy())
    side = bundle.side_information(data.data.gallery, batch_size=512)
    if bundle.upgrader is None:
        assert np.array_equal(bundle.upgrade(stored), stored)       # BCT-style: as it is
    else:
        expected = upgrades.carried[(previous, name)].features.numpy()
        assert np.array_equal(bundle.upgrade(stored, side), expected)
    assert (side is not None) == (name == "f2")                      # FCT stores side info
    assert bundle.new_head is not None                               # uncertainty reads it
    assert bundle.config.parent == (None if previous == "old" else previous)
    assert bundle.config.lineage == lineage.path(name)


def test_a_chain_of_bundles_carries_the_gallery_as_the_run_did(run):
    """v2's bundle then v3's, through ``advance``, is the old gallery carried to v3."""
    _, data, embeddings, upgrades, _, folder = run
    first, second = load(folder / "v2"), load(folder / "v3")
    from compatzoo.plugin import StoredGallery

    stored = StoredGallery(embeddings["old"].gallery)
    carried = second.advance(first.advance(stored, fingerprint=first.fingerprint))
    assert torch.equal(carried.features, upgrades.carried[("old", "v3")].features)
    assert torch.equal(carried.previous, upgrades.carried[("old", "v2")].features)


def test_the_weight_files_and_config_say_what_they_hold(run):
    _, _, _, _, evaluation, folder = run
    config = json.loads((folder / "f2" / "config.json").read_text())
    assert config["schema_version"] == 1 and config["spec"]["name"] == "tiny-seq"
    assert set(config["files"]) == {"old/model.safetensors", "new/model.safetensors",
                                    "new/head.safetensors", "side/model.safetensors",
                                    "upgrader/model.safetensors"}
    for relpath, digest in config["files"].items():
        assert file_sha256(folder / "f2" / relpath) == digest
    # the side encoder is stored once: the upgrader's copy is an alias into side/
    assert config["aliases"] and all(v.startswith("side/model.safetensors:")
                                     for v in config["aliases"].values())
    assert config["upgrader"]["side_dim"] == 4 and config["side"]["embedding_dim"] == 4
    assert config["preprocess"]["image_size"] == 16
    settings = config["evaluation"]["settings"]
    assert settings["n2u"] == evaluation["table"]["n2u/f2"]
    assert settings["o2o"] == evaluation["table"]["o2o"]


def test_the_model_card_is_a_hub_card_with_the_runs_figures(run):
    _, _, _, _, evaluation, folder = run
    card = ModelCard.load(folder / "v2" / "README.md")
    assert card.data.library_name == "compatzoo"
    assert {"compatzoo", "bict-mlp", "cosine"} <= set(card.data.tags)
    results = {(r.metric_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("n2u map@100", "map@100")] == pytest.approx(
        round(100 * evaluation["table"]["n2u/v2"]["map@100"], 2))
    assert "## Training spec" in card.text and "name: tiny-seq" in card.text


def test_the_bundle_command_recreates_a_run_bundle(tmp_path):
    from test_end_to_end import OLD_ENCODER, tiny_spec

    from compatzoo.experiment import run_experiment

    spec = tiny_spec(OLD_ENCODER)
    spec["new"] = [{"name": "psi", "losses": ["classification", "cosine"],
                    "upgrader": {"name": "bict-mlp", "params": PSI}}]
    run_experiment(load_spec(spec), tmp_path / "run", progress=False)
    written = json.loads((tmp_path / "run" / "bundles" / "psi" / "config.json").read_text())
    from compatzoo.cli import main

    assert main(["bundle", str(tmp_path / "run"), "--model", "psi", "--out",
                 str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["files"] == written["files"]                # the same bytes, file by file
    half = bundle_from_run_dir(tmp_path / "run", "psi", tmp_path / "half", dtype="float16")
    assert half.dtype == "float16" and half.old.fingerprint != written["old"]["fingerprint"]
    loaded = load(tmp_path / "half")
    assert loaded.upgrader.mlp[0].weight.dtype == torch.float32   # up-cast on load
    full = load(tmp_path / "again")
    images = torch.randn(4, 3, 16, 16)
    np.testing.assert_allclose(loaded.encode(images), full.encode(images), rtol=1e-2, atol=1e-2)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "half" / "upgrader" / "model.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def copy(run, tmp_path):
    shutil.copytree(run[5] / "f2", tmp_path / "f2")
    return tmp_path / "f2"


def rewrite_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_truncated_or_replaced_weight_file_fails_its_hash(copy):
    path = copy / "upgrader" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"upgrader/model.safetensors has sha256 .* the "
                                              "file is corrupt or was replaced"):
        open_bundle(copy)


def test_a_pickle_under_a_safetensors_name_is_never_unpickled(copy, tmp_path):
    path = copy / "new" / "model.safetensors"
    marker = tmp_path / "unpickled"
    path.write_bytes(pickle.dumps(Exploit(str(marker))))
    rewrite_config(copy, lambda c: c["files"].update({"new/model.safetensors": file_sha256(path)}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file .*never pickles"):
        open_bundle(copy)
    assert not marker.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_shape_that_disagrees_with_the_config_fails(copy):
    path = copy / "old" / "model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(path))
    key = next(k for k, v in state.items() if v.dim() == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(path))
    rewrite_config(copy, lambda c: c["files"].update({"old/model.safetensors": file_sha256(path)}))
    with pytest.raises(CheckpointError, match=f"{key} has shape .* but config.json says"):
        open_bundle(copy)


@pytest.mark.parametrize("content,match", [
    (None, "has no config.json: it is not a compatzoo bundle"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, expected an object"),
    ('{"schema_version": 9}', "schema_version 9; this compatzoo reads version 1"),
    ('{"schema_version": 1, "name": "x"}', "is not a valid bundle config .*compatzoo_version"),
])
def test_a_missing_or_ill_formed_config_fails(copy, content, match):
    if content is None:
        (copy / "config.json").unlink()
    else:
        (copy / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=match):
        open_bundle(copy)


def test_upgrade_refuses_features_of_another_width_or_old_model(run):
    bundle = load(run[5] / "f2")
    with pytest.raises(DimensionMismatchError, match="dimension 5 but 8 was expected"):
        bundle.upgrade(np.zeros((3, 5), np.float32), np.zeros((3, 4), np.float32))
    with pytest.raises(InvalidFeaturesError, match="fingerprint 0000000000000000.*use the bundle "
                                                   "whose old model embedded them"):
        bundle.upgrade(np.zeros((3, 8), np.float32), np.zeros((3, 4), np.float32),
                       fingerprint="0" * 64)
    with pytest.raises(InvalidFeaturesError, match="side information of dimension 4"):
        bundle.upgrade(np.zeros((3, 8), np.float32))


def test_an_unknown_short_name_lists_the_known_ones():
    with pytest.raises(BundleNotFoundError, match=r"no bundle named 'bict-gldv'; known names: "
                                                   r".*bict-gldv2.*hf-hub:ORG/NAME"):
        load("bict-gldv")
    with pytest.raises(BundleNotFoundError, match="does not exist"):
        load("local-dir:/nowhere/at/all")


def test_the_cli_reports_a_bad_bundle_with_exit_2_and_no_traceback(copy):
    (copy / "config.json").write_text("[]")
    result = subprocess.run([sys.executable, "-m", "compatzoo.cli", "publish", str(copy),
                             "--repo", "someone/x"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds a JSON list" in result.stderr


@pytest.mark.parametrize("name", ["v2", "v3", "f2"])
def test_a_bundle_measures_what_its_config_records(run, name):
    """``measure`` recomputes the card's figures from the bundle's own files: the same
    embeddings as the run, so the same numbers (a later hop's seen from its own old model,
    v2: the run measured its n2o in the chain matrix, on the primary metric)."""
    _, data, _, _, evaluation, folder = run
    bundle = load(folder / name)
    measured = bundle.measure(data.data, evaluation["metrics"], batch_size=512)
    recorded = bundle.config.evaluation["settings"]
    assert set(measured) == set(recorded)
    for setting, values in recorded.items():
        assert {m: measured[setting][m] for m in values} == values


def test_a_config_naming_an_unknown_or_invalid_component_fails_with_the_bundle_named(copy):
    from compatzoo.errors import PluginError

    rewrite_config(copy, lambda c: c["upgrader"].update(name="no-such-upgrader"))
    with pytest.raises(PluginError, match="bundle 'f2' needs the upgrader 'no-such-upgrader'"):
        open_bundle(copy)
    rewrite_config(copy, lambda c: c["upgrader"].update(name="fct-transformation",
                                                        params={"bogus": 1}))
    with pytest.raises(CheckpointError, match="'fct-transformation' of its config does not "
                                              "validate"):
        open_bundle(copy)
