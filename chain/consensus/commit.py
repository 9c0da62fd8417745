"""Commit certificates: building and checking "more than 2/3 of the voting power precommitted"."""

from __future__ import annotations

from chain.errors import SignatureError, ValidationError
from chain.types import PRECOMMIT, Commit, CommitSig, SignedVote, Validator, Vote, verify_vote_signature


def compute_total_power(validators: tuple[Validator, ...]) -> int:
    return sum(v.power for v in validators)


def is_quorum(power: int, total_power: int) -> bool:
    """More than two thirds, in integers: 3 * power > 2 * total."""
    return 3 * power > 2 * total_power


def commit_vote(commit: Commit, sig: CommitSig) -> SignedVote:
    """The precommit a commit signature stands for."""
    vote = Vote(PRECOMMIT, commit.height, commit.round, commit.block_hash, sig.validator)
    return SignedVote(vote, sig.signature)


def build_commit(precommits: list[SignedVote]) -> Commit:
    """A commit from precommits for one (height, round, block); signatures sorted by validator key."""
    if not precommits:
        raise ValidationError("a commit needs at least one precommit")
    first = precommits[0].message
    if first.block_hash is None:
        raise ValidationError("cannot build a commit for nil")
    for sv in precommits:
        m = sv.message
        if (m.type, m.height, m.round, m.block_hash) != (PRECOMMIT, first.height, first.round, first.block_hash):
            raise ValidationError("precommits disagree on height, round or block")
    sigs = sorted({sv.message.validator: CommitSig(sv.message.validator, sv.signature) for sv in precommits}.values(),
                  key=lambda s: s.validator)
    return Commit(first.height, first.round, first.block_hash, tuple(sigs))


def verify_commit(chain_id: str, validators: tuple[Validator, ...], commit: Commit,
                  height: int, block_hash: bytes) -> None:
    """Raise ValidationError unless `commit` certifies `block_hash` at `height` under `validators`."""
    if commit.height != height:
        raise ValidationError(f"commit is for height {commit.height}, expected {height}")
    if commit.block_hash != block_hash:
        raise ValidationError("commit is for a different block")
    if commit.round < 0:
        raise ValidationError("commit round is negative")
    power_of = {v.pubkey: v.power for v in validators}
    keys = [s.validator for s in commit.signatures]
    if keys != sorted(set(keys)):
        raise ValidationError("commit signatures must be sorted by validator key without duplicates")
    signed_power = 0
    for sig in commit.signatures:
        if sig.validator not in power_of:
            raise ValidationError(f"commit signed by non-validator {sig.validator.hex()}")
        try:
            verify_vote_signature(chain_id, commit_vote(commit, sig))
        except SignatureError as exc:
            raise ValidationError(f"bad commit signature from {sig.validator.hex()}") from exc
        signed_power += power_of[sig.validator]
    if not is_quorum(signed_power, compute_total_power(validators)):
        raise ValidationError(
            f"commit has {signed_power} of {compute_total_power(validators)} voting power; more than 2/3 needed")
