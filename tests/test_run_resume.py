"""Runs that survive SIGKILL: ``--resume`` continues from the last saved state and ends
with the bytes of a run never stopped; the manifest says what each session did."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_end_to_end import OLD_ENCODER, TRAIN, tiny_spec

DRIVER = Path(__file__).parent / "run_kill_driver.py"
PSI = {"hidden_dim": 16, "epochs": 2, "batch_size": 32}


def resume_spec() -> dict:
    """Old model 96 items (3 steps an epoch), the new one 192 (6 steps), 2 epochs each,
    a BiCT upgrader; a step log line every step."""
    spec = tiny_spec(OLD_ENCODER)
    spec["old"]["train"] = {**TRAIN, "log_every": 1}
    spec["new_defaults"]["train"] = {**TRAIN, "log_every": 1}
    spec["new"] = [{"name": "psi", "losses": ["classification", "bct"],
                    "upgrader": {"name": "bict-mlp", "params": PSI}}]
    return spec


def run(spec_path: Path, out: Path, point: str = "none", resume: bool = True) -> int:
    args = ["run", str(spec_path), "-o", str(out), "-q", "--checkpoint-every", "2",
            *(["--resume"] if resume else [])]
    done = subprocess.run([sys.executable, str(DRIVER), point, "--", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -9), done.stderr[-3000:]
    return done.returncode


def outputs(out: Path) -> dict:
    """What must not depend on interruptions: every weight file's bytes, the step log,
    the evaluation and the training histories (without their timings)."""
    results = json.loads((out / "results.json").read_text())
    histories = {name: [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]
                 for name, history in results["training"].items()}
    weights = {str(p.relative_to(out)): p.read_bytes()
               for p in sorted(out.rglob("*.safetensors"))}
    return {"evaluation": results["evaluation"], "training": histories, "weights": weights,
            "log": (out / "train_log.jsonl").read_text()}


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "resume.yaml"
    path.write_text(yaml.safe_dump(resume_spec()))
    return path


@pytest.fixture(scope="module")
def reference(spec_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(spec_path, out, resume=False) == 0
    return outputs(out)


def manifest(out: Path) -> dict:
    return json.loads((out / "compatzoo-run.json").read_text())


def test_killed_mid_epoch_of_the_new_model_resumes_to_identical_bytes(spec_path, reference,
                                                                      tmp_path):
    out = tmp_path / "run"
    # step 8 of the new model is its last saved state (every 2 steps, mid epoch 2)
    assert run(spec_path, out, "step:psi:10", resume=False) == -9
    assert not (out / "results.json").exists()
    assert (out / "checkpoints" / "psi" / "fit-state.safetensors").is_file()
    assert set(manifest(out)["stages"]) == {"train/old"}
    assert run(spec_path, out) == 0
    assert outputs(out) == reference
    record = manifest(out)
    assert [s["mode"] for s in record["sessions"]] == ["new", "resume"]
    assert record["stages"]["train/old"]["session"] == 1          # not retrained
    assert record["stages"]["train/psi"]["session"] == 2
    assert record["stages"]["train/psi"]["resumed_from"] == {"epoch": 2, "step": 8}
    assert record["finished"] is True
    assert not (out / "checkpoints" / "psi" / "fit-state.safetensors").exists()
    assert not (out / ".staging").exists()


def test_killed_at_four_points_and_resumed_each_time_gives_identical_bytes(spec_path,
                                                                           reference,
                                                                           tmp_path):
    out = tmp_path / "run"
    points = ["step:old:4",          # the old model, mid epoch 2
              "step:psi:5",          # the new model, mid epoch 1 (old loaded, not retrained)
              "stage:train/psi",     # after the new model is recorded, before its state goes
              "step:bict psi:2",     # inside the upgrader's fit (refitted from its start)
              "report"]              # results computed and written, not yet published
    for i, point in enumerate(points):
        assert run(spec_path, out, point, resume=i > 0) == -9, point
        assert not (out / "results.json").exists()
    assert run(spec_path, out) == 0
    assert outputs(out) == reference
    record = manifest(out)
    assert len(record["sessions"]) == len(points) + 1
    assert record["stages"]["train/old"]["session"] == 2
    assert record["stages"]["train/psi"]["session"] == 3
    assert record["stages"]["upgrade/psi"]["session"] == 5
    # a finished run resumed again does nothing and keeps its results
    before = (out / "results.json").read_bytes()
    assert run(spec_path, out) == 0
    assert (out / "results.json").read_bytes() == before
    assert len(manifest(out)["sessions"]) == len(points) + 1


@pytest.mark.parametrize("recipe", [
    {"optimizer": "sgd", "warmup_epochs": 0.5},
    {"optimizer": "adam", "freeze_bn_from": 0.5},
    {"optimizer": "adamw", "schedule": "constant"}], ids=["sgd", "adam", "adamw"])
def test_the_fitting_loop_resumed_from_any_saved_state_ends_identical(tmp_path, recipe):
    """Every state the loop saves (every 3 steps and each epoch end), saved to disk,
    loaded and resumed, gives the weights and the per-epoch losses of a fit never
    stopped: dropout, BatchNorm, augmentation noise and the learning-rate schedule all
    go on exactly."""
    import torch

    from compatzoo.engine.checkpoints import load_fit_state, save_fit_state
    from compatzoo.engine.fitting import Recipe, fit_epochs, fit_minibatches

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def batch_loss(net):
        def loss(index, generator):
            noisy = x[index] + 0.1 * torch.randn(len(index), 4, generator=generator)
            return torch.nn.functional.cross_entropy(net(noisy), y[index])
        return loss

    settings = Recipe(epochs=3, batch_size=16, lr=0.05, **recipe)
    whole = model()
    summaries = fit_minibatches(whole, 64, batch_loss(whole), settings, seed=3, progress=False)
    saved = []
    net = model()
    list(fit_epochs(net, 64, batch_loss(net), settings, seed=3, progress=False, save_every=3,
                    save=lambda s: saved.append(save_fit_state(tmp_path / f"{len(saved)}", s))))
    assert len(saved) == 6                    # steps 3, 4 (epoch end), 6, 8 (end), 9, 12 (end)
    for path in saved:
        state = load_fit_state(path)
        again = model()
        rest = list(fit_epochs(again, 64, batch_loss(again), settings, seed=3,
                               progress=False, resume=state))
        for key, value in whole.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), (path.name, key)
        assert [s["loss"] for s in state.summaries + rest] == [s["loss"] for s in summaries]
