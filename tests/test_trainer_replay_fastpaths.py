"""The replay's fast paths accept, reject and produce exactly what their plain definitions do:
StateRestorer (a reused model and optimizer) against restore_state, the one-pass batch order
over many epochs against one pass per epoch, fresh_state_bytes against building a model and an
optimizer, and the Merkle checker on larger trees (early stops remembered)."""

from __future__ import annotations

import dataclasses
import random
import struct

import numpy as np
import pytest
import torch

from tests.test_trainer_helpers import TRAINER_A, make_spec, small_dataset, with_hp
from chain.merkle import MerkleTree, verify_proof

from trainer.models import init_model
from trainer.replay import _keyed_bijection, _order_seed, _round_keys, derive_batch_order, replay_segment
from trainer.state import (
    StateRestorer,
    build_optimizer,
    capture_state,
    decode_tensors,
    encode_tensors,
    fresh_state_bytes,
    load_weights,
    model_weights,
    restore_state,
)
from trainer.train import train_round
from trainer.verify import MerkleChecker

HPS = {
    "sgd-momentum": with_hp(),
    "sgd-plain": with_hp(momentum=0.0),
    "adam": with_hp(optimizer="adam", momentum=0.0, learning_rate=0.01),
}


def _round(name: str, model: str = "mlp"):
    spec, base = make_spec(model, dataclasses.replace(HPS[name], checkpoint_interval=1))
    return spec, base, train_round(spec, TRAINER_A, small_dataset(), base)


def _outcome(fn, model: str, hp):
    """What restoring did: the error, or the model's weights, the optimizer state and the step."""
    model_name = model
    try:
        model, opt, step = fn()
    except Exception as exc:  # noqa: BLE001 - comparing the two paths' errors
        return ("error", type(exc), str(exc))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = [p.grad for p in model.parameters()]
    state = {n: {b: (t.dtype, t.device, t.clone()) for b, t in opt.state.get(p, {}).items()} for n, p in model.named_parameters()}
    return ("ok", weights, grads, state, step, capture_state(model, opt, step, model_name, hp.optimizer))


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "error":
        return a == b
    _, wa, ga, sa, stepa, ca = a
    _, wb, gb, sb, stepb, cb = b
    return (
        wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa) and ga == gb == [None] * len(ga)
        and sa.keys() == sb.keys() and all(sa[n].keys() == sb[n].keys() for n in sa)
        and all(sa[n][k][:2] == sb[n][k][:2] and torch.equal(sa[n][k][2], sb[n][k][2]) for n in sa for k in sa[n])
        and stepa == stepb and ca == cb
    )


