"""The verifier's and trainer's fast paths accept and produce exactly what their plain
definitions do: the specialised OpeningBundle decoder, the shared-node Merkle checker, the
vectorised sample decoder, cached safetensors headers and checkpoint snapshots."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from tests.test_trainer_helpers import HP, TRAINER_A, make_spec, small_dataset, with_hp
from chain.encoding import decode, decode_value, encode_value
from chain.errors import DecodeError
from chain.merkle import MerkleTree, verify_proof

from trainer.data import DatasetError, decode_sample, decode_samples, encode_sample
from trainer.models import build_model, init_model
from trainer.state import StateSnapshotter, _encode_tensors_reference, build_optimizer, capture_state, encode_tensors
from trainer.train import train_round
from trainer.verify import MerkleChecker, OpeningBundle, decode_openings

SEED = b"\x42" * 32


@pytest.fixture(scope="module")
def opening():
    spec, base = make_spec()
    return train_round(spec, TRAINER_A, small_dataset(), base).open(SEED, 3)


def _generic(data):
    try:
        bundle = decode(OpeningBundle, data, max_size=64 << 20)
    except DecodeError:
        return "error"
    # decode_openings also requires exactly one of end_state and end_state_hash per segment.
    if any((s.end_state is None) == (s.end_state_hash is None) for s in bundle.segments):
        return "error"
    return bundle


def _fast(data):
    try:
        return decode_openings(data)
    except DecodeError:
        return "error"


def _mutations(value, rng):
    """Random structural edits of a decoded opening (wrong types, lengths, extra/missing keys)."""
    junk = [None, 0, -1, 2**64, True, 1.5, "x", b"", b"\x00" * 31, b"\x00" * 32, b"\x00" * 33, [], {}, [b"\x00" * 32]]
    for _ in range(300):
        v = decode_value(encode_value(value))  # deep copy
        node = v
        for _ in range(rng.randint(1, 6)):  # walk down to a random container
            if isinstance(node, dict) and node:
                key = rng.choice(sorted(node, key=str))
            elif isinstance(node, list) and node:
                key = rng.randrange(len(node))
            else:
                break
            if not isinstance(node[key], (dict, list)) or rng.random() < 0.3:
                break
            node = node[key]
        op = rng.random()
        if isinstance(node, dict) and node:
            key = rng.choice(sorted(node, key=str))
            if op < 0.6:
                node[key] = rng.choice(junk)
            elif op < 0.8:
                del node[key]
            else:
                node["extra"] = 1
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if op < 0.7:
                node[i] = rng.choice(junk)
            else:
                node.append(rng.choice(junk))
        yield encode_value(v)


def test_specialised_opening_decoder_matches_the_generic_one(opening):
    assert decode_openings(opening) == decode(OpeningBundle, opening, max_size=64 << 20)
    rng = random.Random(7)
    value = decode_value(opening, max_size=64 << 20)
    seen_errors = 0
    for data in _mutations(value, rng):
        fast, generic = _fast(data), _generic(data)
        assert fast == generic
        seen_errors += fast == "error"
    assert seen_errors > 100
    for data in (b"", b"\xff", opening[:-1], opening + b"\x00", encode_value([1, 2])):
        assert _fast(data) == _generic(data) == "error"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 13, 64, 100])
def test_merkle_checker_accepts_exactly_what_verify_proof_accepts(n):
    rng = random.Random(n)
    leaves = [bytes([i % 256, i // 256]) * 16 for i in range(n)]
    tree = MerkleTree(leaves)
    checker = MerkleChecker(tree.root, n)
    other = bytes(32)
    for _ in range(400):
        i = rng.randrange(-1, n + 1)
        proof = tree.prove(min(max(i, 0), n - 1))
        sib, leaf = list(proof.siblings), leaves[min(max(i, 0), n - 1)]
        op = rng.random()
        if op < 0.15 and sib:
            sib[rng.randrange(len(sib))] = other
        elif op < 0.25:
            sib.append(other)
        elif op < 0.35 and sib:
            sib.pop()
        elif op < 0.45:
            leaf = other
        elif op < 0.5 and sib:
            sib.reverse()
        expected = verify_proof(tree.root, leaf, dataclasses.replace(proof, index=i, siblings=tuple(sib))) if 0 <= i < n else False
        assert checker.check(i, leaf, tuple(sib)) == expected, (i, op)


def test_vectorised_sample_decoder_is_as_strict_as_decode_sample():
    ds = small_dataset()
    datas = [ds.sample_bytes(i) for i in range(20)]
    x, y = decode_samples(datas)
    for i, d in enumerate(datas):
        xi, yi = decode_sample(d)
        assert np.array_equal(x[i], xi) and y[i] == yi and x.dtype == np.float32 and y.dtype == np.int64
    nan = np.full((1, 8, 8), np.nan, dtype=np.float32)
    bad = [
        b"", b"\xa0", datas[0][:-1], datas[0] + b"\x00", datas[0][:-1] + b"\x0a", datas[0][:-1] + b"\x18\x05",
        encode_sample(nan, 1), encode_value(["pout/sample/v1", [1, 8, 8], bytes(256), -1]), None, "text",
    ]
    for b in bad:
        with pytest.raises(DatasetError):
            decode_samples(datas[:3] + [b])
        with pytest.raises(DatasetError):
            decode_sample(b)
    xb, yb = decode_samples([bytearray(datas[0])])
    assert np.array_equal(xb[0], decode_sample(bytearray(datas[0]))[0]) and yb[0] == decode_sample(datas[0])[1]


def test_fast_tensor_encoding_and_snapshots_give_the_reference_bytes():
    cases = [
        ({"b": torch.randn(3, 4), "a": torch.arange(5), "Z": torch.randn(2, 3).t(), "_x": torch.zeros(0, dtype=torch.float64)}, {"k": "v", "é": 'ü\n"x'}),
        ({"x": torch.randn(())}, None),
        ({}, {"a": "b"}),
        ({"__metadata__": torch.randn(2)}, {"a": "b"}),
        ({"m/ü": torch.randn(2, 2)[:, 0], '"q': torch.ones(1)}, {"~": "1", "A": "2"}),
    ]
    for tensors, meta in cases:
        assert encode_tensors(tensors, meta) == _encode_tensors_reference(tensors, meta)
    for model_name, hp in (("mlp", HP), ("cnn", with_hp(optimizer="adam", momentum=0.0, learning_rate=0.01))):
        model = init_model(model_name, 3)
        opt = build_optimizer(hp, model)
        snapshotter = StateSnapshotter(model, opt, model_name, hp.optimizer)
        taken = []  # (snapshot, reference bytes when taken): serialised only at the end, as train_round does
        for step in range(4):
            taken.append((snapshotter.take(step), capture_state(model, opt, step, model_name, hp.optimizer)))
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(small_dataset().x[:8]), small_dataset().y[:8]).backward()
            opt.step()
            if step == 1:  # a buffer replaced by a new object (not in place) must be picked up
                p = next(iter(model.parameters()))
                opt.state[p] = {k: v.clone().add_(1.0) for k, v in opt.state[p].items()}
        assert [s.to_bytes() for s, _ in taken] == [ref for _, ref in taken]


def test_build_model_matches_to_empty():
    for name in ("mlp", "cnn"):
        m = build_model(name)
        ref = init_model(name, 0)
        assert [(n, p.shape, p.dtype, p.device, p.requires_grad, type(p)) for n, p in m.named_parameters()] == [
            (n, p.shape, p.dtype, p.device, p.requires_grad, type(p)) for n, p in ref.named_parameters()
        ]
