"""The cards in model_cards/: shipped bundles load offline and reproduce their cards'
figures from their own weights; cards whose weights nobody published say how to make them."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

import compatzoo
from compatzoo.bundles import BundleNotFoundError, model_cards
from compatzoo.specs import load_spec

SHIPPED = ["bct-synth", "ract-synth", "bict-synth", "fct-synth"]
UNPUBLISHED = ["bict-gldv2", "ract-gldv2", "bct-imagenet", "fct-imagenet", "mixbct-ms1m"]


def test_every_card_is_listed_with_where_its_weights_are():
    rows = {row["name"]: row for row in compatzoo.list_bundles()}
    assert {name: rows[name]["weights"] for name in SHIPPED + UNPUBLISHED} == {
        **{name: "shipped" for name in SHIPPED}, **{name: "not published" for name in UNPUBLISHED}}
    assert rows["example-bict"]["weights"] == "via plugin"        # a plugin's named bundle


@pytest.mark.parametrize("name", SHIPPED + UNPUBLISHED)
def test_every_card_has_a_valid_spec_that_trains_its_new_model(name):
    card = model_cards()[name]
    spec = load_spec(card.spec)
    assert [model.name for model in spec.new] == [name]
    data = ModelCard.load(card.folder / "README.md").data
    assert data.library_name == "compatzoo" and "compatzoo" in data.tags


@pytest.mark.parametrize("name", UNPUBLISHED)
def test_an_unpublished_card_says_how_to_train_and_publish_it(name):
    with pytest.raises(BundleNotFoundError) as info:
        compatzoo.load(name)
    message = str(info.value)
    assert "no one has published its weights" in message
    assert f"compatzoo run {model_cards()[name].spec}" in message
    assert f"compatzoo publish runs/{name}/bundles/" in message


@pytest.fixture(scope="module")
def synthetic():
    spec = load_spec(model_cards()["bct-synth"].spec)
    return spec.data.dataset.build()


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_bundle_reproduces_its_cards_figures(name, synthetic):
    """Measured again from the shipped weights on the regenerated synthetic data: the
    figures the card records for the weights it ships (float32 or float16)."""
    bundle = compatzoo.load(name)
    assert bundle.source["kind"] == "model-card"
    recorded = json.loads((model_cards()[name].folder / "figures.json").read_text())
    assert recorded["dtype"] == bundle.config.dtype
    measured = bundle.measure(synthetic, ["map@100", "cmc@1"])
    assert set(measured) == set(recorded["measured"])
    for setting, values in measured.items():
        expected = {m: recorded["measured"][setting][m] for m in values}
        # another CPU's float rounding may flip near-tied ranks: a few queries of 500 move
        assert values == pytest.approx(expected, abs=2e-3)
    card = (model_cards()[name].folder / "README.md").read_text()
    assert f'compatzoo.load("{name}")' in card and "## Storage" in card


def test_the_shipped_weights_stay_small():
    total = sum(f.stat().st_size for name in SHIPPED
                for f in model_cards()[name].folder.rglob("*.safetensors"))
    assert total < 20e6


def test_a_plugin_named_bundle_resolves_to_its_source():
    bundle = compatzoo.load("example-bict")
    assert bundle.source["name"] == "example-bict" and bundle.config.name == "bict-synth"


def test_the_unpublished_specs_carry_their_papers_recipe():
    spec = yaml.safe_load((model_cards()["bict-gldv2"].spec).read_text())
    new = spec["new"][0]
    assert {"name": "cosine", "weight": 2.0} in new["losses"]
    assert new["upgrader"]["name"] == "bict-mlp"
    assert new["upgrader"]["params"]["hidden_dim"] == 4096


def test_the_readmes_upgrade_walkthrough_runs_as_printed(synthetic, tmp_path, monkeypatch):
    """The "Using a trained upgrade" code, on a gallery the old model of bict-synth wrote
    and two query images on disk."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Using a trained upgrade"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    bundle = compatzoo.load("bict-synth")
    monkeypatch.chdir(tmp_path)
    np.save("gallery_old.npy", bundle.encode(synthetic.gallery, model="old"))
    for i in range(2):   # lossless pixels (PIL reads the format from the content)
        pixels = synthetic.query.images[i].permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(f"query-{i}.jpg", format="PNG")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["gallery"].shape == (len(synthetic.gallery), 128)
    assert namespace["index"].shape == (2, 10)
    # image files go through the recorded preprocessing: the same input as the dataset's
    assert np.array_equal(namespace["queries"], bundle.encode(synthetic.query.images[:2]))
