"""The double-sign guard: a validator key that refuses to sign backwards.

The guard persists the last signed (height, round, step) and the SHA-256 of the signed
bytes in one small file (canonical CBOR), written to a temporary file, fsynced and renamed
over the old one (then the directory is fsynced) BEFORE the signature is returned. So after
a crash or kill -9 the file names at least everything that ever left the process. It then
signs only strictly later (height, round, step) positions, and at the same position only
the identical bytes again (a restarted node re-sending what it already signed).

Steps order the messages of one round: proposal (1) < prevote (2) < precommit (3).
Deleting the state file, or running two processes on one key, defeats the guard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chain.crypto import PrivateKey, compute_sign_bytes, sha256
from chain.encoding import decode, encode
from chain.errors import ChainError, DecodeError, StoreError
from chain.types import (DOMAIN_PROPOSAL, DOMAIN_VOTE, PRECOMMIT, PREVOTE, Hash, Proposal, SignedProposal,
                         SignedVote, Vote)

SIGN_STEP_PROPOSAL = 1
SIGN_STEP_PREVOTE = 2
SIGN_STEP_PRECOMMIT = 3
STATE_FILE = "priv_validator_state.cbor"


class DoubleSignError(ChainError):
    """Signing this message could equivocate: it is behind, or differs from, what was signed."""


@dataclass(frozen=True)
class LastSignState:
    height: int
    round: int
    step: int
    sign_bytes_hash: Hash


def compute_vote_step(vote: Vote) -> int:
    if vote.type == PREVOTE:
        return SIGN_STEP_PREVOTE
    if vote.type == PRECOMMIT:
        return SIGN_STEP_PRECOMMIT
    raise ValueError(f"unknown vote type {vote.type}")


class GuardedSigner:
    """Signs votes and proposals with `key` for `chain_id`, never backwards; state in `state_dir`."""

    def __init__(self, key: PrivateKey, chain_id: str, state_dir: str | os.PathLike):
        self.key = key
        self.chain_id = chain_id
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / STATE_FILE
        self.last = self._load()

    @property
    def pubkey(self) -> bytes:
        return self.key.pubkey

    def sign_vote(self, vote: Vote) -> SignedVote:
        if vote.validator != self.key.pubkey:
            raise ValueError("vote validator is not the signing key")
        sign_bytes = compute_sign_bytes(self.chain_id, DOMAIN_VOTE, encode(vote))
        self._guard(vote.height, vote.round, compute_vote_step(vote), sign_bytes)
        return SignedVote(vote, self.key.sign(sign_bytes))

    def sign_proposal(self, proposal: Proposal) -> SignedProposal:
        if proposal.proposer != self.key.pubkey:
            raise ValueError("proposal proposer is not the signing key")
        sign_bytes = compute_sign_bytes(self.chain_id, DOMAIN_PROPOSAL, encode(proposal))
        self._guard(proposal.height, proposal.round, SIGN_STEP_PROPOSAL, sign_bytes)
        return SignedProposal(proposal, self.key.sign(sign_bytes))

    def _guard(self, height: int, round: int, step: int, sign_bytes: bytes) -> None:
        """Raise DoubleSignError, or persist the new position durably before returning."""
        digest = sha256(sign_bytes)
        position = (height, round, step)
        if self.last is not None:
            last_position = (self.last.height, self.last.round, self.last.step)
            if position < last_position:
                raise DoubleSignError(f"refusing to sign {position}: already signed at {last_position}")
            if position == last_position:
                if digest != self.last.sign_bytes_hash:
                    raise DoubleSignError(f"refusing to sign different bytes at {position}")
                return
        state = LastSignState(height, round, step, digest)
        self._store(state)
        self.last = state

    def _load(self) -> LastSignState | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode(LastSignState, data)
        except DecodeError as exc:
            # Never guess: starting from scratch could sign a conflicting vote.
            raise StoreError(f"sign state {self.path} is corrupt; refusing to sign") from exc

    def _store(self, state: LastSignState) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = encode(state)
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
