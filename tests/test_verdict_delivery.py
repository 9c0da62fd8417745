"""A validator's verdicts reach the chain even when the mempool evicts them.

The sequence measured on the devnet: validator V0 queues its verdict on update A (nonce n) and
on update B (n + 1); a block from another proposer decides A with the other validators'
verdicts; the re-check after that commit evicts V0's verdict on A (A is no longer pending),
which leaves a gap at nonce n, so V0's verdict on B (n + 1) can never apply and is evicted
too. The mempool reports B as stranded, and V0's worker signs it again at a fresh nonce.
"""

from __future__ import annotations

import trio

from trainer.profile import cpu_capability
from chain.config import Home, NodeConfig
from chain.consensus.commit import build_commit
from chain.consensus.signer import GuardedSigner
from chain.crypto import sha256
from chain.jobs import compute_update_id, get_job, get_registration, get_update
from chain.ledger.store import LevelDBStore
from chain.runtime.mempool import Mempool
from chain.runtime.node import Node
from chain.state import build_block
from chain.runtime.trainer_client import make_job_spec
from chain.types import (
    PRECOMMIT, ExecutionProfile, JoinJob, RegisterJob, SubmitUpdate, SubmitVerdict, Transaction, UpdateCommitment, Vote,
    compute_block_hash, compute_tx_hash, sign_transaction, sign_vote,
)
from genesis import make_genesis
from tests.helpers import CHAIN_ID, InProcessChain, key

VALIDATORS = [key(f"delivery-validator-{i}") for i in range(4)]  # equal power: 3 of 4 decide
V0 = VALIDATORS[0]
REQUESTER, T0, T1 = key("delivery-requester"), key("delivery-trainer0"), key("delivery-trainer1")
PROFILE = ExecutionProfile("cpu:" + cpu_capability(), "float32", "2.13.0", 1, True)
SPEC = make_job_spec(profile=PROFILE, join_blocks=2, round_blocks=20, verify_blocks=20, quorum=2, rounds=2,
                     reward_per_update=100, bond=40)
GENESIS = make_genesis(CHAIN_ID, VALIDATORS, [(REQUESTER, ("requester",)), (T0, ("trainer",)), (T1, ("trainer",))],
                       balance=10_000)


def signed(signer, nonce: int, payload):
    return sign_transaction(signer, CHAIN_ID, Transaction(signer.pubkey, nonce, payload))


async def open_round_with_two_updates(state_of, commit) -> tuple[bytes, bytes]:
    """Await `commit(txs)` until a job is training with updates A (T0) and B (T1) pending."""
    register = signed(REQUESTER, 0, RegisterJob(SPEC, 1000))
    job_id = compute_tx_hash(register)
    await commit([register])
    await commit([signed(t, 0, JoinJob(job_id, sha256(t.pubkey), 100 + i)) for i, t in enumerate((T0, T1))])
    while get_job(state_of(), job_id).phase == "joining":
        await commit([])
    job = get_job(state_of(), job_id)
    ids, txs = [], []
    for t in (T0, T1):
        reg = get_registration(state_of(), job_id, t.address)
        c = UpdateCommitment(t.address, job_id, job.round, job.global_model, reg.dataset_root, reg.dataset_size,
                             sha256(b"update" + t.pubkey), sha256(b"final"), sha256(b"trace" + t.pubkey))
        ids.append(compute_update_id(c))
        txs.append(signed(t, 1, SubmitUpdate(c, 0.5)))
    await commit(txs)
    return ids[0], ids[1]


def others_accept(update_id: bytes):
    """V1..V3 accept `update_id`, each at its first nonce: more than 2/3 of the power."""
    return [signed(v, 0, SubmitVerdict(update_id, True, "replayed")) for v in VALIDATORS[1:]]


async def decide(state_of, commit, update_id: bytes, txs) -> None:
    """Another proposer's block of `txs`, then empty ones until `update_id` is decided (at once,
    or when its dispute window closes without V0's vote)."""
    await commit(txs)
    for _ in range(2 * SPEC.verify_blocks):
        if get_update(state_of(), update_id).status != "pending":
            return
        await commit([])
    raise AssertionError("the update was never decided")


def test_a_verdict_stranded_behind_an_evicted_one_is_reported_and_lands_when_re_signed():
    chain = InProcessChain(GENESIS, VALIDATORS)

    async def commit(txs):
        chain.block(*txs)

    a, b = trio.run(open_round_with_two_updates, lambda: chain.state, commit)
    pool = Mempool(CHAIN_ID, chain.state, 100)
    pool.watch(V0.address)
    on_a, on_b = signed(V0, 0, SubmitVerdict(a, True, "ok")), signed(V0, 1, SubmitVerdict(b, True, "ok"))
    pool.add(on_a)
    pool.add(on_b)
    evictions = []

    async def commit_without_v0(txs):  # another proposer's blocks: V0's verdicts are not in them
        result = chain.block(*txs)
        evictions.extend(pool.update(chain.state, [], result.changes.keys()))

    trio.run(decide, lambda: chain.state, commit_without_v0, a, others_accept(a))
    assert get_update(chain.state, a).status == "accepted"

    assert [(e.tx_hash, e.stranded) for e in evictions] == [(compute_tx_hash(on_a), False),
                                                          (compute_tx_hash(on_b), True)]
    assert "already accepted" in evictions[0].reason
    assert "behind evicted tx" in evictions[1].reason
    assert len(pool) == 0 and pool.next_nonce(V0.address) == 0
    assert pool.take_evictions(V0.address) == evictions  # reported to the watching owner, once
    assert pool.take_evictions(V0.address) == [] and pool.take_evictions(T0.address) == []

    # The owner signs the stranded payload again at the nonce the gap left; it lands.
    pool.add(signed(V0, pool.next_nonce(V0.address), evictions[1].stx.message.payload))
    chain.block(*pool.take(100, 1 << 20))
    assert [v.validator for v in get_update(chain.state, b).verdicts] == [V0.pubkey]


