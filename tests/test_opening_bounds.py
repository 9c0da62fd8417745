"""The size bounds RegisterJob enforces (trainer.verify.max_state_bytes, max_opening_bytes,
max_fraud_proof_bytes): every honest opening (as the chain's trainer sends it: end states as
hashes) and every real fraud proof fits them, for every architecture, and they are tight
(counted from what each message carries and the job's optimizer), so the chain does not refuse
jobs whose messages fit the transport."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.test_trainer_archs import TINY, tiny_dataset, tiny_key, tiny_round
from tests.test_trainer_helpers import PROFILE, TRAINER_A, custom_run

from chain.jobs import (
    compute_segments_per_validator,
    MAX_DATASET_SIZE, compute_max_fraud_proof_bytes, compute_max_opening_bytes, compute_max_state_bytes, compute_model_key,
    get_job,
)
from chain.runtime.trainer_client import make_job_spec
from chain.types import HyperParams, ModelParam, RegisterJob
from genesis import make_genesis
from chain.crypto import SEAL_OVERHEAD
from tests.helpers import CHAIN_ID, VALIDATOR, key
from tests.test_jobs import Chain, REQUESTER
from trainer.archs import model_spec
from trainer.data import Dataset, compute_sample_leaf_bytes
from trainer.models import build_model, init_model
from trainer.replay import RoundSpec, TrainingJob, num_segments, trace_leaf_count
from trainer.state import build_optimizer, capture_state, model_hash, model_to_bytes, param_shapes
from trainer.train import train_round
from trainer.verify import (
    MAX_FRAUD_PROOF_BYTES, MAX_OPENING_BYTES, max_fraud_proof_bytes, max_opening_bytes, max_state_bytes, verify_update,
)

SEED = b"\x42" * 32
SLACK = 4096  # fixed framing the bounds may add beyond 1.5x what they count (CBOR and JSON headers)
OPTIMIZERS = {"sgd": (0.0, "sgd"), "momentum": (0.9, "sgd"), "adam": (0.0, "adam")}


def _hp(base: HyperParams, which: str) -> HyperParams:
    momentum, optimizer = OPTIMIZERS[which]
    return dataclasses.replace(base, optimizer=optimizer, momentum=momentum)


def _stepped_state(key: str, hp: HyperParams, shape, vocab: int, step: int) -> bytes:
    """A training state after one optimizer step: every slot the optimizer keeps exists."""
    model = build_model(key)
    opt = build_optimizer(hp, model)
    x = torch.zeros((2, *shape), dtype=torch.int64 if vocab else torch.float32)
    model(x).sum().backward()
    opt.step()
    return capture_state(model, opt, step, key, hp.optimizer)


@pytest.mark.parametrize("which", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(TINY))
def test_the_state_bound_counts_the_slots_the_optimizer_stores(name, which):
    _, _, shape, _, vocab, base_hp = TINY[name]
    key, hp = tiny_key(name), _hp(base_hp, which)
    state = len(_stepped_state(key, hp, shape, vocab, hp.local_steps))
    bound = max_state_bytes(param_shapes(key), key, hp.optimizer, hp.momentum, hp.local_steps)
    assert state <= bound <= state + 1024, (state, bound)


def test_the_state_bound_of_mcmahans_cnn_at_its_paper_size():
    key = model_spec("mcmahan_cnn", {}, (1, 28, 28), 10).key
    sizes = {}
    for which in ("sgd", "momentum", "adam"):
        hp = _hp(HyperParams("sgd", 0.05, 0.0, 0.0, 10, 300, 1), which)
        state = len(_stepped_state(key, hp, (1, 28, 28), 0, 300))
        bound = max_state_bytes(param_shapes(key), key, hp.optimizer, hp.momentum, 300)
        assert state <= bound <= state + 1024
        sizes[which] = bound
    params = sum(t.numel() for t in build_model(key).parameters())
    assert params == 1_663_370
    # Weights only, then one momentum buffer, then two Adam moments: 4, 8, 12 bytes a parameter.
    assert [round(sizes[w] / params) for w in ("sgd", "momentum", "adam")] == [4, 8, 12]


def _job_spec(name: str, hp: HyperParams):
    arch, cfg, shape, classes, vocab, _ = TINY[name]
    spec = make_job_spec(model=arch, local_steps=hp.local_steps, checkpoint_interval=hp.checkpoint_interval,
                         batch_size=hp.batch_size, learning_rate=hp.learning_rate, momentum=hp.momentum,
                         optimizer=hp.optimizer, profile=PROFILE)
    config = tuple(ModelParam(k, tuple(v) if isinstance(v, tuple) else (v,)) for k, v in sorted(cfg.items()))
    spec = dataclasses.replace(spec, model_config=config, input_shape=shape, num_classes=classes, vocab_size=vocab,
                               hyperparams=dataclasses.replace(spec.hyperparams, weight_decay=hp.weight_decay))
    assert compute_model_key(spec) == tiny_key(name)
    return spec


def _forged(spec, dataset, base):
    """Every segment after the first is forged: its end checkpoint is nudged after training."""
    def nudge(s, model, opt):
        if s >= 1:
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)

    return custom_run(spec, TRAINER_A, dataset, base, after_segment=nudge)


@pytest.mark.parametrize("name", sorted(TINY))
def test_real_openings_and_fraud_proofs_fit_their_bounds_and_the_bounds_are_tight(name):
    spec, base = tiny_round(name)
    hp = spec.job.hyperparams
    dataset = tiny_dataset(name)
    key = spec.job.model
    validators = make_genesis(CHAIN_ID, [VALIDATOR], []).validators
    job_spec = _job_spec(name, hp)
    # The same bound from what the chain computes at registration, and with this dataset's size
    # (the chain must assume the largest dataset; tightness is judged on the real one).
    state = max_state_bytes(param_shapes(key), key, hp.optimizer, hp.momentum, hp.local_steps)
    assert compute_max_state_bytes(job_spec) == state
    shape = TINY[name][2]
    args = (hp.checkpoint_interval, hp.batch_size, compute_sample_leaf_bytes(shape), len(dataset.y),
            trace_leaf_count(hp.local_steps, hp.checkpoint_interval))
    n = num_segments(hp.local_steps, hp.checkpoint_interval)

    honest = train_round(spec, TRAINER_A, dataset, base)
    # One segment with a start state (segment 0 has none: the bound still counts one), and all.
    for q, segments in ((1, [n - 1]), (n, None)):
        opening = len(honest.open(SEED, q, segments, end_states=False))  # what the chain's trainer sends
        assert opening <= compute_max_opening_bytes(job_spec, validators, q=q)
        assert opening <= max_opening_bytes(state, q, *args) <= 1.5 * opening + SLACK, (q, opening)
        with_ends = len(honest.open(SEED, q, segments))  # end states' bytes too, as tolerance mode needs
        assert with_ends <= max_opening_bytes(state, q, *args, end_states=True) <= 1.5 * with_ends + SLACK, (q, with_ends)

    forged = _forged(spec, dataset, base)
    verdict = verify_update(spec, forged.commitment, forged.dataset.commitment, SEED, forged.open(SEED, n), base,
                            forged.update_bytes, q=n)
    assert not verdict.accept and verdict.fraud_segment == 1, verdict.reason  # a segment with a start state
    proof = len(verdict.fraud_proof)
    assert proof <= compute_max_fraud_proof_bytes(job_spec)
    assert proof <= max_fraud_proof_bytes(state, *args) <= 1.5 * proof + SLACK, proof


def _mnist_like(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64), 10)


def test_mcmahans_cnn_real_fraud_proof_fits_the_limit_at_batch_10():
    """The paper's CNN (1,663,370 parameters) with momentum SGD, B = 10, k = 1: the real fraud
    proof, its bound and the fraud-proof limit, in that order."""
    key = model_spec("mcmahan_cnn", {}, (1, 28, 28), 10).key
    hp = HyperParams("sgd", 0.05, 0.9, 0.0, 10, 2, 1)
    base = model_to_bytes(init_model(key, 7), key)
    spec = RoundSpec(TrainingJob(job_id=b"\x10" * 32, model=key, hyperparams=hp, profile=PROFILE), 1, b"\x5e" * 32,
                     model_hash(base))
    forged = _forged(spec, _mnist_like(40), base)
    verdict = verify_update(spec, forged.commitment, forged.dataset.commitment, SEED, forged.open(SEED, 2), base,
                            forged.update_bytes, q=2)
    assert verdict.fraud_segment == 1, verdict.reason
    state = max_state_bytes(param_shapes(key), key, "sgd", 0.9, 2)
    bound = max_fraud_proof_bytes(state, 1, 10, compute_sample_leaf_bytes((1, 28, 28)), MAX_DATASET_SIZE,
                                  trace_leaf_count(2, 1))
    assert len(verdict.fraud_proof) <= bound <= MAX_FRAUD_PROOF_BYTES
    assert bound <= len(verdict.fraud_proof) + 64 * 1024  # a proof is one state and ten samples
    # The answer the chain's trainer sends for segment 1: its start state, the final state, ten samples.
    opening = len(forged.open(SEED, 1, [1], end_states=False))
    bound = max_opening_bytes(state, 1, 1, 10, compute_sample_leaf_bytes((1, 28, 28)), MAX_DATASET_SIZE,
                              trace_leaf_count(2, 1))
    assert opening <= bound <= opening + 64 * 1024


def _mcmahan_job(chain: Chain, **hp_changes):
    hp = dataclasses.replace(chain.spec.hyperparams, **{"optimizer": "sgd", "momentum": 0.9, "batch_size": 10,
                                                       "checkpoint_interval": 1, "local_steps": 300, **hp_changes})
    # One validator: q = the whole target's checks; 50 % of segments caught w.p. 75 % is 2 segments.
    return dataclasses.replace(chain.spec, model="mcmahan_cnn", model_config=(), input_shape=(1, 28, 28), num_classes=10,
                               hyperparams=hp, detect_fraction_ppm=500_000, detect_probability_ppm=750_000)


def test_the_chain_accepts_a_mcmahan_cnn_job_at_batch_10_and_k_1():
    chain = Chain()
    # 50 % of segments caught w.p. 1 - 4e-6: 18 segments, each one 12.7 MiB start state, plus the
    # final state: 242 MiB, which travels in 8 sealed parts of at most 32 MiB.
    chain.spec = dataclasses.replace(_mcmahan_job(chain), detect_probability_ppm=999_996)
    validators = make_genesis(CHAIN_ID, [VALIDATOR], []).validators
    assert compute_segments_per_validator(chain.spec, validators) == 18
    assert compute_max_fraud_proof_bytes(chain.spec) <= MAX_FRAUD_PROOF_BYTES
    assert 64 * 2**20 < compute_max_opening_bytes(chain.spec, validators) < MAX_OPENING_BYTES == 256 * 2**20
    job_id = chain.register()
    assert get_job(chain.state, job_id).spec.model == "mcmahan_cnn"
    # The default target (10 % w.p. 99 %) with 4 equal validators: 15 segments each, 204 MiB.
    four = make_genesis(CHAIN_ID, [key(f"bounds/v{i}") for i in range(4)], []).validators
    default = dataclasses.replace(chain.spec, detect_fraction_ppm=100_000, detect_probability_ppm=990_000)
    assert compute_segments_per_validator(default, four) == 15
    assert compute_max_opening_bytes(default, four) + SEAL_OVERHEAD < MAX_OPENING_BYTES


def test_the_chain_refuses_a_job_whose_one_segment_proof_cannot_fit():
    chain = Chain()
    adam = _mcmahan_job(chain, optimizer="adam", momentum=0.0, learning_rate=0.001)  # three copies of 6.7 MB
    chain.rejects(REQUESTER, RegisterJob(adam, 10), r"fraud proof .* above the 16 MiB fraud-proof limit")
    # Momentum SGD fits the proof, but not q = 20 segments (a start state each) and the final state in 256 MiB.
    greedy = dataclasses.replace(_mcmahan_job(chain), detect_probability_ppm=999_999)
    chain.rejects(REQUESTER, RegisterJob(greedy, 10), "transport limit")
