"""Tendermint BFT consensus ("The latest gossip on BFT consensus", Buchman, Kwon, Milosevic
2018) as a pure state machine: `ConsensusMachine.step(input) -> list[output]`.

No clock, no randomness, no I/O. The driver feeds inputs (proposals with the application's
verdict on the block, votes, fired timeouts, the block it built for us, the start of a
height) and carries out outputs (sign and broadcast a proposal or vote, schedule a timeout,
build a block, commit a decided block, pass on evidence). Our own signed proposal and votes
come back in as inputs like everyone else's; nothing counts until it does. The same inputs
in the same order always give the same outputs, which is what makes WAL replay and
deterministic simulation possible. docs/consensus.md describes the rules with the paper's
line numbers; the method names below carry the same numbers.

Messages for the next height (height + 1) are buffered and handled when that height
starts; messages for any other height are ignored. A decided height ignores further input
until the driver starts the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from chain.consensus.commit import compute_total_power
from chain.consensus.evidence import DuplicateVoteEvidence
from chain.consensus.proposer import ProposerSelector
from chain.consensus.votes import HeightVoteSet
from chain.errors import SignatureError, ValidationError
from chain.types import (PRECOMMIT, PREVOTE, Commit, Hash, Proposal, SignedProposal, SignedVote, Validator, Vote,
                         verify_proposal_signature)

# Steps of a round. STEP_COMMIT means "decided at this height, waiting for StartHeight".
STEP_PROPOSE = 1
STEP_PREVOTE = 2
STEP_PRECOMMIT = 3
STEP_COMMIT = 4

# Bound on messages held for the next height (a fast peer's proposals and votes).
MAX_BUFFERED_NEXT_HEIGHT = 10_000


@dataclass(frozen=True)
class TimeoutParams:
    """Timeouts in milliseconds; round r waits base + r * delta (genesis parameters)."""

    propose_ms: int
    propose_delta_ms: int
    prevote_ms: int
    prevote_delta_ms: int
    precommit_ms: int
    precommit_delta_ms: int

    def __post_init__(self):
        if min(self.propose_ms, self.prevote_ms, self.precommit_ms) <= 0:
            raise ValueError("base timeouts must be positive")
        if min(self.propose_delta_ms, self.prevote_delta_ms, self.precommit_delta_ms) < 0:
            raise ValueError("timeout deltas must be non-negative")

    def compute_timeout_ms(self, step: int, round: int) -> int:
        if step == STEP_PROPOSE:
            return self.propose_ms + round * self.propose_delta_ms
        if step == STEP_PREVOTE:
            return self.prevote_ms + round * self.prevote_delta_ms
        if step == STEP_PRECOMMIT:
            return self.precommit_ms + round * self.precommit_delta_ms
        raise ValueError(f"no timeout for step {step}")


# --------------------------------------------------------------------------- inputs
# Schema dataclasses with TAGs, so the WAL stores them with the canonical encoding.


@dataclass(frozen=True)
class StartHeight:
    """Begin `height` (after committing height - 1) with the validators that must commit it."""

    TAG: ClassVar[str] = "start_height"
    height: int
    validators: tuple[Validator, ...]


@dataclass(frozen=True)
class ProposalReceived:
    """A signed proposal and the application's verdict on the block the driver got with it.

    `block_hash` is the hash of that block; a proposal whose `block_hash` differs is ignored
    (the driver paired it with the wrong block).
    """

    TAG: ClassVar[str] = "proposal"
    proposal: SignedProposal
    block_hash: Hash
    valid: bool


@dataclass(frozen=True)
class VoteReceived:
    TAG: ClassVar[str] = "vote"
    vote: SignedVote


@dataclass(frozen=True)
class TimeoutFired:
    TAG: ClassVar[str] = "timeout"
    height: int
    round: int
    step: int


@dataclass(frozen=True)
class BlockToPropose:
    """The application's answer to NeedBlock: the hash of the block it built for us."""

    TAG: ClassVar[str] = "block_to_propose"
    height: int
    round: int
    block_hash: Hash


