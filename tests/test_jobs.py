"""Gallery jobs: ``upgrade`` over every stored format (values, ids and other columns carried,
chains, side information), ``order`` and ``embed``; every bad input refused before an
output is written; and SIGKILL at several points followed by a rerun giving exactly the
bytes of an uninterrupted job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import save_file

import compatzoo
from compatzoo.errors import DatasetError, DimensionMismatchError, InvalidFeaturesError, SpecError
from compatzoo.jobs import (JobStateError, bundle_step, embed_images, order_gallery,
                            read_manifest, upgrade_gallery)
from compatzoo.engine.checkpoints import file_sha256
from compatzoo.plugin import StoredGallery

HERE = Path(__file__).resolve().parent
D = 128   # the shipped synthetic bundles' width


@pytest.fixture(scope="module")
def bict():
    return compatzoo.load("bict-synth")


def gallery(n: int = 700, seed: int = 0, dim: int = D) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def write_formats(folder: Path, rows: np.ndarray) -> dict[str, Path]:
    """The same rows as .npy, .safetensors, Parquet (ids and a label column beside the
    embeddings) and a faiss IndexIDMap(IndexFlatIP)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"npy": folder / "a.npy", "safetensors": folder / "b.safetensors",
             "parquet": folder / "c.parquet", "faiss": folder / "d.index"}
    np.save(paths["npy"], rows)
    save_file({"embeddings": rows}, str(paths["safetensors"]))
    pq.write_table(parquet_table(rows), paths["parquet"], row_group_size=150)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(rows.shape[1]))
    index.add_with_ids(rows, np.arange(len(rows)) + 10_000)
    faiss.write_index(index, str(paths["faiss"]))
    return paths


def parquet_table(rows: np.ndarray, column: str = "embedding", **extra) -> pa.Table:
    return pa.table({"id": np.arange(len(rows)) + 10_000,
                     column: pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)),
                                                               rows.shape[1]),
                     "label": [f"item-{i}" for i in range(len(rows))], **extra})