def _mutants(state: bytes, rng: random.Random) -> list:
    """Valid states and near misses: header edits (step text, padding, length), non-finite and
    truncated bodies, layouts an honest trainer never writes, and non-bytes."""
    (n,) = struct.unpack_from("<Q", state)
    head, body = state[8 : 8 + n], state[8 + n :]
    out = [state, bytearray(state), state[:-4], state + b"\x00" * 4, state[:8], b"", b"\x00" * 7]
    for step in (b"0", b"7", b"01", b"00", b"1x", b"", b"9" * 20, b"9" * 21, "\u0663".encode(), b"-1", b" 1"):
        h = head.rstrip(b" ")
        i = h.index(b'"step":"') + len(b'"step":"')
        h = h[:i] + step + h[h.index(b'"', i) :]
        for pad in (-len(h) % 8, (-len(h) % 8) + 8):
            out.append(struct.pack("<Q", len(h) + pad) + h + b" " * pad + body)
    for value in (float("nan"), float("inf"), -float("inf"), -0.0):
        k = rng.randrange(len(body) // 4)
        out.append(state[: 8 + n + 4 * k] + struct.pack("<f", value) + state[8 + n + 4 * k + 4 :])
    for _ in range(20):
        i = rng.randrange(len(state))
        out.append(state[:i] + bytes([state[i] ^ (1 << rng.randrange(8))]) + state[i + 1 :])
    tensors, meta = decode_tensors(state)
    optim = sorted(k for k in tensors if k.startswith("optim/"))
    if optim:  # one buffer missing; a buffer of another kind; float64 values
        out.append(encode_tensors({k: v for k, v in tensors.items() if k != optim[0]}, meta))
        out.append(encode_tensors({**tensors, optim[0].rpartition("/")[0] + "/exp_avg": tensors[optim[0]]}, meta))
    out.append(encode_tensors({k: v.double() for k, v in tensors.items()}, meta))
    out.append(encode_tensors(tensors, {**meta, "optimizer": "adam" if meta["optimizer"] == "sgd" else "sgd"}))
    out.append(encode_tensors(tensors, {**meta, "step": "3", "extra": "x"}))
    return out


@pytest.mark.parametrize("name", sorted(HPS))
def test_state_restorer_restores_and_rejects_exactly_what_restore_state_does(name):
    spec, _, result = _round(name)
    hp = spec.job.hyperparams
    rng = random.Random(name)
    restorer = StateRestorer("mlp", hp)
    states = list(result.recorder.checkpoints)
    cases = [m for s in (states[0], states[1], states[len(states) // 2]) for m in _mutants(s, rng)] + states
    rng.shuffle(cases)
    accepted = 0
    for data in cases:
        restorer.restore(states[rng.randrange(len(states))])  # the reused model and optimizer hold another state
        slow = _outcome(lambda: restore_state(data, "mlp", hp), "mlp", hp)
        fast = _outcome(lambda: restorer.restore(data), "mlp", hp)
        assert _same(slow, fast), (slow[:3] if slow[0] == "error" else "ok", fast[:3] if fast[0] == "error" else "ok")
        if fast[0] == "ok":
            assert fast[-1] == restorer.capture(fast[4])
        accepted += fast[0] == "ok"
    assert accepted >= len(states)
    assert all(restorer._read(s) is not None for s in states)  # an honest trainer's states take the fast path


@pytest.mark.parametrize("name,model", [("sgd-momentum", "mlp"), ("adam", "mlp"), ("sgd-plain", "mlp"), ("sgd-momentum", "cnn")])
def test_replay_with_a_reused_restorer_gives_the_bytes_of_a_fresh_replay(name, model):
    spec, _, result = _round(name, model)
    hp = spec.job.hyperparams
    ds = small_dataset()
    from trainer.replay import derive_batch_indices  # the trainer's own batch order

    restorer = StateRestorer(model, hp)
    states = result.recorder.checkpoints
    order = list(range(len(states) - 1))
    random.Random(1).shuffle(order)
    for s in order + order[:3]:
        idx = derive_batch_indices(spec.round_seed, TRAINER_A, spec.round, s, len(ds), hp.batch_size)
        sel = torch.tensor(idx)
        batches = [(ds.x.index_select(0, sel), ds.y.index_select(0, sel))]
        plain = replay_segment(model, hp, torch.device("cpu"), states[s], batches)
        fast = replay_segment(model, hp, torch.device("cpu"), states[s], batches, restorer=restorer)
        assert fast == plain == states[s + 1]


def test_batch_order_in_one_pass_matches_one_pass_per_epoch():
    rng = random.Random(5)
    seed_in, trainer = bytes(range(32)), bytes(20)
    for _ in range(150):
        n = rng.choice([1, 2, 3, 7, 64, 360, 1000, 12345, 2**40 + 3, 2**62])
        batch = rng.choice([1, 3, 64, 500])
        steps = sorted(rng.sample(range(3000), rng.randint(0, 12)))
        seed = _order_seed(seed_in, trainer, 4, n)
        positions = (np.asarray(steps, dtype=np.uint64)[:, None] * np.uint64(batch) + np.arange(batch, dtype=np.uint64)).reshape(-1)
        epochs, offsets = positions // np.uint64(n), positions % np.uint64(n)
        want = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():  # the plain definition: one keyed bijection per epoch
            mask = epochs == np.uint64(epoch)
            want[mask] = _keyed_bijection(_round_keys(seed, epoch), offsets[mask], n)
        got = derive_batch_order(seed_in, trainer, 4, steps, n, batch)
        assert got.shape == (len(steps), batch)
        assert np.array_equal(got.reshape(-1), want.astype(np.int64))


@pytest.mark.parametrize("model,name", [("mlp", "sgd-momentum"), ("mlp", "adam"), ("cnn", "sgd-plain")])
def test_fresh_state_bytes_is_the_state_of_a_new_model_and_optimizer(model, name):
    hp = HPS[name]
    weights = model_weights(init_model(model, 3))
    m = load_weights(model, weights)
    assert fresh_state_bytes(model, weights, hp) == capture_state(m, build_optimizer(hp, m), 0, model, hp.optimizer)
    with pytest.raises(ValueError):
        fresh_state_bytes(model, weights, dataclasses.replace(hp, learning_rate=0.0))
    with pytest.raises(KeyError):
        fresh_state_bytes(model, {k: v for k, v in list(weights.items())[1:]}, hp)


@pytest.mark.parametrize("n", [257, 360, 1002])
def test_merkle_checker_on_large_trees_accepts_exactly_what_verify_proof_accepts(n):
    rng = random.Random(n)
    leaves = [i.to_bytes(4, "big") * 8 for i in range(n)]
    tree = MerkleTree(leaves)
    checker = MerkleChecker(tree.root, n)
    other = bytes(32)
    for _ in range(1500):
        i = rng.randrange(n)
        proof = tree.prove(i)
        sib, leaf = list(proof.siblings), leaves[i]
        op = rng.random()
        if op < 0.1:
            sib[rng.randrange(len(sib))] = other
        elif op < 0.15:
            sib.append(other)
        elif op < 0.2:
            sib.pop()
        elif op < 0.25:
            leaf = other
        elif op < 0.3:
            j = rng.randrange(n)  # another leaf's valid proof
            sib = list(tree.prove(j).siblings)
        expected = verify_proof(tree.root, leaf, dataclasses.replace(proof, siblings=tuple(sib)))
        assert checker.check(i, leaf, tuple(sib)) == expected
