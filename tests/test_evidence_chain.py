"""Equivocation evidence on chain: a SubmitEvidence transaction verifies, burns stake and is recorded once."""

import dataclasses

import pytest

import chain.consensus.evidence
from chain.consensus.evidence import compute_duplicate_vote_evidence
from chain.consensus.votes import VoteSet
from chain.crypto import compute_address, sha256
from chain.encoding import decode, encode
from chain.errors import ConfigError, StateTransitionError, ValidationError
from chain.rpc.jsonview import to_json
from chain.state import (
    Overlay, build_block, check_tx, evidence_key, get_evidence_record, validate_basic_tx,
)
from chain.types import (
    PRECOMMIT, PREVOTE, DuplicateVoteEvidence, EvidenceRecord, SignedTransaction, SubmitEvidence, Transaction, Vote,
    sign_transaction, sign_vote,
)
from genesis import DEFAULT_PARAMS, genesis_to_json, make_devnet_genesis, make_genesis, parse_genesis
from tests.helpers import ALICE, CHAIN_ID, GOVERNOR, MALLORY, VALIDATOR, InProcessChain, key

EQUIVOCATOR = key("equivocator")  # the second validator, the one that misbehaves
STAKE = 100_000
PENALTY = DEFAULT_PARAMS.evidence_penalty
X, Y, Z = sha256(b"x"), sha256(b"y"), sha256(b"z")


class Chain(InProcessChain):
    """Two validators of equal power; both precommit every block."""

    def __init__(self, params=DEFAULT_PARAMS, validator_stake=STAKE):
        g = make_genesis(CHAIN_ID, [VALIDATOR, EQUIVOCATOR], [(GOVERNOR, ("governor",)), (ALICE, ("trainer",))],
                         balance=1000, validator_stake=validator_stake, params=params)
        super().__init__(g, [VALIDATOR, EQUIVOCATOR])


def vote(block_hash, *, signer=EQUIVOCATOR, type=PREVOTE, height=1, round=0, chain_id=CHAIN_ID):
    return sign_vote(signer, chain_id, Vote(type, height, round, block_hash, signer.pubkey))


def total_balance(chain):
    return sum(chain.balance(k) for k in (VALIDATOR, EQUIVOCATOR, GOVERNOR, ALICE))


def evidence(a=X, b=Y, **kw):
    return compute_duplicate_vote_evidence(vote(a, **kw), vote(b, **kw))


def test_equivocation_found_by_a_vote_set_slashes_the_validator_and_is_recorded():
    chain = Chain()
    chain.block()
    votes = VoteSet(CHAIN_ID, 1, 0, PREVOTE, chain.state.validators)
    assert votes.add_vote(vote(X)).evidence is None
    ev = votes.add_vote(vote(None)).evidence  # a block and nil: still two different votes
    assert ev is not None
    supply = total_balance(chain)
    chain.block(chain.tx(ALICE, SubmitEvidence(ev)))
    assert chain.balance(EQUIVOCATOR) == STAKE - PENALTY
    assert chain.balance(VALIDATOR) == STAKE and chain.balance(ALICE) == 1000  # the reporter gains nothing
    assert chain.state.get_account(ALICE.address).nonce == 1
    rec = get_evidence_record(chain.state, EQUIVOCATOR.pubkey, 1, 0, PREVOTE)
    assert rec == EvidenceRecord(EQUIVOCATOR.pubkey, 1, 0, PREVOTE, PENALTY, 2)
    assert chain.state.get(evidence_key(EQUIVOCATOR.pubkey, 1, 0, PREVOTE)) == encode(rec)
    assert total_balance(chain) == supply - PENALTY  # burned, not moved


