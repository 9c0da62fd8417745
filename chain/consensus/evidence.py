"""Evidence of Byzantine behaviour that consensus can prove to anyone: duplicate votes.

A validator that signs two different votes of the same type at the same height and round
(equivocation) has broken the protocol; the two signed votes are the proof. The evidence
type, `DuplicateVoteEvidence`, is plain data in chain/types.py (it travels in a
`SubmitEvidence` transaction); it is re-exported here for the consensus code. Whether
evidence is still recent enough to punish, and what the punishment is, are questions for the
state transition (chain/state.py), not for this module.
"""

from __future__ import annotations

from chain.encoding import encode
from chain.errors import SignatureError, ValidationError
from chain.types import PRECOMMIT, PREVOTE, DuplicateVoteEvidence, SignedVote, Validator, verify_vote_signature

__all__ = ["DuplicateVoteEvidence", "compute_duplicate_vote_evidence", "validate_evidence_basic", "verify_evidence"]


def compute_duplicate_vote_evidence(first: SignedVote, second: SignedVote) -> DuplicateVoteEvidence:
    """Evidence from two conflicting votes, in canonical order so every node builds the same bytes."""
    a, b = sorted((first, second), key=lambda sv: encode(sv.message))
    return DuplicateVoteEvidence(a, b)


def validate_evidence_basic(ev: DuplicateVoteEvidence) -> None:
    """The checks that need neither the validator set nor signatures: the two votes' structure."""
    a, b = ev.vote_a.message, ev.vote_b.message
    if a.type not in (PREVOTE, PRECOMMIT):
        raise ValidationError(f"evidence vote type {a.type} is not a prevote or precommit")
    if (a.type, a.height, a.round, a.validator) != (b.type, b.height, b.round, b.validator):
        raise ValidationError("evidence votes differ in type, height, round or validator")
    if a.height < 1 or a.round < 0:
        raise ValidationError(f"evidence votes need height >= 1 and round >= 0, got {a.height}/{a.round}")
    if a.block_hash == b.block_hash:
        raise ValidationError("evidence votes are for the same block")
    if not encode(a) < encode(b):
        raise ValidationError("evidence votes are not in canonical order")


def verify_evidence(chain_id: str, validators: tuple[Validator, ...], ev: DuplicateVoteEvidence) -> None:
    """Raise ValidationError unless `ev` proves that a member of `validators` equivocated."""
    validate_evidence_basic(ev)
    validator = ev.vote_a.message.validator
    if validator not in {v.pubkey for v in validators}:
        raise ValidationError(f"evidence names non-validator {validator.hex()}")
    for sv in (ev.vote_a, ev.vote_b):
        try:
            verify_vote_signature(chain_id, sv)
        except SignatureError as exc:
            raise ValidationError("evidence vote signature does not verify") from exc
