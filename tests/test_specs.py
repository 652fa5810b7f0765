import subprocess
import sys

import pytest
import yaml

from compatzoo.errors import SpecError
from compatzoo.specs import load_spec

TINY = {"name": "tiny-cnn", "params": {"widths": [4, 8], "embedding_dim": 8}}


def minimal_spec(**overrides):
    spec = {
        "name": "t",
        "data": {"dataset": {"name": "synthetic", "params": {}}},
        "old": {"encoder": TINY, "head": {"name": "normface"}},
        "new": [{"name": "bct", "encoder": TINY, "head": "normface",
                 "losses": [{"name": "classification"}, {"name": "bct", "weight": 1.0}]}],
    }
    spec.update(overrides)
    return spec


def test_valid_spec_fills_plugin_defaults():
    spec = load_spec(minimal_spec())
    head = spec.new[0].head
    assert head.name == "normface" and head.params == {"scale": 32.0}
    assert spec.new[0].losses[1].params == {"new_classes": "ignore", "synthesize": "missing",
                                            "old_head": "own_form"}
    assert spec.data.allocation.name == "extended-data"


def test_unknown_component_lists_installed_ones():
    bad = minimal_spec()
    bad["new"][0]["losses"][1]["name"] = "bcct"
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    message = str(info.value)
    assert "new[0].losses[1]" in message
    assert "no loss named 'bcct'" in message and "installed losses:" in message
    assert "bct" in message and "classification" in message


def test_misspelled_field_names_its_path():
    bad = minimal_spec()
    bad["old"]["train"] = {"epochz": 3}
    with pytest.raises(SpecError, match=r"old\.train\.epochz: unknown field"):
        load_spec(bad)


def test_misspelled_plugin_param_names_its_path():
    bad = minimal_spec()
    bad["old"]["encoder"] = {"name": "tiny-cnn", "params": {"widht": [4]}}
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert "old.encoder" in str(info.value)
    assert "params.widht: unknown parameter" in str(info.value)
    assert "widths" in str(info.value)  # the known parameters are listed


def test_cross_field_checks():
    dup = minimal_spec()
    dup["new"].append(dict(dup["new"][0]))
    with pytest.raises(SpecError, match="unique"):
        load_spec(dup)
    with pytest.raises(SpecError, match="metric"):
        load_spec(minimal_spec(evaluation={"metrics": ["mAP@100x"]}))
    with pytest.raises(SpecError, match="paragon 'nope'"):
        load_spec(minimal_spec(evaluation={"paragon": "nope"}))


def test_new_defaults_fill_each_new_model():
    spec = minimal_spec()
    spec["new_defaults"] = {"encoder": TINY, "head": "cosface", "train": {"epochs": 2}}
    spec["new"] = [{"name": "independent"}, {"name": "b", "head": "arcface",
                                              "losses": ["classification", "bct"]}]
    parsed = load_spec(spec)
    assert [m.head.name for m in parsed.new] == ["cosface", "arcface"]
    assert parsed.new[0].train.epochs == 2
    assert [t.name for t in parsed.new[0].losses] == ["classification"]


def test_yaml_errors_are_reported(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_cli_prints_the_message_and_exits_2_without_traceback(tmp_path):
    bad = minimal_spec()
    bad["new"][0]["losses"][1]["params"] = {"new_clases": "ignore"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = subprocess.run([sys.executable, "-m", "compatzoo.cli", "validate", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "new[0].losses[1]" in result.stderr and "new_clases" in result.stderr
    assert "Traceback" not in result.stderr
    debug = subprocess.run([sys.executable, "-m", "compatzoo.cli", "--debug", "validate",
                            str(path)], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_scheduler_listed_twice_is_labelled_by_its_params_and_exact_repeats_are_errors():
    from compatzoo.specs import BackfillSpec

    backfill = BackfillSpec(schedulers=[
        "random", "oracle-distance", {"name": "oracle-distance", "params": {"normalize": True}}])
    assert [backfill.label(s) for s in backfill.schedulers] == [
        "random", "oracle-distance(normalize=False)", "oracle-distance(normalize=True)"]
    with pytest.raises(ValueError, match=r"lists \['random\(\)'\] more than once"):
        BackfillSpec(schedulers=["random", "random"])
