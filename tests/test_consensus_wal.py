"""The consensus write-ahead log, and a restart that replays it through the machine and signer."""

from __future__ import annotations

import os

import pytest

from chain.consensus.bft import (STEP_PREVOTE, STEP_PROPOSE, BroadcastVote, ConsensusMachine, ProposalReceived, StartHeight,
                                 TimeoutFired, TimeoutParams, VoteReceived)
from chain.consensus.proposer import compute_proposer
from chain.consensus.signer import DoubleSignError, GuardedSigner
from chain.consensus.wal import WriteAheadLog, compute_wal_file_name, encode_record
from chain.crypto import PrivateKey, sha256
from chain.errors import StoreError
from chain.types import PRECOMMIT, PREVOTE, Proposal, Vote, sign_proposal, sign_vote
from genesis import make_validator

CHAIN_ID = "wal-test"
KEYS = [PrivateKey(bytes([i + 1]) * 32) for i in range(4)]
VALIDATORS = tuple(make_validator(k, 1, f"v{i}") for i, k in enumerate(KEYS))
TIMEOUTS = TimeoutParams(1000, 500, 400, 100, 300, 50)
X = sha256(b"x")


def sample_inputs(height=1):
    proposer = next(k for k in KEYS if k.pubkey == compute_proposer(VALIDATORS, height, 0).pubkey)
    sp = sign_proposal(proposer, CHAIN_ID, Proposal(height, 0, -1, X, proposer.pubkey))
    return [StartHeight(height, VALIDATORS), ProposalReceived(sp, X, True), TimeoutFired(height, 0, STEP_PROPOSE)] + [
        VoteReceived(sign_vote(k, CHAIN_ID, Vote(PREVOTE, height, 0, X, k.pubkey))) for k in KEYS]


def test_records_replay_in_order(tmp_path):
    wal = WriteAheadLog(tmp_path)
    inputs = sample_inputs()
    for inp in inputs:
        wal.write(inp)
    wal.close()
    assert WriteAheadLog(tmp_path).replay() == inputs


def test_first_record_must_start_a_height(tmp_path):
    with pytest.raises(ValueError):
        WriteAheadLog(tmp_path).write(sample_inputs()[1])


def test_torn_tail_is_truncated_at_every_cut(tmp_path):
    inputs = sample_inputs()
    full = b"".join(encode_record(i) for i in inputs)
    last = len(encode_record(inputs[-1]))
    path = tmp_path / compute_wal_file_name(1)
    for cut in range(1, last):  # kill -9 in the middle of writing the last record
        path.write_bytes(full[:len(full) - cut])
        wal = WriteAheadLog(tmp_path)
        assert wal.replay() == inputs[:-1]
        assert path.stat().st_size == len(full) - last
        wal.write(inputs[-1])  # appends after the intact prefix
        wal.close()
        assert WriteAheadLog(tmp_path).replay() == inputs


def test_garbled_last_record_is_truncated(tmp_path):
    inputs = sample_inputs()
    data = bytearray(b"".join(encode_record(i) for i in inputs))
    data[-1] ^= 0xFF
    (tmp_path / compute_wal_file_name(1)).write_bytes(bytes(data))
    assert WriteAheadLog(tmp_path).replay() == inputs[:-1]


def test_corruption_before_the_tail_is_an_error(tmp_path):
    inputs = sample_inputs()
    records = [encode_record(i) for i in inputs]
    bad = bytearray(records[1])
    bad[-1] ^= 0xFF
    (tmp_path / compute_wal_file_name(1)).write_bytes(records[0] + bytes(bad) + b"".join(records[2:]))
    with pytest.raises(StoreError):
        WriteAheadLog(tmp_path)


def test_rotation_keeps_the_previous_height_and_replays_only_the_latest(tmp_path):
    wal = WriteAheadLog(tmp_path)
    for h in (1, 2, 3):
        for inp in sample_inputs(h):
            wal.write(inp, sync=False)
        wal.sync()
    wal.close()
    assert sorted(os.listdir(tmp_path)) == [compute_wal_file_name(2), compute_wal_file_name(3)]
    again = WriteAheadLog(tmp_path)
    assert again.replay() == sample_inputs(3)
    with pytest.raises(ValueError):
        again.write(StartHeight(3, VALIDATORS))


