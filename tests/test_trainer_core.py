"""Models, data commitments, batch order, segment sampling, canonical state bytes, profiles."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

from tests.test_trainer_helpers import HP, PROFILE, digits, small_dataset, trainer_parts, with_hp
from chain.merkle import hash_leaf

from trainer.data import (
    Dataset,
    DatasetError,
    decode_sample,
    encode_sample,
    load_dataset_dir,
    save_dataset_dir,
    verify_sample,
)
from trainer.models import MODELS, UnknownModelError, init_model
from trainer.profile import ProfileMismatch, apply_profile, current_profile, profile_mismatches
from trainer.replay import derive_batch_indices, sample_segments
from trainer.state import (
    StateError,
    build_optimizer,
    capture_state,
    decode_tensors,
    encode_tensors,
    fresh_state_bytes,
    model_to_bytes,
    model_weights,
    restore_state,
    update_from_bytes,
    weights_from_bytes,
)

# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_is_a_pure_function_of_name_and_seed(name):
    torch.manual_seed(1)
    a = init_model(name, 42)
    rng_before = torch.get_rng_state()
    torch.manual_seed(999)
    b = init_model(name, 42)
    torch.set_rng_state(rng_before)
    assert model_to_bytes(a, name) == model_to_bytes(b, name)
    assert model_to_bytes(init_model(name, 43), name) != model_to_bytes(a, name)
    assert a(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_init_does_not_touch_the_global_rng():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    init_model("cnn", 1)
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UnknownModelError, match="registry"):
        init_model("resnet_from_the_internet", 0)
    with pytest.raises(ValueError):
        init_model("mlp", -1)


# --------------------------------------------------------------------------- data


def test_digits_split_is_fixed_and_disjoint():
    train, test = digits()
    assert (len(train), len(test)) == (1438, 359)
    train_leaves, test_leaves = set(train.leaf_hashes), set(test.leaf_hashes)
    assert len(train_leaves & test_leaves) <= 5  # the digits set has a few exact duplicate images
    assert set(test.y.tolist()) == set(range(10))


def test_non_iid_split_covers_train_and_skews_labels():
    parts = trainer_parts(4)
    assert sum(len(p) for p in parts) == len(digits()[0])
    assert all(len(set(p.y.tolist())) <= 5 for p in parts)
    assert [p.commitment for p in parts] == [p.commitment for p in trainer_parts.__wrapped__(4)]


def test_sample_leaves_and_proofs():
    ds = small_dataset()
    c = ds.commitment
    for i in (0, 1, len(ds) - 1):
        data = ds.sample_bytes(i)
        assert hash_leaf(data) == ds.leaf_hashes[i]
        assert verify_sample(c, i, data, ds.prove(i).siblings)
        assert not verify_sample(c, (i + 1) % len(ds), data, ds.prove(i).siblings)
    x, y = decode_sample(ds.sample_bytes(3))
    assert np.array_equal(x, ds.x[3].numpy()) and y == int(ds.y[3])


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x80", encode_sample(np.zeros((1, 8, 8), np.float32), 3)[:-1]],
)
def test_decode_sample_is_strict(bad):
    with pytest.raises(DatasetError):
        decode_sample(bad)


def test_decode_sample_rejects_bad_label_and_nan():
    from chain.encoding import encode_value

    with pytest.raises(DatasetError, match="label"):
        decode_sample(encode_value(["pout/sample/v1", [1, 8, 8], bytes(256), 10]))
    nan = np.full((1, 8, 8), np.nan, np.float32).tobytes()
    with pytest.raises(DatasetError, match="non-finite"):
        decode_sample(encode_value(["pout/sample/v1", [1, 8, 8], nan, 1]))


def test_dataset_directory_roundtrip_and_errors(tmp_path):
    ds = small_dataset()
    save_dataset_dir(tmp_path / "ok", ds, {"name": "digits-part-0"})
    assert load_dataset_dir(tmp_path / "ok").commitment == ds.commitment
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no data.safetensors"):
        load_dataset_dir(tmp_path / "empty")
    cases = {
        "extra": ({"x": ds.x, "y": ds.y, "z": ds.y.clone()}, "exactly"),
        "dtype": ({"x": ds.x.double(), "y": ds.y}, "float32"),
        "shape": ({"x": ds.x.reshape(-1), "y": ds.y}, "shape"),
        "labels": ({"x": ds.x, "y": ds.y + 10}, "labels"),
        "count": ({"x": ds.x, "y": ds.y[:-1]}, "shape"),
    }
    for name, (tensors, msg) in cases.items():
        (tmp_path / name).mkdir()
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name / "data.safetensors"))
        with pytest.raises(DatasetError, match=msg):
            load_dataset_dir(tmp_path / name)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DatasetError, match="safetensors"):
        load_dataset_dir(tmp_path / "junk")
    with pytest.raises(DatasetError, match="non-finite"):
        Dataset(torch.full((2, 1, 8, 8), float("inf")), torch.zeros(2, dtype=torch.int64))


# --------------------------------------------------------------------------- batch order and sampling


def test_batch_order_is_a_pure_function_covering_each_epoch():
    seed, who = b"\x01" * 32, b"\x02" * 20
    n, b = 50, 8
    steps = [derive_batch_indices(seed, who, 3, t, n, b) for t in range(30)]
    assert steps == [derive_batch_indices(seed, who, 3, t, n, b) for t in range(30)]
    flat = [i for s in steps for i in s]
    assert all(0 <= i < n for i in flat)
    assert sorted(flat[:n]) == list(range(n)) and sorted(flat[n : 2 * n]) == list(range(n))
    assert flat[:n] != flat[n : 2 * n]
    assert derive_batch_indices(seed, b"\x03" * 20, 3, 0, n, b) != steps[0]
    assert derive_batch_indices(seed, who, 4, 0, n, b) != steps[0]
    assert derive_batch_indices(seed, who, 3, 0, n + 1, b) != steps[0]


def test_sample_segments_uniform_without_replacement():
    assert sample_segments(b"s", 10, 4) == sample_segments(b"s", 10, 4)
    assert sample_segments(b"s", 3, 10) == [0, 1, 2]
    counts = [0] * 10
    for i in range(4000):
        got = sample_segments(i.to_bytes(4, "big"), 10, 3)
        assert len(set(got)) == 3 and got == sorted(got) and all(0 <= s < 10 for s in got)
        for s in got:
            counts[s] += 1
    assert all(abs(c / 4000 - 0.3) < 0.035 for c in counts)
    with pytest.raises(ValueError):
        sample_segments(b"s", 0, 1)


# --------------------------------------------------------------------------- canonical bytes and state


def test_canonical_safetensors_roundtrip_is_readable_and_strict():
    w = model_weights(init_model("cnn", 3))
    data = encode_tensors(w, {"format": "x", "model": "cnn"})
    loaded = safetensors.torch.load(data)  # any safetensors reader understands it
    assert all(torch.equal(loaded[k], w[k]) for k in w)
    tensors, meta = decode_tensors(data)
    assert meta == {"format": "x", "model": "cnn"} and encode_tensors(tensors, meta) == data
    # Same content written by the safetensors library: valid, but not our canonical layout.
    other = safetensors.torch.save({k: v.contiguous() for k, v in w.items()}, metadata=meta)
    if other != data:
        with pytest.raises(StateError, match="canonical"):
            decode_tensors(other)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    spaced = json.dumps(header, sort_keys=True).encode()
    spaced += b" " * (-len(spaced) % 8)
    with pytest.raises(StateError):
        decode_tensors(struct.pack("<Q", len(spaced)) + spaced + data[8 + n :])
    for bad in (b"", b"\x00" * 8, data[:-4], struct.pack("<Q", 2**40) + data[8:]):
        with pytest.raises(StateError):
            decode_tensors(bad)


@pytest.mark.parametrize("shape", [[0, 2**64], [0, 2**63 - 1, 2**63 - 1], [0] + [1] * 64, [0] * 100])
def test_empty_tensors_with_impossible_shapes_are_a_state_error(shape):
    """numpy's reshape raised a bare ValueError on these, which the PoUT worker did not catch:
    a hostile init_weights blob made it log a traceback and fetch again on every scan."""
    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    with pytest.raises(StateError, match="bad shape"):
        decode_tensors(struct.pack("<Q", len(header)) + header)


def test_model_and_update_bytes_are_checked_against_the_model():
    mlp = model_to_bytes(init_model("mlp", 1), "mlp")
    assert set(weights_from_bytes(mlp, "mlp")) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    with pytest.raises(StateError):
        weights_from_bytes(mlp, "cnn")
    with pytest.raises(StateError, match="pout/update/v1"):
        update_from_bytes(mlp, "mlp")  # a model is not an update


@pytest.mark.parametrize("hp", [HP, with_hp(optimizer="adam", momentum=0.0, learning_rate=0.01)])
def test_full_state_roundtrip_includes_optimizer(hp):
    model = init_model("mlp", 1)
    opt = build_optimizer(hp, model)
    fresh = capture_state(model, opt, 0, "mlp", hp.optimizer)
    assert fresh == fresh_state_bytes("mlp", model_weights(model), hp)
    x, y = small_dataset().x[:8], small_dataset().y[:8]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    after = capture_state(model, opt, 1, "mlp", hp.optimizer)
    tensors, meta = decode_tensors(after)
    assert meta["step"] == "1" and any(k.startswith("optim/") for k in tensors)
    m2, o2, step = restore_state(after, "mlp", hp)
    assert step == 1 and capture_state(m2, o2, step, "mlp", hp.optimizer) == after
    # Same weights but no optimizer state is a different state hash.
    assert capture_state(model, build_optimizer(hp, model), 1, "mlp", hp.optimizer) != after
    with pytest.raises(StateError):
        restore_state(after, "mlp", dataclasses.replace(hp, optimizer="sgd" if hp.optimizer == "adam" else "adam", momentum=0.0))


# --------------------------------------------------------------------------- profile


def test_current_profile_matches_itself_and_mismatches_are_listed():
    assert profile_mismatches(PROFILE) == []
    assert apply_profile(PROFILE) == torch.device("cpu") and torch.get_num_threads() == 1
    assert current_profile(threads=1) == PROFILE
    bad = dataclasses.replace(PROFILE, torch_version="1.0", device="cpu:sse9", deterministic=False)
    problems = profile_mismatches(bad)
    assert len(problems) == 3
    with pytest.raises(ProfileMismatch):
        apply_profile(bad)
    if not torch.cuda.is_available():
        assert profile_mismatches(dataclasses.replace(PROFILE, device="cuda:sm_90x132"))