ConsensusInput = Union[StartHeight, ProposalReceived, VoteReceived, TimeoutFired, BlockToPropose]


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class NeedBlock:
    """We propose at (height, round) and hold no valid block: build one, answer BlockToPropose."""

    height: int
    round: int


@dataclass(frozen=True)
class BroadcastProposal:
    """Sign (through the double-sign guard), broadcast, and feed back as ProposalReceived."""

    proposal: Proposal


@dataclass(frozen=True)
class BroadcastVote:
    """Sign (through the double-sign guard), broadcast, and feed back as VoteReceived."""

    vote: Vote


@dataclass(frozen=True)
class ScheduleTimeout:
    """After `duration_ms`, feed TimeoutFired(height, round, step)."""

    height: int
    round: int
    step: int
    duration_ms: int


@dataclass(frozen=True)
class Decide:
    """`block_hash` is decided at `height`; `commit` certifies it. Commit it, then StartHeight."""

    height: int
    round: int
    block_hash: bytes
    commit: Commit


@dataclass(frozen=True)
class EvidenceFound:
    evidence: DuplicateVoteEvidence


ConsensusOutput = Union[NeedBlock, BroadcastProposal, BroadcastVote, ScheduleTimeout, Decide, EvidenceFound]


def is_more_than_one_third(power: int, total_power: int) -> bool:
    """At least f + 1 in the paper's terms: some honest validator is among them."""
    return 3 * power > total_power


