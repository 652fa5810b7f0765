import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from compatzoo.cli import main
from compatzoo.retrieval import backfill_curve, evaluate


def _write_features(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 8))
    ql, gl = rng.integers(0, 5, 20), rng.integers(0, 5, 60)

    def noisy(labels, s):
        return (centres[labels] + s * rng.standard_normal((len(labels), 8))).astype(np.float32)

    arrays = {"q_old": noisy(ql, 2.0), "g_old": noisy(gl, 2.0), "q_new": noisy(ql, 0.5),
              "g_new": noisy(gl, 0.5)}
    for name, value in arrays.items():
        np.save(tmp_path / f"{name}.npy", value)
    save_file({"labels": ql, "other": gl}, str(tmp_path / "labels.safetensors"))
    np.save(tmp_path / "gl.npy", gl)
    return arrays, ql, gl


def test_eval_command_reads_features_prints_table_and_writes_json_and_plot(tmp_path, capsys):
    arrays, ql, gl = _write_features(tmp_path)
    out = tmp_path / "out"
    code = main(["eval", "--query-old", str(tmp_path / "q_old.npy"),
                 "--gallery-old", str(tmp_path / "g_old.npy"),
                 "--query-new", str(tmp_path / "q_new.npy"),
                 "--gallery-new", str(tmp_path / "g_new.npy"),
                 "--query-labels", f"{tmp_path / 'labels.safetensors'}:labels",
                 "--gallery-labels", str(tmp_path / "gl.npy"), "--points", "5", "-o", str(out)])
    assert code == 0
    results = json.loads((out / "eval.json").read_text())
    expected = evaluate(arrays["q_new"], ql, arrays["g_old"], gl, ["map@100", "cmc@1"])
    assert results["table"]["n2o"] == pytest.approx(expected)
    order = np.random.default_rng(0).permutation(60)
    curve = backfill_curve(arrays["q_new"], arrays["g_old"], arrays["g_new"], ql, gl, order,
                           points=5, query_old=arrays["q_old"])
    assert results["backfill"]["metrics"]["map@100"] == pytest.approx(curve.metrics["map@100"])
    assert (out / "backfill.png").stat().st_size > 0
    assert "o2o" in capsys.readouterr().out


def test_eval_command_errors_are_clear(tmp_path, capsys):
    _write_features(tmp_path)
    assert main(["eval", "--query-new", str(tmp_path / "q_new.npy"), "--gallery-old",
                 str(tmp_path / "missing.npy"), "--query-labels", str(tmp_path / "gl.npy")]) == 2
    assert "--gallery-labels" in capsys.readouterr().err
    assert main(["eval", "--query-new", str(tmp_path / "q_new.npy"), "--gallery-old",
                 str(tmp_path / "missing.npy"), "--query-labels", str(tmp_path / "gl.npy"),
                 "--gallery-labels", str(tmp_path / "gl.npy")]) == 2
    assert "missing.npy does not exist" in capsys.readouterr().err
    assert main(["eval", "--query-new", str(tmp_path / "q_new.npy"), "--query-labels",
                 str(tmp_path / "labels.safetensors"), "--leave-one-out"]) == 2
    assert "name one as" in capsys.readouterr().err