def read_any(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Embeddings (and ids where the format has them) of an output file."""
    if path.suffix == ".npy":
        return np.load(path), None
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))["embeddings"], None
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return (np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                table.column("id").to_numpy())
    stored = faiss.read_index(str(path))                 # owns the C++ index: keep it alive
    index = faiss.downcast_index(stored)
    flat = faiss.downcast_index(index.index)
    return flat.reconstruct_n(0, flat.ntotal), faiss.vector_to_array(index.id_map)


def test_every_format_is_upgraded_in_place_of_its_kind(bict, tmp_path):
    rows = gallery()
    paths = write_formats(tmp_path / "in", rows)
    summary = upgrade_gallery([bundle_step(bict)], [tmp_path / "in"], tmp_path / "out",
                              chunk_rows=256, progress=False)
    expected = bict.upgrade(rows, chunk_size=256)          # the same chunks: the same bytes
    for kind, path in paths.items():
        values, ids = read_any(tmp_path / "out" / path.name)
        assert np.array_equal(values, expected), kind
        if ids is not None:
            assert np.array_equal(ids, np.arange(len(rows)) + 10_000), kind
    table = pq.read_table(tmp_path / "out" / "c.parquet")
    assert table.column("label").to_pylist() == [f"item-{i}" for i in range(len(rows))]
    assert table.schema.metadata[b"compatzoo_fingerprint"].decode() == bict.config.new.fingerprint
    assert summary["rows"] == 4 * len(rows) and summary["rows_per_s"] > 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["status"] == "done" and set(manifest["outputs"]) == {
        p.name for p in paths.values()}
    for name, record in manifest["outputs"].items():
        assert record["sha256"] == file_sha256(tmp_path / "out" / name)


def test_a_rerun_of_the_finished_job_writes_nothing_and_verify_checks_it(bict, tmp_path):
    from compatzoo.cli import main

    np.save(tmp_path / "g.npy", gallery(50))
    args = ["upgrade", "bict-synth", "--input", str(tmp_path / "g.npy"), "--output",
            str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    stamp = (tmp_path / "out" / "g.npy").stat().st_mtime_ns
    assert main(args) == 0
    assert (tmp_path / "out" / "g.npy").stat().st_mtime_ns == stamp
    assert main(["upgrade", "bict-synth", "--verify", "--output", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "g.npy", "r+b") as handle:      # a flipped byte
        handle.seek(-1, 2)
        handle.write(b"\x7f")
    assert main(["upgrade", "bict-synth", "--verify", "--output", str(tmp_path / "out")]) == 2


def test_a_chain_of_bundles_is_applied_hop_by_hop_in_one_pass(tiny_lineage, tmp_path):
    """v2 then v3 (BiCT, eq. 9 reads the copy v2's hop replaced) on the old gallery: the
    run's gallery carried old -> v2 -> v3."""
    _, _, embeddings, upgrades, _, folder = tiny_lineage
    np.save(tmp_path / "old.npy", embeddings["old"].gallery.numpy())
    steps = [bundle_step(compatzoo.load(folder / name)) for name in ("v2", "v3")]
    upgrade_gallery(steps, [tmp_path / "old.npy"], tmp_path / "out", progress=False)
    assert np.array_equal(np.load(tmp_path / "out" / "old.npy"),
                          upgrades.carried[("old", "v3")].features.numpy())
    with pytest.raises(InvalidFeaturesError, match="bundle 'v2' upgrades galleries of another "
                                                   "model than the one bundle 'v3' upgrades into"):
        upgrade_gallery(steps[::-1], [tmp_path / "old.npy"], tmp_path / "other",
                        progress=False)
    assert not (tmp_path / "other").exists()


def test_side_information_and_the_older_copy_come_from_parallel_inputs(tiny_lineage, tmp_path):
    _, data, embeddings, upgrades, _, folder = tiny_lineage
    fct = compatzoo.load(folder / "f2")
    old = embeddings["old"].gallery.numpy()
    side = fct.side_information(data.data.gallery, batch_size=512)
    pq.write_table(parquet_table(old, side=pa.FixedSizeListArray.from_arrays(
        pa.array(side.reshape(-1)), side.shape[1])), tmp_path / "g.parquet")
    with pytest.raises(InvalidFeaturesError, match="reads 4 values of side information"):
        upgrade_gallery([bundle_step(fct)], [tmp_path / "g.parquet"], tmp_path / "out",
                        progress=False)
    upgrade_gallery([bundle_step(fct)], [tmp_path / "g.parquet"], tmp_path / "out",
                    side=[tmp_path / "g.parquet"], side_column="side", progress=False)
    values, _ = read_any(tmp_path / "out" / "g.parquet")
    assert np.array_equal(values, upgrades.carried[("old", "f2")].features.numpy())
    # an older copy for a second BiCT hop run on its own (eq. 9 mixes both copies)
    v3 = compatzoo.load(folder / "v3")
    np.save(tmp_path / "f1.npy", upgrades.carried[("old", "v2")].features.numpy())
    np.save(tmp_path / "f0.npy", old)
    upgrade_gallery([bundle_step(v3)], [tmp_path / "f1.npy"], tmp_path / "out3",
                    previous=[tmp_path / "f0.npy"], progress=False)
    assert np.array_equal(np.load(tmp_path / "out3" / "f1.npy"),
                          upgrades.carried[("old", "v3")].features.numpy())


@pytest.mark.parametrize("policy", ["skip", "zero"])
def test_rows_with_nan_are_reported_or_handled_as_asked(bict, tmp_path, policy):
    rows = gallery(40)
    rows[[3, 17], 5] = np.nan
    pq.write_table(parquet_table(rows), tmp_path / "g.parquet")
    with pytest.raises(InvalidFeaturesError, match=r"g.parquet: 2 rows \(first: \[3, 17\]\)"):
        upgrade_gallery([bundle_step(bict)], [tmp_path / "g.parquet"], tmp_path / "out",
                        progress=False)
    assert not (tmp_path / "out").exists()
    summary = upgrade_gallery([bundle_step(bict)], [tmp_path / "g.parquet"], tmp_path / "out",
                              on_bad_rows=policy, progress=False)
    values, ids = read_any(tmp_path / "out" / "g.parquet")
    keep = np.ones(40, bool)
    keep[[3, 17]] = False
    if policy == "skip":
        assert summary["rows_skipped"] == 2 and len(values) == 38
        assert np.array_equal(ids, (np.arange(40) + 10_000)[keep])
    else:
        assert summary["rows_zeroed"] == 2 and len(values) == 40
        assert np.allclose(values[3], bict.upgrade(np.zeros((1, D), np.float32))[0], atol=1e-5)
    assert np.isfinite(values).all()


def test_bad_inputs_fail_before_any_output_is_written(bict, tmp_path):
    def refused(inputs, match, error=SpecError, **options):
        with pytest.raises(error, match=match):
            upgrade_gallery([bundle_step(bict)], inputs, tmp_path / "out", progress=False,
                            **options)
        assert not (tmp_path / "out").exists()

    np.save(tmp_path / "narrow.npy", gallery(10, dim=D - 1))
    refused([tmp_path / "narrow.npy"], "holds 127-d embeddings, but bundle 'bict-synth' "
            "upgrades 128-d", DimensionMismatchError)
    truncated = tmp_path / "cut.npy"
    np.save(truncated, gallery(10))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    refused([truncated], r"cut.npy is truncated: its header says \(10, 128\) float32",
            DatasetError)
    pq.write_table(parquet_table(gallery(5), column="vector"), tmp_path / "other.parquet")
    refused([tmp_path / "other.parquet"], r"has no column 'embedding'; its columns are "
            r"\['id', 'vector', 'label'\]: name the embedding column with --column")
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, 2)
    index.train(gallery(100))
    faiss.write_index(index, str(tmp_path / "ivf.index"))
    refused([tmp_path / "ivf.index"], "faiss IndexIVFFlat; compatzoo upgrades the flat kinds "
            "IndexFlatIP, IndexFlatL2")
    foreign = parquet_table(gallery(5)).replace_schema_metadata(
        {"compatzoo_fingerprint": "f" * 64})
    pq.write_table(foreign, tmp_path / "foreign.parquet")
    refused([tmp_path / "foreign.parquet"], "written by a model with fingerprint ffff.*use the "
            "bundle of the model that wrote the gallery", InvalidFeaturesError)
    np.save(tmp_path / "ok.npy", gallery(5))
    refused([tmp_path / "ok.npy"], "fingerprint 0000", InvalidFeaturesError,
            fingerprint="0" * 64)
    refused([tmp_path / "nowhere.npy"], "does not exist")


def test_an_output_folder_holding_another_job_or_changed_inputs_is_refused(bict, tmp_path):
    np.save(tmp_path / "g.npy", gallery(20))
    upgrade_gallery([bundle_step(bict)], [tmp_path / "g.npy"], tmp_path / "out",
                    progress=False)
    before = file_sha256(tmp_path / "out" / "g.npy")
    with pytest.raises(JobStateError, match="holds another job .*parameters differ"):
        upgrade_gallery([bundle_step(bict)], [tmp_path / "g.npy"], tmp_path / "out",
                        chunk_rows=7, progress=False)
    with pytest.raises(JobStateError, match="holds another job .*sources differ"):
        upgrade_gallery([bundle_step(compatzoo.load("bct-synth"))], [tmp_path / "g.npy"],
                        tmp_path / "out", progress=False)
    np.save(tmp_path / "g.npy", gallery(20, seed=1))                 # the input changed
    with pytest.raises(JobStateError, match="g.npy is not what the job .* started from"):
        upgrade_gallery([bundle_step(bict)], [tmp_path / "g.npy"], tmp_path / "out",
                        progress=False)
    assert file_sha256(tmp_path / "out" / "g.npy") == before          # nothing lost


# --------------------------------------------------------------------------- kills
def cli(args: list[str], kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    command = ([sys.executable, str(HERE / "jobs_kill_driver.py"), kill[0], str(kill[1]), "--"]
               if kill else [sys.executable, "-m", "compatzoo.cli"])
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=HERE)


def outputs(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "compatzoo-job.json"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, bict):
    folder = tmp_path_factory.mktemp("kills")
    write_formats(folder / "in", gallery(700))
    upgrade_gallery([bundle_step(bict)], [folder / "in"], folder / "reference",
                    chunk_rows=256, progress=False)
    return folder, outputs(folder / "reference")


@pytest.mark.parametrize("kill", [("chunk", 5), ("commit", 2), ("manifest", 3)],
                         ids=["mid-file", "between-files", "during-the-manifest-write"])
def test_a_killed_upgrade_resumes_to_the_bytes_of_an_uninterrupted_one(uninterrupted, kill):
    folder, expected = uninterrupted
    out = folder / f"killed-{kill[0]}"
    args = ["upgrade", "bict-synth", "--input", str(folder / "in"), "--output", str(out),
            "--chunk-rows", "256", "--quiet"]
    killed = cli(args, kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not any(p.name.endswith(".partial") and not p.name.startswith(".")
                   for p in out.iterdir())                 # partial files are hidden, never named
    assert 0 < len(outputs(out)) or kill[0] == "chunk" or kill[0] == "manifest"
    resumed = cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert outputs(out) == expected                       # every file: rows and sha256
    assert not list(out.glob(".*partial"))
    assert json.loads((out / "compatzoo-job.json").read_text())["status"] == "done"


def torchrun(script: list[str], env_extra: dict[str, str] | None = None):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", *script], capture_output=True, text=True,
                          cwd=HERE, env=env)


def test_two_torchrun_ranks_split_the_files_and_resume_after_one_is_killed(uninterrupted):
    folder, expected = uninterrupted
    args = ["upgrade", "bict-synth", "--input", str(folder / "in"), "--chunk-rows", "256",
            "--quiet"]
    both = torchrun(["-m", "compatzoo.cli", *args, "--output", str(folder / "ranks")])
    assert both.returncode == 0, both.stderr[-3000:]
    assert outputs(folder / "ranks") == expected
    manifest = json.loads((folder / "ranks" / "compatzoo-job.json").read_text())
    assert manifest["status"] == "done" and len(manifest["outputs"]) == 4
    assert not list((folder / "ranks").glob("compatzoo-job.rank-*.json"))   # merged
    # rank 1 dies in its second file's first chunk; the rerun (2 ranks) finishes the job
    out = folder / "ranks-killed"
    killed = torchrun([str(HERE / "jobs_kill_driver.py"), "chunk", "4", "--", *args,
                       "--output", str(out)], {"KILL_RANK": "1"})
    assert killed.returncode != 0
    assert json.loads((out / "compatzoo-job.json").read_text())["status"] == "running"
    resumed = torchrun(["-m", "compatzoo.cli", *args, "--output", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outputs(out) == expected
    single = cli(["upgrade", "bict-synth", "--verify", "--output", str(out)])
    assert single.returncode == 0, single.stderr


# --------------------------------------------------------------------------- order, embed
@pytest.mark.parametrize("scheduler,bundle", [("random", "bict-synth"),
                                              ("uncertainty", "ract-synth"),
                                              ("oracle-distance", "bict-synth")])
def test_order_writes_a_permutation_by_any_scheduler(tmp_path, scheduler, bundle):
    loaded = compatzoo.load(bundle)
    rows = gallery(300)
    np.save(tmp_path / "a.npy", rows[:200])
    pq.write_table(parquet_table(rows[200:]), tmp_path / "b.parquet")
    if scheduler == "oracle-distance":
        with pytest.raises(SpecError, match="reads the re-embedded gallery itself"):
            order_gallery(loaded, [tmp_path / "a.npy"], tmp_path / "order.npy",
                          scheduler=scheduler)
        return
    summary = order_gallery(loaded, [tmp_path / "a.npy", tmp_path / "b.parquet"],
                            tmp_path / "order.parquet", scheduler=scheduler, seed=3)
    table = pq.read_table(tmp_path / "order.parquet").to_pydict()
    assert summary["rows"] == 300 and sorted(table["gallery_row"]) == list(range(300))
    assert table["file"][table["gallery_row"].index(250)] == "b.parquet"
    if scheduler == "uncertainty":          # the scheduler's own order on the same rows
        from compatzoo.plugin import BackfillState

        expected = compatzoo.create_scheduler("uncertainty").order(
            BackfillState(old_features=rows, new_head=loaded.new_head))
        assert table["gallery_row"] == expected.tolist()
    again = order_gallery(loaded, [tmp_path / "a.npy", tmp_path / "b.parquet"],
                          tmp_path / "order.parquet", scheduler=scheduler, seed=3)
    assert again.get("up_to_date")
    with pytest.raises(JobStateError, match="already exists and is not this job's order"):
        order_gallery(loaded, [tmp_path / "a.npy", tmp_path / "b.parquet"],
                      tmp_path / "order.parquet", scheduler=scheduler, seed=4)


def test_order_by_a_signal_the_upgrader_publishes(tiny_lineage, tmp_path):
    """fastfill-sigma needs the fastfill upgrader's signal; bict-synth publishes none."""
    np.save(tmp_path / "g.npy", gallery(30))
    with pytest.raises(SpecError, match=r"orders by \['sigma'\], which the upgrader of "
                                        "bundle 'bict-synth' does not publish"):
        order_gallery(compatzoo.load("bict-synth"), [tmp_path / "g.npy"],
                      tmp_path / "order.npy", scheduler="fastfill-sigma")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Gallery images on disk: the synthetic benchmark's first 40 gallery images."""
    from PIL import Image

    from compatzoo.specs import load_spec

    data = load_spec(compatzoo.bundles.model_cards()["bct-synth"].spec).data.dataset.build()
    folder = tmp_path_factory.mktemp("images")
    for i in range(40):
        pixels = data.gallery.images[i].permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"img-{i:03d}.png")
    return folder, data.gallery.images[:40]


def test_embed_re_embeds_images_in_order_into_shards_and_resumes(images, tmp_path):
    folder, pixels = images
    bundle = compatzoo.load("fct-synth")
    order = np.random.default_rng(0).permutation(40)
    np.save(tmp_path / "order.npy", order)
    summary = embed_images(bundle, folder, tmp_path / "out", order=tmp_path / "order.npy",
                           shard_rows=16, batch_size=8, workers=0, progress=False)
    assert summary["shards"] == 3
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob(
        "part-*.parquet"))])
    assert table.column("row").to_pylist() == order.tolist()
    embedded = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    direct = bundle.encode(pixels[order[:8]], batch_size=8)     # the first batch, same shape
    assert np.array_equal(embedded[:8], direct)
    assert "side" not in table.column_names                       # new model: no next hop
    (tmp_path / "out" / "part-00001.parquet").unlink()             # lost: redone, same bytes
    before = file_sha256(tmp_path / "out" / "part-00002.parquet")
    again = embed_images(bundle, folder, tmp_path / "out", order=tmp_path / "order.npy",
                         shard_rows=16, batch_size=8, workers=0, progress=False)
    assert again["shards_written"] == 1
    assert file_sha256(tmp_path / "out" / "part-00002.parquet") == before
    old = embed_images(bundle, folder, tmp_path / "old", model="old", shard_rows=64,
                       batch_size=8, workers=0, progress=False)
    assert old["shards"] == 1
    side = pq.read_table(tmp_path / "old" / "part-00000.parquet").column("side")
    assert len(side) == 40 and len(side[0]) == bundle.config.side.embedding_dim