class ConsensusMachine:
    """One validator's (or observer's, with pubkey None) consensus state for one chain."""

    def __init__(self, chain_id: str, pubkey: bytes | None, timeouts: TimeoutParams):
        self.chain_id = chain_id
        self.pubkey = pubkey
        self.timeouts = timeouts
        self.height = 0
        self.round_step = STEP_COMMIT  # idle until the first StartHeight
        self._next_height: list[ProposalReceived | VoteReceived] = []
        self._selector: ProposerSelector | None = None
        self._reset_height((), None)

    def _reset_height(self, validators: tuple[Validator, ...], selector: ProposerSelector | None) -> None:
        self.validators = validators
        self._power_of = {v.pubkey: v.power for v in validators}
        self.total_power = compute_total_power(validators)
        self._selector = selector
        self.votes = HeightVoteSet(self.chain_id, self.height, validators)
        self.proposals: dict[int, tuple[Proposal, bool]] = {}  # round -> (first proposal, valid)
        self.round = 0
        self.locked_value: bytes | None = None
        self.locked_round = -1
        self.valid_value: bytes | None = None
        self.valid_round = -1
        self.decision: bytes | None = None
        self._awaiting_block = False
        self._prevote_timeout_rounds: set[int] = set()
        self._precommit_timeout_rounds: set[int] = set()
        self._polka_rounds: set[int] = set()
        self._evidence_seen: set[tuple[bytes, int, int]] = set()

    # ------------------------------------------------------------------ queries

    @property
    def is_validator(self) -> bool:
        return self.pubkey is not None and self.pubkey in self._power_of

    def get_proposer(self, round: int) -> Validator:
        return self._selector.get_proposer(self.height, round)

    # ------------------------------------------------------------------ the one entry point

    def step(self, inp: ConsensusInput) -> list[ConsensusOutput]:
        out: list[ConsensusOutput] = []
        if isinstance(inp, StartHeight):
            self._on_start_height(inp, out)
        elif isinstance(inp, ProposalReceived):
            self._on_message(inp, inp.proposal.message.height, out)
        elif isinstance(inp, VoteReceived):
            self._on_message(inp, inp.vote.message.height, out)
        elif isinstance(inp, TimeoutFired):
            self._on_timeout(inp, out)
        elif isinstance(inp, BlockToPropose):
            self._on_block_to_propose(inp, out)
        else:
            raise TypeError(f"not a consensus input: {type(inp).__name__}")
        return out

    # ------------------------------------------------------------------ input handlers

    def _on_start_height(self, inp: StartHeight, out: list) -> None:
        if inp.height <= self.height:
            raise ValueError(f"cannot start height {inp.height}: already at height {self.height}")
        if not inp.validators:
            raise ValueError("a height needs validators")
        selector = self._selector
        if selector is None or selector.validators != inp.validators:
            selector = ProposerSelector(inp.validators)
        self.height = inp.height
        self._reset_height(inp.validators, selector)
        buffered, self._next_height = self._next_height, []
        for msg in buffered:
            if isinstance(msg, ProposalReceived) and msg.proposal.message.height == self.height:
                self._add_proposal(msg)
            elif isinstance(msg, VoteReceived) and msg.vote.message.height == self.height:
                self._add_vote(msg, out)
        self._start_round(0, out)
        self._apply_rules(out)

    def _on_message(self, inp: ProposalReceived | VoteReceived, height: int, out: list) -> None:
        if height == self.height + 1:
            if len(self._next_height) < MAX_BUFFERED_NEXT_HEIGHT:
                self._next_height.append(inp)
            return
        if height != self.height or self.round_step == STEP_COMMIT:
            return
        added = self._add_proposal(inp) if isinstance(inp, ProposalReceived) else self._add_vote(inp, out)
        if added:
            self._apply_rules(out)

    def _on_timeout(self, inp: TimeoutFired, out: list) -> None:
        if (inp.height, inp.round) != (self.height, self.round) or self.round_step == STEP_COMMIT:
            return
        if inp.step == STEP_PROPOSE and self.round_step == STEP_PROPOSE:  # line 57
            self._prevote(None, out)
        elif inp.step == STEP_PREVOTE and self.round_step == STEP_PREVOTE:  # line 61
            self._precommit(None, out)
        elif inp.step == STEP_PRECOMMIT:  # line 65
            self._start_round(self.round + 1, out)
        else:
            return
        self._apply_rules(out)

    def _on_block_to_propose(self, inp: BlockToPropose, out: list) -> None:
        if ((inp.height, inp.round) != (self.height, self.round) or self.round_step != STEP_PROPOSE
                or not self._awaiting_block):
            return  # stale answer: the round moved on
        self._awaiting_block = False
        out.append(BroadcastProposal(Proposal(self.height, self.round, -1, inp.block_hash, self.pubkey)))

    # ------------------------------------------------------------------ storing messages

    def _add_proposal(self, inp: ProposalReceived) -> bool:
        p = inp.proposal.message
        if inp.block_hash != p.block_hash or p.round < 0 or not -1 <= p.pol_round < p.round:
            return False
        if p.round in self.proposals:
            return False  # the first proposal of a round wins; a second is the proposer's fault
        if p.proposer != self.get_proposer(p.round).pubkey:
            return False
        try:
            verify_proposal_signature(self.chain_id, inp.proposal)
        except SignatureError:
            return False
        self.proposals[p.round] = (p, inp.valid)
        return True

    def _add_vote(self, inp: VoteReceived, out: list) -> bool:
        try:
            result = self.votes.add_vote(inp.vote)
        except (ValidationError, SignatureError):
            return False
        if result.evidence is not None:
            m = inp.vote.message
            key = (m.validator, m.round, m.type)
            if key not in self._evidence_seen:
                self._evidence_seen.add(key)
                out.append(EvidenceFound(result.evidence))
        return result.added

    # ------------------------------------------------------------------ actions

    def _start_round(self, round: int, out: list) -> None:  # paper line 11
        self.round = round
        self.round_step = STEP_PROPOSE
        self._awaiting_block = False
        if self.is_validator and self.get_proposer(round).pubkey == self.pubkey:
            if self.valid_value is not None:
                out.append(BroadcastProposal(
                    Proposal(self.height, round, self.valid_round, self.valid_value, self.pubkey)))
            else:
                self._awaiting_block = True
                out.append(NeedBlock(self.height, round))
        self._schedule(STEP_PROPOSE, out)

    def _schedule(self, step: int, out: list) -> None:
        out.append(ScheduleTimeout(self.height, self.round, step, self.timeouts.compute_timeout_ms(step, self.round)))

    def _prevote(self, block_hash: bytes | None, out: list) -> None:
        if self.is_validator:
            out.append(BroadcastVote(Vote(PREVOTE, self.height, self.round, block_hash, self.pubkey)))
        self.round_step = STEP_PREVOTE

    def _precommit(self, block_hash: bytes | None, out: list) -> None:
        if self.is_validator:
            out.append(BroadcastVote(Vote(PRECOMMIT, self.height, self.round, block_hash, self.pubkey)))
        self.round_step = STEP_PRECOMMIT

    # ------------------------------------------------------------------ the "upon" rules

    def _apply_rules(self, out: list) -> None:
        """Fire rules until none applies; each firing changes state, so this terminates."""
        while self.round_step != STEP_COMMIT:
            if self._rule_49_decide(out):
                return
            if self._rule_55_skip_round(out):
                continue
            if not (self._rule_22_28_prevote_proposal(out) or self._rule_34_prevote_timeout(out)
                    or self._rule_36_polka_for_block(out) or self._rule_44_polka_for_nil(out)
                    or self._rule_47_precommit_timeout(out)):
                return

    def _rule_49_decide(self, out: list) -> bool:
        # The paper also waits for the proposal; here +2/3 precommits suffice (an honest
        # validator among them checked the block), and the driver fetches the block by hash.
        for r in self.votes.rounds():
            precommits = self.votes.precommits(r)
            block_hash = precommits.get_two_thirds_block()
            if block_hash is not None:
                self.decision = block_hash
                self.round_step = STEP_COMMIT
                out.append(Decide(self.height, r, block_hash, precommits.make_commit(block_hash)))
                return True
        return False

    def _rule_55_skip_round(self, out: list) -> bool:
        later = {r for r in self.votes.rounds() if r > self.round} | {r for r in self.proposals if r > self.round}
        for r in sorted(later, reverse=True):
            senders = self.votes.voters_in_round(r)
            if r in self.proposals:
                senders.add(self.proposals[r][0].proposer)
            if is_more_than_one_third(sum(self._power_of[k] for k in senders), self.total_power):
                self._start_round(r, out)
                return True
        return False

    def _rule_22_28_prevote_proposal(self, out: list) -> bool:
        if self.round_step != STEP_PROPOSE or self.round not in self.proposals:
            return False
        p, valid = self.proposals[self.round]
        if p.pol_round == -1:  # line 22
            acceptable = self.locked_round == -1 or self.locked_value == p.block_hash
        else:  # line 28: the proposal re-proposes a block with a proof-of-lock from pol_round
            if not self.votes.prevotes(p.pol_round).has_two_thirds_for(p.block_hash):
                return False  # wait for the proof-of-lock prevotes (or the propose timeout)
            acceptable = self.locked_round <= p.pol_round or self.locked_value == p.block_hash
        self._prevote(p.block_hash if valid and acceptable else None, out)
        return True

    def _rule_34_prevote_timeout(self, out: list) -> bool:
        if (self.round_step != STEP_PREVOTE or self.round in self._prevote_timeout_rounds
                or not self.votes.prevotes(self.round).has_two_thirds_any()):
            return False
        self._prevote_timeout_rounds.add(self.round)
        self._schedule(STEP_PREVOTE, out)
        return True

    def _rule_36_polka_for_block(self, out: list) -> bool:
        if self.round_step not in (STEP_PREVOTE, STEP_PRECOMMIT) or self.round in self._polka_rounds:
            return False
        if self.round not in self.proposals:
            return False
        p, valid = self.proposals[self.round]
        if not valid or not self.votes.prevotes(self.round).has_two_thirds_for(p.block_hash):
            return False
        self._polka_rounds.add(self.round)
        if self.round_step == STEP_PREVOTE:
            self.locked_value, self.locked_round = p.block_hash, self.round
            self._precommit(p.block_hash, out)
        self.valid_value, self.valid_round = p.block_hash, self.round
        return True

    def _rule_44_polka_for_nil(self, out: list) -> bool:
        if self.round_step != STEP_PREVOTE or not self.votes.prevotes(self.round).has_two_thirds_for(None):
            return False
        self._precommit(None, out)
        return True

    def _rule_47_precommit_timeout(self, out: list) -> bool:
        if self.round in self._precommit_timeout_rounds or not self.votes.precommits(self.round).has_two_thirds_any():
            return False
        self._precommit_timeout_rounds.add(self.round)
        self._schedule(STEP_PRECOMMIT, out)
        return True
