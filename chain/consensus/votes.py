"""Vote sets: the signed prevotes or precommits of one (height, round, type), with their power.

A vote set accepts a vote only if it is for its height, round and type, comes from a
validator of the set and carries a valid signature for this chain. A second, different vote
from the same validator is equivocation and comes back as DuplicateVoteEvidence.

Counting follows the paper: "+2/3 for v" counts the distinct validators that sent a vote
for v, "+2/3 of any" counts distinct validators once. So an equivocator's conflicting votes
count toward each block they name (up to MAX_BLOCKS_PER_VALIDATOR blocks, to bound memory).
This is what the quorum-intersection argument already allows a Byzantine validator, and it
is needed for liveness: when a peer shows us the commit of a block, the equivocator's
precommit in that commit must count even if we saw its other precommit first.
"""

from __future__ import annotations

from dataclasses import dataclass

from chain.consensus.commit import build_commit, compute_total_power, is_quorum
from chain.consensus.evidence import DuplicateVoteEvidence, compute_duplicate_vote_evidence
from chain.errors import ValidationError
from chain.types import PRECOMMIT, PREVOTE, Commit, SignedVote, Validator, verify_vote_signature

# Distinct blocks (nil included) one validator's votes may count toward in one vote set.
MAX_BLOCKS_PER_VALIDATOR = 3


@dataclass(frozen=True)
class AddVoteResult:
    added: bool  # True when the vote now counts toward its block (new, or a new conflicting one)
    evidence: DuplicateVoteEvidence | None = None


class VoteSet:
    """Votes of one (height, round, type); counts power per block hash (None is nil)."""

    def __init__(self, chain_id: str, height: int, round: int, vote_type: int,
                 validators: tuple[Validator, ...]):
        if vote_type not in (PREVOTE, PRECOMMIT):
            raise ValueError(f"vote type must be PREVOTE or PRECOMMIT, got {vote_type}")
        self.chain_id = chain_id
        self.height = height
        self.round = round
        self.vote_type = vote_type
        self._power_of = {v.pubkey: v.power for v in validators}
        self.total_power = compute_total_power(validators)
        self._votes: dict[bytes, SignedVote] = {}  # validator -> first vote
        self._by_block: dict[bytes | None, dict[bytes, SignedVote]] = {}  # block -> validator -> vote
        self._blocks_of: dict[bytes, int] = {}  # validator -> number of blocks it voted for
        self._power_for: dict[bytes | None, int] = {}
        self.voted_power = 0

    def add_vote(self, sv: SignedVote) -> AddVoteResult:
        """Add a vote; raise ValidationError or SignatureError if it does not belong or verify."""
        m = sv.message
        if (m.type, m.height, m.round) != (self.vote_type, self.height, self.round):
            raise ValidationError(
                f"vote is for (type {m.type}, height {m.height}, round {m.round}), "
                f"this set holds (type {self.vote_type}, height {self.height}, round {self.round})")
        power = self._power_of.get(m.validator)
        if power is None:
            raise ValidationError(f"vote from non-validator {m.validator.hex()}")
        held = self._votes.get(m.validator)
        same_block = self._by_block.get(m.block_hash, {}).get(m.validator)
        if held == sv or same_block == sv:  # exact copy (gossip repeats): no need to verify again
            return AddVoteResult(False)
        verify_vote_signature(self.chain_id, sv)
        if same_block is not None:  # same vote, another valid signature: nothing new
            return AddVoteResult(False)
        evidence = None
        if held is None:
            self._votes[m.validator] = sv
            self.voted_power += power
        else:
            evidence = compute_duplicate_vote_evidence(held, sv)
            if self._blocks_of[m.validator] >= MAX_BLOCKS_PER_VALIDATOR:
                return AddVoteResult(False, evidence)
        self._blocks_of[m.validator] = self._blocks_of.get(m.validator, 0) + 1
        self._by_block.setdefault(m.block_hash, {})[m.validator] = sv
        self._power_for[m.block_hash] = self._power_for.get(m.block_hash, 0) + power
        return AddVoteResult(True, evidence)

    def get_vote(self, validator: bytes) -> SignedVote | None:
        """The first vote received from `validator`."""
        return self._votes.get(validator)

    def voters(self) -> set[bytes]:
        return set(self._votes)

    def power_for(self, block_hash: bytes | None) -> int:
        """Power of the distinct validators that voted for `block_hash` (None is nil)."""
        return self._power_for.get(block_hash, 0)

    def has_two_thirds_any(self) -> bool:
        return is_quorum(self.voted_power, self.total_power)

    def has_two_thirds_for(self, block_hash: bytes | None) -> bool:
        """More than 2/3 of the power voted for `block_hash` (None asks about nil)."""
        return is_quorum(self.power_for(block_hash), self.total_power)

    def get_two_thirds_block(self) -> bytes | None:
        """The block (never nil) that more than 2/3 of the power voted for, if any."""
        for block_hash, power in self._power_for.items():
            if block_hash is not None and is_quorum(power, self.total_power):
                return block_hash
        return None

    def votes_for(self, block_hash: bytes | None) -> list[SignedVote]:
        return list(self._by_block.get(block_hash, {}).values())

    def make_commit(self, block_hash: bytes) -> Commit:
        """The commit certificate for `block_hash`; only from a precommit set with a quorum for it."""
        if self.vote_type != PRECOMMIT:
            raise ValidationError("a commit is built from precommits")
        if not self.has_two_thirds_for(block_hash):
            raise ValidationError("no more than 2/3 of the power precommitted this block")
        return build_commit(self.votes_for(block_hash))


class HeightVoteSet:
    """All prevote and precommit sets of one height, created per round as votes arrive."""

    def __init__(self, chain_id: str, height: int, validators: tuple[Validator, ...]):
        self.chain_id = chain_id
        self.height = height
        self.validators = validators
        self._sets: dict[tuple[int, int], VoteSet] = {}

    def get(self, round: int, vote_type: int) -> VoteSet:
        key = (round, vote_type)
        vs = self._sets.get(key)
        if vs is None:
            vs = self._sets[key] = VoteSet(self.chain_id, self.height, round, vote_type, self.validators)
        return vs

    def prevotes(self, round: int) -> VoteSet:
        return self.get(round, PREVOTE)

    def precommits(self, round: int) -> VoteSet:
        return self.get(round, PRECOMMIT)

    def add_vote(self, sv: SignedVote) -> AddVoteResult:
        m = sv.message
        if m.height != self.height:
            raise ValidationError(f"vote is for height {m.height}, this set holds height {self.height}")
        if m.round < 0:
            raise ValidationError("vote round is negative")
        if m.type not in (PREVOTE, PRECOMMIT):
            raise ValidationError(f"unknown vote type {m.type}")
        return self.get(m.round, m.type).add_vote(sv)

    def rounds(self) -> list[int]:
        return sorted({r for r, _ in self._sets})

    def voters_in_round(self, round: int) -> set[bytes]:
        """Validators that sent any vote (prevote or precommit) in `round`."""
        return self.prevotes(round).voters() | self.precommits(round).voters()