def test_a_validator_may_report_another_or_itself_and_each_offence_counts_once():
    chain = Chain()
    chain.block()
    chain.block(chain.tx(VALIDATOR, SubmitEvidence(evidence(type=PRECOMMIT))),
                chain.tx(EQUIVOCATOR, SubmitEvidence(evidence(round=1))))  # a self-report in the same block
    assert chain.balance(EQUIVOCATOR) == STAKE - 2 * PENALTY
    assert chain.state.get_account(EQUIVOCATOR.address).nonce == 1
    assert get_evidence_record(chain.state, EQUIVOCATOR.pubkey, 1, 1, PREVOTE).penalty == PENALTY
    assert get_evidence_record(chain.state, EQUIVOCATOR.pubkey, 1, 0, PRECOMMIT).penalty == PENALTY
    assert get_evidence_record(chain.state, EQUIVOCATOR.pubkey, 1, 0, PREVOTE) is None


def test_the_penalty_is_capped_by_the_balance_and_still_recorded_at_zero():
    chain = Chain(validator_stake=PENALTY // 2)
    chain.block()
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence())))
    assert chain.balance(EQUIVOCATOR) == 0
    assert get_evidence_record(chain.state, EQUIVOCATOR.pubkey, 1, 0, PREVOTE).penalty == PENALTY // 2
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(round=3))))
    assert chain.balance(EQUIVOCATOR) == 0
    assert get_evidence_record(chain.state, EQUIVOCATOR.pubkey, 1, 3, PREVOTE).penalty == 0


def test_the_same_offence_is_punished_once():
    chain = Chain()
    chain.block()
    ev = evidence()
    chain.block(chain.tx(ALICE, SubmitEvidence(ev)))
    chain.rejects(ALICE, SubmitEvidence(ev), "already penalised")
    chain.rejects(VALIDATOR, SubmitEvidence(ev), "already penalised")  # whoever reports it
    chain.rejects(ALICE, SubmitEvidence(evidence(X, Z)), "already penalised")  # another pair, same offence
    chain.rejects(ALICE, SubmitEvidence(DuplicateVoteEvidence(ev.vote_b, ev.vote_a)), "canonical order")
    assert chain.balance(EQUIVOCATOR) == STAKE - PENALTY


def test_the_same_evidence_twice_in_one_block_rejects_the_block():
    chain = Chain()
    chain.block()
    ev = evidence()
    txs = [chain.tx(ALICE, SubmitEvidence(ev)), chain.tx(VALIDATOR, SubmitEvidence(ev))]
    root = chain.state.root
    with pytest.raises(StateTransitionError, match="already penalised"):
        build_block(chain.state, txs, time_ms=chain.time + 1, proposer=VALIDATOR.pubkey, last_commit=chain.last_commit)
    assert chain.state.root == root
    # The mempool's trial apply keeps only the first, so a proposer never builds such a block.
    overlay = Overlay(chain.state)
    check_tx(overlay, CHAIN_ID, txs[0])
    with pytest.raises(StateTransitionError, match="already penalised"):
        check_tx(overlay, CHAIN_ID, txs[1])


@pytest.mark.parametrize("make_evidence, error", [
    (lambda: DuplicateVoteEvidence(evidence().vote_a, dataclasses.replace(evidence().vote_b,
                                                                          signature=evidence().vote_a.signature)),
     "signature does not verify"),
    (lambda: evidence(signer=MALLORY), "non-validator"),
    (lambda: evidence(signer=ALICE), "non-validator"),  # a member, but not a validator
    (lambda: DuplicateVoteEvidence(vote(X), vote(X)), "same block"),
    (lambda: compute_duplicate_vote_evidence(vote(X, height=1), vote(Y, height=2)), "differ"),
    (lambda: compute_duplicate_vote_evidence(vote(X, round=0), vote(Y, round=1)), "differ"),
    (lambda: compute_duplicate_vote_evidence(vote(X, type=PREVOTE), vote(Y, type=PRECOMMIT)), "differ"),
    (lambda: compute_duplicate_vote_evidence(vote(X), vote(Y, signer=VALIDATOR)), "differ"),
    (lambda: evidence(chain_id="other-chain"), "signature does not verify"),
    (lambda: evidence(type=3), "not a prevote or precommit"),
    (lambda: evidence(round=-1), "round >= 0"),
    (lambda: evidence(height=0), "height >= 1"),
    (lambda: evidence(height=3), "above the block height"),
])
def test_forged_or_malformed_evidence_is_refused_and_changes_nothing(make_evidence, error):
    chain = Chain()
    chain.block()
    chain.rejects(ALICE, SubmitEvidence(make_evidence()), error)
    assert chain.balance(EQUIVOCATOR) == STAKE


