"""Saved weights are checked when loaded: a changed byte, NaN written by a diverged
model, or a config that is not an object are errors that name the file."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from compatzoo.cli import main
from compatzoo.engine import load_state, save_state
from compatzoo.engine.checkpoints import WEIGHTS
from compatzoo.errors import CheckpointError


def saved(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    save_state(tmp_path / "ckpt", {"m": module}, {"what": "test"})
    return tmp_path / "ckpt", module


def test_a_checkpoint_loads_back_exactly(tmp_path):
    folder, module = saved(tmp_path)
    again = torch.nn.Linear(4, 3)
    load_state(folder, {"m": again})
    assert torch.equal(again.weight, module.weight) and torch.equal(again.bias, module.bias)


def test_a_flipped_bit_is_refused_naming_the_file(tmp_path):
    folder, _ = saved(tmp_path)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-3] ^= 0x10                                   # inside the last tensor's values
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has sha256 .* changed"):
        load_state(folder, {"m": torch.nn.Linear(4, 3)})


def test_nan_weights_are_refused_naming_the_tensor(tmp_path):
    folder, _ = saved(tmp_path)
    state = load_file(str(folder / WEIGHTS))
    state["m.weight"][0, 0] = float("nan")
    save_file(state, str(folder / WEIGHTS))
    config = json.loads((folder / "config.json").read_text())
    del config["files"]                                 # as a checkpoint without sha256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"m\.weight holds NaN"):
        load_state(folder, {"m": torch.nn.Linear(4, 3)})


def test_a_config_holding_a_list_is_refused(tmp_path):
    folder, _ = saved(tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list, expected an object"):
        load_state(folder, {"m": torch.nn.Linear(4, 3)})


def test_a_truncated_feature_file_is_a_message_naming_it(tmp_path, capsys):
    np.save(tmp_path / "q.npy", np.zeros((50, 8), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(50, np.int64))
    whole = (tmp_path / "q.npy").read_bytes()
    (tmp_path / "q.npy").write_bytes(whole[:400])
    code = main(["eval", "--query-new", str(tmp_path / "q.npy"), "--gallery-old",
                 str(tmp_path / "q.npy"), "--query-labels", str(tmp_path / "labels.npy"),
                 "--leave-one-out", "-o", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'q.npy'} is truncated" in err and "Traceback" not in err
