"""Specs are strict where silence hurts (issue #11): a YAML key given twice, a number or
boolean written as something else, a value that would only fail once the run reaches it,
and a plugin that breaks on import are each one clear error at validation."""

from __future__ import annotations

import copy
import importlib.metadata
import textwrap
from pathlib import Path

import pytest
import yaml
from test_registry import FakeEntryPoint, _plugin_module
from test_specs import minimal_spec

import compatzoo
from compatzoo.errors import PluginError, PluginLoadError, SpecError
from compatzoo.registry import Registry, get_registry
from compatzoo.specs import SEED_MAX, SpecLoader, load_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*ROOT.glob("compatzoo/configs/*.yaml"), *ROOT.glob("benchmarks/suites/**/*.yaml"),
                  *ROOT.glob("model_cards/*/spec.yaml")])

SPEC_YAML = """\
name: strict
data:
  dataset: {name: synthetic}
old:
  encoder: tiny-cnn
  head: normface
  train: &recipe
    epochs: 3
    lr: 0.1
new:
  - name: bct
    encoder: tiny-cnn
    head: normface
    losses: [classification, bct]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def with_value(where: tuple, value, spec: dict | None = None) -> dict:
    """``minimal_spec()`` with ``value`` at the path ``where`` (dicts made on the way)."""
    spec = copy.deepcopy(spec or minimal_spec())
    node = spec
    for key in where[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
    node[where[-1]] = value
    return spec


def spec_error(spec) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    return str(info.value)


# --------------------------------------------------------------------------- YAML
def test_a_key_given_twice_names_the_key_both_lines_and_the_file(tmp_path):
    path = write(tmp_path, SPEC_YAML.replace("    lr: 0.1\n", "    lr: 0.1\n    epochs: 5\n"))
    message = spec_error(path)
    assert str(path) in message and "'epochs'" in message
    assert "lines 8 and 10" in message and "Keep one of them" in message


def test_a_key_given_twice_inside_a_list_entry_is_found_too(tmp_path):
    path = write(tmp_path, SPEC_YAML + "    name: bct2\n")
    message = spec_error(path)
    assert "'name'" in message and "lines 11 and 15" in message


def test_merge_keys_still_override_what_they_merge(tmp_path):
    merged = SPEC_YAML + "    train: {<<: *recipe, epochs: 1}\n"
    spec = load_spec(write(tmp_path, merged))
    assert spec.new[0].train.epochs == 1 and spec.new[0].train.lr == pytest.approx(0.1)
    twice = SPEC_YAML + "    train: {<<: *recipe, epochs: 1, epochs: 2}\n"
    assert "lines 15 and 15" in spec_error(write(tmp_path, twice))


def test_exponent_floats_load_as_numbers(tmp_path):
    spec = load_spec(write(tmp_path, SPEC_YAML.replace("lr: 0.1", "lr: 1e-3")))
    assert spec.old.train.lr == pytest.approx(1e-3)
    assert yaml.load("a: 1.5E+2\nb: -2e3\nc: 1e3x", Loader=SpecLoader) == {
        "a": 150.0, "b": -2000.0, "c": "1e3x"}


# --------------------------------------------------------------------------- no conversions
@pytest.mark.parametrize("where, value, expected", [
    (("old", "train", "epochs"), "2",
     "expected an integer, found the string '2'; write 2 without quotes"),
    (("old", "train", "epochs"), True, "expected an integer, found the boolean true"),
    (("old", "train", "epochs"), 2.0, "expected an integer, found the float 2.0"),
    (("old", "train", "lr"), "0.1", "expected a number, found the string '0.1'"),
    (("old", "train", "lr"), True, "expected a number, found the boolean true"),
    (("old", "train", "amp"), 1, "expected true or false, found the int 1"),
    (("old", "train", "amp"), "yes", "expected true or false, found the string 'yes'"),
    (("seed",), "3", "expected an integer, found the string '3'"),
    (("new", 0, "losses", 1, "weight"), "1", "expected a number, found the string '1'"),
    (("evaluation", "backfill", "points"), "5", "expected an integer, found the string '5'"),
])
def test_numbers_and_booleans_are_not_converted(where, value, expected):
    path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where).lstrip(".")
    assert f"{path}: {expected}" in spec_error(with_value(where, value))


def test_an_int_for_a_float_field_is_still_a_number():
    spec = load_spec(with_value(("old", "train", "lr"), 1,
                                with_value(("new", 0, "losses", 1, "weight"), 2)))
    assert spec.old.train.lr == 1.0 and isinstance(spec.old.train.lr, float)
    assert spec.new[0].losses[1].weight == 2.0


@pytest.mark.parametrize("where, component, expected", [
    (("old", "head"), {"name": "cosface", "params": {"scale": "32"}},
     "old.head: head 'cosface': params.scale: expected a number, found the string '32'"),
    (("old", "head"), {"name": "linear", "params": {"bias": 1}},
     "old.head: head 'linear': params.bias: expected true or false, found the int 1"),
    (("new", 0, "upgrader"), {"name": "bict-mlp", "params": {"epochs": "2"}},  # a Recipe
     "new[0].upgrader: upgrader 'bict-mlp': params.epochs: expected an integer"),
    (("new", 0, "upgrader"), {"name": "fct-transformation",
                              "params": {"side_model": {"epochs": True}}},
     "params.side_model.epochs: expected an integer, found the boolean true"),
    (("data", "augment"), {"hflip": "true"},
     "data.augment: hflip: expected true or false, found the string 'true'"),
])
def test_component_params_are_not_converted_either(where, component, expected):
    assert expected in spec_error(with_value(where, component))


def test_the_python_api_validates_params_the_same_way():
    with pytest.raises(SpecError, match="params.scale: expected a number, found the string"):
        compatzoo.create_head("cosface", embedding_dim=8, num_classes=3, scale="32")
    head = compatzoo.create_head("cosface", embedding_dim=8, num_classes=3, scale=16)
    assert head.scale == 16.0


def test_what_yaml_can_only_write_as_strings_or_lists_still_validates(tmp_path):
    spec = minimal_spec()
    spec["data"] = {
        "dataset": {"name": "image-folder",
                    "params": {"root": str(tmp_path), "mean": [0.5, 0.5, 0.5]}},  # Path, tuple
        "allocation": {"name": "sequential", "params": {"fractions": [0.5, 1], "by": "class"}},
        "augment": {"crop_scale": [0.5, 1], "hflip": True}}
    spec["old"]["train"] = {"optimizer": "adam", "lr": 1, "freeze_bn_from": None}  # Literal
    parsed = load_spec(spec)
    assert parsed.data.dataset.validated.root == tmp_path
    assert parsed.data.dataset.validated.mean == (0.5, 0.5, 0.5)
    assert parsed.data.allocation.validated.fractions == (0.5, 1.0)
    assert parsed.data.augment["crop_scale"] == [0.5, 1.0]
    assert parsed.old.train.optimizer == "adam"


# --------------------------------------------------------------------------- later failures
@pytest.mark.parametrize("seed", [-5, 2**32])
def test_a_seed_numpy_refuses_fails_at_validation(seed):
    message = spec_error(minimal_spec(seed=seed))
    assert f"seed: seed {seed} is outside [0, {SEED_MAX}]" in message


def test_the_new_models_seeds_must_fit_too():
    assert "new model i trains with seed + 1 + i" in spec_error(minimal_spec(seed=SEED_MAX))
    assert load_spec(minimal_spec(seed=SEED_MAX - 1)).seed == SEED_MAX - 1  # one new model


def test_a_components_seed_param_is_checked():
    spec = with_value(("data", "dataset", "params", "seed"), -5)
    assert ("data.dataset: dataset 'synthetic': params.seed: seed -5 is outside"
            in spec_error(spec))


@pytest.mark.parametrize("nfr_k, expected", [
    ([0], "evaluation.backfill.nfr_k[0]: Input should be greater than or equal to 1 (found 0)"),
    ([1, 5, 1], "backfill.nfr_k lists [1] more than once"),
    ([], "evaluation.backfill.nfr_k: List should have at least 1 item"),
])
def test_nfr_k_are_distinct_positive_integers(nfr_k, expected):
    assert expected in spec_error(with_value(("evaluation", "backfill", "nfr_k"), nfr_k))


@pytest.mark.parametrize("models, expected", [
    ([], "evaluation.backfill.models: List should have at least 1 item"),
    (["bct", "bct"], "backfill.models lists ['bct'] more than once"),
])
def test_backfill_models_are_listed_once_and_an_empty_list_is_not_all(models, expected):
    assert expected in spec_error(with_value(("evaluation", "backfill", "models"), models))


def test_backfill_needs_two_points():
    message = spec_error(with_value(("evaluation", "backfill", "points"), 1))
    assert "evaluation.backfill.points: Input should be greater than or equal to 2" in message


def test_metrics_are_known_and_listed_once():
    message = spec_error(minimal_spec(evaluation={"metrics": ["map@100", "mAP@100"]}))
    assert "metrics lists one metric twice ('map@100' and 'mAP@100')" in message
    assert "unknown metric 'cmc@0'" in spec_error(minimal_spec(evaluation={"metrics": ["cmc@0"]}))


def test_an_unknown_device_fails_at_validation():
    message = spec_error(with_value(("old", "train", "device"), "gpu"))
    assert "old.train.device: device 'gpu' is not a device torch knows" in message
    assert load_spec(with_value(("old", "train", "device"), "cuda:1")).old.train.device == "cuda:1"


def test_a_misspelt_new_defaults_field_is_one_error():
    spec = minimal_spec()
    spec["new"] += [{**spec["new"][0], "name": f"bct{i}"} for i in range(3)]
    spec["new_defaults"] = {"trian": {"epochs": 2}}
    message = spec_error(spec)
    assert message.count("trian") == 1 and "new_defaults sets ['trian']" in message


# --------------------------------------------------------------------------- plugins
def _exits():
    raise SystemExit(3)


def test_a_plugin_calling_sys_exit_is_a_load_failure():
    registry = Registry()
    registry.load_entry_points([
        FakeEntryPoint("quitter", _exits, dist="compatzoo-quitter"),
        FakeEntryPoint("fine", lambda: _plugin_module("m-exit", "scheduler", "fine")),
    ], strict=False)
    [failed] = registry.failed
    assert failed.plugin == "quitter" and failed.distribution == "compatzoo-quitter"
    assert "SystemExit(3)" in failed.error and registry.names("scheduler") == ["fine"]
    with pytest.raises(PluginLoadError,
                       match=r"'quitter' from distribution 'compatzoo-quitter'.*SystemExit\(3\)"):
        Registry().load_entry_points([FakeEntryPoint("quitter", _exits,
                                                     dist="compatzoo-quitter")], strict=True)


def test_ctrl_c_while_a_plugin_loads_is_not_swallowed():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Registry().load_entry_points([FakeEntryPoint("slow", interrupted)], strict=False)


def test_a_broken_plugin_is_one_error_in_strict_mode(monkeypatch):
    monkeypatch.setenv("COMPATZOO_STRICT_PLUGINS", "1")
    original = importlib.metadata.entry_points
    installed = list(original(group="compatzoo"))
    imports = []

    def broken():
        imports.append(1)
        raise ImportError("No module named 'torch_nonexistent'")

    def entry_points(**selection):
        if selection != {"group": "compatzoo"}:
            return original(**selection)
        return [*installed, FakeEntryPoint("broken", broken, dist="compatzoo-broken")]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.raises(PluginLoadError) as info:
        load_spec(minimal_spec())
    message = str(info.value)
    assert message.count("failed to load") == 1 and "invalid spec" not in message
    assert "'broken' from distribution 'compatzoo-broken'" in message
    assert "torch_nonexistent" in message and "COMPATZOO_STRICT_PLUGINS" in message
    with pytest.raises(PluginError, match="compatzoo-broken"):
        get_registry()
    assert imports == [1]  # kept, not imported again for every component


# --------------------------------------------------------------------------- shipped specs
def test_the_scan_finds_the_shipped_specs():
    assert len(SHIPPED) >= 30
    assert ROOT / "compatzoo" / "configs" / "demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_spec_still_loads(path):
    text = path.read_text()
    assert yaml.load(text, Loader=SpecLoader) == yaml.safe_load(text)  # same data as before
    load_spec(path)