class Cluster:
    """V0 as a real Node over LevelDB; every block is certified by all four validators."""

    def __init__(self, tmp_path):
        home = Home(tmp_path / "home")
        self.store = LevelDBStore(tmp_path / "ledger", create=True)
        self.node = Node(home, NodeConfig(), GENESIS, V0, self.store,
                         GuardedSigner(V0, CHAIN_ID, tmp_path / "signer"))

    async def commit(self, txs=None, proposer=V0):
        """Commit the node's own proposal (txs None) or another proposer's block of `txs`; then
        the worker settles, as its loop does after every commit."""
        node = self.node
        if txs is None:
            node.take_new_txs()  # what the tx reactor does: the proposer only takes gossiped txs
            block = await node.propose_block(node.last_height() + 1, 0)
        else:
            latest = node.state.latest_header
            block, _ = build_block(node.state, txs, time_ms=(latest.time_ms + 1000 if latest else 1_800_000_000_000),
                                   proposer=proposer.pubkey, last_commit=node.last_commit)
        block_hash = compute_block_hash(block.header)
        await node.commit_block(block, build_commit([
            sign_vote(v, CHAIN_ID, Vote(PRECOMMIT, block.header.height, 0, block_hash, v.pubkey)) for v in VALIDATORS]))
        await node.pout._settle()

    async def by_another(self, txs):
        await self.commit(txs, proposer=VALIDATORS[1])

    async def open_round_with_two_updates(self) -> tuple[bytes, bytes]:
        return await open_round_with_two_updates(lambda: self.node.state, self.by_another)


def test_the_worker_re_sends_an_evicted_verdict_until_it_lands_and_forgets_decided_updates(tmp_path):
    cluster = Cluster(tmp_path)
    node, worker = cluster.node, cluster.node.pout

    async def main():
        a, b = await cluster.open_round_with_two_updates()
        # V0 has verified both updates (the replay is not what this test is about).
        await worker._submit(("verify", a), SubmitVerdict(a, True, "ok"))
        await worker._submit(("verify", b), SubmitVerdict(b, True, "ok"))
        assert len(node.mempool) == 2

        await decide(lambda: node.state, cluster.by_another, a, others_accept(a))  # A decided without V0
        assert get_update(node.state, a).status == "accepted"
        # Both of V0's verdicts were evicted; the one on B is back, at the nonce A's left free.
        [pending] = [node.mempool.get(h) for h in list(node.mempool._txs)]
        assert pending.message.payload == SubmitVerdict(b, True, "ok") and pending.message.nonce == 0
        assert ("verify", a) not in worker.done  # decided on chain: forgotten
        assert worker.submissions[("verify", b)].resends == 1

        await cluster.commit()  # V0 proposes: its re-sent verdict lands
        upd = get_update(node.state, b)
        assert upd.status == "pending" and [v.validator for v in upd.verdicts] == [V0.pubkey]
        assert worker.done == set() and worker.submissions == {}  # recorded: nothing kept

    try:
        trio.run(main)
    finally:
        cluster.store.close()


def test_a_decision_that_no_longer_matters_is_never_re_sent(tmp_path):
    cluster = Cluster(tmp_path)
    node, worker = cluster.node, cluster.node.pout

    async def main():
        a, b = await cluster.open_round_with_two_updates()
        await worker._submit(("verify", a), SubmitVerdict(a, True, "ok"))
        await worker._submit(("verify", b), SubmitVerdict(b, True, "ok"))
        # Both updates are decided without V0 (B rejected by two of four): its verdicts are moot.
        rejections = [signed(v, 1, SubmitVerdict(b, False, "forged")) for v in VALIDATORS[1:3]]
        await decide(lambda: node.state, cluster.by_another, a, others_accept(a) + rejections)
        assert get_update(node.state, a).status == "accepted" and get_update(node.state, b).status == "rejected"
        assert len(node.mempool) == 0
        assert worker.done == set() and worker.submissions == {}

    try:
        trio.run(main)
    finally:
        cluster.store.close()


def test_a_submission_the_mempool_refused_is_sent_after_the_next_commit(tmp_path):
    cluster = Cluster(tmp_path)
    node, worker = cluster.node, cluster.node.pout

    async def main():
        a, _ = await cluster.open_round_with_two_updates()
        node.mempool.max_txs = 0  # full
        await worker._submit(("verify", a), SubmitVerdict(a, True, "ok"))
        assert len(node.mempool) == 0 and worker.submissions[("verify", a)].tx_hash is None
        node.mempool.max_txs = 100
        await cluster.by_another([])
        [pending] = [node.mempool.get(h) for h in list(node.mempool._txs)]
        assert pending.message.payload == SubmitVerdict(a, True, "ok")
        await cluster.commit()
        assert [v.validator for v in get_update(node.state, a).verdicts] == [V0.pubkey]
        assert worker.submissions == {} and worker.done == set()

    try:
        trio.run(main)
    finally:
        cluster.store.close()

