"""InsightFace RecordIO packages (MS1M) read without MXNet: the byte format, labels from
identity records or headers, the held-out retrieval split, pickling, and bad files."""

from __future__ import annotations

import io
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compatzoo.data import DATASETS
from compatzoo.data.ms1m import MS1MParams, RecordImages, make_ms1m, read_package
from compatzoo.data.recordio import IndexedRecordIO, unpack
from compatzoo.errors import DatasetError

MAGIC = 0xCED7230A  # written from the format description, not imported from the reader
IDENTITIES, PER_IDENTITY, SIDE = 4, 3, 16


# --------------------------------------------------------------------------- writing
def frame(payload: bytes, cflag: int = 0) -> bytes:
    """One RecordIO record: magic, (cflag << 29) | length, payload, zero padding to 4."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(payload)) + payload + b"\0" * (-len(payload) % 4)


def ir_header(label: float | list[float], key: int = 0) -> bytes:
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, key, 0) + np.asarray(label, "<f4").tobytes()
    return struct.pack("<IfQQ", 0, label, key, 0)


def jpeg(seed: int, side: int = SIDE) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_package(folder: Path, records: dict[int, bytes]) -> Path:
    """``records``: key -> framed bytes, written in key order with a matching .idx."""
    folder.mkdir(parents=True, exist_ok=True)
    rec, idx = bytearray(), []
    for key, framed in sorted(records.items()):
        idx.append(f"{key}\t{len(rec)}\n")
        rec += framed
    (folder / "train.rec").write_bytes(bytes(rec))
    (folder / "train.idx").write_text("".join(idx))
    return folder


def insightface_records(labels=range(IDENTITIES)) -> dict[int, bytes]:
    """Record 0 = header [first identity record, end]; images 1..12; identity records."""
    n_images = IDENTITIES * PER_IDENTITY
    first_id = n_images + 1
    records = {0: frame(ir_header([float(first_id), float(first_id + IDENTITIES)]))}
    for key in range(1, first_id):
        records[key] = frame(ir_header(float(labels[(key - 1) // PER_IDENTITY]), key) + jpeg(key))
    for i in range(IDENTITIES):
        start = 1 + i * PER_IDENTITY
        records[first_id + i] = frame(ir_header([float(start), float(start + PER_IDENTITY)]))
    return records


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    return write_package(tmp_path / "faces", insightface_records())


def decoded(key: int) -> torch.Tensor:
    """The image of record ``key`` decoded straight from its JPEG bytes."""
    with Image.open(io.BytesIO(jpeg(key))) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def params(root: Path, **kw) -> MS1MParams:
    return MS1MParams(root=root, image_size=SIDE, mean=(0, 0, 0), std=(1, 1, 1),
                      **{"eval_classes": 2, **kw})


# --------------------------------------------------------------------------- reading
def test_labels_from_identity_records_match_image_headers(package: Path) -> None:
    reader = IndexedRecordIO(package / "train.rec")
    keys, labels, source = read_package(reader)
    np.testing.assert_array_equal(keys, np.arange(1, 13))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(IDENTITIES), PER_IDENTITY))
    assert source == "identity-records"
    keys2, labels2, source2 = read_package(reader, scan_headers=True)
    np.testing.assert_array_equal(keys2, keys)
    np.testing.assert_array_equal(labels2, labels)
    assert source2 == "image-headers"


def test_record_payload_and_header(package: Path) -> None:
    reader = IndexedRecordIO(package / "train.rec", package / "train.idx")
    header, encoded = unpack(reader.read(5))
    assert (header.flag, header.label, header.id) == (0, 1.0, 5)
    assert encoded == jpeg(5)
    header0 = reader.read_header(0)
    np.testing.assert_array_equal(header0.label, [13, 17])


def test_split_sizes_labels_and_pixels(package: Path) -> None:
    data = make_ms1m(params(package))
    assert data.name == "ms1m" and data.num_classes == 2
    assert (len(data.train), len(data.query), len(data.gallery)) == (6, 2, 4)
    # train identities get 0, 1 in label order; held-out ones 2, 3
    np.testing.assert_array_equal(data.train.labels, [0, 0, 0, 1, 1, 1])
    assert set(data.query.labels) == set(data.gallery.labels) == {2, 3}
    held = set(data.query.source_labels)
    assert held == set(data.gallery.source_labels) and not held & set(data.train.source_labels)
    for new_id in (2, 3):  # one query (3 // 2), two gallery images, together all three
        q = data.query.keys[data.query.labels == new_id]
        g = data.gallery.keys[data.gallery.labels == new_id]
        assert len(q) == 1 and len(g) == 2
        source = data.query.source_labels[data.query.labels == new_id][0]
        assert sorted([*q, *g]) == list(range(1 + source * 3, 4 + source * 3))
    image, label, index = data.train[4]
    assert image.shape == (3, SIDE, SIDE) and (label, index) == (1, 4)
    assert torch.equal(torch.round(image * 255).to(torch.uint8), decoded(int(data.train.keys[4])))
    assert data.info["labels_from"] == "identity-records"
    assert data.info["sizes"]["query_images"] == 2


def test_split_is_seeded(package: Path) -> None:
    first, again = make_ms1m(params(package)), make_ms1m(params(package))
    np.testing.assert_array_equal(first.query.keys, again.query.keys)
    splits = {tuple(make_ms1m(params(package, seed=s)).query.keys) for s in range(8)}
    assert len(splits) > 1


def test_resizes_and_normalises_like_insightface(package: Path) -> None:
    data = make_ms1m(MS1MParams(root=package, image_size=8, eval_classes=2))
    image, _, _ = data.train[0]
    assert image.shape == (3, 8, 8)
    assert data.preprocess.mean == (0.5, 0.5, 0.5) and data.preprocess.std == (0.5, 0.5, 0.5)
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_subsets(package: Path) -> None:
    data = make_ms1m(params(package, eval_classes=1, max_classes=2, max_images_per_class=2))
    np.testing.assert_array_equal(data.train.labels, [0, 0, 1, 1])
    train_sources = np.unique(data.train.source_labels)
    assert len(train_sources) == 2 and data.num_classes == 2
    for s in train_sources:  # the first two images, in record order
        np.testing.assert_array_equal(data.train.keys[data.train.source_labels == s],
                                      [1 + 3 * s, 2 + 3 * s])


def test_pickles_without_an_open_file(package: Path) -> None:
    data = make_ms1m(params(package))
    before = data.train[2][0]  # opens the file in this process
    assert data.train.reader._file is not None
    clone = pickle.loads(pickle.dumps(data.train))
    assert isinstance(clone, RecordImages) and clone.reader._file is None
    assert torch.equal(clone[2][0], before)
    images, labels = clone.subset([2, 0]).get_batch([0, 1])
    assert images.shape == (2, 3, SIDE, SIDE) and labels.tolist() == [0, 0]


def test_registered() -> None:
    assert DATASETS["ms1m"] is make_ms1m


def test_multi_part_record_is_joined(tmp_path: Path) -> None:
    # dmlc splits a payload where it contains the magic number; the reader puts it back
    payload = ir_header(0.0, 1) + jpeg(1)
    cut = len(payload) // 2 // 4 * 4
    parts = frame(payload[:cut], cflag=1) + frame(b"abcd", cflag=2) + frame(payload[cut:], cflag=3)
    records = {0: frame(ir_header(0.0, 0) + jpeg(0)), 1: parts, 2: frame(ir_header(1.0, 2) + jpeg(2)),
               3: frame(ir_header(1.0, 3) + jpeg(3)), 4: frame(ir_header(2.0, 4) + jpeg(4)),
               5: frame(ir_header(2.0, 5) + jpeg(5))}
    root = write_package(tmp_path, records)
    reader = IndexedRecordIO(root / "train.rec")
    magic = struct.pack("<I", MAGIC)
    assert reader.read(1) == payload[:cut] + magic + b"abcd" + magic + payload[cut:]
    assert reader.read(1, limit=cut + 2) == payload[:cut] + magic[:2]
    # a header record with flag 0 is an image: every key is an image, labels from headers
    keys, labels, source = read_package(reader)
    np.testing.assert_array_equal(keys, np.arange(6))
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    assert source == "image-headers"


def test_broken_continuation_is_reported(tmp_path: Path) -> None:
    records = {0: frame(b"x" * 24, cflag=1) + frame(b"y" * 24, cflag=1)}
    reader = IndexedRecordIO(write_package(tmp_path, records) / "train.rec")
    with pytest.raises(DatasetError, match=r"record 0 .*continuation flag 1, expected 2 or 3"):
        reader.read(0)


def test_array_labels_use_their_first_value(tmp_path: Path) -> None:
    records = {k: frame(ir_header([float(k // 2), 7.0], k) + jpeg(k)) for k in range(1, 6)}
    records[0] = frame(ir_header(0.0) + jpeg(0))  # flag 0: no header record, all are images
    reader = IndexedRecordIO(write_package(tmp_path, records) / "train.rec")
    _, labels, _ = read_package(reader)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])


def test_identity_records_that_miss_images_fall_back_to_headers(tmp_path: Path, caplog) -> None:
    records = insightface_records()
    records[16] = frame(ir_header([10.0, 12.0]))  # the last identity loses record 12
    reader = IndexedRecordIO(write_package(tmp_path, records) / "train.rec")
    with caplog.at_level(logging.WARNING):
        _, labels, source = read_package(reader)
    assert source == "image-headers" and labels[-1] == 3
    assert "identity records do not cover" in caplog.text


# --------------------------------------------------------------------------- bad input
def test_rec_without_idx(package: Path) -> None:
    (package / "train.idx").unlink()
    with pytest.raises(DatasetError, match=r"has no index: expected .*train\.idx.*rec2idx"):
        make_ms1m(params(package))


def test_missing_rec(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no train\.rec in .*Expected .*train\.idx"):
        make_ms1m(params(tmp_path))


def test_bad_magic(package: Path) -> None:
    (package / "train.rec").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 4000)
    with pytest.raises(DatasetError, match=r"not a RecordIO file: expected magic number "
                                           r"0xced7230a at offset 0, found 0x474e5089"):
        make_ms1m(params(package))


def test_offset_past_end(package: Path) -> None:
    size = (package / "train.rec").stat().st_size
    with open(package / "train.idx", "a") as idx:
        idx.write(f"99\t{size + 10}\n")
    with pytest.raises(DatasetError, match=rf"points past the end .*\({size} bytes\).*key 99 at "
                                           rf"offset {size + 10}.*download both again"):
        make_ms1m(params(package))


def test_malformed_idx_line_is_named(package: Path) -> None:
    lines = (package / "train.idx").read_text().splitlines()
    lines[3] = "3"
    (package / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"train\.idx line 4: expected a record index as 2 "
                                           r"integers \(key<TAB>byte offset\), found '3'"):
        make_ms1m(params(package))


def test_too_many_held_out_identities(package: Path) -> None:
    with pytest.raises(DatasetError, match=r"eval_classes=3 .*4 identities.*lower eval_classes"):
        make_ms1m(params(package, eval_classes=3))


def test_identity_records_contradicting_headers_fail_at_read(tmp_path: Path) -> None:
    records = insightface_records()
    records[3] = frame(ir_header(2.0, 3) + jpeg(3))  # in identity 0's range, labelled 2
    root = write_package(tmp_path, records)
    data = make_ms1m(params(root, eval_classes=1, seed=3))
    images = {0: data.train, 1: data.query, 2: data.gallery}
    for split in images.values():
        at = np.flatnonzero(split.keys == 3)
        if len(at):
            with pytest.raises(DatasetError, match=r"record 3 has label 2 .*scan_headers: true"):
                split[int(at[0])]
            break
    else:
        pytest.fail("record 3 is in no split")
    fixed = make_ms1m(params(root, eval_classes=1, seed=3, scan_headers=True))
    assert fixed.info["labels_from"] == "image-headers"
