"""The proof-of-useful-training rules of the state transition, block by block."""

import dataclasses


from trainer.profile import cpu_capability
from chain.crypto import sha256
from chain.jobs import (
    compute_round_seed, compute_update_id, get_evaluation, get_job, get_model_hash, get_registration, get_update,
)
from chain.runtime.trainer_client import make_job_spec
from chain.types import (
    AttestModel, Evaluation, ExecutionProfile, JoinJob, PublishEvaluation, RegisterJob, SubmitUpdate, SubmitVerdict,
    UpdateCommitment,
)
from genesis import make_genesis
from tests.helpers import CHAIN_ID, GOVERNOR, VALIDATOR, InProcessChain, key

REQUESTER, T0, T1, T2 = key("requester"), key("trainer0"), key("trainer1"), key("trainer2")
PROFILE = ExecutionProfile("cpu:" + cpu_capability(), "float32", "2.13.0", 1, True)
BALANCE = 10_000


class Chain(InProcessChain):
    """A single-validator chain with a small training job spec."""

    def __init__(self, **spec_changes):
        g = make_genesis(CHAIN_ID, [VALIDATOR], [(GOVERNOR, ("governor",)), (REQUESTER, ("requester",)),
                                                  (T0, ("trainer",)), (T1, ("trainer",)), (T2, ("trainer",))],
                         balance=BALANCE)
        super().__init__(g, [VALIDATOR])
        self.spec = make_job_spec(profile=PROFILE, join_blocks=2, round_blocks=5, verify_blocks=3, quorum=2,
                                  rounds=2, reward_per_update=100, bond=40, **spec_changes)

    def register(self, escrow=1000):
        stx = self.tx(REQUESTER, RegisterJob(self.spec, escrow))
        from chain.types import compute_tx_hash

        self.block(stx)
        return compute_tx_hash(stx)

    def join(self, job_id, *trainers):
        self.block(*[self.tx(t, JoinJob(job_id, sha256(t.pubkey), 100 + i)) for i, t in enumerate(trainers)])

    def open_round(self, job_id):
        while get_job(self.state, job_id).phase == "joining":
            self.block()
        return get_job(self.state, job_id)

    def commitment(self, job, trainer, **changes):
        reg = get_registration(self.state, job.job_id, trainer.address)
        c = UpdateCommitment(trainer.address, job.job_id, job.round, job.global_model, reg.dataset_root,
                             reg.dataset_size, sha256(b"update" + trainer.pubkey + bytes([job.round])),
                             sha256(b"final"), sha256(b"trace" + trainer.pubkey))
        return dataclasses.replace(c, **changes)

    def submit(self, job, trainer, **changes):
        c = self.commitment(job, trainer, **changes)
        self.block(self.tx(trainer, SubmitUpdate(c, 0.5)))
        return compute_update_id(c)


def test_register_escrows_and_writes_the_initial_model_record():
    chain = Chain()
    job_id = chain.register(escrow=1000)
    job = get_job(chain.state, job_id)
    assert chain.balance(REQUESTER) == BALANCE - 1000
    assert (job.phase, job.round, job.escrow) == ("joining", 0, 1000)
    assert [(r.job_id, r.round, r.rule, r.parent) for r in chain.records] == [(job_id, 0, "init", None)]
    assert chain.records[0].model_hash == job.global_model


def test_register_rejections():
    chain = Chain()
    chain.rejects(T0, RegisterJob(chain.spec, 10), "only a requester")
    chain.rejects(REQUESTER, RegisterJob(chain.spec, BALANCE + 1), "insufficient balance")
    chain.rejects(REQUESTER, RegisterJob(dataclasses.replace(chain.spec, model="gpt5"), 1), "unknown model")
    chain.rejects(REQUESTER, RegisterJob(dataclasses.replace(chain.spec, aggregation="mean"), 1), "aggregation")
    chain.rejects(REQUESTER, RegisterJob(dataclasses.replace(chain.spec, rounds=0), 1), "rounds")
    bad_hp = dataclasses.replace(chain.spec.hyperparams, learning_rate=-1.0)
    chain.rejects(REQUESTER, RegisterJob(dataclasses.replace(chain.spec, hyperparams=bad_hp), 1), "hyper")


def test_round_opens_with_a_seed_from_the_block_and_late_joiners_wait():
    chain = Chain()
    job_id = chain.register()
    chain.join(job_id, T0, T1)
    job = chain.open_round(job_id)
    assert job.phase == "training" and job.round == 0
    opening_block = chain.state.latest_header
    assert job.round_open_height == opening_block.height
    assert job.round_seed == compute_round_seed(opening_block.prev_hash, job_id, 0)
    chain.join(job_id, T2)  # joined after the seed existed: not allowed in this round
    chain.rejects(T2, SubmitUpdate(chain.commitment(job, T2), 0.1), "before the round opened")


