"""MXNet indexed RecordIO (``.rec`` + ``.idx``) read without MXNet.

InsightFace ships its face training sets (MS1M, Glint360K, WebFace) in this format, and
MXNet is no longer installable on current Pythons, so compatzoo reads the bytes itself:

- ``.idx``: text lines ``<key>\\t<byte offset of the record in .rec>``.
- ``.rec``: records of ``uint32 magic 0xced7230a``, ``uint32 lrecord`` (upper 3 bits: the
  continuation flag, lower 29: the length), the payload, zero padding to 4 bytes. A payload
  that contained the magic number is split there into parts (flag 1 = first, 2 = middle,
  3 = last) and joined back with the magic bytes between parts, as dmlc's reader does.
- Image payloads start with the ``IRHeader`` ``<IfQQ`` (flag, label, id, id2); when
  ``flag > 0`` the label is the ``flag`` float32 values that follow it.

Files are opened lazily in each process and read with ``os.pread`` (no shared file
position), so a reader can be pickled into DataLoader workers and used from threads.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compatzoo.errors import DatasetError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_RECORD_HEADER = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
_SHOW = 5


@dataclass(frozen=True)
class IRHeader:
    """An image record's header; ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def unpack(payload: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split an image record's payload into its header and the encoded image (mxnet's
    ``recordio.unpack``)."""
    if len(payload) < IR_HEADER.size:
        raise DatasetError(
            f"{where} holds {len(payload)} bytes, fewer than the {IR_HEADER.size}-byte image "
            "header (IRHeader <IfQQ); the file is not an image RecordIO file or is corrupt: "
            "download or pack it again"
        )
    flag, label, id1, id2 = IR_HEADER.unpack_from(payload)
    rest = payload[IR_HEADER.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise DatasetError(
                f"{where} declares {flag} label values but holds only {len(rest)} bytes after "
                "its header; the file is corrupt: download or pack it again"
            )
        label = np.frombuffer(rest, dtype="<f4", count=flag).copy()
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id1, id2), rest


def first_label(header: IRHeader) -> float:
    """The sample label InsightFace uses: the scalar label, or the first value of an array."""
    return float(header.label if header.flag == 0 else header.label[0])


def read_int_table(path: Path, columns: int, what: str, line_format: str) -> np.ndarray:
    """An ``(N, columns)`` int64 array from a whitespace-separated text file.

    numpy's C parser reads millions of lines in seconds; if it refuses the file, a line by
    line pass finds the first bad line so the error can name it.
    """
    try:
        with warnings.catch_warnings():  # an empty file is the caller's to judge
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        table = None
    if table is not None and (table.shape[1] == columns or table.size == 0):
        return table.reshape(-1, columns)
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns or not all(f.lstrip("-").isdigit() for f in fields):
                raise DatasetError(
                    f"{path} line {number}: expected {what} as {columns} integers "
                    f"({line_format}), found {line.strip()[:120]!r}; the file is corrupt or "
                    "not the right file: download or generate it again"
                )
    raise DatasetError(f"{path} could not be read as {what} ({line_format}); download it again")


class IndexedRecordIO:
    """Random access to the records of one ``.rec`` by key, through its ``.idx``.

    Checked at construction: both files exist, every idx line is ``key offset``, no key
    repeats, every offset lies inside the .rec, and the first record starts with the
    RecordIO magic number. Each record is checked again when read.
    """

    def __init__(self, rec_path: Path, idx_path: Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise DatasetError(f"RecordIO file {self.rec_path} does not exist; check the path")
        if not self.idx_path.is_file():
            raise DatasetError(
                f"{self.rec_path} has no index: expected {self.idx_path} (lines "
                "'<key>\\t<offset>'), found no such file. Copy the .idx that came with the .rec "
                "(InsightFace ships train.rec with train.idx) or rebuild it with mxnet's "
                "tools/rec2idx.py"
            )
        table = read_int_table(self.idx_path, 2, "a record index", "key<TAB>byte offset")
        if not len(table):
            raise DatasetError(f"{self.idx_path} lists no records; rebuild the index")
        order = np.argsort(table[:, 0], kind="stable")
        self.keys = np.ascontiguousarray(table[order, 0])
        self.offsets = np.ascontiguousarray(table[order, 1])
        repeated = self.keys[1:][self.keys[1:] == self.keys[:-1]]
        if len(repeated):
            raise DatasetError(
                f"{self.idx_path} lists key(s) {_first(repeated)} more than once; the index is "
                "corrupt: rebuild it with mxnet's tools/rec2idx.py"
            )
        self._file = None
        self._pid = None
        self.size = self.rec_path.stat().st_size
        first = int(self.offsets.min())
        if 0 <= first and first + _RECORD_HEADER.size <= self.size:  # else: the check below
            magic, _ = _RECORD_HEADER.unpack(self._read_at(first, _RECORD_HEADER.size))
            if magic != MAGIC:
                raise DatasetError(
                    f"{self.rec_path} is not a RecordIO file: expected magic number "
                    f"0x{MAGIC:08x} at offset {first}, found 0x{magic:08x}. Point the dataset "
                    "at the InsightFace train.rec (MXNet RecordIO), not an image, archive or "
                    "other file"
                )
        outside = np.flatnonzero((self.offsets < 0) | (self.offsets + _RECORD_HEADER.size > self.size))
        if len(outside):
            raise DatasetError(
                f"{self.idx_path} points past the end of {self.rec_path} ({self.size} bytes): "
                f"{len(outside)} record(s), e.g. key {self.keys[outside[0]]} at offset "
                f"{self.offsets[outside[0]]}. The .rec is truncated or the .idx belongs to "
                "another file: download both again"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """The given keys that the index does not list."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return keys[self.keys[pos] != keys]

    def __getstate__(self) -> dict:
        """Pickled without the open file: each process opens its own on first read."""
        return {**self.__dict__, "_file": None, "_pid": None}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._pid = None

    def _read_at(self, offset: int, n: int) -> bytes:
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb", buffering=0)  # noqa: SIM115 - kept open
            self._pid = os.getpid()
        if hasattr(os, "pread"):
            return os.pread(self._file.fileno(), n, offset)
        self._file.seek(offset)  # pragma: no cover - platforms without pread (Windows)
        return self._file.read(n)

    def offset(self, key: int) -> int:
        pos = int(np.searchsorted(self.keys, key))
        if pos >= len(self.keys) or self.keys[pos] != key:
            raise DatasetError(
                f"{self.idx_path} has no record with key {key} (it lists {len(self.keys)} keys "
                f"from {self.keys[0]} to {self.keys[-1]}); the .rec and .idx do not match the "
                "dataset's header: download both again"
            )
        return int(self.offsets[pos])

    def read(self, key: int, limit: int | None = None) -> bytes:
        """The payload of record ``key``, its parts joined as dmlc's RecordIO reader does;
        only its first ``limit`` bytes when given (headers without the image)."""
        offset = self.offset(key)
        limit = 1 << 62 if limit is None else limit
        out = bytearray()
        first = True
        while True:
            head = self._read_at(offset, _RECORD_HEADER.size)
            if len(head) < _RECORD_HEADER.size:
                raise self._corrupt(key, offset, "the file ends inside a record header")
            magic, lrecord = _RECORD_HEADER.unpack(head)
            if magic != MAGIC:
                raise self._corrupt(key, offset, f"expected magic 0x{MAGIC:08x}, found 0x{magic:08x}")
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if cflag not in ((0, 1) if first else (2, 3)):
                expected = "0 (whole) or 1 (first part)" if first else "2 or 3 (next part)"
                raise self._corrupt(key, offset, f"continuation flag {cflag}, expected {expected}")
            wanted = min(length, limit - len(out))
            data = self._read_at(offset + _RECORD_HEADER.size, wanted)
            if len(data) < wanted:
                raise self._corrupt(key, offset, f"record of {length} bytes runs past the file end")
            out += data
            if cflag in (0, 3) or len(out) >= limit:
                return bytes(out)
            out += _MAGIC_BYTES[:limit - len(out)]
            first = False
            offset += _RECORD_HEADER.size + ((length + 3) & ~3)

    def read_header(self, key: int) -> IRHeader:
        """The image header of record ``key``, without reading its image."""
        where = f"{self.rec_path} record {key}"
        head = self.read(key, IR_HEADER.size)
        flag = IR_HEADER.unpack_from(head)[0] if len(head) == IR_HEADER.size else 0
        if flag > 0:
            head = self.read(key, IR_HEADER.size + 4 * flag)
        return unpack(head, where)[0]

    def _corrupt(self, key: int, offset: int, problem: str) -> DatasetError:
        return DatasetError(
            f"{self.rec_path}: record {key} at offset {offset} is damaged ({problem}); the file "
            "is truncated or the .idx belongs to another file: download both again"
        )


def _first(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:_SHOW].tolist())
    return shown + (", ..." if len(values) > _SHOW else "")
