"""Stored galleries in the formats users keep embeddings in, read and written in row
chunks so a job's memory does not grow with the gallery:

- ``.npy`` (memory-mapped) and ``.safetensors`` (one tensor, read slice by slice);
- Parquet files with an embedding column (fixed-size or variable lists of floats); every
  other column travels through unchanged;
- faiss index files of the flat kinds (``IndexFlatIP`` / ``IndexFlatL2``, optionally in an
  ``IndexIDMap``): vectors are reconstructed, ids kept. A flat index lives in memory by
  nature, so these are read whole.

A reader serves consecutive chunks (``take``); a writer writes to a hidden ``.partial``
file and renames it only when complete, so an output name never holds a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from compatzoo.engine.checkpoints import atomic_write
from compatzoo.errors import DatasetError, InvalidFeaturesError, SpecError

ARRAY_SUFFIXES = (".npy", ".safetensors")
PARQUET_SUFFIXES = (".parquet",)
FAISS_SUFFIXES = (".index", ".faiss")
SUFFIXES = ARRAY_SUFFIXES + PARQUET_SUFFIXES + FAISS_SUFFIXES
FINGERPRINT_KEY = "compatzoo_fingerprint"




def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Files as given, and the supported files of given folders (sorted by name)."""
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.iterdir() if p.suffix in SUFFIXES and p.is_file()
                           and not p.name.startswith("."))
            if not found:
                raise SpecError(f"folder {given} holds no stored embeddings (files ending in "
                                f"{', '.join(SUFFIXES)})")
            files += found
        elif given.is_file():
            files.append(given)
        else:
            raise SpecError(f"input {given} does not exist")
    return files


class StoredFile:
    """One input file: ``rows`` embeddings of width ``dim``, maybe with the fingerprint of
    the model that wrote them."""

    path: Path
    rows: int
    dim: int
    fingerprint: str | None = None

    def reader(self) -> Reader:  # pragma: no cover - interface
        raise NotImplementedError

    def writer(self, target: Path, dim: int, rows: int, fingerprint: str | None) -> Writer:
        raise NotImplementedError  # pragma: no cover - interface


