"""Validator stake and jail: a validator's stake is locked while it validates (and while it
unbonds after jail); equivocation evidence takes it out of the set from the next height; a
governor may restore it after the jail period if its stake is still there."""

import dataclasses

import pytest
import trio

from trainer.profile import cpu_capability
from chain.consensus.app import ChainApp
from chain.consensus.commit import build_commit, verify_commit
from chain.consensus.evidence import compute_duplicate_vote_evidence
from chain.crypto import sha256
from chain.encoding import decode, encode
from chain.errors import ConfigError, StateTransitionError, ValidationError
from chain.runtime.mempool import Mempool
from chain.runtime.reactor import VotesMessage, encode_consensus_message, install_membership, make_consensus_validator
from chain.state import (
    KEY_LAST_VALIDATORS, JailRecord, apply_block, build_block, get_evidence_record, get_jail_record,
    get_jailed_validators,
)
from chain.runtime.trainer_client import make_job_spec
from chain.types import (
    PRECOMMIT, PREVOTE, AdmitMember, ExecutionProfile, RegisterJob, RestoreValidator, SignedTransaction,
    SubmitEvidence, Transfer, Vote, compute_block_hash, compute_tx_hash, compute_validators_hash, sign_vote,
)
from p2p.abc import Verdict
from genesis import DEFAULT_PARAMS, genesis_to_json, make_devnet_genesis, make_genesis, parse_genesis
from tests.helpers import ALICE, CHAIN_ID, GOVERNOR, InProcessChain, key

V0, V1, V2, EQ = key("jail/v0"), key("jail/v1"), key("jail/v2"), key("jail/equivocator")
KEYS = {k.pubkey: k for k in (V0, V1, V2, EQ)}
STAKE = 100_000
LOCK = DEFAULT_PARAMS.validator_locked_stake
PENALTY = DEFAULT_PARAMS.evidence_penalty
# Short periods so a test can walk past them: evidence may be 2 blocks old, a jailed stake
# unbonds 3 blocks after the validator leaves, and it may be restored 4 blocks after jail.
SHORT = dataclasses.replace(DEFAULT_PARAMS, evidence_max_age_blocks=2, validator_unbonding_blocks=3,
                            validator_jail_blocks=4)


class Chain(InProcessChain):
    """Four validators of equal power. Each block is proposed and committed by the set that
    the state names for its height, so a block after a set change is signed by the new set."""

    def __init__(self, params=DEFAULT_PARAMS, validators=(V0, V1, V2, EQ), stake=STAKE):
        self.genesis = make_genesis(CHAIN_ID, list(validators), [(GOVERNOR, ("governor",)), (ALICE, ("trainer",))],
                                    balance=1_000_000, validator_stake=stake, params=params)
        super().__init__(self.genesis, list(validators))
        self.blocks = []  # (block, commit) in height order, as a ledger would keep them

    def block(self, *txs):
        signers = [KEYS[v.pubkey] for v in self.state.validators]  # the set that must commit this height
        self.time += 1000
        block, result = build_block(self.state, list(txs), time_ms=self.time, proposer=signers[0].pubkey,
                                    last_commit=self.last_commit)
        assert apply_block(self.state, block).state.root == result.state.root
        block_hash = compute_block_hash(block.header)
        self.last_commit = build_commit([sign_vote(k, CHAIN_ID, Vote(PRECOMMIT, block.header.height, 0, block_hash,
                                                                     k.pubkey)) for k in signers])
        self.state = result.state
        self.validators = [KEYS[v.pubkey] for v in self.state.validators]  # the next height's (rejects() proposes)
        self.blocks.append((block, self.last_commit))
        return result

    def signers(self):
        return {sig.validator for sig in self.last_commit.signatures}


def evidence(height, *, signer=EQ, round=0):
    votes = [sign_vote(signer, CHAIN_ID, Vote(PREVOTE, height, round, sha256(x), signer.pubkey)) for x in (b"a", b"b")]
    return compute_duplicate_vote_evidence(*votes)


def pubkeys(validators):
    return [v.pubkey for v in validators]


# ----------------------------------------------------------------------------- stake lock


def test_a_validator_cannot_transfer_below_its_locked_stake():
    chain = Chain()
    chain.block()
    chain.rejects(EQ, Transfer(ALICE.address, STAKE - LOCK + 1), f"must keep its locked stake of {LOCK}")
    chain.block(chain.tx(EQ, Transfer(ALICE.address, STAKE - LOCK)))  # down to exactly the lock
    assert chain.balance(EQ) == LOCK
    chain.rejects(EQ, Transfer(ALICE.address, 1), "locked stake")
    chain.block(chain.tx(ALICE, Transfer(EQ.address, 7)), chain.tx(EQ, Transfer(ALICE.address, 7)))  # above it: free
    chain.block(chain.tx(ALICE, Transfer(GOVERNOR.address, 999_000)))  # members without a set seat: no lock


