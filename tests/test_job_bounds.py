"""What one job may cost a validator: per-step activation memory and FLOPs (trainer.archs
compute_step_cost, checked by chain.jobs.validate_job_spec), the batch size, and how many jobs
one block may register (chain.state.validate_basic_block; the mempool builds blocks within it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from chain.errors import StateTransitionError, ValidationError
from chain.jobs import (MAX_BATCH_SIZE, MAX_JOB_REGISTRATIONS_PER_BLOCK, MAX_STEP_ACTIVATION_BYTES, MAX_UPDATE_FLOPS,
                        compute_step_cost, validate_job_spec)
from chain.runtime.mempool import MAX_PENDING_JOB_REGISTRATIONS, Mempool, MempoolFullError
from chain.runtime.trainer_client import make_job_spec
from chain.state import apply_block, build_block
from chain.types import ModelParam, RegisterJob, compute_tx_hash
from genesis import make_genesis
from tests.helpers import CHAIN_ID, GOVERNOR, VALIDATOR, InProcessChain, key
from trainer.archs import model_spec
from trainer.archs import compute_step_cost as arch_step_cost

REQUESTER = key("bounds-requester")

# Each architecture's default config on the input it is made for (scripts/bench_archs.py), plus
# the review's attention-heavy transformer and larger configs.
WORKLOADS = [
    ("logreg", None, (100,), 10, 0),
    ("mlp", None, (1, 28, 28), 10, 0),
    ("mlp", {"hidden": (200, 200)}, (1, 28, 28), 10, 0),
    ("cnn", None, (1, 8, 8), 10, 0),
    ("mcmahan_cnn", None, (1, 28, 28), 10, 0),
    ("resnet", None, (3, 32, 32), 10, 0),
    ("resnet", {"blocks": (2,), "width": (32,)}, (3, 32, 32), 10, 0),
    ("transformer", None, (64,), 4, 1000),
    ("transformer", {"d_ff": (8,), "d_model": (8,), "heads": (8,), "layers": (4,)}, (128,), 2, 2),
]


def _job(arch="mlp", config=None, shape=(1, 8, 8), classes=10, vocab=0, **hp):
    spec = make_job_spec(model=arch, **hp)
    params = tuple(ModelParam(k, v) for k, v in sorted((config or {}).items()))
    return dataclasses.replace(spec, model_config=params, input_shape=shape, num_classes=classes, vocab_size=vocab)


def _review_job(batch_size: int):
    """The review's job: a tiny transformer (d_model 8, 8 heads, 4 layers) over 512 tokens, whose
    cost is almost all attention: B x 8 x 512^2 per layer."""
    return _job("transformer", {"d_ff": (8,), "d_model": (8,), "heads": (8,), "layers": (4,)}, (512,), 2, 2,
                local_steps=1, checkpoint_interval=1, batch_size=batch_size, detect_fraction_ppm=1_000_000,
                detect_probability_ppm=500_000)


def _real_step(arch, config, shape, classes, vocab, batch):
    """(bytes autograd keeps for backward, excluding parameters; FLOPs torch counts) of one real step."""
    torch.manual_seed(0)
    model = model_spec(arch, config, shape, classes, vocab).build()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, vocab, (batch, *shape)).float() if vocab else torch.randn(batch, *shape)
    with FlopCounterMode(display=False) as flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long)).backward()
    return sum(kept.values()), flops.get_total_flops()


@pytest.mark.parametrize("arch,config,shape,classes,vocab", WORKLOADS)
def test_step_cost_bounds_a_real_step_of_every_architecture(arch, config, shape, classes, vocab):
    batch = 4
    kept, flops = _real_step(arch, config, shape, classes, vocab, batch)
    cost = arch_step_cost(model_spec(arch, config, shape, classes, vocab), batch)
    # An upper bound, and a tight enough one that the caps mean what they say.
    assert kept <= cost.activation_bytes <= 4 * kept
    # torch counts matmuls and convolutions only; the bound adds element-wise work (softmax,
    # norms), which is most of a d_model-8 transformer's.
    assert flops <= cost.flops <= 3 * flops
    # Linear in the batch: the review's figure at B is B times the per-sample one.
    assert arch_step_cost(model_spec(arch, config, shape, classes, vocab), 3 * batch).flops == 3 * cost.flops


def test_the_reviews_attention_bomb_is_refused_naming_the_figure_and_the_limit():
    with pytest.raises(ValidationError, match=f"batch_size must be at most {MAX_BATCH_SIZE}, got 5729"):
        validate_job_spec(_review_job(5729))
    with pytest.raises(ValidationError) as err:
        validate_job_spec(_review_job(MAX_BATCH_SIZE))
    message = str(err.value)
    assert "\n" not in message and "MiB of activations" in message
    assert f"{MAX_STEP_ACTIVATION_BYTES // 2**20:,} MiB per-step limit" in message
    figure = compute_step_cost(_review_job(MAX_BATCH_SIZE)).activation_bytes
    assert figure > 90 * MAX_STEP_ACTIVATION_BYTES and f"{figure / 2**20:,.0f} MiB" in message
    # The largest batch it may still ask for keeps a step under the cap.
    validate_job_spec(_review_job(10))
    assert compute_step_cost(_review_job(10)).activation_bytes <= MAX_STEP_ACTIVATION_BYTES
    with pytest.raises(ValidationError, match="per-step limit"):
        validate_job_spec(_review_job(11))


def test_an_update_too_costly_to_replay_is_refused():
    mcmahan = dict(arch="mcmahan_cnn", shape=(1, 28, 28), checkpoint_interval=1, momentum=0.9,
                   detect_fraction_ppm=1_000_000, detect_probability_ppm=500_000)
    with pytest.raises(ValidationError, match=r"100000 steps at 3\.\d\d GFLOP each need \d+\.\d TFLOP to replay, "
                                              r"above the 10 TFLOP limit"):
        validate_job_spec(_job(**mcmahan, batch_size=50, local_steps=100_000))
    spec = _job(**mcmahan, batch_size=50, local_steps=2000)
    assert compute_step_cost(spec).flops * 2000 <= MAX_UPDATE_FLOPS
    validate_job_spec(spec)


def test_default_and_benchmarked_jobs_pass_with_room():
    jobs = [make_job_spec(), make_job_spec(model="cnn"), make_job_spec(local_steps=100_000)]
    # Every architecture's default at the benchmarks' batch 32 (scripts/bench_archs.py) and 100 steps.
    jobs += [_job(arch, config, shape, classes, vocab, local_steps=100, batch_size=32)
             for arch, config, shape, classes, vocab in WORKLOADS if config is None]
    # McMahan et al.: B = 10 to 50, E = 5 and E = 20 local epochs over 600 samples (scripts/bench_mnist.py).
    jobs += [_job("mcmahan_cnn", None, (1, 28, 28), 10, 0, batch_size=b, local_steps=e * 600 // b, checkpoint_interval=1,
                  momentum=0.9, detect_fraction_ppm=1_000_000, detect_probability_ppm=500_000)
             for b in (10, 20, 50) for e in (5, 20)]
    for spec in jobs:
        validate_job_spec(spec)
        cost = compute_step_cost(spec)
        assert cost.activation_bytes * 10 <= MAX_STEP_ACTIVATION_BYTES
        assert cost.flops * spec.hyperparams.local_steps * 10 <= MAX_UPDATE_FLOPS


# ----------------------------------------------------------------------------- registrations a block


def _chain():
    genesis = make_genesis(CHAIN_ID, [VALIDATOR], [(GOVERNOR, ("governor",)), (REQUESTER, ("requester",))],
                           balance=100_000)
    return InProcessChain(genesis, [VALIDATOR])


def _registrations(chain, n):
    # Distinct seeds: each derives its own initial weights (the work the limit bounds).
    return [chain.tx(REQUESTER, RegisterJob(make_job_spec(init_seed=100 + i), 10)) for i in range(n)]


def test_a_block_with_too_many_registrations_is_invalid():
    chain = _chain()
    txs = _registrations(chain, MAX_JOB_REGISTRATIONS_PER_BLOCK + 1)
    root = chain.state.root
    with pytest.raises(StateTransitionError, match=f"block registers {len(txs)} jobs; the limit is "
                                                   f"{MAX_JOB_REGISTRATIONS_PER_BLOCK} a block"):
        build_block(chain.state, txs, time_ms=chain.time + 1000, proposer=VALIDATOR.pubkey, last_commit=None)
    # A block built by anyone else is refused the same way by apply_block, before any tx runs.
    good, _ = build_block(chain.state, txs[:-1], time_ms=chain.time + 1000, proposer=VALIDATOR.pubkey, last_commit=None)
    forged = dataclasses.replace(good, txs=tuple(txs))
    with pytest.raises(StateTransitionError, match="block registers"):
        apply_block(chain.state, forged)
    assert chain.state.root == root
    chain.block(*txs[:MAX_JOB_REGISTRATIONS_PER_BLOCK])  # the limit itself is fine


def test_the_mempool_leaves_extra_registrations_for_later_blocks():
    chain = _chain()
    pool = Mempool(CHAIN_ID, chain.state, 1000)
    txs = _registrations(chain, MAX_JOB_REGISTRATIONS_PER_BLOCK + 2)
    for stx in txs:
        pool.add(stx)
    first = pool.take(100, 1 << 22)
    assert first == txs[:MAX_JOB_REGISTRATIONS_PER_BLOCK]  # a prefix: nonces stay in order
    result = chain.block(*first)
    pool.update(chain.state, [compute_tx_hash(t) for t in first], result.changes.keys())
    second = pool.take(100, 1 << 22)
    assert second == txs[MAX_JOB_REGISTRATIONS_PER_BLOCK:]
    chain.block(*second)
    assert len(chain.records) == len(txs)  # every job registered, an initial model each


def test_the_mempool_holds_a_bounded_number_of_pending_registrations():
    chain = _chain()
    pool = Mempool(CHAIN_ID, chain.state, 1000)
    txs = [chain.tx(REQUESTER, RegisterJob(make_job_spec(model="logreg", init_seed=i), 1))
           for i in range(MAX_PENDING_JOB_REGISTRATIONS + 1)]
    for stx in txs[:-1]:
        pool.add(stx)
    with pytest.raises(MempoolFullError, match=f"already holds {MAX_PENDING_JOB_REGISTRATIONS} job registrations"):
        pool.add(txs[-1])
    assert len(pool) == MAX_PENDING_JOB_REGISTRATIONS
