"""Applying upgraders to stored embeddings: chunked over memory-mapped .npy equals
in-memory, and sharded, resumable upgrades that never leave a partial output shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import compatzoo
from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError, SpecError
from compatzoo.jobs import JobStateError
from compatzoo.plugin import GalleryUpgrader
from compatzoo.shards import upgrade_shards

D_OLD, D_NEW = 6, 4


def psi() -> GalleryUpgrader:
    torch.manual_seed(0)
    upgrader = compatzoo.create_upgrader("bict-mlp", D_OLD, D_NEW, hidden_dim=16)
    for bn in (m for m in upgrader.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.uniform_(-1, 1)                  # non-trivial eval-mode statistics
    return upgrader.eval()


class ConcatSide(GalleryUpgrader):
    """Output = [old, side]: makes the pairing of side rows with old rows visible."""

    input_dim, side_dim, output_dim = D_OLD, 2, D_OLD + 2

    def forward(self, old, side=None):
        return torch.cat([old, side], dim=1)


def counting(upgrader: GalleryUpgrader, fail_at: int = -1) -> list[int]:
    """Count the upgrader's forward calls (its weights, hence the job, unchanged) and raise
    on the ``fail_at``-th."""
    calls: list[int] = []

    def hook(module, inputs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")

    upgrader.register_forward_pre_hook(hook)
    return calls


def outputs_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "compatzoo-job.json")


def write_shards(tmp_path: Path, sizes=(10, 7, 12), dim: int = D_OLD, seed: int = 0,
                 prefix: str = "part") -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(sizes):
        path = tmp_path / "in" / f"{prefix}-{i}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.normal(size=(n, dim)).astype(np.float32))
        paths.append(path)
    return paths


def test_chunked_memmap_upgrade_equals_in_memory(tmp_path):
    array = np.random.default_rng(0).normal(size=(101, D_OLD)).astype(np.float32)
    np.save(tmp_path / "gallery.npy", array)
    stored = np.load(tmp_path / "gallery.npy", mmap_mode="r")
    upgrader = psi()
    assert isinstance(stored, np.memmap)
    chunked = upgrader.upgrade(stored, chunk_size=8)
    assert np.array_equal(chunked, upgrader.upgrade(array, chunk_size=8))   # same computation
    # One 101-row chunk is another matrix shape: BLAS may sum in another order, so the
    # values agree to float32 rounding, not bit for bit.
    np.testing.assert_allclose(chunked, upgrader.upgrade(array), rtol=1e-5, atol=1e-6)


def test_sharded_outputs_equal_in_memory_upgrade(tmp_path):
    paths = write_shards(tmp_path)
    upgrader = psi()
    outputs = upgrade_shards(upgrader, paths, tmp_path / "out", chunk_size=4, progress=False)
    assert [p.name for p in outputs] == [p.name for p in paths]
    for path, out in zip(paths, outputs):
        assert np.array_equal(np.load(out), upgrader.upgrade(np.load(path), chunk_size=4))
    assert outputs_of(tmp_path / "out") == [p.name for p in paths]


def test_sharded_upgrade_is_resumable(tmp_path):
    paths = write_shards(tmp_path)
    out_dir = tmp_path / "out"
    first = upgrade_shards(psi(), paths, out_dir, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in first}
    first[1].unlink()
    again = psi()
    calls = counting(again)
    upgrade_shards(again, paths, out_dir, progress=False)
    assert len(calls) == 1                                         # only the missing shard
    assert first[0].stat().st_mtime_ns == stamps[first[0]]
    assert np.array_equal(np.load(first[1]), psi().upgrade(np.load(paths[1])))


def test_an_interrupted_shard_leaves_no_partial_output(tmp_path):
    paths = write_shards(tmp_path)                                  # 10, 7, 12 rows
    out_dir = tmp_path / "out"
    failing = psi()
    counting(failing, fail_at=5)                                    # chunk 4 = 2nd chunk of shard 1
    with pytest.raises(RuntimeError, match="injected"):
        upgrade_shards(failing, paths, out_dir, chunk_size=4, progress=False)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "compatzoo-job.json", "part-0.npy"]                         # no part-1, no .partial
    resumed = upgrade_shards(psi(), paths, out_dir, chunk_size=4, progress=False)
    for path, out in zip(paths, resumed):
        assert np.array_equal(np.load(out), psi().upgrade(np.load(path), chunk_size=4))


def test_bad_shards_fail_before_any_output_is_written(tmp_path):
    paths = write_shards(tmp_path)
    with_nan = np.load(paths[2])
    with_nan[11, 3] = np.nan
    np.save(paths[2], with_nan)
    with pytest.raises(InvalidFeaturesError, match=r"NaN or inf .*nothing was written.*\n.*"
                                                   r"part-2.npy: 1 rows \(first: \[11\]\)"):
        upgrade_shards(psi(), paths, tmp_path / "out", chunk_size=4, progress=False)
    assert not (tmp_path / "out").exists()
    wide = write_shards(tmp_path, sizes=(3,), dim=D_OLD + 1, prefix="wide")
    with pytest.raises(DimensionMismatchError, match="holds 7-d embeddings, but upgrader "
                                                     "BiCTMLP upgrades 6-d ones"):
        upgrade_shards(psi(), [paths[0], *wide], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SpecError, match="does not exist"):
        upgrade_shards(psi(), [tmp_path / "missing.npy"], tmp_path / "out", progress=False)


def test_side_shards_are_required_and_paired_by_row(tmp_path):
    paths = write_shards(tmp_path, sizes=(5, 3))
    rng = np.random.default_rng(1)
    sides = []
    for path in paths:
        side = tmp_path / f"side-{path.name}"
        np.save(side, rng.normal(size=(len(np.load(path)), 2)).astype(np.float32))
        sides.append(side)
    with pytest.raises(InvalidFeaturesError, match="reads 2 values of side information"):
        upgrade_shards(ConcatSide(), paths, tmp_path / "out", progress=False)
    outputs = upgrade_shards(ConcatSide(), paths, tmp_path / "out", side_paths=sides,
                             chunk_size=2, progress=False)
    for path, side, out in zip(paths, sides, outputs):
        assert np.array_equal(np.load(out), np.concatenate([np.load(path), np.load(side)], axis=1))
    with pytest.raises(InvalidFeaturesError, match="holds 3 rows of width 2, but .* needs 5"):
        upgrade_shards(ConcatSide(), paths[:1], tmp_path / "out2", side_paths=sides[1:],
                       progress=False)


def test_safetensors_shards(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(n, D_OLD)).astype(np.float32) for n in (9, 4)]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"emb-{i}.safetensors")
        save_file({"embeddings": array}, str(paths[-1]))
    outputs = upgrade_shards(psi(), paths, tmp_path / "out", chunk_size=4, progress=False)
    from safetensors.numpy import load_file

    for array, out in zip(arrays, outputs):
        assert np.array_equal(load_file(str(out))["embeddings"], psi().upgrade(array, chunk_size=4))
    save_file({"a": arrays[0], "b": arrays[0]}, str(tmp_path / "two.safetensors"))
    with pytest.raises(SpecError, match="holds tensors \\['a', 'b'\\]; name one"):
        upgrade_shards(psi(), [tmp_path / "two.safetensors"], tmp_path / "out", progress=False)


def test_a_file_no_job_wrote_is_never_overwritten(tmp_path):
    paths = write_shards(tmp_path, sizes=(5,))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    np.save(out_dir / paths[0].name, np.zeros((5, 9), np.float32))
    with pytest.raises(JobStateError, match="already holds \\['part-0.npy'\\] but no "
                                            "compatzoo-job.json"):
        upgrade_shards(psi(), paths, out_dir, progress=False)
    assert np.load(out_dir / paths[0].name).shape == (5, 9)


def test_another_upgrader_never_gets_the_previous_ones_outputs(tmp_path):
    """The stale-output bug: a retrained upgrader writing into the same folder was handed
    the old outputs back; the input folder as output returned the input unchanged."""
    paths = write_shards(tmp_path, sizes=(5, 4))
    upgrade_shards(psi(), paths, tmp_path / "out", progress=False)
    retrained = psi()
    with torch.no_grad():
        retrained.mlp[0].weight.add_(1.0)
    with pytest.raises(JobStateError, match="holds another job .*sources differ"):
        upgrade_shards(retrained, paths, tmp_path / "out", progress=False)
    same_dims = compatzoo.create_upgrader("identity", D_OLD, D_OLD)
    with pytest.raises(JobStateError, match="lies in the output folder"):
        upgrade_shards(same_dims, paths, paths[0].parent, progress=False)
