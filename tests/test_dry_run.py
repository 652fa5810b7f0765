"""`compatzoo run SPEC --dry-run`: every paper-scale spec builds at full size and steps once on
a fake batch, reading no data and writing nothing; what cannot run fails with exit 2 and a
message naming the component, no traceback."""

import re
from pathlib import Path

import pytest
import yaml

from compatzoo.cli import main
from compatzoo.dry_run import dataset_shape
from compatzoo.specs import DatasetSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "benchmarks" / "suites" / "paper").glob("*.yaml"))
COMMAND = re.compile(r"^#\s+compatzoo run (\S+) --dry-run(.*)$", re.MULTILINE)


def documented_dry_run(path: Path) -> list[str]:
    """The dry-run command the spec's header documents, as CLI arguments."""
    found = COMMAND.search(path.read_text())
    assert found, f"{path.name}: the header documents no `compatzoo run ... --dry-run` command"
    assert ROOT / found.group(1) == path, f"{path.name}: the command names {found.group(1)}"
    return ["run", str(path), "--dry-run", *found.group(2).split()]


# Each takes seconds on a CPU (ResNet-50/101 at 224-384 px, batch 2, heads of up to 92k
# classes); the whole file stays near a minute on two cores.
@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_every_paper_spec_builds_and_steps_at_full_size(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                      # a run would write runs/<spec> here
    assert main(documented_dry_run(path)) == 0
    out = capsys.readouterr().out
    spec = load_spec(path)
    for model in ["old", *(m.name for m in spec.new)]:
        assert f"  generation {model}: " in out
    for model in spec.new:
        if model.upgrader is not None:
            assert f"  upgrader {model.name} (" in out
        for direct in model.direct_upgrades:
            assert f"  upgrader {model.name}/{direct.label} (" in out
    assert "no data read, nothing written" in out
    assert list(tmp_path.iterdir()) == []


def tiny_spec(new: dict) -> dict:
    encoder = {"name": "tiny-cnn", "params": {"widths": [8, 8, 8, 8], "embedding_dim": 16}}
    return {"name": "tiny", "data": {"dataset": {"name": "synthetic"}},
            "old": {"encoder": encoder, "head": "linear", "train": {"batch_size": 8}},
            "new": [{"name": "m", "encoder": encoder, "head": "linear",
                     "train": {"batch_size": 8}, **new}],
            "evaluation": {"metrics": ["cmc@1"], "primary": "cmc@1", "backfill": None}}


def write(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_loss_whose_widths_disagree_fails_with_exit_2(tmp_path, capsys):
    spec = tiny_spec({"losses": ["mixbct"]})
    spec["new"][0]["encoder"] = {"name": "tiny-cnn",
                                 "params": {"widths": [8, 8, 8, 8], "embedding_dim": 32}}
    assert main(["run", write(tmp_path, spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "dry run: new model 'm'" in err and "dimension 16" in err and "Traceback" not in err


def test_a_tiny_upgrade_with_side_information_and_signals_runs(tmp_path, capsys):
    spec = tiny_spec({"upgrader": {"name": "fastfill", "params": {
        "side_info": "simclr", "side_info_dim": 8, "inner_dim": 16, "sigma_head": "linear",
        "side_model": {"encoder_params": {"widths": [8, 8, 8, 8]}}}}})
    assert main(["run", write(tmp_path, spec), "--dry-run", "--fake-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "a fake batch of 4" in out and "400 classes (declared by dataset 'synthetic')" in out
    assert re.search(r"upgrader m \(old -> m\): upgrader \S+ \+ side encoder \S+ parameters; "
                     r"loss \(side \S+, mse \S+\)", out)


def test_a_dataset_that_cannot_count_its_classes_asks_for_them(tmp_path, capsys):
    spec = tiny_spec({})
    spec["data"]["dataset"] = {"name": "image-folder", "params": {"root": str(tmp_path / "no")}}
    path = write(tmp_path, spec)
    assert main(["run", path, "--dry-run"]) == 2
    assert "--classes N" in capsys.readouterr().err
    assert main(["run", path, "--dry-run", "--classes", "7"]) == 0
    assert "7 classes (given with --classes), 224 px" in capsys.readouterr().out
    assert main(["run", path, "--classes", "7"]) == 2          # only with --dry-run
    assert not (tmp_path / "no").exists()


def test_datasets_declare_their_shape_from_params_alone(tmp_path):
    def shape(name, **params):
        return dataset_shape(DatasetSpec(name=name, params=params))

    revisited = {"root": str(tmp_path), "name": "roxford5k"}
    assert shape("gldv2", root=str(tmp_path), revisited=revisited)[::2] == (81_313, 224)
    assert shape("gldv2", root=str(tmp_path), csv="full", max_classes=500,
                 revisited=revisited)[0] == 500
    with pytest.raises(Exception, match="--classes"):
        shape("gldv2", root=str(tmp_path), min_images_per_class=2, revisited=revisited)
    assert shape("cifar100", root=str(tmp_path))[::2] == (100, 32)
    assert shape("cifar100", root=str(tmp_path), classes=50)[0] == 50
    assert shape("ms1m", root=str(tmp_path), max_classes=300)[::2] == (300, 112)
    assert dataset_shape(DatasetSpec(name="ms1m", params={"root": str(tmp_path)}), 9)[0] == 9
