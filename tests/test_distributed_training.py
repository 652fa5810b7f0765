"""Training under ``torchrun --nproc_per_node 2`` (gloo, CPU): a data-parallel step equals
the single-process step over the whole batch, a spec runs the same way as in one process
and resumes after a kill, and bad launches fail once, before training."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_end_to_end import tiny_spec
from test_run_resume import outputs, resume_spec

HERE = Path(__file__).parent
KILL_DRIVER = HERE / "run_kill_driver.py"


def torchrun(args: list[str], cwd: Path = HERE) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def single(args: list[str], cwd: Path = HERE) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """The worker's step and fit, in one process and over two ranks."""
    out = tmp_path_factory.mktemp("fits")
    for runner, name in ((single, "one"), (torchrun, "two")):
        done = runner([str(HERE / "dist_fit_worker.py"), "step,fit", str(out / name)])
        assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_one_ddp_step_over_2x4_items_equals_one_step_over_8(fits):
    one = load_file(fits / "one" / "step" / "weights.safetensors")
    two = load_file(fits / "two" / "step" / "weights.safetensors")
    for key in [k for k in one if k.startswith("after.")]:
        name = key.removeprefix("after.")
        assert torch.equal(one[f"before.{name}"], two[f"before.{name}"])   # same start
        grad_one = one[f"before.{name}"] - one[key]           # SGD with lr 1: the gradient
        grad_two = two[f"before.{name}"] - two[key]
        assert grad_one.abs().max() > 1e-3
        # Means over 4 then over 2 ranks instead of over 8: float32 rounding only.
        torch.testing.assert_close(grad_two, grad_one, rtol=1e-5, atol=1e-7)


def test_a_ddp_fit_over_epochs_equals_the_single_process_fit(fits):
    one = load_file(fits / "one" / "fit" / "weights.safetensors")
    two = load_file(fits / "two" / "fit" / "weights.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    history_one = eval((fits / "one" / "fit" / "history.txt").read_text())  # our own repr
    history_two = eval((fits / "two" / "fit" / "history.txt").read_text())
    for a, b in zip(history_one, history_two, strict=True):
        assert a.keys() == b.keys() and a["steps"] == b["steps"] == 3
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)     # the mean over ranks
    # Rank 0 alone logs and saves; its states hold both ranks' RNG.
    lines = (fits / "two" / "fit" / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 6 == len((fits / "one" / "fit" / "steps.jsonl").read_text().splitlines())
    saved = eval((fits / "two" / "fit" / "saved.txt").read_text())
    assert [s[:3] for s in saved] == [(0, 1, 1), (0, 2, 2), (1, 0, 3), (1, 1, 4), (1, 2, 5),
                                      (2, 0, 6)]
    assert {s[3] for s in saved} == {2}
    assert {s[3] for s in eval((fits / "one" / "fit" / "saved.txt").read_text())} == {None}


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "resume.yaml"
    path.write_text(yaml.safe_dump(resume_spec()))
    return path


def run_args(spec: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(spec), "-o", str(out), "-q", "--checkpoint-every", "2", *extra]


@pytest.fixture(scope="module")
def uninterrupted(spec_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    # Through the kill driver (killing nowhere) for its deterministic algorithms.
    done = torchrun([str(KILL_DRIVER), "none", "--", *run_args(spec_path, out)])
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_a_spec_under_torchrun_writes_what_one_process_writes(uninterrupted, spec_path,
                                                              tmp_path):
    out, done = uninterrupted
    alone = tmp_path / "alone"
    assert single(["-m", "compatzoo", *run_args(spec_path, alone)]).returncode == 0

    def shape(value, path=""):
        if isinstance(value, dict):
            return {k: shape(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value]
        # NFR is None where the old model got no query right: a value, not a field.
        return "number" if value is None or isinstance(value, float) else type(value).__name__

    ddp, one = (json.loads((d / "results.json").read_text()) for d in (out, alone))
    assert shape(ddp) == shape(one)                   # the same fields, list lengths, types
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in alone.iterdir())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted(
        str(p.relative_to(alone)) for p in alone.rglob("*"))
    assert json.loads((out / "compatzoo-run.json").read_text())["options"]["processes"] == 2
    assert done.stdout.count("results: ") == 1       # rank 0 reports, once
    for row in ddp["evaluation"]["table"].values():
        assert all(0.0 <= v <= 1.0 for v in row.values())


def test_a_torchrun_run_killed_mid_training_resumes_to_the_same_bytes(uninterrupted,
                                                                      spec_path, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "run"
    killed = torchrun([str(KILL_DRIVER), "step:psi:5", "--", *run_args(spec_path, out)])
    assert killed.returncode != 0                      # both ranks died at step 5 of psi
    manifest = json.loads((out / "compatzoo-run.json").read_text())
    assert "train/old" in manifest["stages"] and "train/psi" not in manifest["stages"]
    resumed = torchrun([str(KILL_DRIVER), "none", "--", *run_args(spec_path, out, "--resume")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stages = json.loads((out / "compatzoo-run.json").read_text())["stages"]
    assert stages["train/psi"]["resumed_from"] == {"epoch": 1, "step": 4}
    assert outputs(out) == outputs(reference)


@pytest.mark.parametrize("change, flags, message", [
    ({"batch_size": 33}, [], "batch_size 33 cannot be shared equally by 2 processes"),
    ({}, ["--dist-backend", "nccl"], "nccl backend needs CUDA"),
], ids=["batch-not-divisible", "nccl-without-cuda"])
def test_a_bad_launch_fails_once_before_training(tmp_path, change, flags, message):
    if message.startswith("nccl") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec = tiny_spec()
    spec["old"]["train"] = {**spec["old"]["train"], **change}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = torchrun(["-m", "compatzoo", "run", str(path), "-o", str(tmp_path / "out"), "-q",
                     *flags])
    assert done.returncode != 0
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    # torchrun prints its own traceback when a process exits non-zero; none of ours.
    assert not re.search(r'File ".*compatzoo', done.stderr), done.stderr[-3000:]
    assert not (tmp_path / "out" / "checkpoints").exists()