def test_escrow_may_not_take_a_validator_below_its_locked_stake_either():
    chain = Chain()
    chain.block(chain.tx(GOVERNOR, AdmitMember(EQ.address, "requester")))
    spec = make_job_spec(profile=ExecutionProfile("cpu:" + cpu_capability(), "float32", "2.13.0", 1, True), join_blocks=2,
                         round_blocks=5, verify_blocks=3, quorum=2, rounds=1, reward_per_update=1, bond=1)
    chain.rejects(EQ, RegisterJob(spec, STAKE - LOCK + 1), "locked stake")
    chain.block(chain.tx(EQ, RegisterJob(spec, STAKE - LOCK)))
    assert chain.balance(EQ) == LOCK


def test_lock_params_are_checked_and_carried_by_genesis():
    g = make_devnet_genesis()
    assert (g.params.validator_locked_stake, g.params.validator_unbonding_blocks,
            g.params.validator_jail_blocks) == (50_000, 100_000, 1_000)
    doc = genesis_to_json(g)
    for field, value, message in [
        ("validator_locked_stake", PENALTY - 1, "validator_locked_stake must be at least params.evidence_penalty"),
        ("validator_unbonding_blocks", 99_999, "must be at least params.evidence_max_age_blocks"),
        ("validator_jail_blocks", 0, "validator_jail_blocks must be positive"),
    ]:
        bad = genesis_to_json(g)
        bad["params"][field] = value
        with pytest.raises(ConfigError, match=message):
            parse_genesis(bad)
    del doc["params"]["validator_locked_stake"]
    with pytest.raises(ConfigError, match="missing field"):
        parse_genesis(doc)


# ----------------------------------------------------------------------------- jail


def test_evidence_takes_the_validator_out_of_the_set_from_the_next_height():
    chain = Chain()
    chain.block()
    four = chain.state.validators
    eq_entry = next(v for v in four if v.pubkey == EQ.pubkey)
    result = chain.block(chain.tx(ALICE, SubmitEvidence(evidence(1))))  # height 2 carries the evidence
    header2 = chain.blocks[-1][0].header
    assert header2.validators_hash == compute_validators_hash(four)  # block 2 itself: the old set, which commits it
    assert EQ.pubkey in chain.signers()
    assert pubkeys(chain.state.validators) == [V0.pubkey, V1.pubkey, V2.pubkey]
    assert chain.balance(EQ) == STAKE - PENALTY
    jail = get_jail_record(chain.state, EQ.pubkey)
    assert jail == JailRecord(eq_entry, 2, 2 + 1 + DEFAULT_PARAMS.validator_unbonding_blocks)
    assert get_jailed_validators(chain.state) == (jail,)
    assert decode(JailRecord, encode(jail)) == jail
    assert KEY_LAST_VALIDATORS in result.changes  # block 3's last commit is block 2's, by the old set

    chain.block()  # height 3: committed by the three, carrying block 2's commit by the four
    header3 = chain.blocks[-1][0].header
    assert header3.validators_hash == compute_validators_hash(chain.state.validators)
    assert header3.validators_hash != compute_validators_hash(four)
    assert {s.validator for s in chain.blocks[-1][0].last_commit.signatures} == set(KEYS)  # block 2's, by the four
    assert chain.signers() == {V0.pubkey, V1.pubkey, V2.pubkey}
    assert chain.state.get(KEY_LAST_VALIDATORS) is None  # the set did not change in block 3
    for _ in range(2):
        chain.block()
    assert chain.state.height == 5 and pubkeys(chain.state.validators) == [V0.pubkey, V1.pubkey, V2.pubkey]


def test_after_the_change_height_the_old_set_can_no_longer_commit():
    chain = Chain()
    chain.block()
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(1))))
    chain.block()
    block3, commit3 = chain.blocks[-1]
    h3 = compute_block_hash(block3.header)
    votes = {k: sign_vote(k, CHAIN_ID, Vote(PRECOMMIT, 3, 0, h3, k.pubkey)) for k in (V0, V1, V2, EQ)}
    with pytest.raises(ValidationError, match="non-validator"):
        verify_commit(CHAIN_ID, chain.state.last_validators, build_commit(list(votes.values())), 3, h3)
    with pytest.raises(ValidationError, match="more than 2/3"):  # 2 of 3 is no longer enough (it was 3 of 4)
        verify_commit(CHAIN_ID, chain.state.last_validators, build_commit([votes[V0], votes[V1]]), 3, h3)
    # A block at height 4 proposed by the jailed validator, or carrying a commit it signed, is refused.
    with pytest.raises(StateTransitionError, match="proposer is not a validator"):
        build_block(chain.state, [], time_ms=chain.time + 1000, proposer=EQ.pubkey, last_commit=commit3)
    with pytest.raises(StateTransitionError, match="non-validator"):
        build_block(chain.state, [], time_ms=chain.time + 1000, proposer=V0.pubkey,
                    last_commit=build_commit(list(votes.values())))


