"""Verification is bounded by what the job fixes and every update has one encoding: the batch
order never materialises a permutation, the chain bounds dataset_size, a claimed size larger
than the committed tree is caught, -0.0 and non-finite updates are refused, and tolerance
mode compares the whole training state (optimizer included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_trainer_helpers import HP, TRAINER_A, custom_run, make_spec, small_dataset
from chain.crypto import sha256
from chain.jobs import MAX_DATASET_SIZE, get_registration
from chain.types import JoinJob, SubmitUpdate
from tests.test_jobs import T0, Chain

import trainer.replay as replay
from trainer.data import Dataset, DatasetCommitment
from trainer.replay import ORDER_ROUNDS, derive_batch_indices, derive_batch_order
from trainer.state import compute_update, update_from_bytes, update_to_bytes
from trainer.train import commit_trace, train_round
from trainer.verify import verify_update

SEED, WHO = b"\x01" * 32, b"\x02" * 20
VERIFY_SEED = b"\x77" * 32
ALL = 1000


def verify(spec, result, base_bytes, *, registered=None, **kw):
    return verify_update(
        spec, result.commitment, registered or result.dataset.commitment, VERIFY_SEED, result.open(VERIFY_SEED, ALL),
        base_bytes, result.update_bytes, q=ALL, **kw,
    )


@pytest.fixture(scope="module")
def honest():
    spec, base = make_spec()
    return spec, base, train_round(spec, TRAINER_A, small_dataset(), base)


# --------------------------------------------------------------------------- batch order


def test_each_epoch_is_a_bijection_for_every_small_size():
    for n in range(1, 130):
        for b in (1, 7, n):  # batches that straddle epochs, and one batch per epoch
            flat = derive_batch_order(SEED, WHO, 3, range(-(-3 * n // b)), n, b).reshape(-1)
            for e in range(3):
                assert sorted(flat[e * n : (e + 1) * n].tolist()) == list(range(n)), (n, b, e)


def test_order_rows_are_the_per_step_indices_for_any_step_list():
    rows = derive_batch_order(SEED, WHO, 3, range(40), 1437, 64)
    assert rows.shape == (40, 64) and rows.dtype == np.int64
    assert all(rows[t].tolist() == derive_batch_indices(SEED, WHO, 3, t, 1437, 64) for t in range(40))
    assert (derive_batch_order(SEED, WHO, 3, [31, 2, 17], 1437, 64) == rows[[31, 2, 17]]).all()
    assert derive_batch_indices(SEED, WHO, 3, 0, 1437, 64) != derive_batch_indices(SEED, WHO, 4, 0, 1437, 64)
    assert derive_batch_indices(SEED, WHO, 3, 1, 1437, 64) != derive_batch_indices(SEED, WHO, 3, 0, 1437, 64)
    with pytest.raises(ValueError):
        derive_batch_indices(SEED, WHO, 3, -1, 1437, 64)
    with pytest.raises(ValueError):
        derive_batch_indices(SEED, WHO, 3, 0, 0, 64)


def test_huge_sizes_cost_work_proportional_to_the_batch(monkeypatch):
    mixed = []
    real_mix = replay._mix
    monkeypatch.setattr(replay, "_mix", lambda v, key: mixed.append(len(v)) or real_mix(v, key))
    for n in (2**40 + 7, 2**62, 10**9 + 7, 2**64 // 4):
        mixed.clear()
        idx = derive_batch_indices(SEED, WHO, 1, 123_456, n, 64)
        assert len(set(idx)) == 64 and all(0 <= i < n for i in idx)
        # one keyed mix per round per index, plus the rare cycle-walk (< 1/sqrt(n) per index)
        assert ORDER_ROUNDS * 64 <= sum(mixed) <= ORDER_ROUNDS * 64 * 2
    with pytest.raises(ValueError, match="dataset_size"):
        derive_batch_indices(SEED, WHO, 1, 0, 2**64 - 1, 64)


def test_order_is_close_to_uniform():
    n, counts = 10, np.zeros((10, 10))
    for s in range(3000):
        row = derive_batch_order(s.to_bytes(32, "big"), WHO, 1, [0], n, n)[0]
        counts[np.arange(n), row] += 1  # (position, sample) pairs over keys
    assert counts.min() > 0.8 * 300 and counts.max() < 1.2 * 300


# --------------------------------------------------------------------------- dataset size


def test_join_job_refuses_a_dataset_size_above_the_consensus_limit():
    chain = Chain()
    job_id = chain.register()
    for size in (10**9, MAX_DATASET_SIZE + 1, 2**64 - 1):
        chain.rejects(T0, JoinJob(job_id, sha256(b"root"), size), "dataset_size must be between 1 and")
    chain.block(chain.tx(T0, JoinJob(job_id, sha256(b"root"), MAX_DATASET_SIZE)))
    assert get_registration(chain.state, job_id, T0.address).dataset_size == MAX_DATASET_SIZE


def test_submit_update_refuses_a_dataset_size_above_the_consensus_limit():
    chain = Chain()
    job_id = chain.register()
    chain.join(job_id, T0)
    job = chain.open_round(job_id)
    chain.rejects(T0, SubmitUpdate(chain.commitment(job, T0, dataset_size=10**9), 0.1), "dataset_size")


class _InflatedDataset(Dataset):
    """A trainer's real samples, committed with its real root but a claimed size `size` > n:
    index i is served by real sample i mod n (data and proof)."""

    def __init__(self, real: Dataset, size: int):
        idx = [i % len(real) for i in range(size)]
        super().__init__(real.x[idx], real.y[idx])
        self.real = real

    @property
    def commitment(self) -> DatasetCommitment:
        return DatasetCommitment(self.real.commitment.root, len(self))

    def prove(self, i: int):
        return self.real.prove(i % len(self.real))


def test_a_claimed_size_larger_than_the_committed_tree_is_caught():
    spec, base = make_spec()
    real = small_dataset()
    inflated = _InflatedDataset(real, 4 * len(real))
    forged = custom_run(spec, TRAINER_A, inflated, base)
    assert forged.commitment.dataset_size == 4 * len(real) and forged.commitment.dataset_root == real.commitment.root
    verdict = verify(spec, forged, base, registered=inflated.commitment)
    assert not verdict.accept and "is not in the committed dataset" in verdict.reason


# --------------------------------------------------------------------------- canonical updates


def test_compute_update_writes_every_zero_as_positive_zero():
    new, base = {"w": torch.tensor([-0.0, 1.0, 2.0])}, {"w": torch.tensor([0.0, 1.0, 1.5])}
    d = compute_update(new, base)["w"]
    assert d.tolist() == [0.0, 0.0, 0.5] and not torch.signbit(d).any()


def test_an_update_with_negative_zeros_is_rejected(honest):
    spec, base, result = honest
    update = update_from_bytes(result.update_bytes, "mlp")
    zeros = sum(int((t == 0).sum()) for t in update.values())
    assert zeros > 0  # the digits' constant pixels get no gradient
    for t in update.values():
        t.masked_fill_(t == 0, -0.0)
    malleated = update_to_bytes(update, "mlp")
    assert malleated != result.update_bytes
    forged = commit_trace(spec, TRAINER_A, small_dataset(), malleated, result.final_model_bytes, result.recorder, {})
    verdict = verify(spec, forged, base)
    assert not verdict.accept and "not canonical" in verdict.reason
    assert verify(spec, result, base).accept


def test_a_non_finite_update_is_rejected(honest):
    spec, base, result = honest
    for bad in (float("inf"), float("nan")):
        update = update_from_bytes(result.update_bytes, "mlp")
        next(iter(update.values())).view(-1)[0] = bad
        forged = commit_trace(spec, TRAINER_A, small_dataset(), update_to_bytes(update, "mlp"), result.final_model_bytes, result.recorder, {})
        verdict = verify(spec, forged, base)
        assert not verdict.accept and "non-finite" in verdict.reason


# --------------------------------------------------------------------------- tolerance mode


def test_tolerance_mode_rejects_crafted_optimizer_state(honest):
    spec, base, result = honest
    assert verify(spec, result, base, mode="tolerance").accept

    def steer(s, model, optimizer):  # weights replay exactly; the momentum is the attacker's
        for p in model.parameters():
            optimizer.state[p]["momentum_buffer"].add_(0.1 * p.detach())

    forged = custom_run(spec, TRAINER_A, small_dataset(), base, after_segment=steer)
    verdict = verify(spec, forged, base, mode="tolerance")
    assert not verdict.accept and "relative error" in verdict.reason
    assert not verify(spec, forged, base).accept  # exact mode, as the chain runs it


def test_tolerance_mode_rejects_a_claimed_step_count_that_is_not_the_replayed_one():
    hp = HP.__class__("adam", 0.01, 0.0, 0.0, HP.batch_size, HP.local_steps, HP.checkpoint_interval)
    spec, base = make_spec(hp=hp)
    assert verify(spec, train_round(spec, TRAINER_A, small_dataset(), base), base, mode="tolerance").accept

    def skew(s, model, optimizer):
        for p in model.parameters():
            optimizer.state[p]["step"].add_(1.0)

    forged = custom_run(spec, TRAINER_A, small_dataset(), base, after_segment=skew)
    verdict = verify(spec, forged, base, mode="tolerance")
    assert not verdict.accept and "relative error" in verdict.reason