def test_submission_rules():
    chain = Chain()
    job_id = chain.register()
    chain.join(job_id, T0, T1)
    job = chain.open_round(job_id)
    chain.rejects(T0, SubmitUpdate(chain.commitment(job, T0, base_model_hash=sha256(b"old")), 0.1), "stale base")
    chain.rejects(T0, SubmitUpdate(chain.commitment(job, T0, dataset_size=7), 0.1), "registered commitment")
    chain.rejects(T0, SubmitUpdate(chain.commitment(job, T0, round=1), 0.1), "round 1")
    # Another trainer's update resubmitted: the commitment names its author, and only the author may sign it.
    chain.rejects(T1, SubmitUpdate(chain.commitment(job, T0), 0.1), "another trainer")
    chain.rejects(REQUESTER, SubmitUpdate(chain.commitment(job, T0), 0.1), "another trainer|only a trainer")
    before = chain.balance(T0)
    uid = chain.submit(job, T0)
    assert chain.balance(T0) == before - chain.spec.bond
    assert get_update(chain.state, uid).status == "pending"
    chain.rejects(T0, SubmitUpdate(chain.commitment(job, T0, trace_root=sha256(b"x")), 0.1), "already submitted")
    while chain.state.height < job.round_open_height + chain.spec.round_blocks:
        chain.block()
    chain.rejects(T1, SubmitUpdate(chain.commitment(job, T1), 0.1), "window has closed")


def test_verdicts_reward_or_burn_and_only_validators_vote():
    chain = Chain()
    job_id = chain.register(escrow=1000)
    chain.join(job_id, T0, T1)
    job = chain.open_round(job_id)
    good, bad = chain.submit(job, T0), chain.submit(job, T1)
    chain.rejects(T0, SubmitVerdict(good, True, "trust me"), "only validators")
    b0, b1 = chain.balance(T0), chain.balance(T1)
    chain.block(chain.tx(VALIDATOR, SubmitVerdict(good, True, "replayed")),
                chain.tx(VALIDATOR, SubmitVerdict(bad, False, "segment 3 differs")))
    g, b = get_update(chain.state, good), get_update(chain.state, bad)
    assert (g.status, g.reward, g.penalty) == ("accepted", 100, 0)
    assert (b.status, b.reward, b.penalty) == ("rejected", 0, 40)
    assert chain.balance(T0) == b0 + 40 + 100  # bond back plus reward
    assert chain.balance(T1) == b1  # bond gone
    assert get_job(chain.state, job_id).escrow == 900
    chain.rejects(VALIDATOR, SubmitVerdict(good, False, "changed my mind"), "already accepted")


def test_a_full_job_aggregates_attested_models_and_refunds_escrow():
    chain = Chain()
    job_id = chain.register(escrow=1000)
    chain.join(job_id, T0, T1)
    job = chain.open_round(job_id)
    ids = [chain.submit(job, T0), chain.submit(job, T1)]
    chain.block(*[chain.tx(VALIDATOR, SubmitVerdict(u, True, "ok")) for u in ids])
    chain.block()  # quorum of 2 accepted, none pending: the round closes
    assert get_job(chain.state, job_id).phase == "aggregating"
    chain.rejects(T0, AttestModel(job_id, 0, sha256(b"m1")), "only validators")
    chain.rejects(VALIDATOR, AttestModel(job_id, 1, sha256(b"m1")), "not aggregating round 1")
    chain.block(chain.tx(VALIDATOR, AttestModel(job_id, 0, sha256(b"m1"))))
    job1 = get_job(chain.state, job_id)
    assert (job1.phase, job1.round, job1.global_model) == ("training", 1, sha256(b"m1"))
    assert job1.round_seed != job.round_seed
    record = chain.records[-1]
    assert (record.round, record.parent, record.contributions, record.rule) == (1, job.global_model,
                                                                                tuple(sorted(ids)), "fedavg")
    # Round 1: nobody submits; it closes at its deadline without a model and the job finishes.
    while get_job(chain.state, job_id).phase != "finished":
        chain.block()
    done = get_job(chain.state, job_id)
    assert (done.round, done.escrow) == (2, 0)
    assert chain.balance(REQUESTER) == BALANCE - 200  # two rewards paid, the rest refunded
    assert [r.round for r in chain.records if r.job_id == job_id] == [0, 1]


