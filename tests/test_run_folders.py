"""Honest output folders: a run writes into a fresh folder, continues its own with
``--resume`` or replaces a previous run as a whole with ``--overwrite``; anything else is
refused before any work and leaves the folder as it was. Divergence stops at once, and
failures of the machine (a full disk, a folder that cannot be written) are messages."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_cli_eval import _write_features
from test_end_to_end import OLD_ENCODER, TRAIN, tiny_spec

import compatzoo.experiment as experiment
from compatzoo.cli import main
from compatzoo.errors import TrainingDivergedError
from compatzoo.experiment import run_experiment
from compatzoo.run_folder import RunFolderError
from compatzoo.specs import load_spec


def quick_spec(**changes) -> dict:
    spec = tiny_spec(OLD_ENCODER)
    spec["new"] = [{"name": "independent"}]
    spec["evaluation"]["backfill"] = None
    spec.update(changes)
    return spec


def no_training(monkeypatch):
    """Training that must not start: the checks come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(experiment, "train_model", refuse)


def test_a_new_run_refuses_a_folder_that_holds_anything(tmp_path, monkeypatch, capsys):
    no_training(monkeypatch)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(quick_spec()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(spec), "-o", str(out), "-q"]) == 2
    message = capsys.readouterr().err
    assert "notes.txt" in message and "--resume" in message and "--overwrite" in message
    assert "Traceback" not in message
    # --overwrite does not delete what is not a run; --resume does not adopt it
    for flag in ("--overwrite", "--resume"):
        assert main(["run", str(spec), "-o", str(out), "-q", flag]) == 2
        assert "not a compatzoo run folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_output_naming_a_file_is_a_message(tmp_path, monkeypatch, capsys):
    no_training(monkeypatch)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(quick_spec()))
    target = tmp_path / "results.txt"
    target.write_text("keep")
    assert main(["run", str(spec), "-o", str(target), "-q"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished quick run with a stale file planted in its checkpoints."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_experiment(load_spec(quick_spec()), out, progress=False)
    return out


def test_resume_refuses_another_spec_naming_what_differs(finished, monkeypatch):
    no_training(monkeypatch)
    other = quick_spec(seed=3)
    other["old"]["train"] = {**TRAIN, "lr": 0.02}
    before = sorted(p.relative_to(finished) for p in finished.rglob("*"))
    with pytest.raises(RunFolderError, match=r"another spec.*old\.train\.lr.*seed"):
        run_experiment(load_spec(other), finished, progress=False, mode="resume")
    with pytest.raises(RunFolderError, match="bundles=True.*bundles=False"):
        run_experiment(load_spec(quick_spec()), finished, progress=False, mode="resume",
                       save_bundles=False)
    assert sorted(p.relative_to(finished) for p in finished.rglob("*")) == before


def test_overwrite_replaces_the_previous_run_as_a_whole(finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    stale = out / "checkpoints" / "another-model"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"old")
    (out / "backfill_another-model.png").write_bytes(b"old")
    spec = quick_spec()
    spec["new"] = [{"name": "bct", "losses": ["classification", "bct"]}]
    run_experiment(load_spec(spec), out, progress=False, mode="overwrite")
    assert not stale.exists() and not (out / "backfill_another-model.png").exists()
    assert not (out / "checkpoints" / "independent").exists()
    results = json.loads((out / "results.json").read_text())
    assert "n2o/bct" in results["evaluation"]["table"]
    record = json.loads((out / "compatzoo-run.json").read_text())
    assert [s["mode"] for s in record["sessions"]] == ["overwrite"]


def test_a_run_that_fails_late_leaves_no_results(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr("compatzoo.evaluation.evaluate_run", fail)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_experiment(load_spec(quick_spec()), out, progress=False)
    assert not (out / "results.json").exists()
    assert not list(out.glob("*.png")) and not (out / "bundles").exists()
    record = json.loads((out / "compatzoo-run.json").read_text())
    assert record["finished"] is False and set(record["stages"]) == {
        "train/old", "train/independent", "upgrade/independent"}


def image_folder_spec(root) -> dict:
    spec = quick_spec()
    spec["data"] = {"dataset": {"name": "image-folder",
                                "params": {"root": str(root), "image_size": 8}},
                    "allocation": {"name": "extended-data", "params": {"fraction": 0.5}}}
    for model in (spec["old"], spec["new_defaults"]):
        model["train"] = {**TRAIN, "batch_size": 4}
    return spec


def test_bad_data_stops_the_run_before_any_training(tmp_path, monkeypatch, capsys):
    """A corrupt gallery image, and query and gallery without a class in common, are
    found before the first model trains (they used to surface after every model had)."""
    import shutil

    from test_data_checks import truncated_jpeg, write_jpegs

    no_training(monkeypatch)
    root = tmp_path / "images"
    for split, classes in (("train", ("cat", "dog")), ("query", ("cat", "dog")),
                           ("gallery", ("cat", "dog"))):
        for name, colour in zip(classes, ((200, 30, 30), (30, 30, 200))):
            write_jpegs(root / split / name, 4, colour)
    truncated_jpeg(root / "gallery" / "dog" / "img3.jpg")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(image_folder_spec(root)))
    assert main(["run", str(spec), "-o", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "1 of 24 images cannot be decoded" in err
    assert str(root / "gallery" / "dog" / "img3.jpg") in err
    assert main(["validate", str(spec), "--check-data", "-q"]) == 2
    assert str(root / "gallery" / "dog" / "img3.jpg") in capsys.readouterr().err
    # the same spec with the check skipped fails at training (here: our stand-in)
    with pytest.raises(AssertionError, match="training started"):
        main(["run", str(spec), "-o", str(tmp_path / "run2"), "-q", "--skip-data-check"])

    shutil.rmtree(root / "gallery")              # a gallery of other classes only
    for name in ("yak", "zebra"):
        write_jpegs(root / "gallery" / name, 4, (9, 9, 9))
    assert main(["run", str(spec), "-o", str(tmp_path / "run3"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "the query and the gallery share no label" in err and "'yak'" in err


def test_divergence_stops_at_once_naming_model_epoch_tensor_and_last_good(tmp_path):
    spec = quick_spec()
    spec["old"]["train"] = {**TRAIN, "lr": 1e6, "optimizer": "sgd"}
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as caught:
        run_experiment(load_spec(spec), out, progress=False)
    message = str(caught.value)
    assert message.startswith("old:") and "epoch 1" in message
    assert "non-finite" in message and "last good checkpoint: none saved yet" in message
    # the broken weights were not saved
    assert not (out / "checkpoints" / "old" / "model.safetensors").exists()


def test_eval_refuses_to_replace_results_and_a_late_failure_leaves_none(tmp_path, capsys):
    _write_features(tmp_path)
    out = tmp_path / "out"
    base = ["eval", "--query-new", str(tmp_path / "q_new.npy"),
            "--gallery-old", str(tmp_path / "g_old.npy"),
            "--gallery-new", str(tmp_path / "g_new.npy"),
            "--query-labels", f"{tmp_path / 'labels.safetensors'}:labels",
            "--gallery-labels", str(tmp_path / "gl.npy"), "--points", "3", "-o", str(out)]
    assert main(base) == 0
    assert main(base) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a failure after the checks (a missing order file) leaves no results at all
    assert main([*base, "--overwrite", "--order", str(tmp_path / "missing.npy")]) == 2
    assert not (out / "eval.json").exists() and not (out / "backfill.png").exists()
    assert main([*base, "--overwrite"]) == 0
    assert (out / "eval.json").is_file()


def _cli(args, **kwargs):
    code = "import sys; from compatzoo.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_a_full_disk_is_a_message(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(quick_spec()))
        done = _cli(["run", str(spec), "-o", str(disk / "run"), "-q"])
        assert done.returncode == 2, done.stderr[-2000:]
        assert "no space left on the device" in done.stderr and "--resume" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_folder_that_cannot_be_written_is_a_message(tmp_path):
    """A folder without write permission for a normal user; as root, which may write
    anywhere, a read-only bind mount of it."""
    locked = tmp_path / "locked"
    locked.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(quick_spec()))
    mounted = False
    if os.geteuid() == 0:
        for command in (["mount", "--bind", str(locked), str(locked)],
                        ["mount", "-o", "remount,ro,bind", str(locked)]):
            if subprocess.run(command, capture_output=True).returncode != 0:
                subprocess.run(["umount", str(locked)], capture_output=True)
                pytest.skip("as root, a read-only folder needs a read-only bind mount, "
                            "which this machine does not allow")
            mounted = True
    else:
        locked.chmod(0o555)
    try:
        done = _cli(["run", str(spec), "-o", str(locked / "run"), "-q"])
    finally:
        if mounted:
            subprocess.run(["umount", str(locked)], check=True)
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(locked / "run") in done.stderr and "Traceback" not in done.stderr
    assert ("read-only" if mounted else "permission denied") in done.stderr
