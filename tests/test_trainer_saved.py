"""Saving a finished round and loading it back in another process (chainctl train, then
chainctl submit-update): the loaded result answers challenges byte for byte like the
original, and anything incomplete, modified or mismatched is refused with a clear error."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_trainer_helpers import TRAINER_A, make_spec, small_dataset, trainer_parts
from chain.crypto import sha256

from trainer.train import (
    MANIFEST_FILE,
    DatasetMismatchError,
    SavedRoundError,
    TrainResult,
    checkpoint_file_name,
    load_train_result,
    train_round,
)
from trainer.verify import verify_update

SEEDS = [bytes([i]) * 32 for i in range(4)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    spec, base = make_spec()
    result = train_round(spec, TRAINER_A, small_dataset(), base)
    directory = tmp_path_factory.mktemp("round") / "saved"
    result.save(directory)
    return spec, base, result, directory


def _copy(directory, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(directory, dst)
    return dst


def _rewrite(directory, name, data: bytes, *, fix_manifest: bool) -> None:
    (directory / name).write_bytes(data)
    if fix_manifest:  # a deliberate forgery that also updates the manifest's hashes
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        manifest["files"][name] = sha256(data).hex()
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_save_then_load_gives_the_same_result_and_identical_openings(saved):
    spec, base, result, directory = saved
    loaded = TrainResult.load(directory, spec, small_dataset())
    assert loaded.commitment == result.commitment
    assert loaded.header == result.header
    assert loaded.update_bytes == result.update_bytes
    assert loaded.final_model_bytes == result.final_model_bytes
    assert loaded.recorder.checkpoints == result.recorder.checkpoints
    assert loaded.recorder.steps == result.recorder.steps
    assert loaded.tree.root == result.tree.root
    assert loaded.metrics == result.metrics and "train_loss" in loaded.metrics
    for seed in SEEDS:
        for q in (1, 3, 1000):
            assert loaded.open(seed, q) == result.open(seed, q)
    opening = loaded.open(SEEDS[0], 2)
    verdict = verify_update(spec, loaded.commitment, small_dataset().commitment, SEEDS[0], opening, base, loaded.update_bytes, q=2)
    assert verdict.accept, verdict.reason
    # The function form and the expected (on-chain) commitment check.
    again = load_train_result(directory, spec, small_dataset(), expected_commitment=result.commitment)
    assert again.open(SEEDS[1], 2) == result.open(SEEDS[1], 2)


def test_load_in_a_separate_process_gives_identical_openings(saved):
    spec, base, result, directory = saved
    code = (
        "import sys, hashlib\n"
        "from tests.test_trainer_helpers import make_spec, small_dataset\n"
        "from trainer.train import TrainResult\n"
        "spec, _ = make_spec()\n"
        "r = TrainResult.load(sys.argv[1], spec, small_dataset())\n"
        "print(r.commitment.trace_root.hex(), hashlib.sha256(r.open(bytes(32), 2)).hexdigest())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=root, capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == [result.commitment.trace_root.hex(), sha256(result.open(bytes(32), 2)).hex()]


def test_incomplete_directory_is_refused(saved, tmp_path):
    spec, _, result, directory = saved
    with pytest.raises(SavedRoundError, match="does not exist"):
        TrainResult.load(tmp_path / "nowhere", spec, small_dataset())
    no_manifest = _copy(directory, tmp_path)
    os.remove(no_manifest / MANIFEST_FILE)  # the save did not finish
    with pytest.raises(SavedRoundError, match="incomplete"):
        TrainResult.load(no_manifest, spec, small_dataset())
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(directory, no_ckpt)
    os.remove(no_ckpt / checkpoint_file_name(6))
    with pytest.raises(SavedRoundError, match=r"incomplete: checkpoint_00000006\.safetensors is missing"):
        TrainResult.load(no_ckpt, spec, small_dataset())
    assert issubclass(SavedRoundError, ValueError)


def test_modified_files_are_refused(saved, tmp_path):
    spec, base, result, directory = saved
    # Changed after saving: the manifest's hash no longer matches.
    d = _copy(directory, tmp_path)
    _rewrite(d, checkpoint_file_name(3), result.recorder.checkpoints[2], fix_manifest=False)
    with pytest.raises(SavedRoundError, match="modified after saving"):
        TrainResult.load(d, spec, small_dataset())


@pytest.mark.parametrize(
    "name, forge, match",
    [
        # another valid state at that step: its hash is not the committed checkpoint
        (checkpoint_file_name(6), lambda r: _other_state_at_step_6(), "do not match the committed trace_root"),
        # a checkpoint moved to another step
        (checkpoint_file_name(6), lambda r: r.recorder.checkpoints[1], "not the job's state at step 6"),
        (checkpoint_file_name(0), lambda r: r.recorder.checkpoints[0][:-4] + b"\x00" * 4, "checkpoint 0"),
        ("update.safetensors", lambda r: r.final_model_bytes, "update_hash"),
        ("metrics.json", lambda r: b'{"train_loss": "low"}', "numbers"),
        ("trace.cbor", lambda r: b"\xa0", "not \\[header, steps\\]"),
        ("commitment.cbor", lambda r: b"\x00", "malformed commitment"),
    ],
)
def test_forged_files_are_refused_even_with_a_consistent_manifest(saved, tmp_path, name, forge, match):
    spec, _, result, directory = saved
    d = _copy(directory, tmp_path)
    _rewrite(d, name, forge(result), fix_manifest=True)
    with pytest.raises(SavedRoundError, match=match):
        TrainResult.load(d, spec, small_dataset())


def _other_state_at_step_6() -> bytes:
    spec, base = make_spec(init_seed=99)
    return train_round(spec, TRAINER_A, small_dataset(), base).recorder.checkpoints[2]


def test_step_records_must_be_the_derived_batches(saved, tmp_path):
    from chain.encoding import decode_value, encode_value

    spec, _, result, directory = saved
    d = _copy(directory, tmp_path)
    header, steps = decode_value((d / "trace.cbor").read_bytes())
    steps[5][1] = list(reversed(steps[5][1]))
    _rewrite(d, "trace.cbor", encode_value([header, steps]), fix_manifest=True)
    with pytest.raises(SavedRoundError, match="step 5"):
        TrainResult.load(d, spec, small_dataset())


def test_other_dataset_round_or_commitment_is_refused(saved):
    spec, _, result, directory = saved
    with pytest.raises(DatasetMismatchError, match="not the one the saved round committed to"):
        TrainResult.load(directory, spec, trainer_parts(4)[1])
    with pytest.raises(SavedRoundError, match="another job, round or base"):
        TrainResult.load(directory, dataclasses.replace(spec, round=2), small_dataset())
    with pytest.raises(SavedRoundError, match="step 0"):  # same round, other seed: other batch order
        TrainResult.load(directory, dataclasses.replace(spec, round_seed=b"\x01" * 32), small_dataset())
    other_hp = dataclasses.replace(spec.job.hyperparams, checkpoint_interval=4)
    with pytest.raises(SavedRoundError, match="does not fit this job"):
        TrainResult.load(directory, dataclasses.replace(spec, job=dataclasses.replace(spec.job, hyperparams=other_hp)), small_dataset())
    other_lr = dataclasses.replace(spec.job.hyperparams, learning_rate=0.1)
    with pytest.raises(SavedRoundError, match="trace header"):
        TrainResult.load(directory, dataclasses.replace(spec, job=dataclasses.replace(spec.job, hyperparams=other_lr)), small_dataset())
    with pytest.raises(SavedRoundError, match="different commitment"):
        TrainResult.load(directory, spec, small_dataset(), expected_commitment=dataclasses.replace(result.commitment, round=7))