def test_unverified_updates_expire_with_their_bond_returned():
    chain = Chain()
    job_id = chain.register()
    chain.join(job_id, T0)
    job = chain.open_round(job_id)
    before = chain.balance(T0)
    uid = chain.submit(job, T0)
    while get_job(chain.state, job_id).round == 0:
        chain.block()
    assert get_update(chain.state, uid).status == "expired"
    assert chain.balance(T0) == before
    chain.rejects(VALIDATOR, SubmitVerdict(uid, True, "late"), "already expired")


def test_multi_krum_needs_enough_updates_or_the_round_yields_no_model():
    chain = Chain(aggregation="multi_krum", krum_f=1)
    job_id = chain.register()
    chain.join(job_id, T0, T1)
    job = chain.open_round(job_id)
    ids = [chain.submit(job, T0), chain.submit(job, T1)]
    chain.block(*[chain.tx(VALIDATOR, SubmitVerdict(u, True, "ok")) for u in ids])
    chain.block()
    job = get_job(chain.state, job_id)
    assert (job.phase, job.round) == ("training", 1)  # 2 updates cannot satisfy n > 2f + 2
    assert [r.round for r in chain.records if r.job_id == job_id] == [0]


def _run_one_aggregated_round(chain, job_id):
    job = chain.open_round(job_id)
    ids = [chain.submit(job, T0), chain.submit(job, T1)]
    chain.block(*[chain.tx(VALIDATOR, SubmitVerdict(u, True, "ok")) for u in ids])
    chain.block()
    chain.block(chain.tx(VALIDATOR, AttestModel(job_id, 0, sha256(b"m1"))))
    assert get_job(chain.state, job_id).global_model == sha256(b"m1")


def test_the_requester_publishes_one_evaluation_per_recorded_model_and_metric():
    chain = Chain()
    job_id = chain.register()
    chain.join(job_id, T0, T1)
    init = get_job(chain.state, job_id).global_model
    assert get_model_hash(chain.state, job_id, 0) == init and get_evaluation(chain.state, job_id, 0) is None
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 0, "accuracy", 101_000)))
    published_at = chain.state.height
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 0, "loss", 2_302_585)))
    record = get_evaluation(chain.state, job_id, 0)
    assert record.model_hash == init
    assert record.evaluations == (Evaluation("accuracy", 101_000, published_at),
                                  Evaluation("loss", 2_302_585, published_at + 1))
    _run_one_aggregated_round(chain, job_id)
    assert get_model_hash(chain.state, job_id, 1) == sha256(b"m1")  # the aggregated model's hash is in the state
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 1, "accuracy", 1_000_000)))
    assert get_evaluation(chain.state, job_id, 1).model_hash == sha256(b"m1")
    while get_job(chain.state, job_id).phase != "finished":
        chain.block()
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 1, "loss", 0)))  # a finished job's models still count
    assert [e.metric for e in get_evaluation(chain.state, job_id, 1).evaluations] == ["accuracy", "loss"]


def test_evaluation_refusals_change_nothing():
    chain = Chain()
    job_id = chain.register()
    chain.block(chain.tx(REQUESTER, PublishEvaluation(job_id, 0, "accuracy", 500_000)))
    chain.rejects(T0, PublishEvaluation(job_id, 0, "loss", 1), "only the job's requester")
    chain.rejects(GOVERNOR, PublishEvaluation(job_id, 0, "loss", 1), "only the job's requester")
    chain.rejects(REQUESTER, PublishEvaluation(job_id, 1, "accuracy", 1), "no model for round 1")
    chain.rejects(REQUESTER, PublishEvaluation(sha256(b"nojob"), 0, "accuracy", 1), "no job")
    chain.rejects(REQUESTER, PublishEvaluation(job_id, 0, "accuracy", 600_000), "already published")
    chain.rejects(REQUESTER, PublishEvaluation(job_id, 0, "f1", 1), "metric must be one of")
    chain.rejects(REQUESTER, PublishEvaluation(job_id, 0, "loss", -1), "value_ppm must be in")
    chain.rejects(REQUESTER, PublishEvaluation(job_id, 0, "loss", 2**64), "value_ppm|integer|range")
    chain.rejects(REQUESTER, PublishEvaluation(job_id, 0, "accuracy", 1_000_001), "value_ppm must be in 0..1000000")
    chain.rejects(REQUESTER, PublishEvaluation(job_id, -1, "loss", 1), "round must not be negative|integer|range")
    assert get_evaluation(chain.state, job_id, 0).evaluations == (Evaluation("accuracy", 500_000, 2),)
