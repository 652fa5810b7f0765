"""``compatzoo fit-adapter``: paired embeddings from files -> a held-out report and an
adapter bundle that ``compatzoo.load`` and ``compatzoo upgrade`` accept."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

import compatzoo
from compatzoo.cli import main
from compatzoo.errors import InvalidFeaturesError, SpecError

N, D = 600, 24


def rotation_pairs(d_new: int = D, noise: float = 0.05, seed: int = 0):
    """Old embeddings, and new ones: a known (semi-)orthogonal map of them plus noise."""
    rng = np.random.default_rng(seed)
    old = rng.standard_normal((N, D)).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((d_new, d_new)))[0][:D]
    new = (old @ rotation + noise * rng.standard_normal((N, d_new))).astype(np.float32)
    return old, new, rotation


def parquet(path, values: np.ndarray, ids=None, fixed: bool = True) -> str:
    flat = pa.array(values.reshape(-1))
    column = (pa.FixedSizeListArray.from_arrays(flat, values.shape[1]) if fixed else
              pa.ListArray.from_arrays(pa.array(np.arange(0, values.size + 1, values.shape[1],
                                                          dtype=np.int32)), flat))
    table = {"embedding": column} if ids is None else {"id": ids, "embedding": column}
    pq.write_table(pa.table(table), path)
    return str(path)


def fit(*args: str) -> int:
    """The command, with ``--method procrustes`` unless the args name a method."""
    method = [] if "--method" in args else ["--method", "procrustes"]
    return main(["fit-adapter", *args, *method, "--quiet"])


def report(capsys) -> dict[str, dict[str, float]]:
    """The printed table: {setting: {metric: percent}}."""
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("setting"))
    metrics = lines[header].split()[1:]
    rows = [line.split() for line in lines[header + 1:] if line[:3] in ("n2o", "n2u", "a2o", "n2n")]
    return {row[0]: dict(zip(metrics, map(float, row[1:]))) for row in rows}


def test_npy_pairs_end_to_end(tmp_path, capsys):
    old, new, rotation = rotation_pairs()
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    bundle_dir = tmp_path / "bundle"
    assert fit("--old", str(tmp_path / "old.npy"), "--new", str(tmp_path / "new.npy"),
               "--out", str(bundle_dir)) == 0
    table = report(capsys)
    assert table["n2u"]["recall@1"] >= 98 and table["n2u"]["map"] >= 98
    assert table["n2o"]["recall@10"] < 30                  # the unadapted baseline
    assert table["n2n"]["recall@1"] == 100

    bundle = compatzoo.load(bundle_dir)
    config = bundle.config
    assert (config.old.encoder, config.upgrader.name, config.upgrader.direction) == (
        None, "procrustes", "gallery")
    assert list(config.files) == ["upgrader/model.safetensors"]
    assert config.evaluation["pairs"] == {"train": 540, "held_out": 60}
    assert np.abs(bundle.upgrade(old) - old @ rotation).mean() < 0.01   # noise: 0.04
    with pytest.raises(InvalidFeaturesError, match="holds no encoders"):
        bundle.encode(np.zeros((1, 3, 8, 8), np.float32))

    out = tmp_path / "upgraded"
    assert main(["upgrade", str(bundle_dir), "--input", str(tmp_path / "old.npy"),
                 "--output", str(out), "--quiet"]) == 0
    assert np.array_equal(np.load(out / "old.npy"), bundle.upgrade(old))


def test_parquet_pairs_with_ids_and_a_query_adapter(tmp_path, capsys):
    old, new, _ = rotation_pairs(d_new=32)                # 24-d old, 32-d new
    ids = [f"item-{i}" for i in range(N)]
    old_path = parquet(tmp_path / "old.parquet", old, ids)
    new_path = parquet(tmp_path / "new.parquet", new, ids, fixed=False)
    assert fit("--old", old_path, "--new", new_path, "--direction", "query",
               "--params", '{"center": true}', "--val-fraction", "0.2", "--seed", "3",
               "--out", str(tmp_path / "query")) == 0
    table = report(capsys)
    assert "n2o" not in table                              # widths differ: no baseline
    assert table["a2o"]["recall@1"] >= 98

    bundle = compatzoo.load(tmp_path / "query")
    entry = bundle.config.upgrader
    assert (entry.direction, entry.input_dim, entry.output_dim) == ("query", 32, 24)
    assert np.abs(bundle.upgrader.upgrade(new) - old).mean() < 0.05
    with pytest.raises(SpecError, match="query adapter"):
        bundle.upgrade(old)
    np.save(tmp_path / "gallery.npy", old)
    assert main(["upgrade", str(tmp_path / "query"), "--input", str(tmp_path / "gallery.npy"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "holds a query adapter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()                 # refused before anything exists


def test_safetensors_keys_and_trained_methods(tmp_path, capsys):
    old, new, _ = rotation_pairs()
    save_file({"old": old, "other": old[:, :3].copy()}, str(tmp_path / "old.safetensors"))
    save_file({"embedding": new}, str(tmp_path / "new.safetensors"))
    assert fit("--old", f"{tmp_path / 'old.safetensors'}:old",
               "--new", str(tmp_path / "new.safetensors"), "--method", "residual-mlp",
               "--params", "epochs=20", "lr=0.01", "hidden_dim=32", "--val-fraction", "0",
               "--out", str(tmp_path / "mlp")) == 0
    assert "none held out" in capsys.readouterr().out
    config = compatzoo.load(tmp_path / "mlp").config
    assert config.upgrader.params["hidden_dim"] == 32 and "settings" not in config.evaluation



@pytest.mark.parametrize("method, params", [
    ("bict-mlp", ["hidden_dim=32", "epochs=30", "lr=0.5"]),
    ("fct-transformation", ["side_info=none", "epochs=30"]),
], ids=["bict-mlp", "fct-transformation"])
def test_the_seed_methods_upgraders_fit_on_the_same_paired_input(tmp_path, capsys, method,
                                                                 params):
    """Issue #15: BiCT's psi and FCT's h (without side information) run on paired
    embeddings alone, like the adapters, and beat the unadapted baseline."""
    old, new, _ = rotation_pairs()
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    assert fit("--old", str(tmp_path / "old.npy"), "--new", str(tmp_path / "new.npy"),
               "--method", method, "--params", *params, "--out", str(tmp_path / "b")) == 0
    table = report(capsys)
    assert table["n2u"]["map"] > table["n2o"]["map"] + 20
    assert compatzoo.load(tmp_path / "b").config.upgrader.name == method

def bad_pairs(tmp_path):
    old, new, _ = rotation_pairs()
    paths = {"old": tmp_path / "old.npy", "new": tmp_path / "new.npy",
             "short": tmp_path / "short.npy", "nan": tmp_path / "nan.npy",
             "few-old": tmp_path / "few-old.npy", "few-new": tmp_path / "few-new.npy"}
    np.save(paths["old"], old)
    np.save(paths["new"], new)
    np.save(paths["short"], new[:-1])
    broken = new.copy()
    broken[[5, 70]] = np.nan
    np.save(paths["nan"], broken)
    np.save(paths["few-old"], old[:20])
    np.save(paths["few-new"], new[:20])
    parquet(tmp_path / "a.parquet", old, list(range(N)))
    parquet(tmp_path / "b.parquet", new, [*range(N - 1), 10**6])
    return {name: str(path) for name, path in paths.items()}


@pytest.mark.parametrize("case,message", [
    (["--old", "{old}", "--new", "{short}"], "holds 600 embeddings but"),
    (["--old", "{tmp}/a.parquet", "--new", "{tmp}/b.parquet"], "1 of 600 rows have other ids"),
    (["--old", "{old}", "--new", "{nan}"], r"NaN or inf in 2 rows \(first: \[5, 70\]\)"),
    (["--old", "{few-old}", "--new", "{few-new}", "--method", "affine"],
     "needs at least 25 pairs"),
    (["--old", "{old}", "--new", "{new}", "--method", "nope"], "nope"),
    (["--old", "{old}", "--new", "{new}", "--method", "identity", "--direction", "query"],
     "only maps stored galleries"),
    (["--old", "{old}", "--new", "{new}", "--params", "rank"], "not KEY=VALUE"),
    (["--old", "{old}", "--new", "{new}", "--params", "rank=true"], "rank"),
    (["--old", "{old}", "--new", "{tmp}/missing.npy"], "does not exist"),
    (["--old", "{old}", "--new", "{new}", "--val-fraction", "0.001"], "needs at least 2"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, case, message):
    paths = bad_pairs(tmp_path) | {"tmp": str(tmp_path)}
    args = [arg.format(**paths) for arg in case]
    assert fit(*args, "--out", str(tmp_path / "bundle")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "bundle").exists()


def test_the_bundle_records_how_it_was_fitted(tmp_path, capsys):
    old, new, _ = rotation_pairs()
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    assert fit("--old", str(tmp_path / "old.npy"), "--new", str(tmp_path / "new.npy"),
               "--method", "affine", "--params", "rank=8", "--name", "my-upgrade",
               "--out", str(tmp_path / "b")) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["name"] == "my-upgrade"
    assert config["spec"]["fit_adapter"]["params"] == {"direction": "gallery", "ridge": 0.0,
                                                      "rank": 8}
    card = (tmp_path / "b" / "README.md").read_text()
    assert "paired embeddings only" in card and "n2u" in card


def test_an_encoder_entry_must_be_complete(tmp_path, capsys):
    """Adapter bundles have no encoders; a config naming an encoder's file without the
    encoder (a tampered or truncated config) is refused."""
    from compatzoo.errors import CheckpointError

    old, new, _ = rotation_pairs()
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    assert fit("--old", str(tmp_path / "old.npy"), "--new", str(tmp_path / "new.npy"),
               "--out", str(tmp_path / "b")) == 0
    path = tmp_path / "b" / "config.json"
    config = json.loads(path.read_text())
    config["old"]["file"] = "old/model.safetensors"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="encoder spec, file and fingerprint together"):
        compatzoo.load(tmp_path / "b")