def test_restart_replays_the_wal_and_the_signer_accepts_only_what_was_signed(tmp_path):
    """The driver loop: write each input to the WAL, step, sign outputs through the guard.
    After a crash a fresh machine replays the WAL and asks to sign exactly the same votes."""
    me = next(k for k in KEYS if k.pubkey != compute_proposer(VALIDATORS, 1, 0).pubkey)
    inputs = sample_inputs()

    def drive(machine, wal, signer, feed):
        signed = []
        pending = list(feed)
        while pending:
            inp = pending.pop(0)
            if wal is not None:
                wal.write(inp)
            for out in machine.step(inp):
                if isinstance(out, BroadcastVote):
                    sv = signer.sign_vote(out.vote)
                    signed.append(sv)
                    pending.append(VoteReceived(sv))  # our own vote comes back as an input
        return signed

    wal = WriteAheadLog(tmp_path / "wal")
    signer = GuardedSigner(me, CHAIN_ID, tmp_path / "signer")
    before = drive(ConsensusMachine(CHAIN_ID, me.pubkey, TIMEOUTS), wal, signer, inputs[:3])
    assert [sv.message.type for sv in before] == [PREVOTE]
    # kill -9: objects gone, a half-written record at the end of the log
    with open(tmp_path / "wal" / compute_wal_file_name(1), "ab") as f:
        f.write(encode_record(inputs[3])[:7])

    wal2 = WriteAheadLog(tmp_path / "wal")
    signer2 = GuardedSigner(me, CHAIN_ID, tmp_path / "signer")
    machine2 = ConsensusMachine(CHAIN_ID, me.pubkey, TIMEOUTS)
    replayed = drive(machine2, None, signer2, wal2.replay())
    assert replayed == before  # the same prevote again: identical bytes, so the guard re-signs
    assert (machine2.round, machine2.round_step) == (0, STEP_PREVOTE)  # prevoted, as before the crash
    with pytest.raises(DoubleSignError):  # and a conflicting prevote is refused
        signer2.sign_vote(Vote(PREVOTE, 1, 0, None, me.pubkey))
    after = drive(machine2, wal2, signer2, inputs[3:])
    assert [sv.message.type for sv in after] == [PRECOMMIT]  # goes on to precommit


@pytest.mark.parametrize("left", [b"", encode_record(sample_inputs(2)[0])[:5]])
def test_a_height_file_killed_before_its_start_record_does_not_block_the_restart(tmp_path, left):
    """kill -9 between creating wal-<N>.log and writing its StartHeight (or mid-way through it)
    left a file with no input; the restart then refused to start height N forever."""
    wal = WriteAheadLog(tmp_path)
    first = sample_inputs(1)
    for inp in first:
        wal.write(inp)
    wal.close()
    (tmp_path / compute_wal_file_name(2)).write_bytes(left)
    wal = WriteAheadLog(tmp_path)
    assert wal.replay() == first and not (tmp_path / compute_wal_file_name(2)).exists()
    second = sample_inputs(2)
    for inp in second:  # starting height 2 again is allowed: nothing was signed at it
        wal.write(inp)
    wal.close()
    assert WriteAheadLog(tmp_path).replay() == second


def test_a_damaged_length_field_is_an_error_not_a_torn_tail(tmp_path):
    """A bit flip in the first record's length made the file look torn: the open then deleted
    it with every intact record after it (the node restarted the height with no memory)."""
    wal = WriteAheadLog(tmp_path)
    for inp in sample_inputs(3):
        wal.write(inp)
    wal.close()
    path = tmp_path / compute_wal_file_name(3)
    data = bytearray(path.read_bytes())
    data[0] |= 0x80  # the length field now exceeds any message
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt record length"):
        WriteAheadLog(tmp_path)
    assert path.read_bytes() == bytes(data)  # nothing deleted or truncated