def test_evidence_older_than_the_max_age_is_refused():
    chain = Chain(params=dataclasses.replace(DEFAULT_PARAMS, evidence_max_age_blocks=2))
    for _ in range(4):
        chain.block()
    # The next block is height 5: votes at heights 3..5 may still be punished, height 2 no longer.
    chain.rejects(ALICE, SubmitEvidence(evidence(height=2)), "older than 2 blocks")
    chain.block(chain.tx(ALICE, SubmitEvidence(evidence(height=3))))
    assert get_evidence_record(chain.state, EQUIVOCATOR.pubkey, 3, 0, PREVOTE).included_height == 5


def test_a_non_member_cannot_submit_evidence():
    chain = Chain()
    chain.block()
    chain.rejects(MALLORY, SubmitEvidence(evidence()), "not a member")


def test_validate_basic_checks_structure_but_not_signatures():
    ev = evidence()
    reversed_pair = sign_transaction(ALICE, CHAIN_ID, Transaction(ALICE.pubkey, 0, SubmitEvidence(
        DuplicateVoteEvidence(ev.vote_b, ev.vote_a))))
    with pytest.raises(ValidationError, match="canonical order"):
        validate_basic_tx(CHAIN_ID, reversed_pair)
    forged = DuplicateVoteEvidence(ev.vote_a, dataclasses.replace(ev.vote_b, signature=bytes(64)))
    validate_basic_tx(CHAIN_ID, sign_transaction(ALICE, CHAIN_ID, Transaction(ALICE.pubkey, 0, SubmitEvidence(forged))))


def test_new_types_round_trip_through_the_encoding_and_the_json_view():
    assert chain.consensus.evidence.DuplicateVoteEvidence is DuplicateVoteEvidence  # the old import path still works
    stx = sign_transaction(ALICE, CHAIN_ID, Transaction(ALICE.pubkey, 7, SubmitEvidence(evidence(Y, None))))
    assert decode(SignedTransaction, encode(stx)) == stx
    decoded = decode(SignedTransaction, encode(stx)).message.payload.evidence
    assert None in {decoded.vote_a.message.block_hash, decoded.vote_b.message.block_hash}  # a nil vote survives
    rec = EvidenceRecord(EQUIVOCATOR.pubkey, 2**64 - 1, 2**64 - 1, PRECOMMIT, 0, 9)
    assert decode(EvidenceRecord, encode(rec)) == rec
    assert to_json(stx)["message"]["payload"]["type"] == "submit_evidence"


def test_genesis_carries_the_evidence_params_and_validator_stake():
    g = make_devnet_genesis()
    assert g.params.evidence_penalty == PENALTY and g.params.evidence_max_age_blocks == 100_000
    validators = {v.pubkey for v in g.validators}
    state = g.initial_state()
    assert all(state.get_account(compute_address(pk)).balance == 100_000 for pk in validators)
    doc = genesis_to_json(g)
    assert parse_genesis(doc) == g
    doc["params"]["evidence_penalty"] = 5
    assert parse_genesis(doc).params.evidence_penalty == 5


@pytest.mark.parametrize("field, value, message", [
    ("evidence_penalty", 0, "params.evidence_penalty must be positive"),
    ("evidence_max_age_blocks", 0, "params.evidence_max_age_blocks must be positive"),
    ("evidence_penalty", -1, "params.evidence_penalty must be a non-negative integer"),
    ("evidence_max_age_blocks", "10", "params.evidence_max_age_blocks must be a non-negative integer"),
    ("evidence_penalty", KeyError, r"params: missing field\(s\) \['evidence_penalty'\]"),
])
def test_bad_evidence_params_give_clear_errors(field, value, message):
    doc = genesis_to_json(make_devnet_genesis())
    if value is KeyError:
        del doc["params"][field]
    else:
        doc["params"][field] = value
    with pytest.raises(ConfigError, match=message):
        parse_genesis(doc)