def test_embed_decodes_in_worker_processes(images, tmp_path):
    folder, _ = images
    bundle = compatzoo.load("bct-synth")
    embed_images(bundle, folder, tmp_path / "w2", shard_rows=40, batch_size=8, workers=2,
                 progress=False)
    embed_images(bundle, folder, tmp_path / "w0", shard_rows=40, batch_size=8, workers=0,
                 progress=False)
    assert file_sha256(tmp_path / "w2" / "part-00000.parquet") == file_sha256(
        tmp_path / "w0" / "part-00000.parquet")


def test_embed_refuses_an_order_of_another_gallery(images, tmp_path):
    folder, _ = images
    np.save(tmp_path / "order.npy", np.arange(39))
    with pytest.raises(SpecError, match="not a permutation of the 40 gallery images"):
        embed_images(compatzoo.load("bct-synth"), folder, tmp_path / "out",
                     order=tmp_path / "order.npy", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DatasetError, match="neither a folder of images nor a list file"):
        embed_images(compatzoo.load("bct-synth"), tmp_path / "nowhere", tmp_path / "out",
                     progress=False)


def test_the_upgraded_bytes_match_a_stored_gallery_advance(bict):
    """``bundle.advance`` and the job compute the same thing on the same chunk."""
    rows = torch.from_numpy(gallery(64))
    assert torch.equal(bict.advance(StoredGallery(rows)).features,
                       torch.from_numpy(bict.upgrade(rows.numpy())))


def test_the_ray_engine_writes_the_local_engines_bytes(uninterrupted):
    """Files on Ray actors (a local Ray with 2 CPUs), then a rerun with the local engine
    finds the job done: the same job, the same outputs."""
    pytest.importorskip("ray")
    folder, expected = uninterrupted
    out = folder / "ray"
    summary = upgrade_gallery([bundle_step(compatzoo.load("bict-synth"))], [folder / "in"],
                              out, chunk_rows=256, engine="ray", workers=2, progress=False)
    assert summary["files_written"] == 4
    assert outputs(out) == expected                     # byte for byte, every format
    again = upgrade_gallery([bundle_step(compatzoo.load("bict-synth"))], [folder / "in"],
                            out, chunk_rows=256, progress=False)
    assert again["files_written"] == 0