class Reader:
    """Consecutive chunks of one file: ``take(n)`` -> (features ``(n, dim)`` float32, what
    the output must carry along for those rows)."""

    def take(self, n: int) -> tuple[np.ndarray, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (readers are used once, front to back)."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Writer:
    """Appends chunks to a hidden partial file; ``commit`` renames it into place.
    ``sha256`` is the finished file's, where the writer could hash it as it wrote."""

    sha256: str | None = None

    def __init__(self, target: Path):
        self.target = target
        self.partial = target.with_name(f".{target.name}.partial")

    def write(self, features: np.ndarray, carried: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    def finish(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def commit(self) -> None:
        self.finish()
        with open(self.partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial, self.target)

    def abort(self) -> None:
        self.partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------- npy
class NpyFile(StoredFile):
    """Read with positioned reads rather than a memory map, so the pages of a large file
    never accumulate in the job's resident memory."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(handle)
                self.offset = handle.tell()
        except ValueError as exc:
            raise DatasetError(f"{path} is not a plain numeric .npy array ({exc}); re-write it "
                               "with numpy.save") from None
        _check_2d(shape, path)
        if fortran or dtype.hasobject or dtype.kind not in "fiu":
            raise DatasetError(f"{path} holds {'Fortran-ordered ' if fortran else ''}{dtype} "
                               "data; save a C-ordered numeric array with numpy.save")
        self.rows, self.dim = shape
        self.dtype = dtype
        expected = self.offset + self.rows * self.dim * dtype.itemsize
        if path.stat().st_size < expected:
            raise DatasetError(f"{path} is truncated: its header says {shape} {dtype} "
                               f"({expected} bytes) but the file has {path.stat().st_size}; "
                               "re-write it")

    def reader(self) -> Reader:
        stored = self
        handle = open(self.path, "rb")
        row_bytes = self.dim * self.dtype.itemsize

        def rows_of(start: int, stop: int) -> np.ndarray:
            count = max(0, min(stop, stored.rows) - start)
            data = os.pread(handle.fileno(), count * row_bytes, stored.offset + start * row_bytes)
            return np.frombuffer(data, dtype=stored.dtype).reshape(count, stored.dim)

        return _ArrayReader(rows_of, handle.close)

    def writer(self, target: Path, dim: int, rows: int, fingerprint: str | None) -> Writer:
        return _NpyWriter(target, dim, rows)


class _ArrayReader(Reader):
    def __init__(self, rows_of, close=None):
        self.rows_of, self.position, self._close = rows_of, 0, close

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def take(self, n: int) -> tuple[np.ndarray, Any]:
        # a writable float32 copy: the chunk is handed to torch
        block = np.array(self.rows_of(self.position, self.position + n), dtype=np.float32)
        self.position += n
        return block, None


class _HashingFile:
    """A binary file that hashes what is written to it, so a finished output's sha256
    needs no second read."""

    def __init__(self, path: Path):
        self.handle, self.digest = open(path, "wb"), hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.handle.write(data)

    def close(self) -> None:
        self.handle.close()


class _NpyWriter(Writer):
    """The header first, then the rows appended as they come: no memory map."""

    def __init__(self, target: Path, dim: int, rows: int):
        super().__init__(target)
        self.handle = _HashingFile(self.partial)
        np.lib.format.write_array_header_1_0(
            self.handle, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        self.rows, self.written = rows, 0

    def write(self, features: np.ndarray, carried: Any) -> None:
        self.handle.write(np.ascontiguousarray(features, dtype="<f4").tobytes())
        self.written += len(features)

    @property
    def sha256(self) -> str:
        return self.handle.digest.hexdigest()

    def finish(self) -> None:
        self.handle.close()
        if self.written != self.rows:
            raise RuntimeError(f"{self.target}: wrote {self.written} rows, expected {self.rows}")

    def abort(self) -> None:
        self.handle.close()
        super().abort()


# --------------------------------------------------------------------------- safetensors
class SafetensorsFile(StoredFile):
    """One tensor of a safetensors file, read slice by slice; the file is opened per
    chunk so no mapping of the whole file stays resident."""

    def __init__(self, path: Path, key: str | None):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="np") as handle:
                names = list(handle.keys())
                metadata = handle.metadata() or {}
                if key is None and len(names) == 1:
                    key = names[0]
                shape = tuple(handle.get_slice(key).get_shape()) if key in names else None
        except (SafetensorError, OSError) as exc:
            raise DatasetError(f"{path} is not a readable safetensors file, or it is "
                               f"truncated ({exc}); re-write it") from None
        if key is None:
            raise SpecError(f"{path} holds tensors {names}; name one with --key")
        if shape is None:
            raise SpecError(f"{path} has no tensor {key!r}; it holds {names}")
        _check_2d(shape, path)
        self.key = key
        self.rows, self.dim = shape
        self.fingerprint = metadata.get(FINGERPRINT_KEY)

    def reader(self) -> Reader:
        from safetensors import safe_open

        def rows_of(start: int, stop: int) -> np.ndarray:
            with safe_open(str(self.path), framework="np") as handle:
                return handle.get_slice(self.key)[start:stop]

        return _ArrayReader(rows_of)

    def writer(self, target: Path, dim: int, rows: int, fingerprint: str | None) -> Writer:
        return _SafetensorsWriter(target, self.key, dim, rows, fingerprint)


class _SafetensorsWriter(_NpyWriter):
    """The safetensors layout -- an 8-byte little-endian header length, a JSON header
    (padded to 8 bytes), then the raw float32 rows -- written as the rows come; the result
    is read back through the safetensors library before it is committed."""

    def __init__(self, target: Path, key: str, dim: int, rows: int, fingerprint: str | None):
        Writer.__init__(self, target)
        header = {key: {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, rows * dim * 4]}}
        if fingerprint:
            header["__metadata__"] = {FINGERPRINT_KEY: fingerprint}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.handle = _HashingFile(self.partial)
        self.handle.write(len(text).to_bytes(8, "little") + text)
        self.rows, self.written, self.key = rows, 0, key

    def finish(self) -> None:
        from safetensors import safe_open

        super().finish()
        with safe_open(str(self.partial), framework="np") as handle:
            shape = handle.get_slice(self.key).get_shape()
        if shape[0] != self.rows:
            raise RuntimeError(f"{self.target}: the written file reads back as {shape}")


# --------------------------------------------------------------------------- parquet
class ParquetFile(StoredFile):
    def __init__(self, path: Path, column: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.column = path, column
        try:
            file = pq.ParquetFile(path)     # metadata only: readers open their own
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{path} is not a readable Parquet file, or it is truncated "
                               f"({exc}); re-write it") from None
        schema = file.schema_arrow
        if column not in schema.names:
            raise SpecError(f"{path} has no column {column!r}; its columns are "
                            f"{schema.names}: name the embedding column with --column")
        kind = schema.field(column).type
        if not (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)
                or pa.types.is_large_list(kind)) or not pa.types.is_floating(kind.value_type):
            raise SpecError(f"{path}: column {column!r} holds {kind}, expected a list of floats "
                            "(one embedding per row)")
        self.schema = schema
        self.rows = file.metadata.num_rows
        if pa.types.is_fixed_size_list(kind):
            self.dim = kind.list_size
        else:   # the first row's length; the iterator (and its row group) is dropped at once
            batches = file.iter_batches(batch_size=1, columns=[column])
            first = next(batches, None)
            del batches
            self.dim = 0 if first is None else len(first.column(0)[0])
        meta = schema.metadata or {}
        value = meta.get(FINGERPRINT_KEY.encode())
        self.fingerprint = value.decode() if value else None

    def reader(self) -> Reader:
        return _ParquetReader(self)

    def writer(self, target: Path, dim: int, rows: int, fingerprint: str | None) -> Writer:
        return _ParquetWriter(target, self, dim, fingerprint)


class _ParquetReader(Reader):
    """Record batches re-cut into chunks of exactly the requested size."""

    def __init__(self, stored: ParquetFile):
        self.stored = stored
        import pyarrow.parquet as pq

        # a file of its own, dropped with the reader: an open ParquetFile keeps what it
        # decoded, so files held open for a whole job would grow its memory file by file
        self.file = pq.ParquetFile(stored.path)
        self.batches = self.file.iter_batches(batch_size=65536)
        self.pending = []     # record batches not yet served
        self.buffered = 0

    def close(self) -> None:
        self.batches = self.pending = self.file = None

    def take(self, n: int):
        import pyarrow as pa

        while self.buffered < n:
            batch = next(self.batches)
            self.pending.append(batch)
            self.buffered += batch.num_rows
        table = pa.Table.from_batches(self.pending)
        served, rest = table.slice(0, n), table.slice(n)
        self.pending, self.buffered = rest.to_batches(), rest.num_rows
        column = served.column(self.stored.column).combine_chunks()
        if column.null_count:
            raise InvalidFeaturesError(f"{self.stored.path}: {column.null_count} rows have no "
                                       f"embedding (null) in column {self.stored.column!r}")
        values = column.flatten().to_numpy(zero_copy_only=False)
        lengths = np.diff(np.asarray(column.offsets)) if hasattr(column, "offsets") else None
        dim = self.stored.dim
        if lengths is not None and np.any(lengths != dim):
            bad = int(np.flatnonzero(lengths != dim)[0])
            raise InvalidFeaturesError(f"{self.stored.path}: the embedding of one row has "
                                       f"{int(lengths[bad])} values, the first row's {dim}; "
                                       "every row must have the same width")
        return np.array(values, dtype=np.float32).reshape(n, dim), served   # a writable copy


class _ParquetWriter(Writer):
    def __init__(self, target: Path, stored: ParquetFile, dim: int, fingerprint: str | None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(target)
        self.column = stored.column
        index = stored.schema.get_field_index(stored.column)
        field = pa.field(stored.column, pa.list_(pa.float32(), dim))
        metadata = dict(stored.schema.metadata or {})
        if fingerprint:
            metadata[FINGERPRINT_KEY.encode()] = fingerprint.encode()
        self.schema = stored.schema.set(index, field).with_metadata(metadata)
        self.out = pq.ParquetWriter(self.partial, self.schema)

    def write(self, features: np.ndarray, carried) -> None:
        import pyarrow as pa

        values = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(features, np.float32).reshape(-1)), features.shape[1])
        index = carried.schema.get_field_index(self.column)
        table = carried.set_column(index, self.schema.field(index), values)
        self.out.write_table(table.cast(self.schema))

    def finish(self) -> None:
        self.out.close()


# --------------------------------------------------------------------------- faiss
class FaissFile(StoredFile):
    KINDS = ("IndexFlatIP", "IndexFlatL2")

    def __init__(self, path: Path):
        import faiss

        self.path = path
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise DatasetError(f"{path} is not a readable faiss index ({str(exc).strip()[:200]})"
                               "; re-write it with faiss.write_index") from None
        self.ids = None
        inner = faiss.downcast_index(index)
        if type(inner).__name__ in ("IndexIDMap", "IndexIDMap2"):
            self.ids = faiss.vector_to_array(inner.id_map).astype(np.int64)
            inner = faiss.downcast_index(inner.index)
        self.kind = type(inner).__name__
        if self.kind not in self.KINDS:
            raise SpecError(f"{path} is a faiss {self.kind}; compatzoo upgrades the flat kinds "
                            f"{', '.join(self.KINDS)} (optionally wrapped in IndexIDMap), whose "
                            "vectors it can reconstruct exactly")
        self.rows, self.dim = inner.ntotal, inner.d
        self.vectors = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros(
            (0, inner.d), np.float32)

    def reader(self) -> Reader:
        stored = self

        class _FaissReader(Reader):
            position = 0

            def take(self, n: int):
                start, self.position = self.position, self.position + n
                ids = None if stored.ids is None else stored.ids[start:start + n]
                return stored.vectors[start:start + n], ids

        return _FaissReader()

    def writer(self, target: Path, dim: int, rows: int, fingerprint: str | None) -> Writer:
        return _FaissWriter(target, self.kind, self.ids is not None, dim)


class _FaissWriter(Writer):
    def __init__(self, target: Path, kind: str, with_ids: bool, dim: int):
        import faiss

        super().__init__(target)
        flat = getattr(faiss, kind)(dim)
        self.index = faiss.IndexIDMap(flat) if with_ids else flat
        self.flat, self.with_ids = flat, with_ids

    def write(self, features: np.ndarray, ids) -> None:
        features = np.ascontiguousarray(features, np.float32)
        if self.with_ids:
            self.index.add_with_ids(features, np.ascontiguousarray(ids, np.int64))
        else:
            self.index.add(features)

    def finish(self) -> None:
        import faiss

        faiss.write_index(self.index, str(self.partial))


# --------------------------------------------------------------------------- opening
def open_stored(path: Path, *, column: str = "embedding", key: str | None = None) -> StoredFile:
    """The stored file at ``path``, by its suffix."""
    suffix = path.suffix
    if suffix == ".npy":
        return NpyFile(path)
    if suffix == ".safetensors":
        return SafetensorsFile(path, key)
    if suffix in PARQUET_SUFFIXES:
        return ParquetFile(path, column)
    if suffix in FAISS_SUFFIXES:
        return FaissFile(path)
    raise SpecError(f"{path}: unsupported stored-embedding format {suffix!r}; compatzoo reads "
                    f"{', '.join(SUFFIXES)}")


def _check_2d(shape: tuple, path: Path) -> None:
    if len(shape) != 2:
        raise InvalidFeaturesError(f"{path} holds an array of shape {shape}; stored embeddings "
                                   "are (N, d), one row per item")


@contextmanager
def returned_memory():
    """Arrow buffers from the system allocator while a job runs: arrow's default pool
    (mimalloc) keeps freed memory for reuse, so a job's resident memory would grow with
    every file it reads; the system allocator returns large blocks at once."""
    try:
        import pyarrow as pa
    except ImportError:
        yield
        return
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``) after a
    file: decoded Parquet pages are many mid-sized blocks, which would otherwise stay in
    the heap, so resident memory would grow with the number of files read."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def write_json(path: Path, data: dict) -> None:
    """Atomically (a crash leaves the old file or the new one, never half of one)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))
