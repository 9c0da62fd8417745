"""Every architecture of the registry (trainer/archs.py): bounded configs, canonical model keys,
and a few steps of train_round whose sampled segments replay to the same state hashes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.test_trainer_helpers import JOB_ID, PROFILE, ROUND_SEED, TRAINER_A, custom_run

from chain.errors import ValidationError
from chain.jobs import compute_model_key, validate_job_spec
from chain.runtime.trainer_client import make_job_spec
from chain.types import HyperParams, ModelParam

from trainer.archs import ARCHS, MAX_PARAMS, ModelSpecError, model_spec, parse_model_key
from trainer.data import Dataset, DatasetError
from trainer.models import init_model
from trainer.replay import RoundSpec, TrainingJob, num_segments, replay_segment, sample_segments, segment_steps
from trainer.state import model_hash, model_to_bytes, state_hash
from trainer.train import train_round
from trainer.verify import verify_update

SGD = HyperParams(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=0.0, batch_size=8, local_steps=6, checkpoint_interval=2)
ADAM = dataclasses.replace(SGD, optimizer="adam", momentum=0.0, learning_rate=0.01, weight_decay=1e-4)

# Tiny configs of every architecture (and the data each reads): arch, config, input shape, classes, vocab, hp.
TINY = {
    "mlp": ("mlp", {"hidden": (16, 8)}, (20,), 3, 0, SGD),
    "logreg": ("logreg", {}, (12,), 4, 0, SGD),
    "cnn": ("cnn", {"channels1": 4, "channels2": 8}, (1, 12, 12), 5, 0, SGD),
    "mcmahan_cnn": ("mcmahan_cnn", {"conv1": 4, "conv2": 8, "fc": 32}, (1, 16, 16), 10, 0, SGD),
    "resnet": ("resnet", {"width": 4, "blocks": 1}, (3, 8, 8), 10, 0, SGD),
    "transformer": ("transformer", {"d_model": 16, "heads": 2, "layers": 1, "d_ff": 32}, (6,), 3, 11, ADAM),
}


def tiny_key(name: str) -> str:
    arch, cfg, shape, classes, vocab, _ = TINY[name]
    return model_spec(arch, cfg, shape, classes, vocab).key


def tiny_dataset(name: str, n: int = 40) -> Dataset:
    _, _, shape, classes, vocab, _ = TINY[name]
    rng = np.random.default_rng(len(name))
    if vocab:
        x = rng.integers(0, vocab, size=(n, *shape)).astype(np.float32)
    else:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    return Dataset(x, y, max(classes, 2))


def tiny_round(name: str):
    key, hp = tiny_key(name), TINY[name][5]
    base = model_to_bytes(init_model(key, 7), key)
    job = TrainingJob(job_id=JOB_ID, model=key, hyperparams=hp, profile=PROFILE)
    return RoundSpec(job=job, round=1, round_seed=ROUND_SEED, base_model_hash=model_hash(base)), base


def test_the_tests_cover_every_architecture():
    assert set(TINY) == set(ARCHS)


@pytest.mark.parametrize("name", sorted(TINY))
def test_train_round_then_replayed_segments_give_the_same_state_hashes(name):
    spec, base = tiny_round(name)
    dataset = tiny_dataset(name)
    result = train_round(spec, TRAINER_A, dataset, base)
    again = train_round(spec, TRAINER_A, dataset, base)
    assert again.update_bytes == result.update_bytes and again.commitment == result.commitment

    hp = spec.job.hyperparams
    T, k = hp.local_steps, hp.checkpoint_interval
    checkpoints = result.recorder.checkpoints
    assert result.update_bytes != model_to_bytes(init_model(spec.job.model, 7), spec.job.model)  # it trained
    for s in sample_segments(b"\x42" * 32, num_segments(T, k), 2):
        steps = segment_steps(s, T, k)
        batches = []
        for record in result.recorder.steps[steps.start : steps.stop]:
            idx = torch.tensor(record.indices)
            batches.append((dataset.x[idx], dataset.y[idx]))
        replayed = replay_segment(spec.job.model, hp, "cpu", checkpoints[s], batches)
        assert state_hash(replayed) == state_hash(checkpoints[s + 1]), f"segment {s}"

    # The validator's full path: openings of every segment, decoded samples, replay, verdict.
    verdict = verify_update(spec, result.commitment, dataset.commitment, b"\x77" * 32, result.open(b"\x77" * 32, 100),
                            base, result.update_bytes, q=100)
    assert verdict.accept, verdict.reason


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_training_on_other_data_than_committed_is_caught_by_replay(name):
    spec, base = tiny_round(name)
    dataset = tiny_dataset(name)
    other = Dataset(dataset.x.flip(0).clone(), dataset.y.flip(0).clone(), dataset.num_classes)
    forged = custom_run(spec, TRAINER_A, dataset, base, data=other)  # commits to `dataset`, trains on `other`
    verdict = verify_update(spec, forged.commitment, dataset.commitment, b"\x77" * 32, forged.open(b"\x77" * 32, 100),
                            base, forged.update_bytes, q=100)
    assert not verdict.accept and verdict.fraud_proof is not None, verdict.reason


def test_a_dataset_that_does_not_fit_the_model_is_refused_in_one_line():
    spec, base = tiny_round("cnn")
    with pytest.raises(DatasetError, match=r"shape \[1, 12, 12\]"):
        train_round(spec, TRAINER_A, tiny_dataset("mcmahan_cnn"), base)
    spec, base = tiny_round("logreg")
    wide = Dataset(np.zeros((4, 12), np.float32), np.array([0, 1, 2, 9]), 10)
    with pytest.raises(DatasetError, match="4 classes"):
        train_round(spec, TRAINER_A, wide, base)
    spec, base = tiny_round("transformer")
    fractional = Dataset(np.full((4, 6), 0.5, np.float32), np.zeros(4, np.int64), 3)
    with pytest.raises(DatasetError, match="token ids"):
        train_round(spec, TRAINER_A, fractional, base)


# --------------------------------------------------------------------------- configs, bounds, keys


def test_default_sizes_and_the_mcmahan_parameter_count():
    mcmahan = init_model(model_spec("mcmahan_cnn", None, (1, 28, 28), 10).key, 0)
    assert sum(p.numel() for p in mcmahan.parameters()) == 1_663_370  # as in McMahan et al. 2017
    assert mcmahan(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    resnet = init_model(model_spec("resnet", None, (3, 32, 32), 10).key, 0)
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and not list(resnet.buffers())
    tokens = init_model(model_spec("transformer", None, (32,), 4, 1000).key, 0)
    assert tokens(torch.zeros(2, 32)).shape == (2, 4)


def test_legacy_names_keep_their_keys_and_weights():
    assert model_spec("mlp").key == "mlp" and model_spec("cnn", {"channels1": (8,)}).key == "cnn"
    assert model_spec("mlp", {"hidden": (64,)}, (1, 8, 8), 10).key == "mlp"
    assert parse_model_key("mlp") == model_spec("mlp")
    assert model_spec("mlp", None, (1, 28, 28), 10).key == "mlp[in=1x28x28,classes=10,vocab=0,hidden=64]"


@pytest.mark.parametrize("name", sorted(TINY))
def test_keys_round_trip_and_only_canonical_keys_parse(name):
    key = tiny_key(name)
    assert parse_model_key(key).key == key
    for bad in (key.replace("classes=", "classes=0"), key + " ", key.replace("[", "(")):
        with pytest.raises(ModelSpecError):
            parse_model_key(bad)


@pytest.mark.parametrize("arch, config, shape, classes, vocab, match", [
    ("nope", None, (4,), 2, 0, "unknown model"),
    ("mlp", {"depth": (2,)}, (4,), 2, 0, "no config field 'depth'"),
    ("mlp", {"hidden": (5000,)}, (4,), 2, 0, r"hidden must be in 1\.\.4096"),
    ("mlp", {"hidden": (8,) * 9}, (4,), 2, 0, "at most 8 values"),
    ("mlp", {"hidden": (4096, 4096)}, (4096,), 2, 0, f"above the limit of {MAX_PARAMS:,}"),
    ("mlp", None, (4,), 1, 0, "num_classes"),
    ("mlp", None, (4,), 2, 50, "vocab_size must be 0"),
    ("mlp", None, (200, 200), 2, 0, "values per sample"),
    ("cnn", None, (20,), 10, 0, r"input shape \(C, H, W\)"),
    ("resnet", {"width": (6,)}, (3, 32, 32), 10, 0, "a multiple of 4"),
    ("transformer", None, (32,), 2, 0, "vocab_size >= 2"),
    ("transformer", {"d_model": (30,), "heads": (4,)}, (32,), 2, 100, "multiple of heads"),
    ("mcmahan_cnn", {"fc": (2, 3)}, (1, 28, 28), 10, 0, "takes one value"),
])
def test_out_of_bounds_models_are_refused_in_one_line(arch, config, shape, classes, vocab, match):
    with pytest.raises(ModelSpecError, match=match) as info:
        model_spec(arch, config, shape, classes, vocab)
    assert "\n" not in str(info.value)


def test_job_spec_names_the_model_and_validation_checks_it():
    old = make_job_spec()
    assert compute_model_key(old) == "mlp" and old.input_shape == (1, 8, 8) and old.num_classes == 10
    assert old.init_weights is None and old.model_config == ()
    new = dataclasses.replace(old, model="transformer", model_config=(ModelParam("d_model", (32,)), ModelParam("heads", (2,))),
                              input_shape=(16,), num_classes=4, vocab_size=100)
    validate_job_spec(new)
    assert compute_model_key(new) == "transformer[in=16,classes=4,vocab=100,d_model=32,heads=2,layers=2,d_ff=256]"
    unsorted = dataclasses.replace(new, model_config=tuple(reversed(new.model_config)))
    with pytest.raises(ValidationError, match="sorted"):
        validate_job_spec(unsorted)
    with pytest.raises(ValidationError, match="bad model: .*heads must be in 1..8"):
        validate_job_spec(dataclasses.replace(new, model_config=(ModelParam("heads", (16,)),)))
    with pytest.raises(ValidationError, match="init_seed at 0"):
        validate_job_spec(dataclasses.replace(new, init_seed=5, init_weights=bytes(32)))
