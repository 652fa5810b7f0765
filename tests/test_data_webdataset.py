"""WebDataset shards written with webdataset.TarWriter: a random-access index by item,
webdataset's sample conventions, the one image decode, and errors naming shard and key."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from pydantic import ValidationError
from test_data_revisited import PREPROCESS, jpeg_bytes, write_revisited

from compatzoo.data import FileImages, WebDatasetParams, make_webdataset
from compatzoo.errors import DatasetError, PluginError


def write_shard(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def image_bytes(seed: int, ext: str = "jpg") -> bytes:
    """The noise image of ``seed`` as written into a sample's ``ext`` member."""
    if ext == "jpg":
        return jpeg_bytes(seed)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(seed))).save(buffer, format=ext.upper())
    return buffer.getvalue()


def sample(key: str, cls: int | None, seed: int, ext: str = "jpg") -> dict:
    record = {"__key__": key, "json": {"note": "ignored"}}
    if ext:
        record[ext] = image_bytes(seed, ext)
    if cls is not None:
        record["cls"] = cls
    return record


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """Two train shards (cls 10, 3, 7), and query/gallery shards with one unseen cls (99)."""
    write_shard(tmp_path / "train-000000.tar", [sample("a/000", 10, 0), sample("a/001", 3, 1),
                                                sample("a/002", 10, 2, ext="png")])
    write_shard(tmp_path / "train-000001.tar", [sample("b/000", 7, 3), sample("b/001", 3, 4)])
    write_shard(tmp_path / "query.tar", [sample("q0", 3, 5), sample("q1", 99, 6)])
    write_shard(tmp_path / "gallery.tar", [sample("g0", 99, 7), sample("g1", 3, 8), sample("g2", 7, 9)])
    return tmp_path


def params(root: Path, **eval_split) -> WebDatasetParams:
    eval_split = eval_split or {"query": str(root / "query.tar"), "gallery": [str(root / "gallery.tar")]}
    return WebDatasetParams(train=str(root / "train-{000000..000001}.tar"), image_size=16,
                            mean=PREPROCESS.mean, std=PREPROCESS.std, **eval_split)


def reference(data: bytes, tmp_path: Path) -> torch.Tensor:
    """The same bytes decoded as a file through FileImages."""
    path = tmp_path / "reference.img"
    path.write_bytes(data)
    return FileImages([path], np.zeros(1), PREPROCESS)[0][0]


def test_shards_index_samples_in_order_with_mapped_classes(shards: Path) -> None:
    data = make_webdataset(params(shards))
    assert len(data.train) == 5 and len(data.query) == 2 and len(data.gallery) == 3
    # train cls by sorted value: 3 -> 0, 7 -> 1, 10 -> 2; unseen 99 -> 3
    np.testing.assert_array_equal(data.train.labels, [2, 0, 2, 1, 0])
    np.testing.assert_array_equal(data.query.labels, [0, 3])
    np.testing.assert_array_equal(data.gallery.labels, [3, 0, 1])
    assert data.num_classes == 3 and data.info["unseen_classes"] == 1
    assert data.info["protocol"] == "query-gallery" and data.relevance is None
    assert data.train.index.key.tolist() == [b"a/000", b"a/001", b"a/002", b"b/000", b"b/001"]


def test_get_batch_reads_each_image_by_seek_and_decodes_like_files(shards: Path, tmp_path: Path) -> None:
    data = make_webdataset(params(shards))
    order = [4, 0, 2, 3]  # across both shards, out of order
    images, labels = data.train.get_batch(order)
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 2, 2, 1]
    for row, seed, ext in zip(images, [4, 0, 2, 3], ["jpg", "jpg", "png", "jpg"]):
        torch.testing.assert_close(row, reference(image_bytes(seed, ext), tmp_path))
    image, label, index = data.gallery[2]
    torch.testing.assert_close(image, reference(jpeg_bytes(9), tmp_path))
    assert (label, index) == (1, 2)
    subset_images, _ = data.train.subset([1, 4]).get_batch([1])
    torch.testing.assert_close(subset_images[0], images[0])


def test_val_is_leave_one_out_and_revisited_carries_its_truth(shards: Path, tmp_path: Path) -> None:
    data = make_webdataset(params(shards, val=str(shards / "gallery.tar")))
    assert data.gallery is None and data.info["protocol"] == "leave-one-out"
    write_revisited(tmp_path / "revisitop", name="rparis6k")
    data = make_webdataset(params(shards, revisited={"root": tmp_path / "revisitop", "name": "rparis6k"}))
    assert len(data.query) == 2 and data.relevance.dataset == "rparis6k"
    assert data.query.labels.min() >= data.num_classes


@pytest.mark.parametrize(("broken", "problem"), [
    (sample("a/bad", None, 0), "sample 'a/bad' has no cls member"),
    (sample("a/bad", 3, 0, ext=""), "sample 'a/bad' has no image member"),
    ({"__key__": "a/bad", "jpg": jpeg_bytes(0), "cls": b"three"}, "not an integer"),
])
def test_incomplete_samples_name_the_shard_and_key(tmp_path: Path, broken: dict, problem: str) -> None:
    shard = write_shard(tmp_path / "train-000000.tar", [sample("a/ok", 1, 1), broken])
    with pytest.raises(DatasetError, match=problem) as err:
        make_webdataset(WebDatasetParams(train=str(shard), val=str(shard)))
    assert str(shard) in str(err.value) and "1 samples" in str(err.value)


def test_missing_and_empty_shard_lists_fail_before_indexing(shards: Path) -> None:
    with pytest.raises(DatasetError, match=r"train: 1 of 3 shards do not exist .*train-000002.tar"):
        make_webdataset(params(shards).model_copy(
            update={"train": str(shards / "train-{000000..000002}.tar")}))
    with pytest.raises(DatasetError, match="shard list is empty"):
        make_webdataset(params(shards).model_copy(update={"train": []}))


def test_compressed_shards_are_refused_with_advice(tmp_path: Path) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        info = tarfile.TarInfo("x.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    (tmp_path / "train.tar").write_bytes(data.getvalue())
    with pytest.raises(DatasetError, match="not an uncompressed tar"):
        make_webdataset(WebDatasetParams(train=str(tmp_path / "train.tar"), val=str(tmp_path / "train.tar")))


def test_exactly_one_evaluation_set() -> None:
    with pytest.raises(ValidationError, match="query and gallery go together"):
        WebDatasetParams(train="t.tar", query="q.tar")
    with pytest.raises(ValidationError, match="exactly one evaluation set"):
        WebDatasetParams(train="t.tar", query="q.tar", gallery="g.tar", val="v.tar")


def test_without_webdataset_installed_the_error_names_the_extra(shards: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "webdataset", None)
    monkeypatch.setitem(sys.modules, "webdataset.tariterators", None)
    with pytest.raises(PluginError, match=r"pip install 'compatzoo\[webdataset\]'"):
        make_webdataset(params(shards))


def test_the_index_groups_samples_as_webdataset_streams_them(shards: Path) -> None:
    data = make_webdataset(params(shards))
    streamed = list(wds.WebDataset(str(shards / "train-{000000..000001}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in streamed] == [k.decode() for k in data.train.index.key]
    assert [int(s["cls"]) for s in streamed] == data.train.index.cls.tolist()