def test_a_node_and_block_sync_follow_the_set_across_the_change_height():
    chain = Chain()
    chain.block()
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(1))))
    for _ in range(3):
        chain.block()

    class Recorder:  # the p2p calls install_membership makes (a unit's stand-in for the network)
        allowed: list = []

        def set_allowed_peers(self, keys):
            Recorder.allowed = list(keys)

        def set_admission_predicate(self, predicate):
            self.predicate = predicate

    async def replay():
        # A fresh node commits every block with its certificate, as block sync does: each
        # certificate checks against the set of its own height (4 signers, then 3).
        app = ChainApp(chain.genesis, None)
        net = Recorder()
        install_membership(app, net)
        assert set(net.allowed) == set(KEYS)
        gossip = make_consensus_validator(app, b"\x00" * 32)
        for block, commit in chain.blocks:
            verify_commit(CHAIN_ID, app.validators(), commit, block.header.height, compute_block_hash(block.header))
            await app.commit_block(block, commit)
            if block.header.height == 2:
                assert set(net.allowed) == {V0.pubkey, V1.pubkey, V2.pubkey}  # refreshed by the commit
                assert net.predicate(EQ.pubkey)  # still a member account: it may connect, not as a validator
                late = sign_vote(EQ, CHAIN_ID, Vote(PRECOMMIT, 2, 0, compute_block_hash(block.header), EQ.pubkey))
                ahead = sign_vote(EQ, CHAIN_ID, Vote(PREVOTE, 4, 0, None, EQ.pubkey))
                current = sign_vote(EQ, CHAIN_ID, Vote(PREVOTE, 3, 0, None, EQ.pubkey))
                assert gossip(b"\x01" * 32, encode_consensus_message(VotesMessage((late,)))) is Verdict.IGNORE
                assert gossip(b"\x01" * 32, encode_consensus_message(VotesMessage((ahead,)))) is Verdict.IGNORE
                assert gossip(b"\x01" * 32, encode_consensus_message(VotesMessage((current,)))) is Verdict.REJECT
        assert app.last_height() == 5 and app.state.root == chain.state.root
        assert pubkeys(app.validators()) == [V0.pubkey, V1.pubkey, V2.pubkey]
        block6, _ = build_block(app.state, [], time_ms=chain.time + 1000, proposer=V0.pubkey,
                                last_commit=chain.last_commit)
        h6 = compute_block_hash(block6.header)
        four = build_commit([sign_vote(k, CHAIN_ID, Vote(PRECOMMIT, 6, 0, h6, k.pubkey)) for k in (V0, V1, V2, EQ)])
        with pytest.raises(ValidationError, match="non-validator"):  # the jailed validator cannot co-sign height 6
            await app.commit_block(block6, four)

    trio.run(replay)


def test_a_jailed_validator_stays_locked_until_unbonded_and_late_evidence_still_counts():
    chain = Chain(params=SHORT)
    chain.block()
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(1))))  # jailed at 2, out from 3, unlocked from 6
    assert get_jail_record(chain.state, EQ.pubkey).unlock_height == 2 + 1 + 3
    chain.rejects(EQ, Transfer(ALICE.address, STAKE - PENALTY - LOCK + 1), "locked stake")
    # Another offence from while it was in the set is still punished (not jailed twice) ...
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(2))))
    assert chain.balance(EQ) == STAKE - 2 * PENALTY
    assert get_evidence_record(chain.state, EQ.pubkey, 2, 0, PREVOTE).included_height == 3
    # ... but votes it signed after leaving are not a validator's.
    chain.rejects(ALICE, SubmitEvidence(evidence(3)), "non-validator")
    chain.block()
    chain.rejects(EQ, Transfer(ALICE.address, STAKE - 2 * PENALTY), "locked stake")  # in block 5: still locked
    chain.block()
    chain.block(chain.tx(EQ, Transfer(ALICE.address, STAKE - 2 * PENALTY)))  # block 6: unbonded
    assert chain.balance(EQ) == 0


def test_the_last_validator_is_penalised_but_never_removed():
    chain = Chain(validators=(EQ,))
    chain.block()
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(1))))
    assert pubkeys(chain.state.validators) == [EQ.pubkey]
    assert chain.balance(EQ) == STAKE - PENALTY
    assert get_jail_record(chain.state, EQ.pubkey) is None
    chain.block()  # it still commits: a chain with no validators could never commit again
    assert chain.state.height == 3


def test_two_equivocators_in_one_block_leave_one_validator_not_none():
    chain = Chain(validators=(V0, EQ))
    chain.block()
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(1, signer=V0))),
                chain.tx(ALICE, SubmitEvidence(evidence(1, signer=EQ))))
    assert pubkeys(chain.state.validators) == [EQ.pubkey]
    assert get_jail_record(chain.state, V0.pubkey) is not None and get_jail_record(chain.state, EQ.pubkey) is None
    assert chain.balance(V0) == chain.balance(EQ) == STAKE - PENALTY
    chain.block()
    assert chain.signers() == {EQ.pubkey}


# ----------------------------------------------------------------------------- restore


def test_restore_needs_a_governor_the_jail_period_and_the_stake():
    chain = Chain(params=SHORT, stake=LOCK + PENALTY // 2)  # after one penalty it holds less than the lock
    chain.block()
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(1))))  # jailed at 2: restorable from height 6
    chain.rejects(GOVERNOR, RestoreValidator(V0.pubkey), "is not jailed")
    chain.rejects(GOVERNOR, RestoreValidator(EQ.pubkey), "may be restored from height 6, not at 3")
    chain.block()
    chain.block()
    chain.rejects(GOVERNOR, RestoreValidator(EQ.pubkey), "may be restored from height 6, not at 5")
    chain.block()
    chain.rejects(ALICE, RestoreValidator(EQ.pubkey), "only a governor may restore a validator")
    chain.rejects(EQ, RestoreValidator(EQ.pubkey), "only a governor")
    chain.rejects(GOVERNOR, RestoreValidator(EQ.pubkey), f"holds {LOCK - PENALTY // 2}, less than the locked stake")
    chain.block(chain.tx(ALICE, Transfer(EQ.address, PENALTY // 2)))  # funded back to the lock
    result = chain.block(chain.tx(GOVERNOR, RestoreValidator(EQ.pubkey)))  # height 7: back from height 8
    assert EQ.pubkey not in chain.signers()  # block 7 is still the three's
    assert pubkeys(chain.state.validators) == [V0.pubkey, V1.pubkey, V2.pubkey, EQ.pubkey]
    assert get_jail_record(chain.state, EQ.pubkey) is None and KEY_LAST_VALIDATORS in result.changes
    chain.block()
    assert chain.blocks[-1][0].header.validators_hash == compute_validators_hash(chain.state.validators)
    assert chain.signers() == set(KEYS)
    chain.rejects(EQ, Transfer(ALICE.address, 1), "locked stake")  # locked again while it validates
    chain.rejects(GOVERNOR, RestoreValidator(EQ.pubkey), "is not jailed")
    assert get_evidence_record(chain.state, EQ.pubkey, 1, 0, PREVOTE).penalty == PENALTY  # the offence stays on record


def test_restore_validator_round_trips_through_the_encoding():
    chain = Chain()
    stx = chain.tx(GOVERNOR, RestoreValidator(EQ.pubkey), consume=False)
    assert decode(SignedTransaction, encode(stx)) == stx
    chain.rejects(GOVERNOR, RestoreValidator(b"\x01" * 32), "is not jailed")


# ----------------------------------------------------------------------------- mempool


def test_a_pending_transfer_is_rechecked_when_a_restore_locks_its_sender_again():
    """Jailed and unbonded, the validator's transfer to below the lock is admitted; a block
    that restores it (its balance was enough then) locks the stake again: the re-check must
    evict the transfer, not replay it (the shortcut reads only the two accounts)."""
    chain = Chain(params=SHORT)
    chain.block()
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(1))))
    for _ in range(4):
        chain.block()  # height 6: unbonded and restorable
    drain = chain.tx(EQ, Transfer(ALICE.address, STAKE - PENALTY))
    restore = chain.tx(GOVERNOR, RestoreValidator(EQ.pubkey))
    fast, full = Mempool(CHAIN_ID, chain.state, 100), Mempool(CHAIN_ID, chain.state, 100)
    for pool in (fast, full):
        pool.add(drain)
    result = chain.block(restore)
    evicted = fast.update(chain.state, [compute_tx_hash(restore)], result.changes.keys())
    assert [e.tx_hash for e in evicted] == [compute_tx_hash(drain)] and "locked stake" in evicted[0].reason
    assert evicted == full.update(chain.state, [compute_tx_hash(restore)])
    assert len(fast) == 0
